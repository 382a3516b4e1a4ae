"""The ground floor's facts about this machine: its CPU (cpu.py) and how ONNX Runtime is set up to run on it
(ort.py). They import nothing else of the workbench, so qdq/ (which converts graphs for this CPU) and runtime/ (which
runs them) both read them without importing each other."""
