"""Generation under an expert-memory budget: transformers (+ accelerate offloading) vs edgemoe, side by side.

Greedy decoding of the same prompts on the same weights, four ways, at 100 / 50 / 25 % of the
model's routed-expert bytes, with expert loads throttled to the jetson-orin-nano-8gb profile's
storage tier (``load_gbs()``: a load of n bytes takes at least n / bandwidth):

* (a) transformers ``generate``: every weight resident (its own KV cache); the reference tokens.
* (b) transformers + accelerate disk offloading (``from_pretrained(device_map="auto",
  max_memory={"cpu": non-expert bytes + budget}, offload_folder=...)``): what a user tries first.
  The layers that do not fit are offloaded whole and read again on every forward; each offloaded
  module's read is throttled like edgemoe's expert loads (a pre-forward hook sleeps bytes / bandwidth).
* (c) edgemoe, experts loaded on demand into an LRU cache of the budget (mixtral-offloading's policy).
* (d) edgemoe with the bundle's swap plan (``compile --memory-budget B --device ...``): the planned
  eviction policy and prefetch mode the planner chose, from calibration routing; and the same
  plan without prefetch (the policy alone), since background loads compete for 2 cores. Every
  prefetch mode loads a layer's misses as soon as it is routed and runs its cached experts
  meanwhile (``routed``, which guesses nothing; predictors add loads of the next layers' experts).
  The LRU cache with ``routed`` prefetch is shown too (``edgemoe-lru-routed``), to tell what the
  routed steps give from what the planned policy gives.

Models: ``mixtral-lm-bytes`` (the trained byte-level LM; for (a)/(b) its weights are converted into
a transformers ``MixtralForCausalLM``, checked to give the same logits; prompts are held-out text)
and ``olmoe-1b-7b-quarter`` (random weights in OLMoE-1B-7B's layout, 64 experts top-8, at a quarter of
its width and 4 of its 16 layers, so it runs on 2 cores; saved with ``save_pretrained`` and compiled
from the folder; random prompts). Each configuration runs in its own process (peak RSS is that
process's), all prompts in turn, warm after the first; the configurations alternate over rounds and
the table gives medians. Every configuration's tokens are checked against (a).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MiB, machine, median, parse_args, table, write_results

NAME = "bench_generate"
DEVICE = "jetson-orin-nano-8gb"
BUDGETS = (100, 50, 25)
OLMOE_QUARTER = {
    "arch": "olmoe",
    "name": "olmoe-1b-7b-quarter",
    "vocab_size": 50304,
    "hidden_size": 512,  # 2048 / 4
    "intermediate_size": 256,  # 1024 / 4
    "num_hidden_layers": 4,  # of 16
    "num_attention_heads": 4,  # 16 / 4, head width 128 as the original
    "num_key_value_heads": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 4096,
    "pad_token_id": 1,
    "eos_token_id": 50279,
    "initializer_range": 0.1,
}


# -- preparation (parent process) -------------------------------------------------------------
def _mixtral_from_bytes_lm(folder: Path) -> None:
    """Save mixtral-lm-bytes as a transformers MixtralForCausalLM folder (same weights, same logits)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from edgemoe.models import resolve_model

    lm = resolve_model("mixtral-lm-bytes").build().eval()
    c = lm.cfg
    assert c.moe_blocks == tuple(range(c.depth)) and c.normalize and not c.shared_experts
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.expert_hidden,
        num_hidden_layers=c.depth,
        num_attention_heads=c.heads,
        num_key_value_heads=c.heads,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.top_k,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=4096,
        sliding_window=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(lm.tok_embed.weight)
        hf.model.norm.weight.copy_(lm.norm.weight)
        hf.lm_head.weight.copy_(lm.lm_head.weight)
        for block, layer in zip(lm.blocks, hf.model.layers, strict=True):
            q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
            layer.self_attn.o_proj.weight.copy_(block.attn.proj.weight)
            layer.input_layernorm.weight.copy_(block.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(block.norm2.weight)
            layer.mlp.gate.weight.copy_(block.moe.router.w_gate.weight)
            for e, expert in enumerate(block.moe.experts):
                layer.mlp.experts.gate_up_proj[e].copy_(torch.cat([expert.w_gate.weight, expert.w_up.weight]))
                layer.mlp.experts.down_proj[e].copy_(expert.w_down.weight)
        ids = torch.randint(0, c.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        diff = (hf(input_ids=ids).logits - lm(ids)).abs().max().item()
    assert diff < 1e-4, f"converted Mixtral differs from mixtral-lm-bytes by {diff}"
    hf.save_pretrained(folder)


def _random_olmoe(folder: Path) -> None:
    from edgemoe.models.hf import family

    family.build(OLMOE_QUARTER).save_pretrained(folder)


def _prompts(model: str, n: int, length: int) -> list[list[int]]:
    import numpy as np

    if model == "mixtral-lm-bytes":
        from edgemoe.models.moe_lm import text

        return [w.tolist() for w in text.windows("heldout", n, length, seed=11)]
    rng = np.random.default_rng(11)
    return [rng.integers(2, OLMOE_QUARTER["vocab_size"], length).tolist() for _ in range(n)]


def _compile(model: str, out: Path, max_seq: int, budget: int | None) -> None:
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig

    cfg = CompileConfig(
        model=model,
        device=DEVICE,
        max_seq=max_seq,
        memory_budget=None if budget is None else f"{budget}%",
    )
    compile_model(cfg, out)


# -- one configuration (child process) --------------------------------------------------------
def _transformers(spec: dict) -> tuple[list[list[int]], list[dict], dict]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    kwargs = {"dtype": torch.float32}
    if spec["kind"] == "accelerate" and spec["budget"] < 100:
        kwargs.update(
            device_map="auto",
            max_memory={"cpu": spec["cpu_bytes"]},
            offload_folder=str(Path(spec["tmp"]) / "offload"),
        )
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs).eval()
    model.generation_config.eos_token_id = None
    offloaded = 0
    gbs = spec["gbs"]
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False):
            size = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            offloaded += size

            def throttle(_m, _args, size=size):
                time.sleep(size / (gbs * 1e9))

            module.register_forward_pre_hook(throttle)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    outs, timings = [], []
    for prompt in spec["prompts"]:
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=spec["new"],
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt itself
        outs.append(seq[0, len(prompt) :].tolist())
        timings.append(
            {
                "ttft_ms": (first - start) * 1e3,
                "decode_tok_s": (spec["new"] - 1) / (last - first) if last > first else 0,
            }
        )
    return outs, timings, {"offloaded_bytes": offloaded}


