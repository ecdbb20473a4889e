"""PNG plots of a plan: memory over time, and per-task expert usage (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


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

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timelines, traces = result["_timeline"], result["_traces"]
    files = []

    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.6 * len(timelines)), squeeze=False)
    for ax, (task, sim) in zip(axes[:, 0], timelines.items(), strict=True):
        t = np.array([m[0] for m in sim.memory]) * 1e3
        b = np.array([m[1] for m in sim.memory]) / 1e6
        ax.step(t, b, where="post", label="cached + in flight")
        ax.axhline(sim.capacity_bytes / 1e6, color="r", linestyle="--", label="cache budget")
        stalls = [(s, e) for s, e, kind, *_ in sim.timeline if kind == "stall" and e > s]
        for s, e in stalls:
            ax.axvspan(s * 1e3, e * 1e3, color="orange", alpha=0.2, lw=0)
        ax.set_title(f"{task}: {sim.policy}, hit rate {sim.hit_rate:.2f} (orange: stalls)")
        ax.set_xlabel("simulated time (ms)")
        ax.set_ylabel("expert MB")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{Path(result['bundle']).name} on {result['device']}, budget {result['budget_bytes']} B")
    fig.tight_layout()
    files.append(out / "memory.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(traces), figsize=(4.5 * len(traces), 3.5), squeeze=False)
    for ax, (task, (_, held)) in zip(axes[0], traces.items(), strict=True):
        usage = held.usage()
        share = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis")
        ax.set_title(f"{task}: share of tokens (held-out)")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    files.append(out / "usage.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files
