"""PNG plots of a plan: memory over time, and per-task expert usage (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20


def _model(result: dict) -> str:
    """The plot title's name: the model, with the bundle folder when it says something else."""
    model, folder = result.get("model"), Path(result["bundle"]).name
    if not model:
        return folder
    return model if folder in (model, "") else f"{model} ({folder})"


def write_plots(result: dict, out: str | Path) -> list[Path]:
    """Write ``memory.png`` and ``usage.png`` for a :func:`~edgemoe.schedule.planner.plan_bundle` result.

    ``result`` must come from ``plan_bundle(..., keep_timeline=True)``.

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timelines, traces = result["_timeline"], result["_traces"]
    files = []

    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.6 * len(timelines)), squeeze=False)
    for ax, (task, sim) in zip(axes[:, 0], timelines.items(), strict=True):
        t = np.array([m[0] for m in sim.memory]) * 1e3
        b = np.array([m[1] for m in sim.memory]) / MiB
        ax.step(t, b, where="post", label="cached + in flight")
        ax.axhline(sim.capacity_bytes / MiB, color="r", linestyle="--", label="cache budget")
        stalls = [(s, e) for s, e, kind, *_ in sim.timeline if kind == "stall" and e > s]
        for s, e in stalls:
            ax.axvspan(s * 1e3, e * 1e3, color="orange", alpha=0.2, lw=0)
        ax.set_title(f"{task}: {sim.policy}, hit rate {sim.hit_rate:.2f} (orange: stalls)")
        ax.set_xlabel("simulated time (ms)")
        ax.set_ylabel("expert weights (MiB)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{_model(result)} on {result['device']}, budget {result['budget_bytes'] / MiB:.2f} MiB")
    fig.tight_layout()
    files.append(out / "memory.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    shares = {}
    for task, (_, held) in traces.items():
        usage = held.usage()
        shares[task] = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
    # One colour scale for every task, so the same colour means the same share in each panel.
    top = max((float(s.max()) for s in shares.values()), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(traces), figsize=(4.5 * len(traces) + 1, 3.5), squeeze=False)
    im = None
    for ax, (task, share) in zip(axes[0], shares.items(), strict=True):
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_title(f"{task}: share of tokens (held-out)")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{_model(result)}: expert use per MoE layer")
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="share of the layer's tokens")
    files.append(out / "usage.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files
