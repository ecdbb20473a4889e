"""Stage 4b: per-expert mixed precision (after MC-MoE) as an integer program.

Each shipped expert e gets one bit-width b from the choices. Its cost is the stored bytes
bytes(e, b); its damage is importance(e) · error(e, b), where importance comes from the
routing traces (how often each task chooses the expert, times its mean gate score; every task's
importances scaled so that its damage at the lowest bit-width is 1, see :func:`balance_tasks`)
and error(e, b) is the expert's measured relative output error at b bits on the calibration
tokens routed to it. scipy's HiGHS solves::

    min  Σ_e Σ_b importance(e) · error(e, b) · x[e, b]
    s.t. Σ_b x[e, b] = 1                        for every expert e
         Σ_e Σ_b bytes(e, b) · x[e, b] ≤ budget  (or Σ bits · weights ≤ avg_bits · Σ weights)
         x binary
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# Experts never routed to on calibration data still cost something to damage (they may be used).
IMPORTANCE_FLOOR = 1e-6


@dataclass(frozen=True)
class ExpertChoice:
    """Inputs of the solver for one expert.

    Attributes:
        key: (layer, expert).
        importance: Routing importance (frequency × mean gate score, tasks balanced).
        weights: Number of quantized weight values (2-D tensors).
        bytes: Stored bytes per bit-width.
        error: Relative output error per bit-width.
    """

    key: tuple[int, int]
    importance: float
    weights: int
    bytes: dict[int, int]
    error: dict[int, float]


@dataclass(frozen=True)
class BitPlan:
    """The solver's answer.

    Attributes:
        bits: Bit-width per (layer, expert).
        total_bytes: Stored bytes of all experts under the plan.
        avg_bits: Nominal average bits per weight value.
        objective: Importance-weighted error of the plan.
        solve_seconds: Wall time of the solve.
        budget_bytes: The byte budget solved for (None when solved for an average bit-width).
    """

    bits: dict[tuple[int, int], int]
    total_bytes: int
    avg_bits: float
    objective: float
    solve_seconds: float
    budget_bytes: int | None


def plan_expert_bits(
    experts: list[ExpertChoice],
    choices: tuple[int, ...],
    budget_bytes: int | None = None,
    avg_bits: float | None = None,
) -> BitPlan:
    """Choose a bit-width per expert under a byte budget or an average bit-width.

    Raises:
        ConfigError: The budget is below what the lowest bit-width needs, or no constraint given.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if (budget_bytes is None) == (avg_bits is None):
        raise ConfigError("mixed precision needs exactly one of a weight budget or an average bit-width")
    choices = tuple(sorted(choices))
    n, m = len(experts), len(choices)
    floor_bytes = sum(e.bytes[choices[0]] for e in experts)
    if budget_bytes is not None and budget_bytes < floor_bytes:
        raise ConfigError(
            f"weight budget {budget_bytes:,} B is below the {floor_bytes:,} B the experts need at "
            f"{choices[0]} bits; raise the budget or drop experts (pruning)"
        )
    cost = np.array([max(e.importance, IMPORTANCE_FLOOR) * e.error[b] for e in experts for b in choices])
    one_each = np.zeros((n, n * m))
    for i in range(n):
        one_each[i, i * m : (i + 1) * m] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    if budget_bytes is not None:
        row = np.array([e.bytes[b] for e in experts for b in choices], dtype=float)
        constraints.append(LinearConstraint(row[None], -np.inf, budget_bytes))
    else:
        row = np.array([b * e.weights for e in experts for b in choices], dtype=float)
        constraints.append(LinearConstraint(row[None], -np.inf, avg_bits * sum(e.weights for e in experts)))
    start = time.perf_counter()
    res = milp(
        cost, constraints=constraints, integrality=np.ones(n * m), bounds=Bounds(0, 1), options={"time_limit": 30.0}
    )
    seconds = time.perf_counter() - start
    if res.x is None:
        raise ConfigError(f"mixed-precision solver found no plan: {res.message}")
    x = np.rint(res.x).reshape(n, m)
    bits = {e.key: choices[int(np.argmax(x[i]))] for i, e in enumerate(experts)}
    total = sum(e.bytes[bits[e.key]] for e in experts)
    weights = sum(e.weights for e in experts)
    return BitPlan(
        bits=bits,
        total_bytes=total,
        avg_bits=sum(bits[e.key] * e.weights for e in experts) / max(weights, 1),
        objective=float(sum(max(e.importance, IMPORTANCE_FLOOR) * e.error[bits[e.key]] for e in experts)),
        solve_seconds=seconds,
        budget_bytes=budget_bytes,
    )


def routing_importance(
    manifest: dict, mean_scores: dict[tuple[int, int], float]
) -> dict[str, dict[tuple[int, int], float]]:
    """Importance per task and (layer, expert): its share of the task's routed slots × its mean gate score."""
    out: dict[str, dict[tuple[int, int], float]] = {}
    for name, task in manifest["tasks"].items():
        imp = out.setdefault(name, {})
        for layer, counts in enumerate(task["expert_counts"]):
            total = max(sum(counts), 1)
            for e, c in enumerate(counts):
                if c:
                    imp[(layer, e)] = c / total * mean_scores.get((layer, e), 1.0)
    return out


def balance_tasks(
    per_task: dict[str, dict[tuple[int, int], float]], lowest_error: dict[tuple[int, int], float]
) -> dict[tuple[int, int], float]:
    """Combine per-task importances so that every task weighs the same in the objective.

    Each task's importance is divided by its damage with all of its experts at the lowest
    bit-width (Σ importance · error). The objective then sums the tasks' *relative* damage, so
    the solver cannot buy a small gain on one task with a large relative loss on another whose
    experts happen to carry lower gate scores or errors (tasks of a multi-task model are judged
    each on its own metric).
    """
    out: dict[tuple[int, int], float] = {}
    for imp in per_task.values():
        damage = sum(v * lowest_error.get(k, 0.0) for k, v in imp.items())
        scale = 1.0 / damage if damage > 0 else 1.0
        for k, v in imp.items():
            out[k] = out.get(k, 0.0) + v * scale
    return out
