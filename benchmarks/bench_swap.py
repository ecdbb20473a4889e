"""Expert swapping: cache policies vs Belady's MIN, prefetch predictors, and throttled runtime latency.

For each model, a bundle is compiled into a temporary folder and traced with the runtime: the
compile's calibration inputs give the plan (per-expert probabilities, affinity tables), held-out
inputs give the trace it is scored on, so no plan is scored on the trace it was built from. The
cache holds 25% or 50% of the bundle's routed expert bytes. Task-level m3vit-tiny is traced per
run (one step per layer per image, as the runtime executes a batch); token-routed LMs per token
(one step per layer per token, as decoding executes). mixtral-lm-bytes is the trained byte-level LM
(models/moe_lm/train.py): its calibration and held-out inputs are disjoint windows of real text,
so its routing depends on the text, unlike the random-weight LMs beside it. mixtral-lm-bytes-local
is the same architecture trained with a routing-locality loss (consecutive bytes keep their experts).

* Hit rate: LRU, LFU and the trace-planned policy vs Belady's MIN on the same held-out trace
  (cold cache; hits / expert accesses).
* Prefetch accuracy: fraction of needed experts already loaded or loading when needed, with the
  planned policy and each predictor at the same budget; "ahead" restricts it to the layers a
  prefetch can target (all but each token's or image's first MoE layer); "recall" is the share
  of the next layer's experts the predictor named.
* Runtime latency, m3vit-tiny semseg, batch 1, held-out images, storage tier throttled to the
  jetson-orin-nano-8gb profile (``load_gbs()``: sleep so a load of n bytes takes >= n / bandwidth):
  all experts resident (warmed), 25% budget loading on demand (planned policy), and 25% budget
  with prefetch (each predictor), following the schedule ``edgemoe plan`` stored in the bundle.
  The configurations run interleaved, image by image (this machine is shared). "Latency hidden"
  compares the added latency over all-resident: ``1 - (prefetch - resident) / (on-demand - resident)``;
  "stall hidden" the measured stall (time the compute waited for loads): ``1 - prefetch / on-demand``.
  They differ by the CPU time the background loads take from compute (reads, copies, bookkeeping).
  Loads share one throttled channel (demand and prefetch queue for it). Prefetch looks two MoE layers
  ahead and, at a run's last layer, wraps to the next run's first layers; those loads are allowed to
  finish between images (``Session.wait_prefetch``, untimed), as between two frames of a camera.

``--hit-rates-only`` skips the latency part (it needs a quiet machine) and keeps the latency
results of the previous full run, labelled with that run's date.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import machine, median, parse_args, table, write_results

from edgemoe.bundle.format import read_manifest
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.devices import get_device
from edgemoe.runtime import Session
from edgemoe.schedule import Belady, plan_bundle, simulate, trace_inputs
from edgemoe.schedule.planner import _recency, replay_prefetch, stored_plan
from edgemoe.schedule.traces import Trace, record_trace
from edgemoe.swap import Planned, ThrashWarning, expert_sizes, make_policy, predictor_from_json

NAME = "bench_swap"
DEVICE = "jetson-orin-nano-8gb"
CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "m3vit" / "m3vit-tiny.safetensors"


def compile_into(tmp: Path, model: str) -> Path:
    out = tmp / model
    if not out.exists():
        t = time.perf_counter()
        compile_model(CompileConfig(model=model), out)
        print(f"compiled {model} in {time.perf_counter() - t:.0f}s")
    return out


class FutureTokensOracle(Planned):
    """The planned policy told the scored trace's exact routing up to ``units`` tokens ahead: a bound, not a policy.

    Keys used again within the current token or the next ``units`` ones are ranked by their true
    next access (Belady's rule); the rest by the planned policy's expectation, after all of those. No
    online policy has this information (a decoder does not know the next token before it ends the
    current one); it measures how much of MIN's lead comes from routing of tokens not yet decoded.
    """

    name = "oracle"

    def __init__(self, trace: Trace, units: int, prob, recency):
        super().__init__(prob, recency)
        self.units, self.unit = units, [s.unit for s in trace.steps]
        self.min = Belady([trace.keys(i) for i in range(len(trace.steps))])

    def begin_step(self, step, layer, keys):
        keys = tuple(keys)
        super().begin_step(step, layer, keys)
        self.min.begin_step(step, layer, keys)

    def touch(self, key):
        super().touch(key)
        self.min.touch(key)

    def victim(self, candidates):
        horizon = self.unit[self.step] + self.units

        def rank(key):
            step, pos = self.min.next_access(key)  # per access: MIN's order within a step too
            known = step < len(self.unit) and self.unit[int(step)] <= horizon
            return (0, step, pos) if known else (1, self.expected_next_use(key))

        return max(candidates, key=rank)


def oracle_bounds(bundle: Path, traces: dict, capacity: int, units=(1, 2)) -> dict:
    """Hit rates of :class:`FutureTokensOracle` on the held-out token traces, per lookahead in tokens."""
    manifest = read_manifest(bundle)
    out = {}
    for n in units:
        hits = accesses = 0
        for task, (calib, held) in traces.items():
            sizes = expert_sizes(manifest, task)
            policy = FutureTokensOracle(held, n, calib.probabilities(), _recency(calib, sizes, capacity))
            r = simulate(held, sizes, capacity, policy)
            hits, accesses = hits + r.hits, accesses + r.accesses
        out[str(n)] = hits / accesses if accesses else 1.0
    return out


def hit_rates(bundle: Path, budgets: tuple[str, ...], heldout: int) -> dict:
    out = {}
    for budget in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ThrashWarning)
            r = plan_bundle(bundle, DEVICE, budget, "planned", heldout=heldout, write=False, keep_timeline=True)
        out[budget] = {k: r[k] for k in ("budget_bytes", "cache_bytes", "expert_bytes", "policies", "prefetch")}
        b = r["policies"]["belady"]["hit_rate"]
        if next(iter(r["_traces"].values()))[1].granularity == "token":
            out[budget]["future_tokens_oracle"] = oracle_bounds(bundle, r["_traces"], r["cache_bytes"])
            # as the runtime executes a token-routed model today: a whole window per run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ThrashWarning)
                runs = plan_bundle(bundle, DEVICE, budget, "planned", heldout=heldout, granularity="run", write=False)
            out[budget]["per_run"] = {k: v["hit_rate"] for k, v in runs["policies"].items()}
        print(
            f"{bundle.name} {budget}: "
            + ", ".join(f"{k} {v['hit_rate']:.3f}" for k, v in r["policies"].items())
            + f" | planned/belady {r['policies']['planned']['hit_rate'] / b if b else float('nan'):.3f} | "
            + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in r["prefetch"].items())
            + "".join(
                f" | told {n} token(s) ahead {h:.3f}" for n, h in out[budget].get("future_tokens_oracle", {}).items()
            )
        )
    return out


def simulated(bundle: Path, task: str, held, warmup: int, runs: int, configs: dict, resident_ms: float) -> dict:
    """The simulator's prediction of each latency configuration, per timed run, following the stored plan.

    The device profile is the throttled one with its compute throughput replaced by this host's,
    fitted so that the simulated all-resident run takes the measured all-resident time (one fitted
    number); the other configurations are predictions.
    """
    manifest = read_manifest(bundle)
    entry = manifest["schedule"]["tasks"][task]
    plan = stored_plan(manifest, task, entry)
    trace = record_trace(bundle, task, held, "run")
    first = dataclasses.replace(trace, steps=trace.steps[: warmup * trace.num_layers])
    sizes = plan.sizes

    def per_run(profile, kw) -> tuple[float, float, float]:
        budget, name = kw["memory_budget"], kw["prefetch"]
        capacity = sum(sizes.values()) if budget is None else budget - manifest["schedule"]["shared_bytes"]

        def replay(t):
            if name:
                pred = predictor_from_json(entry["predictors"][name])
                return replay_prefetch(t, plan, capacity, profile, "planned", pred)
            policy = make_policy("planned", plan.prob, plan.recency)
            # all resident: warmed by running every held-out image first
            warm = list(sizes) if budget is None else []
            return simulate(t, sizes, capacity, policy, profile, warm=warm, dense=plan.dense)

        a, b = replay(first), replay(trace)
        return (
            (b.time_s - a.time_s) / runs * 1e3,
            (b.stall_s - a.stall_s) / runs * 1e3,
            (b.bytes_moved - a.bytes_moved) / runs / 1e6,
        )

    device = get_device(DEVICE)
    t1, _, _ = per_run(dataclasses.replace(device, compute_gflops=1.0), configs["all resident"])
    host = dataclasses.replace(device, compute_gflops=t1 / resident_ms)
    out = {}
    for name, kw in configs.items():
        t, stall, mb = per_run(host, kw)
        out[name] = {"latency_ms": t, "stall_ms_per_run": stall, "mb_loaded_per_run": mb}
    return {"host_gflops_fitted": host.compute_gflops, "configs": out}


def latency(bundle: Path, task: str, runs: int, warmup: int) -> dict:
    """Median batch-1 latency of three configurations on held-out images, loads throttled to the device."""
    gbs = get_device(DEVICE).load_gbs()
    _, held, _ = trace_inputs(bundle, heldout=runs + warmup)
    # The runtime follows the stored plan: planned-policy probabilities and prefetch tables.
    plan = plan_bundle(bundle, DEVICE, "25%", "planned", heldout=4, write=True)
    budget = plan["budget_bytes"]
    configs = {
        "all resident": {"memory_budget": None, "prefetch": None},
        "25% on demand": {"memory_budget": budget, "prefetch": None, "policy": "planned"},
        "25% + prefetch (pregate)": {"memory_budget": budget, "prefetch": "pregate", "policy": "planned"},
        "25% + prefetch (static)": {"memory_budget": budget, "prefetch": "static", "policy": "planned"},
        "25% + prefetch (affinity)": {"memory_budget": budget, "prefetch": "affinity", "policy": "planned"},
    }
    sessions, before, times = {}, {}, {name: [] for name in configs}
    for name, kw in configs.items():
        s = sessions[name] = Session(bundle, task, storage_gbs=gbs, **kw)
        if kw["memory_budget"] is None:
            for i in range(len(held)):  # all resident: every expert any held-out image needs is loaded first
                s.run(held[i : i + 1])
        for i in range(warmup):
            s.run(held[i : i + 1])
        before[name] = s.stats
    # Interleaved: each image runs under every configuration in turn, so load on this shared
    # machine affects all of them alike.
    for i in range(warmup, warmup + runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(held[i : i + 1])
            times[name].append((time.perf_counter() - start) * 1e3)
            # The run queued loads for the next image's first layers (lookahead wraps around): let them
            # land before the next configuration is timed, as they would between two camera frames.
            s.wait_prefetch()
    out = {}
    for name, kw in configs.items():
        s, b, n = sessions[name], before[name], runs
        st = s.stats
        s.close()
        accesses = st.cache_hits + st.cache_misses - b.cache_hits - b.cache_misses
        out[name] = {
            "latency_ms": median(times[name]),
            "mean_ms": sum(times[name]) / n,
            "stall_ms_per_run": (st.stall_ms - b.stall_ms) / n,
            "misses_per_run": (st.cache_misses - b.cache_misses) / n,
            "hit_rate": (st.cache_hits - b.cache_hits) / max(1, accesses),
            "mb_loaded_per_run": (st.expert_bytes_loaded - b.expert_bytes_loaded) / n / 1e6,
            "peak_expert_bytes": st.peak_expert_bytes,
            "memory_budget": kw["memory_budget"] or 0,
        }
        print(f"{name}: {out[name]['latency_ms']:.1f} ms, stall {out[name]['stall_ms_per_run']:.1f} ms/run")
    sim = simulated(bundle, task, held, warmup, runs, configs, out["all resident"]["latency_ms"])
    return {"device": DEVICE, "load_gbs": gbs, "task": task, "runs": runs, "configs": out, "simulated": sim}


def main() -> None:
    hit_rates_only = "--hit-rates-only" in sys.argv
    if hit_rates_only:
        sys.argv.remove("--hit-rates-only")
    args = parse_args(__doc__, NAME)
    quick = args.quick
    vit = "m3vit-micro" if quick else ("m3vit-tiny" if CHECKPOINT.exists() else "m3vit-tiny-random")
    lms = (
        ["switch-lm-micro"]
        if quick
        else ["mixtral-lm-bytes-local", "mixtral-lm-bytes", "mixtral-lm-micro", "deepseek-lm-micro", "mixtral-lm-tiny"]
    )
    heldout = 2 if quick else 16
    budgets = ("25%", "50%")
    tmp = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    data: dict = {"quick": quick, "machine": machine(), "device": DEVICE, "heldout": heldout, "models": {}}
    for model in (vit, *lms):
        data["models"][model] = hit_rates(compile_into(tmp, model), budgets, heldout)
    previous = args.out / "results" / f"{NAME}.json"
    if not hit_rates_only:
        data["latency"] = latency(compile_into(tmp, vit), "semseg", runs=3 if quick else 20, warmup=1 if quick else 2)
    elif previous.exists() and "latency" in (prev := json.loads(previous.read_text())):
        data["latency"], data["latency_date"] = prev["latency"], prev.get("latency_date", prev["machine"]["date"])
    # The m3vit-tiny checkpoint may be retrained: record which weights these numbers are for.
    data["weights_sha256"] = {m: read_manifest(tmp / m)["model"]["source"].get("state_sha256") for m in data["models"]}

    rows = []
    for model, per in data["models"].items():
        for budget, r in per.items():
            p, b = r["policies"], r["policies"]["belady"]["hit_rate"]
            rows.append(
                [model, budget]
                + [f"{p[k]['hit_rate']:.3f}" for k in ("lru", "lfu", "planned", "belady")]
                + [f"{p['planned']['hit_rate'] / b:.2f}" if b else "n/a"]
            )
    md = [
        f"Held-out traces ({heldout} inputs per task; plans from calibration traces only), cold cache, "
        f"{DEVICE} profile. Cache = budget share of routed expert bytes. Weights sha256: "
        + ", ".join(
            f"{m} {str(data['weights_sha256'][m])[:12]}"
            for m in (vit, "mixtral-lm-bytes", "mixtral-lm-bytes-local")
            if m in data["models"]
        )
        + ". Token-routed plans add recency (expected visits to the next use by visits since the last, "
        "from calibration traces) to the planned policy's per-expert frequencies.",
        "",
        table(["model", "cache", "LRU", "LFU", "planned", "Belady MIN", "planned / Belady"], rows),
        "",
    ]
    rows = [
        [model, budget, f"{r['policies']['planned']['hit_rate']:.3f}"]
        + [f"{h:.3f} ({h / r['policies']['belady']['hit_rate']:.2f})" for h in r["future_tokens_oracle"].values()]
        + [f"{r['policies']['belady']['hit_rate']:.3f}"]
        for model, per in data["models"].items()
        for budget, r in per.items()
        if "future_tokens_oracle" in r
    ]
    runs = [
        [model, budget] + [f"{r['per_run'][k]:.3f}" for k in ("lru", "lfu", "planned", "belady")]
        for model, per in data["models"].items()
        for budget, r in per.items()
        if "per_run" in r
    ]
    if runs:
        md += [
            "Token-routed models traced as the runtime executes them (one step per layer per input window, the "
            "union of its tokens' experts) rather than per decoded token:",
            "",
            table(["model", "cache", "LRU", "LFU", "planned", "Belady MIN"], runs),
            "",
        ]
    md += [
        "Where MIN's lead on token-routed models comes from: the planned policy told the held-out trace's "
        "exact routing of the current token and the next 1 or 2 tokens (oracle information a decoder does not "
        "have; × Belady in brackets):",
        "",
        table(["model", "cache", "planned", "told 1 token ahead", "told 2 tokens ahead", "Belady MIN"], rows),
        "",
        "Prefetch accuracy (needed experts loaded or loading when needed; planned policy; "
        "ahead = layers a prefetch can target; recall = share of next-layer experts named):",
        "",
    ]
    rows = []
    for model, per in data["models"].items():
        for budget, r in per.items():
            for name, q in r["prefetch"].items():
                ahead = "-" if q["hit_rate_ahead"] is None else f"{q['hit_rate_ahead']:.3f}"
                recall = "-" if q["recall"] is None else f"{q['recall']:.3f}"
                rows.append([model, budget, name, f"{q['accuracy']:.3f}", ahead, recall])
    md += [table(["model", "cache", "predictor", "accuracy", "accuracy (ahead)", "recall"], rows), ""]
    title = "Expert swapping: policies vs Belady, prefetch, throttled latency"
    lat = data.get("latency")
    if lat is None:
        write_results(args.out, NAME, title, data, "\n".join(md))
        return
    res = lat["configs"]["all resident"]["latency_ms"]
    ond = lat["configs"]["25% on demand"]["latency_ms"]
    ond_stall = lat["configs"]["25% on demand"]["stall_ms_per_run"]
    rows = []
    for name, c in lat["configs"].items():
        hidden = stall_hidden = "-"
        if "prefetch" in name and ond > res:
            hidden = f"{1 - (c['latency_ms'] - res) / (ond - res):.2f}"
        if "prefetch" in name and ond_stall > 0:
            stall_hidden = f"{1 - c['stall_ms_per_run'] / ond_stall:.2f}"
        rows.append(
            [
                name,
                f"{c['latency_ms']:.1f}",
                f"{c['latency_ms'] / res:.2f}x",
                f"{c['stall_ms_per_run']:.1f}",
                f"{c['hit_rate']:.3f}",
                f"{c['mb_loaded_per_run']:.1f}",
                hidden,
                stall_hidden,
            ]
        )
    sim = lat.get("simulated")
    if sim:
        for row, name in zip(rows, lat["configs"], strict=True):
            c = sim["configs"][name]
            row += [f"{c['latency_ms']:.1f}", f"{c['stall_ms_per_run']:.1f}", f"{c['mb_loaded_per_run']:.1f}"]
    md += [
        f"Runtime, {vit} {lat['task']}, batch 1, median of {lat['runs']} held-out images, expert loads throttled "
        f"to {DEVICE} ({lat['load_gbs']:g} GB/s)"
        + (f"; measured in the full run of {data['latency_date']}:" if "latency_date" in data else ":"),
        "",
        table(
            [
                "configuration",
                "latency ms",
                "vs resident",
                "stall ms/run",
                "hit rate",
                "MB loaded/run",
                "latency hidden",
                "stall hidden",
            ]
            + (["sim ms", "sim stall ms", "sim MB"] if sim else []),
            rows,
        ),
    ]
    if sim:
        md += [
            "",
            "sim: the simulator replaying the same images' trace under the stored plan, on the throttled profile "
            f"with this host's compute fitted to the all-resident time ({sim['host_gflops_fitted']:.0f} GFLOP/s); "
            "the other rows are its predictions.",
        ]
    write_results(args.out, NAME, title, data, "\n".join(md))


if __name__ == "__main__":
    main()
