"""The swap planner: from routing traces, a device and a budget to a schedule stored in the bundle.

Per task the schedule holds the always-resident set (shared experts plus the hottest routed
experts), the cache capacity, the eviction policy with its learned probabilities, the prefetch
plan and, between tasks, what to unload and load on a switch. :func:`plan_bundle` also scores
every policy and predictor on held-out traces against Belady's MIN on the same trace.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.format import MANIFEST, graph_bytes, read_manifest
from ..devices import DeviceProfile, get_device
from ..errors import ConfigError
from ..swap.book import CacheBook, Key
from ..swap.budget import check_budget, expert_sizes, parse_budget, shared_bytes
from ..swap.policies import POLICIES, make_policy
from ..swap.predict import PREDICTORS, PREFETCH_DEPTH, Predictor, Static, make_predictor, predictor_from_json
from .belady import Belady
from .simulate import DenseCost, SimResult, SwitchResult, simulate, simulate_switch
from .traces import Trace, bundle_traces

# Prefetch must save this share of the simulated time over what it replaces (see choose_predictor).
PREFETCH_MARGIN = 0.02
# Experts used in at least this fraction of their layer's calibration steps are kept resident,
# in at most this share of the cache (the rest streams: prefetches never evict the resident set).
HOT = 0.9
RESIDENT_SHARE = 0.5


def dense_cost(manifest: dict, task: str) -> DenseCost:
    """Bytes of ``task``'s dense graphs around each MoE layer, for the simulator's compute time."""
    graphs, segments, record = manifest["graphs"], manifest["segments"], manifest["tasks"][task]
    layers = len(manifest["moe_layers"])

    def size(name: str | None) -> int:
        return graph_bytes(graphs[name]) if name in graphs else 0

    gates = list(record.get("gates", []))
    before = tuple(size(segments[li]) + size(gates[li] if li < len(gates) else None) for li in range(layers))
    after = sum(size(name) for name in segments[layers:]) + size(record.get("head"))
    return DenseCost(before, after, tuple(int(layer["top_k"]) for layer in manifest["moe_layers"]))


@dataclass(frozen=True)
class Schedule:
    """The plan stored under the manifest's ``schedule`` key.

    Attributes:
        device: Device profile name.
        budget_bytes: Memory for expert weights (routed and shared).
        shared_bytes: Bytes of shared experts (always resident).
        cache_bytes: Capacity for routed experts (budget less shared experts).
        policy: Eviction policy.
        predictor: Prefetch predictor, or None where the plan's simulation says prefetch does not pay.
        granularity: Trace granularity the plan was built on.
        tasks: Per task: resident experts, per-expert probabilities, prefetch plan.
        task_switch: Per ``"A->B"``: experts to unload, load, keep and drop from the cache, and the
            simulator's predicted ``cost`` (bytes, seconds on the device) from A's held-out trace.
    """

    device: str
    budget_bytes: int
    shared_bytes: int
    cache_bytes: int
    policy: str
    predictor: str | None
    granularity: str
    tasks: dict
    task_switch: dict

    def to_json(self) -> dict:
        """Manifest form."""
        return dict(self.__dict__)


def resident_room(capacity: int, sizes: dict[Key, int]) -> int:
    """Bytes a task's resident set may take: RESIDENT_SHARE of the cache, leaving room for its largest expert."""
    return max(0, min(int(capacity * RESIDENT_SHARE), capacity - max(sizes.values(), default=0)))


def _resident(prob: list[list[float]], sizes: dict[Key, int], room: int) -> list[Key]:
    """Hottest experts (used in >= HOT of their layer's steps) that fit in ``room`` bytes."""
    hot = sorted(((p, (li, e)) for li, ps in enumerate(prob) for e, p in enumerate(ps) if p >= HOT), reverse=True)
    out, used = [], 0
    for _, key in hot:
        if key in sizes and used + sizes[key] <= room:
            out.append(key)
            used += sizes[key]
    return sorted(out)


# Recency tables of the planned policy: visits since an expert's last use are told apart up to this
# many (older uses pooled), and each hazard estimate is smoothed toward the layer's mean use rate
# with the weight of this many visits (calibration traces are short).
RECENCY_VISITS = 8
RECENCY_PRIOR = 4.0
# The (visits, prior) pairs a plan chooses from on its calibration trace: sticky routing (long runs of
# one expert, long gaps after) is told apart further back than routing that changes at every token.
RECENCY_CHOICES = (
    (RECENCY_VISITS, RECENCY_PRIOR),
    *((v, p) for v in (8, 16, 32, 64) for p in (4.0, 32.0) if (v, p) != (RECENCY_VISITS, RECENCY_PRIOR)),
)


