"""Moved to hardware/cpu.py, the ground floor (qdq/ reads CPU facts too, and must not import runtime/).

This path stays for code written against it: it is the same module object as workbench.hardware.cpu (not a copy of
its names), so a test's stub of `workbench.runtime.cpu.cpu_info` is the one every reader sees.
"""

import sys

from ..hardware import cpu as _cpu

sys.modules[__name__] = _cpu
