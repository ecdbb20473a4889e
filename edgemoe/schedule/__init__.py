"""The compiler's side of expert swapping: routing traces, a simulator, Belady's bound and the planner.

The rules themselves (cache bookkeeping, policies, predictors, one step's protocol, task switches,
budget checks) are :mod:`edgemoe.swap`, which the runtime runs too; the simulator replays them on
a virtual clock. Pure Python over numpy except :func:`~edgemoe.schedule.traces.trace_inputs`, which
rebuilds the source model (compiler extra) to draw the compile's calibration inputs.
"""

from .belady import Belady
from .planner import Schedule, plan_bundle, write_schedule
from .simulate import SimResult, SwitchResult, simulate, simulate_switch
from .traces import Step, Trace, bundle_traces, record_trace, trace_inputs

__all__ = [
    "Belady",
    "Schedule",
    "SimResult",
    "Step",
    "SwitchResult",
    "Trace",
    "bundle_traces",
    "plan_bundle",
    "record_trace",
    "simulate",
    "simulate_switch",
    "trace_inputs",
    "write_schedule",
]