def recency_table(trace: Trace, visits: int = RECENCY_VISITS, prior: float = RECENCY_PRIOR) -> list[list[float]]:
    """Per layer, expected visits until an expert is used again by visits since its last use (planned policy).

    Counted on a (calibration) trace, pooled over the layer's experts: ``h[r]``, the share of visits
    that use an expert last used ``r`` visits before (``r >= visits`` pooled), smoothed toward the
    layer's mean use rate; then ``E[r] = 1 + (1 - h[r]) E[r + 1]`` with ``E[visits] = 1 / h[visits]``.

    Returns:
        ``table[l][r - 1]`` for ``r`` in ``1..visits``.
    """
    n = np.zeros((trace.num_layers, visits + 1))
    used = np.zeros((trace.num_layers, visits + 1))
    since: dict[Key, int] = {}
    for s in trace.steps:
        now = set(s.experts)
        for e in range(trace.num_experts[s.layer]):
            r = since.get((s.layer, e))
            if r is not None:
                n[s.layer, min(r, visits)] += 1
                used[s.layer, min(r, visits)] += e in now
                since[(s.layer, e)] = 1 if e in now else r + 1
            elif e in now:
                since[(s.layer, e)] = 1
    table = []
    for li, probs in enumerate(trace.probabilities()):
        seen = [p for p in probs if p > 0]
        mean = sum(seen) / len(seen) if seen else 1.0
        weight = n[li] + prior
        h = np.where(weight > 0, (used[li] + prior * mean) / np.maximum(weight, 1e-12), mean)
        expect = [0.0] * (visits + 1)
        expect[visits] = 1.0 / max(h[visits], 1e-6)
        for r in range(visits - 1, 0, -1):
            expect[r] = 1.0 + (1.0 - h[r]) * expect[r + 1]
        table.append([round(float(x), 4) for x in expect[1:]])
    return table


def _recency(calib: Trace, sizes: dict[Key, int], capacity: int) -> list[list[float]] | None:
    """The planned policy's recency table for a calibration trace, if it pays there (token traces only).

    A task-level model's runs all route to the task's experts, so recency adds nothing there. On a
    token trace, each table of :data:`RECENCY_CHOICES` and frequencies alone (None) replay the
    calibration trace at this capacity, and the one that hits most is kept (ties: the earlier, the
    default table first): routing without temporal locality (random-weight models) is better served by
    per-expert frequencies, which a pooled table gives up. The choice sees calibration traces only.
    """
    if calib.granularity != "token":
        return None
    prob = calib.probabilities()
    tables = [recency_table(calib, v, p) for v, p in RECENCY_CHOICES]
    tables.insert(1, None)
    hits = [simulate(calib, sizes, capacity, make_policy("planned", prob, t)).hits for t in tables]
    return tables[max(range(len(tables)), key=lambda i: (hits[i], -i))]


@dataclass(frozen=True, eq=False)
class TaskPlan:
    """What a task's plan learns from its calibration trace, computed once per plan.

    Attributes:
        sizes: Bytes of each of the task's routed experts.
        prob: Per layer, per expert: share of calibration steps that use it.
        recency: The planned policy's recency table, or None (see :func:`_recency`).
        resident: The always-resident experts.
        far: Calibration order the runtime prefetches from beyond the next layer.
        dense: Dense graphs' bytes, for the simulated compute time.
    """

    sizes: dict[Key, int]
    prob: list[list[float]]
    recency: list[list[float]] | None
    resident: list[Key]
    far: Static
    dense: DenseCost


def task_plan(manifest: dict, task: str, calib: Trace, capacity: int) -> TaskPlan:
    """Learn ``task``'s plan parts from its calibration trace for a cache of ``capacity`` bytes."""
    sizes, prob = expert_sizes(manifest, task), calib.probabilities()
    return TaskPlan(
        sizes=sizes,
        prob=prob,
        recency=_recency(calib, sizes, capacity),
        resident=_resident(prob, sizes, resident_room(capacity, sizes)),
        far=Static.from_trace(calib),
        dense=dense_cost(manifest, task),
    )