def _edgemoe(spec: dict):
    from edgemoe.runtime import Session
    from edgemoe.runtime.run import cache_report

    if spec["kind"].startswith("edgemoe-lru"):
        session = Session(
            spec["bundle"],
            memory_budget=f"{spec['budget']}%",
            policy="lru",
            prefetch="routed" if spec["kind"] == "edgemoe-lru-routed" else None,
            storage_gbs=spec["gbs"],
        )
    elif spec["kind"] == "edgemoe-planned":  # the bundle's schedule: budget, planned policy, prefetch predictor
        session = Session(spec["bundle"], storage_gbs=spec["gbs"])
    else:  # the schedule's budget and policy, no prefetch
        session = Session(spec["bundle"], prefetch=None, storage_gbs=spec["gbs"])
    outs, timings = [], []
    for prompt in spec["prompts"]:
        outs.append(list(session.generate(prompt, spec["new"])))
        gen = session.last_generation
        timings.append({"ttft_ms": gen.ttft_ms, "decode_tok_s": gen.decode_tok_s})
        session.wait_prefetch()
    return outs, timings, cache_report(session)


def _peak_rss() -> int:
    """This process's peak resident set since exec (``VmHWM``; ``ru_maxrss`` would count the parent's pages at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(spec: dict) -> dict:
    run = _transformers if spec["kind"] in ("transformers", "accelerate") else _edgemoe
    outs, timings, extra = run(spec)
    # The first prompt warms caches and code paths; later prompts are what a running device sees.
    warm = timings[1:] or timings
    return {
        "tokens": outs,
        "ttft_ms": median([t["ttft_ms"] for t in warm]),
        "decode_tok_s": median([t["decode_tok_s"] for t in warm]),
        "peak_rss_bytes": _peak_rss(),
        **extra,
    }


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(Path(sys.argv[2]).read_text()))))
        return
    args = parse_args(__doc__, NAME)
    from edgemoe.devices import get_device

    gbs = get_device(DEVICE).load_gbs()
    models = ["mixtral-lm-bytes"] if args.quick else ["mixtral-lm-bytes", "olmoe-1b-7b-quarter"]
    n_prompts, prompt_len, new = (2, 16, 8) if args.quick else (4, 32, 48)
    rounds = 1 if args.quick else 3
    results: dict = {"machine": machine(), "quick": args.quick, "device": DEVICE, "load_gbs": gbs, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_generate-") as tmp:
        tmp = Path(tmp)
        for model in models:
            folder = tmp / f"{model}-hf"
            (_mixtral_from_bytes_lm if model == "mixtral-lm-bytes" else _random_olmoe)(folder)
            source = model if model == "mixtral-lm-bytes" else str(folder)
            max_seq = prompt_len + new
            bundles = {None: tmp / f"{model}-plain"}
            _compile(source, bundles[None], max_seq, None)
            for b in BUDGETS:
                bundles[b] = tmp / f"{model}-{b}"
                _compile(source, bundles[b], max_seq, b)
            manifest = json.loads((bundles[None] / "manifest.json").read_text())
            expert_bytes = manifest["totals"]["expert_bytes_bundle"]
            params_bytes = manifest["model"]["params"] * 4
            non_expert = params_bytes - expert_bytes - manifest["totals"]["shared_expert_bytes"]
            # mixtral-lm-bytes decodes a prompt in ~0.1 s: twice the prompts steady its medians
            count = n_prompts * 2 if model == "mixtral-lm-bytes" and not args.quick else n_prompts
            prompts = _prompts(model, count, prompt_len)
            base = {"prompts": prompts, "new": new, "gbs": gbs, "folder": str(folder), "tmp": str(tmp)}
            configs = [("transformers", 100)]
            for b in BUDGETS:
                configs += [
                    ("accelerate", b),
                    ("edgemoe-lru", b),
                    ("edgemoe-lru-routed", b),
                    ("edgemoe-planned", b),
                    ("edgemoe-planned-noprefetch", b),
                ]
            runs: dict = {}
            for r in range(rounds):
                order = configs if r % 2 == 0 else configs[::-1]
                for kind, b in order:
                    spec = {
                        **base,
                        "kind": kind,
                        "budget": b,
                        "cpu_bytes": int(non_expert + expert_bytes * b / 100),
                        "bundle": str(bundles[None] if kind.startswith("edgemoe-lru") else bundles[b]),
                    }
                    path = tmp / "spec.json"
                    path.write_text(json.dumps(spec))
                    print(f"[{model}] round {r + 1}/{rounds}: {kind} at {b}%", file=sys.stderr, flush=True)
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True, check=False
                    )
                    if proc.returncode:
                        raise SystemExit(f"{kind} at {b}% failed:\n{proc.stderr[-3000:]}")
                    runs.setdefault(f"{kind}@{b}", []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            reference = runs["transformers@100"][0]["tokens"]
            rows = {}
            for key, reps in runs.items():
                rows[key] = {
                    "decode_tok_s": median([x["decode_tok_s"] for x in reps]),
                    "ttft_ms": median([x["ttft_ms"] for x in reps]),
                    "peak_rss_mib": median([x["peak_rss_bytes"] for x in reps]) / MiB,
                    "same_tokens": all(x["tokens"] == reference for x in reps),
                    **{
                        k: reps[-1][k]
                        for k in reps[-1]
                        if k not in ("tokens", "ttft_ms", "decode_tok_s", "peak_rss_bytes")
                    },
                }
            results["models"][model] = {
                "expert_bytes": expert_bytes,
                "non_expert_bytes": non_expert,
                "prompts": count,
                "prompt_tokens": prompt_len,
                "new_tokens": new,
                "rounds": rounds,
                "rows": rows,
            }
    _plot(results, args.out / "results" / f"{NAME}.png")
    write_results(args.out, NAME, "Generation under an expert budget (bench_generate)", results, _markdown(results))


KINDS = {  # configuration -> legend label
    "accelerate": "(b) transformers + accelerate offload",
    "edgemoe-lru": "(c) edgemoe LRU on demand",
    "edgemoe-lru-routed": "edgemoe LRU, routed steps (misses load while cached experts run)",
    "edgemoe-planned": "(d) edgemoe swap plan (policy + its prefetch mode)",
    "edgemoe-planned-noprefetch": "(d) swap plan, prefetch off",
}


def _plot(results: dict, path: Path) -> None:
    """Decode tok/s against the expert budget, one panel per model (log scale: the configurations differ 10x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, (model, data) in zip(axes[0], models.items(), strict=True):
        rows = data["rows"]
        for kind, label in KINDS.items():
            pts = [(b, rows[f"{kind}@{b}"]["decode_tok_s"]) for b in BUDGETS if f"{kind}@{b}" in rows]
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=label)
        full = rows["transformers@100"]["decode_tok_s"]
        ax.axhline(full, color="grey", ls="--", label="(a) transformers, all resident")
        ax.set(xlabel="expert budget, % of routed-expert bytes", ylabel="decode tok/s", yscale="log", title=model)
        ax.set_xticks(BUDGETS)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Greedy decoding, expert loads throttled to {results['device']} ({results['load_gbs']} GB/s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results: dict) -> str:
    parts = [
        f"Greedy decoding, expert loads throttled to {results['device']} ({results['load_gbs']} GB/s); "
        "medians over warm prompts and rounds; every configuration in its own process.",
        "",
        f"![decode tok/s against the expert budget](results/{NAME}.png)",
        "",
    ]
    for model, data in results["models"].items():
        rows = data["rows"]
        parts.append(
            f"**{model}** ({data['expert_bytes'] / MiB:.1f} MiB of routed experts, "
            f"{data['non_expert_bytes'] / MiB:.1f} MiB other weights; {data['prompts']} prompts of "
            f"{data['prompt_tokens']} tokens, {data['new_tokens']} new tokens each)"
        )
        parts.append("")
        body = []
        for b in BUDGETS:
            for kind in ("transformers", "accelerate", *(k for k in KINDS if k.startswith("edgemoe"))):
                row = rows.get(f"{kind}@{b}")
                if row is None:
                    continue
                lru = rows[f"edgemoe-lru@{b}"]["decode_tok_s"]
                acc = rows[f"accelerate@{b}"]["decode_tok_s"]
                body.append(
                    [
                        f"{b} %",
                        kind + (f" ({row['policy']}, prefetch {row['prefetch']})" if "planned" in kind else ""),
                        f"{row['decode_tok_s']:.1f}",
                        f"{row['decode_tok_s'] / acc:.2f}x" if acc else "-",
                        f"{row['decode_tok_s'] / lru:.2f}x" if lru else "-",
                        f"{row['ttft_ms']:.1f}",
                        f"{row['peak_rss_mib']:.0f}",
                        "yes" if row["same_tokens"] else "NO",
                    ]
                )
        parts.append(
            table(
                [
                    "budget",
                    "configuration",
                    "decode tok/s",
                    "vs accelerate",
                    "vs LRU",
                    "TTFT ms",
                    "peak RSS MiB",
                    "tokens = (a)",
                ],
                body,
            )
        )
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
