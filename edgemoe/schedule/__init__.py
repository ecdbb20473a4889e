"""Memory-aware expert swapping: routing traces, cache policies, prefetch predictors, a simulator and a planner.

Pure Python over numpy except :func:`~edgemoe.schedule.traces.trace_inputs`, which rebuilds the
source model (compiler extra) to draw the compile's calibration inputs.
"""

from .planner import Schedule, ThrashWarning, check_budget, parse_budget, plan_bundle, write_schedule
from .policies import LFU, LRU, POLICIES, Belady, CacheBook, Planned, Policy, make_policy
from .predict import PREDICTORS, Affinity, Predictor, PreGate, Static, make_predictor, predictor_from_json
from .simulate import SimResult, SwitchResult, simulate, simulate_switch
from .switch import SwitchMoves, plan_switch, switch_entry
from .traces import Step, Trace, bundle_traces, record_trace, trace_inputs

__all__ = [
    "LFU",
    "LRU",
    "POLICIES",
    "PREDICTORS",
    "Affinity",
    "Belady",
    "CacheBook",
    "Planned",
    "Policy",
    "PreGate",
    "Predictor",
    "Schedule",
    "SimResult",
    "Static",
    "Step",
    "SwitchMoves",
    "SwitchResult",
    "ThrashWarning",
    "Trace",
    "bundle_traces",
    "check_budget",
    "make_policy",
    "make_predictor",
    "parse_budget",
    "plan_bundle",
    "plan_switch",
    "predictor_from_json",
    "record_trace",
    "simulate",
    "simulate_switch",
    "switch_entry",
    "trace_inputs",
    "write_schedule",
]
