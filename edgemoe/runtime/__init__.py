"""The on-device runtime: reads a bundle and runs it.

Imports only the bundle format, numpy and an executor's runtime library (onnxruntime) —
never torch and never the compiler — so ``pip install edgemoe[runtime]`` is enough on a device.
"""

from .inputs import load_input
from .session import GenerationStats, Session, SessionStats
from .task_switch import SwitchStats

__all__ = ["GenerationStats", "Session", "SessionStats", "SwitchStats", "load_input"]
