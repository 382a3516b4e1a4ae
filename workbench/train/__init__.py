"""Training shared by fine-tuning after pruning and quantization-aware training: one loop, written once.

loop.py is the loop (`fit`), options.py its options (plain data), finetuning.py the body of the training
stages (losses from the run's task, per-epoch evaluation, checkpoints). Import the module you need.
"""
