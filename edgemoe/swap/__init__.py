"""The swap rules: how an expert cache under a memory budget decides, shared by runtime and compiler.

What a device needs to keep experts within a budget — the bookkeeping and its decision rules
(:mod:`.book`), eviction policies (:mod:`.policies`), prefetch predictors and lookahead
(:mod:`.predict`), one MoE step's protocol (:mod:`.step`), task-switch moves (:mod:`.switch`) and
the budget check (:mod:`.budget`). The runtime's cache and the compiler's simulator
(:mod:`edgemoe.schedule`) both run these rules, so they make the same decisions and log the same
events for the same trace. Pure Python (numpy for the predictors' tables); no compiler code.
"""

from .book import EVENTS, CacheBook, Key, prefetch_rule
from .budget import ThrashWarning, check_budget, expert_sizes, parse_budget, parse_bytes, shared_bytes
from .policies import LFU, LRU, POLICIES, Planned, Policy, make_policy
from .predict import PREDICTORS, PREFETCH_DEPTH, Affinity, Predictor, PreGate, Static, lookahead, predictor_from_json
from .step import begin_run, run_step
from .switch import SwitchMoves, plan_switch, switch_entry

__all__ = [
    "EVENTS",
    "LFU",
    "LRU",
    "POLICIES",
    "PREDICTORS",
    "PREFETCH_DEPTH",
    "Affinity",
    "CacheBook",
    "Key",
    "Planned",
    "Policy",
    "PreGate",
    "Predictor",
    "Static",
    "SwitchMoves",
    "ThrashWarning",
    "begin_run",
    "check_budget",
    "expert_sizes",
    "lookahead",
    "make_policy",
    "parse_budget",
    "parse_bytes",
    "plan_switch",
    "predictor_from_json",
    "prefetch_rule",
    "run_step",
    "shared_bytes",
    "switch_entry",
]