def stored_plan(manifest: dict, task: str, entry: dict) -> TaskPlan:
    """A task's plan as the runtime reads it: from its ``schedule.tasks`` ``entry`` in the manifest."""
    static = entry["predictors"].get("static")
    return TaskPlan(
        sizes=expert_sizes(manifest, task),
        prob=entry["probability"],
        recency=entry.get("recency"),
        resident=[tuple(k) for k in entry["resident"]],
        far=predictor_from_json(static) if static else Static.from_probabilities(entry["probability"]),
        dense=dense_cost(manifest, task),
    )


def replay_prefetch(
    trace: Trace,
    plan: TaskPlan,
    capacity: int,
    profile: DeviceProfile,
    policy: str,
    predictor: Predictor | None,
    book: CacheBook | None = None,
) -> SimResult:
    """Replay ``trace`` under ``plan`` with ``predictor`` prefetching by the runtime's rules (None: on demand only).

    ``book`` continues on that cache (built with ``plan``'s policy) instead of an empty one.
    """
    return simulate(
        trace,
        plan.sizes,
        capacity,
        book.policy if book else make_policy(policy, plan.prob, plan.recency),
        profile,
        predictor,
        resident=plan.resident,
        book=book,
        far=plan.far,
        depth=PREFETCH_DEPTH,
        dense=plan.dense,
    )


def _combine(results: list[SimResult]) -> dict:
    accesses = sum(r.accesses for r in results)
    hits = sum(r.hits for r in results)
    needed = [r.recall for r in results if r.recall == r.recall]
    ahead = [(r.hit_rate_ahead, r.accesses_ahead) for r in results if r.accesses_ahead]
    return {
        "hit_rate": hits / accesses if accesses else 1.0,
        "hits": hits,
        "misses": sum(r.misses for r in results),
        "accesses": accesses,
        "bytes_moved": sum(r.bytes_moved for r in results),
        "peak_bytes": max((r.peak_bytes for r in results), default=0),
        "stall_s": sum(r.stall_s for r in results),
        "time_s": sum(r.time_s for r in results),
        "recall": sum(needed) / len(needed) if needed else None,
        # hit rate over the layers a prefetch can target (all but each token's / run's first)
        "hit_rate_ahead": sum(h * n for h, n in ahead) / sum(n for _, n in ahead) if ahead else None,
    }


def score_policies(
    traces: dict[str, tuple[Trace, Trace]],
    manifest: dict,
    capacity: int,
    profile: DeviceProfile,
    policies: tuple[str, ...] = POLICIES,
    predictors: tuple[str, ...] = PREDICTORS,
    plan_policy: str = "planned",
    keep_timeline: str | None = None,
    plans: dict[str, TaskPlan] | None = None,
) -> tuple[dict, dict, dict[str, SimResult]]:
    """Replay each task's held-out trace under every policy, Belady's MIN and every predictor.

    Plans (probabilities, affinity tables) come from the calibration trace only; ``plans`` passes
    each task's :func:`task_plan` when already computed.

    Returns:
        (per-policy summaries incl. ``belady``, per-predictor summaries with ``accuracy``,
        the per-task results of ``keep_timeline`` policy when asked, for plots).
    """
    per_policy: dict[str, list[SimResult]] = {p: [] for p in (*policies, "belady")}
    per_pred: dict[str, list[SimResult]] = {p: [] for p in predictors}
    kept: dict[str, SimResult] = {}
    for task, (calib, held) in traces.items():
        plan = plans[task] if plans else task_plan(manifest, task, calib, capacity)
        sizes, dense = plan.sizes, plan.dense
        for name in policies:
            policy = make_policy(name, plan.prob, plan.recency)
            r = simulate(held, sizes, capacity, policy, profile, keep_timeline=name == keep_timeline, dense=dense)
            per_policy[name].append(r)
            if name == keep_timeline:
                kept[task] = r
        steps = [held.keys(i) for i in range(len(held.steps))]
        per_policy["belady"].append(simulate(held, sizes, capacity, Belady(steps), profile, dense=dense))
        for name in predictors:
            pred = make_predictor(name, calib)
            per_pred[name].append(replay_prefetch(held, plan, capacity, profile, plan_policy, pred))
    policies_out = {name: _combine(rs) for name, rs in per_policy.items()}
    preds_out = {}
    for name, rs in per_pred.items():
        c = _combine(rs)
        preds_out[name] = {"accuracy": c["hit_rate"], **c}
    return policies_out, preds_out, kept


