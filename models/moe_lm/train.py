"""Train a byte-level MoE language model on Python's bundled docs and write its checkpoint and metrics.

Every step draws ``--batch`` windows of ``--seq + 1`` bytes from the ``train`` split of
:mod:`text` (offsets from a generator seeded by ``--seed``) and minimises next-byte
cross-entropy plus ``aux`` times the Switch Transformer load-balancing loss of every MoE layer,
``E * sum_e f_e * P_e``: ``f_e`` the share of the batch's (token, slot) assignments routed to
expert ``e``, ``P_e`` its mean router probability (Fedus et al. 2021; Mixtral trains with the
same term). A small coefficient keeps every expert in use without flattening the router: routing
stays a function of the token and its context, which is what an expert cache can learn from.
With ``--locality`` it also minimises :func:`locality_loss`, the router mass each byte puts off
the experts its predecessor used, so that routing changes only when the text does: an expert
cache serving byte-by-byte decoding then hits far more often (``mixtral-lm-bytes-local``).
AdamW with linear warm-up and cosine decay, gradients clipped at norm 1, one CPU thread and
deterministic kernels: the same command gives the same checkpoint on the same torch build.
Each shipped config's loss coefficients are the command line's defaults for it (:data:`RECIPES`).

Writes ``<out>`` (fp32 safetensors), ``<stem>.metrics.json`` (checkpoint sha256, held-out bits
per byte against the unigram baseline, expert usage) and ``<stem>.train.json`` (loss curve).

Reproduce the shipped checkpoint (1200 steps, ~9 minutes on one core; it was trained with torch
2.11 on Python 3.12 from a dump of Python 3.11.7's corpus, see the metrics JSON)::

    python -c "from edgemoe.models.moe_lm import text; open('corpus.bin', 'wb').write(text.corpus())"
    nice -n 19 python -m edgemoe.models.moe_lm.train --corpus corpus.bin

and the locality-trained one (trained here, Python 3.11.7, torch 2.13.0 CPU)::

    python -m edgemoe.models.moe_lm.train --config mixtral-lm-bytes-local
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # ``python models/moe_lm/train.py``: run as the installed package module (relative imports).
    import runpy

    runpy.run_module("edgemoe.models.moe_lm.train", run_name="__main__", alter_sys=True)
    sys.exit(0)

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from edgemoe.bundle.format import sha256_file

from . import text
from .configs import CONFIGS
from .model import MoELM, build_moe_lm

DEFAULT_CONFIG = "mixtral-lm-bytes"
# Loss coefficients each shipped checkpoint was trained with (the command line's defaults for its config).
RECIPES: dict[str, dict[str, float]] = {
    "mixtral-lm-bytes": {"aux": 0.01, "locality": 0.0},
    "mixtral-lm-bytes-local": {"aux": 1.0, "locality": 1.5},
}
EVAL_SEQ = 128  # held-out evaluation: consecutive non-overlapping windows of this many predicted bytes


class RouterTap:
    """Records each MoE layer's router logits and chosen experts during a forward pass."""

    def __init__(self, model: MoELM):
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [model.blocks[b].moe.router.register_forward_hook(self._hook) for b in model.cfg.moe_blocks]

    def _hook(self, router, args, out) -> None:
        self.records.append((router.w_gate(args[0]), out[0]))

    def clear(self) -> None:
        self.records.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def balance_loss(records: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``, averaged over MoE layers (1.0 when uniform)."""
    total = torch.zeros(())
    for logits, idx in records:
        probs = torch.softmax(logits, dim=-1).reshape(-1, num_experts)
        frac = torch.bincount(idx.reshape(-1), minlength=num_experts).float() / idx.numel()
        total = total + num_experts * (frac * probs.mean(0)).sum()
    return total / max(1, len(records))


def locality_loss(records: list[tuple[torch.Tensor, torch.Tensor]], batch: int, num_experts: int) -> torch.Tensor:
    """Routing-locality loss, averaged over MoE layers: router mass a token puts off the previous token's experts.

    ``1 - sum_{e in topk(t-1)} p_t(e)`` per token after the first of a window: 0 when every token
    puts all its router probability on the experts its predecessor used. It asks for sharp routing
    that changes only when the text does, so consecutive tokens share experts and an expert cache
    hits more often (the balance loss still spreads experts over the batch).
    """
    total = torch.zeros(())
    for logits, idx in records:
        probs = torch.softmax(logits, dim=-1).reshape(batch, -1, num_experts)
        chosen = F.one_hot(idx, num_experts).sum(-2).reshape(batch, -1, num_experts).to(probs.dtype)
        total = total + (1.0 - (probs[:, 1:] * chosen[:, :-1]).sum(-1)).mean()
    return total / max(1, len(records))


@torch.no_grad()
def heldout_bits(model: MoELM, data: np.ndarray, seq: int = EVAL_SEQ, limit: int | None = None) -> float:
    """Bits per byte of ``data`` under the model: consecutive windows, each predicting ``seq`` bytes.

    Args:
        model: The LM (eval mode).
        data: Byte ids (uint8 or int).
        seq: Predicted bytes per window (the window's first byte is context only).
        limit: Use at most this many windows (None: all).
    """
    n = (len(data) - 1) // seq
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise ValueError(f"need more than {seq} bytes to evaluate, got {len(data)}")
    d = torch.from_numpy(np.asarray(data[: n * seq + 1], dtype=np.int64))
    x = torch.stack([d[i * seq : (i + 1) * seq] for i in range(n)])
    y = torch.stack([d[i * seq + 1 : (i + 1) * seq + 1] for i in range(n)])
    nats = 0.0
    for i in range(0, n, 32):
        logits = model(x[i : i + 32])
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i : i + 32].reshape(-1), reduction="sum").item()
    return nats / (n * seq) / math.log(2)


@torch.no_grad()
def expert_usage(model: MoELM, data: np.ndarray, seq: int = EVAL_SEQ, windows: int = 32) -> dict:
    """Per MoE layer, the routing of held-out windows.

    Returns:
        ``share``: share of routed (token, slot) assignments per expert; ``kept_from_previous_token``:
        share of a token's experts the previous token of its window also used (the temporal locality
        an expert cache can exploit; top-k of E experts at random gives k/E).
    """
    tap = RouterTap(model)
    try:
        n = min(windows, (len(data) - 1) // seq)
        x = torch.from_numpy(np.asarray(data[: n * seq], dtype=np.int64)).reshape(n, seq)
        model(x)
        share, repeat = [], []
        e = model.cfg.num_experts
        for _, idx in tap.records:
            counts = torch.bincount(idx.reshape(-1), minlength=e).float() / idx.numel()
            share.append([round(float(c), 4) for c in counts])
            used = F.one_hot(idx.reshape(n, seq, -1), e).sum(-2).bool()  # (windows, seq, experts)
            kept = (used[:, 1:] & used[:, :-1]).sum(-1).float().mean() / idx.shape[-1]
            repeat.append(round(float(kept), 4))
    finally:
        tap.close()
    return {"share": share, "kept_from_previous_token": repeat}


def train(
    config: str = DEFAULT_CONFIG,
    steps: int = 1200,
    batch: int = 32,
    seq: int = 128,
    lr: float = 3e-3,
    warmup: int = 100,
    weight_decay: float = 0.01,
    aux: float = 0.01,
    locality: float = 0.0,
    seed: int = 0,
    log_every: int = 50,
    log=print,
) -> tuple[MoELM, list[dict]]:
    """Train ``config`` from its seeded initialisation; returns the model (eval mode) and the loss curve."""
    model = build_moe_lm(CONFIGS[config]).train()
    torch.manual_seed(seed)
    data = torch.from_numpy(text.split("train").astype(np.int64))
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    tap = RouterTap(model)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    history, start, acc = [], time.perf_counter(), {"ce": 0.0, "balance": 0.0, "locality": 0.0}
    for step in range(steps):
        starts = torch.from_numpy(rng.integers(0, len(data) - seq - 1, size=batch))
        win = data[starts[:, None] + torch.arange(seq + 1)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        tap.clear()
        logits = model(win[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
        bal = balance_loss(tap.records, model.cfg.num_experts)
        loc = locality_loss(tap.records, batch, model.cfg.num_experts)
        loss = ce + aux * bal + locality * loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc["ce"] += ce.item()
        acc["balance"] += bal.item()
        acc["locality"] += loc.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = (step % log_every) + 1
            rec = {
                "step": step + 1,
                "bits_per_byte": round(acc["ce"] / k / math.log(2), 4),
                "balance": round(acc["balance"] / k, 4),
                "locality": round(acc["locality"] / k, 4),
                "lr": round(lr_at(step), 6),
                "wall_s": round(time.perf_counter() - start, 1),
            }
            history.append(rec)
            log(json.dumps(rec))
            acc = {"ce": 0.0, "balance": 0.0, "locality": 0.0}
    tap.close()
    return model.eval(), history


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m edgemoe.models.moe_lm.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, choices=sorted(c for c in CONFIGS if text.is_text_model(c)))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32, help="windows per step")
    ap.add_argument("--seq", type=int, default=128, help="predicted bytes per window")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--aux", type=float, default=None, help="load-balancing loss coefficient (default: the recipe's)")
    ap.add_argument(
        "--locality",
        type=float,
        default=None,
        help="routing-locality loss coefficient (0: none; see locality_loss; default: the recipe's)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--corpus", default=None, help="train on this dump of the corpus (text.corpus() bytes)")
    ap.add_argument("--out", default=None, help="checkpoint path (default: models/moe_lm/<config>.safetensors)")
    args = ap.parse_args(argv)
    recipe = RECIPES.get(args.config, {"aux": 0.01, "locality": 0.0})
    args.aux = recipe["aux"] if args.aux is None else args.aux
    args.locality = recipe["locality"] if args.locality is None else args.locality

    from safetensors.torch import save_file

    if args.corpus:
        text.use_corpus_file(args.corpus)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out or Path(__file__).with_name(f"{args.config}.safetensors"))
    t0 = time.perf_counter()
    model, history = train(
        args.config,
        args.steps,
        args.batch,
        args.seq,
        args.lr,
        aux=args.aux,
        locality=args.locality,
        seed=args.seed,
    )
    wall = time.perf_counter() - t0
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"config": args.config, "corpus_sha256": text.corpus_sha256()})
    train_split, held = text.split("train"), text.split("heldout")
    bits = heldout_bits(model, held)
    training = {
        "config": args.config,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "aux": args.aux,
        "locality": args.locality,
        "seed": args.seed,
        "threads": args.threads,
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": "python -m edgemoe.models.moe_lm.train " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    metrics = {
        "model": args.config,
        "checkpoint": out.name,
        "checkpoint_sha256": sha256_file(out),
        "checkpoint_bytes": out.stat().st_size,
        "corpus": {
            "source": "pydoc_data.topics",
            "sha256": text.corpus_sha256(),
            "bytes": len(text.corpus()),
            "splits": {k: list(v) for k, v in text.SPLITS.items()},
        },
        "training": training,
        "heldout": {
            "bytes_scored": ((len(held) - 1) // EVAL_SEQ) * EVAL_SEQ,
            "window": EVAL_SEQ,
            "bits_per_byte": round(bits, 4),
            "unigram_bits_per_byte": round(text.unigram_bits(train_split, held), 4),
            "uniform_bits_per_byte": 8.0,
            "experts": expert_usage(model, held),
        },
    }
    stem = out.with_suffix("")
    Path(f"{stem}.metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    Path(f"{stem}.train.json").write_text(json.dumps({**training, "history": history}, indent=1) + "\n")
    print(json.dumps(metrics["heldout"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