def choose_predictor(
    traces: dict[str, tuple[Trace, Trace]],
    plans: dict[str, TaskPlan],
    capacity: int,
    profile: DeviceProfile,
    policy: str,
) -> str | None:
    """The prefetch predictor of the plan, or None where none pays.

    Each predictor replays the calibration traces by the runtime's rules. ``routed`` (a step's
    misses load at once while its cached experts run; it guesses nothing) replaces loading on
    demand where it saves at least :data:`PREFETCH_MARGIN` of the simulated time; a guessing
    predictor (the most accurate, ties: pre-gating, unless it stalls more than on demand, then the
    one that stalls least) replaces that choice where it saves that share again. The margin
    stands for what the simulation does not charge: a background load's hand-off and read take
    CPU time beside the compute (routed decoding of mixtral-lm-bytes, whose loads take 48 us,
    ran ~7 % slower than on demand on 2 cores although it stalled 14 % less), pre-gating runs one
    more gate per layer and token, and a wrong guess takes the channel too. A step that loads its
    misses at once also picks their victims before its own experts have run, which can cost hits
    (the simulation sees that). The held-out traces only score the plan, so they do not pick its
    parts either.
    """
    score: dict[str, list[float]] = {name: [0, 0, 0.0, 0.0] for name in PREDICTORS}
    demand = [0.0, 0.0]
    for task, (calib, _) in traces.items():
        r = replay_prefetch(calib, plans[task], capacity, profile, policy, None)
        demand[0] += r.stall_s
        demand[1] += r.time_s
        for name in PREDICTORS:
            r = replay_prefetch(calib, plans[task], capacity, profile, policy, make_predictor(name, calib))
            score[name][0] += r.hits
            score[name][1] += r.accesses
            score[name][2] += r.stall_s
            score[name][3] += r.time_s
    choice, time_s = None, demand[1]
    if score["routed"][3] < time_s * (1 - PREFETCH_MARGIN):
        choice, time_s = "routed", score["routed"][3]
    guessers = tuple(p for p in PREDICTORS if p != "routed")
    best = max(guessers, key=lambda p: (score[p][0] / max(score[p][1], 1), p == "pregate"))
    if score[best][2] > demand[0]:
        best = min(guessers, key=lambda p: (score[p][2], p != "pregate"))
    return best if score[best][3] < time_s * (1 - PREFETCH_MARGIN) else choice


def predict_switch(
    held: Trace,
    manifest: dict,
    capacity: int,
    profile: DeviceProfile,
    policy: str,
    tasks: dict,
    predictor: str,
    source: str,
    target: str,
    entry: dict,
) -> SwitchResult:
    """Simulate ``source``'s held-out trace under the plan (policy, prefetch, resident set), then the switch.

    Returns:
        The :class:`~edgemoe.schedule.simulate.SwitchResult`: bytes freed and loaded, load time.
    """
    plan_a, plan_b = stored_plan(manifest, source, tasks[source]), tasks[target]
    book = CacheBook(capacity, plan_a.sizes, make_policy(policy, plan_a.prob, plan_a.recency))
    pred = (
        None
        if predictor is None
        else predictor_from_json(tasks[source]["predictors"].get(predictor, {"name": predictor}))
    )
    replay_prefetch(held, plan_a, capacity, profile, policy, pred, book=book)
    return simulate_switch(
        book,
        expert_sizes(manifest, target),
        [tuple(k) for k in plan_b["resident"]],
        entry,
        plan_b["probability"],
        profile,
        source,
        target,
    )


def plan_bundle(
    bundle: str | Path,
    device: str | DeviceProfile = "host",
    budget: str | int | None = None,
    policy: str = "planned",
    predictor: str | None = None,
    heldout: int = 8,
    granularity: str | None = None,
    write: bool = True,
    keep_timeline: bool = False,
) -> dict:
    """Plan a bundle's expert swapping for a device and budget, score it, and store the schedule.

    Args:
        bundle: Bundle folder.
        device: Device profile (name, file or object).
        budget: ``NN%`` of routed expert bytes, bytes, or None for the device's weight memory.
        policy: Eviction policy of the plan (``lru``, ``lfu``, ``planned``).
        predictor: Prefetch predictor of the plan (None: the most accurate on held-out traces).
        heldout: Held-out inputs to score on.
        granularity: Trace granularity (default: per token for token-routed models, else per run).
        write: Store the schedule in the manifest.
        keep_timeline: Keep the plan policy's timeline and the traces for plots (``_timeline``, ``_traces``).

    Returns:
        ``{"budget_bytes", "cache_bytes", "policies", "prefetch", "peak_bytes", "schedule", ...}``.

    Raises:
        ConfigError: Bad budget or policy, or a budget too small for the largest expert.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown cache policy '{policy}' (known: {', '.join(POLICIES)})")
    if predictor is not None and predictor not in PREDICTORS:
        raise ConfigError(f"unknown prefetch predictor '{predictor}' (known: {', '.join(PREDICTORS)})")
    manifest = read_manifest(bundle)
    profile = device if isinstance(device, DeviceProfile) else get_device(device)
    routed = sum(expert_sizes(manifest).values())
    if budget is None:
        budget_bytes = min(profile.weight_memory_bytes or routed, routed) + shared_bytes(manifest)
    else:
        budget_bytes = parse_budget(budget, manifest)
    if profile.weight_memory_bytes and budget_bytes > profile.weight_memory_bytes:
        raise ConfigError(
            f"memory budget of {budget_bytes} bytes exceeds {profile.name}'s {profile.weight_memory_bytes} bytes "
            "of weight memory"
        )
    capacity = check_budget(manifest, budget_bytes)
    traces = bundle_traces(bundle, granularity, heldout)
    plans = {task: task_plan(manifest, task, calib, capacity) for task, (calib, _) in traces.items()}
    policies, prefetch, kept = score_policies(
        traces, manifest, capacity, profile, keep_timeline=policy if keep_timeline else None, plans=plans
    )
    best = predictor or choose_predictor(traces, plans, capacity, profile, policy)
    tasks, residents = {}, {}
    for task, (calib, _) in traces.items():
        plan = plans[task]
        residents[task] = plan.resident
        tasks[task] = {
            "resident": [list(k) for k in plan.resident],
            "resident_bytes": sum(plan.sizes[k] for k in plan.resident),
            "probability": [[round(p, 4) for p in ps] for ps in plan.prob],
            "prefetch": None if best is None else make_predictor(best, calib).to_json(),
            "predictors": {name: make_predictor(name, calib).to_json() for name in PREDICTORS},
        }
        if plan.recency is not None:
            tasks[task]["recency"] = plan.recency
    switch = {}
    for a in traces:
        for b in traces:
            if a != b:
                ra, rb = set(residents[a]), set(residents[b])
                kept_a, kept_b = expert_sizes(manifest, a), expert_sizes(manifest, b)
                switch[f"{a}->{b}"] = {
                    "unload": [list(k) for k in sorted(ra - rb)],
                    "load": [list(k) for k in sorted(rb - ra)],
                    "keep": [list(k) for k in sorted(ra & rb)],
                    # cached experts of A that B never routes to: free them first
                    "drop_cached": [list(k) for k in sorted(set(kept_a) - set(kept_b))],
                }
                switch[f"{a}->{b}"]["cost"] = predict_switch(
                    traces[a][1], manifest, capacity, profile, policy, tasks, best, a, b, switch[f"{a}->{b}"]
                ).summary()
    schedule = Schedule(
        device=profile.name,
        budget_bytes=budget_bytes,
        shared_bytes=shared_bytes(manifest),
        cache_bytes=capacity,
        policy=policy,
        predictor=best,
        granularity=next(iter(traces.values()))[0].granularity if traces else "run",
        tasks=tasks,
        task_switch=switch,
    )
    if write:
        write_schedule(bundle, schedule)
    peak = max([p["peak_bytes"] for p in (*policies.values(), *prefetch.values())], default=0)
    out = {
        "bundle": str(bundle),
        "model": manifest["model"]["name"],
        "device": profile.name,
        "compute_gflops": profile.compute_gflops,
        "budget_bytes": budget_bytes,
        "cache_bytes": capacity,
        "expert_bytes": routed,
        "shared_bytes": shared_bytes(manifest),
        "policy": policy,
        "predictor": best,
        "policies": {k: v for k, v in policies.items() if k != "belady"},
        "belady": policies["belady"],
        "prefetch": prefetch,
        "peak_bytes": peak + shared_bytes(manifest),
        "schedule": schedule.to_json(),
    }
    out["policies"]["belady"] = policies["belady"]
    if keep_timeline:
        out["_timeline"], out["_traces"] = kept, traces
    return out


def write_schedule(bundle: str | Path, schedule: Schedule) -> None:
    """Store ``schedule`` in the bundle's manifest (atomically: temp file, then rename).

    The schedule is advisory (it changes no file the manifest checksums), so the bundle stays valid.
    """
    root = Path(bundle)
    manifest = read_manifest(root)
    manifest["schedule"] = schedule.to_json()
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
