"""Check a bundle against its source model: same inputs through both, per task."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.describe import check_files
from ..bundle.format import read_manifest
from ..errors import BundleError, ModelError
from ..passes.capture_model import capture_bundle_source
from ..runtime import Session

# fp32 bundles must reproduce the framework model to this max absolute error.
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class TaskVerification:
    """One task's comparison.

    Attributes:
        task: Task name.
        output_shape: Shape of the bundle's output for the verification batch.
        max_abs_error: Max |bundle - reference| with the bundle's expert masks applied to the reference.
        mean_abs_error: Mean of the same difference.
        max_abs_error_unpruned: Max |bundle - unpruned reference| (what pruning costs, plus numerics).
        reference_max_abs: Largest |reference| value, to read the errors against.
        experts_loaded: Experts the session loaded.
        experts_task: Experts the task keeps.
        experts_total: Experts of the source model.
        expert_bytes_loaded: Expert bytes the session read.
        expert_bytes_total: Expert bytes of the source model.
        latency_ms: Median latency of one batch-1 run after warm-up.
        metric_name: The task metric (see the adapter's ``task_metric``).
        metric: The bundle's metric on held-out evaluation data.
        metric_fp32: The fp32 framework model's metric on the same data.
        higher_is_better: Direction of the metric.
        passed: ``max_abs_error <= tolerance`` (always true for a quantized bundle verified
            without an explicit tolerance: its error is reported, its metric is the check), or the
            target's own check (HLS: output MSE and C simulation equal to the emulator).
        extra: The target's further checks (HLS: ``mse``, ``bit_exact`` against the emulator).
    """

    task: str
    output_shape: list[int]
    max_abs_error: float
    mean_abs_error: float
    max_abs_error_unpruned: float
    reference_max_abs: float
    experts_loaded: int
    experts_task: int
    experts_total: int
    expert_bytes_loaded: int
    expert_bytes_total: int
    latency_ms: float
    metric_name: str
    metric: float
    metric_fp32: float
    higher_is_better: bool
    passed: bool
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyReport:
    """All tasks' comparisons."""

    bundle: str
    model: str
    samples: int
    seed: int
    tolerance: float | None
    quantization: str
    tasks: dict[str, TaskVerification]

    @property
    def passed(self) -> bool:
        """Whether every task is within tolerance."""
        return all(t.passed for t in self.tasks.values())

    def to_json(self) -> dict:
        """Stable JSON form (``edgemoe verify --json``)."""
        return {
            "bundle": self.bundle,
            "model": self.model,
            "samples": self.samples,
            "seed": self.seed,
            "tolerance": self.tolerance,
            "quantization": self.quantization,
            "passed": self.passed,
            "tasks": {name: asdict(t) for name, t in self.tasks.items()},
        }


def verify_bundle(
    bundle: str | Path,
    samples: int = 2,
    seed: int = 7,
    tolerance: float | None = None,
    tasks: tuple[str, ...] = (),
    timing_runs: int = 5,
    eval_samples: int = 8,
    progress=lambda _msg: None,
) -> VerifyReport:
    """Run sample inputs through the bundle and through the source model, per task.

    Args:
        bundle: Bundle folder.
        samples: Inputs in the verification batch.
        seed: Seed of the inputs.
        tolerance: Max absolute error that passes (None: 1e-4 for fp32 bundles; not checked for
            quantized bundles, whose metric against fp32 is reported instead).
        tasks: Tasks to check (empty: all in the bundle).
        timing_runs: Batch-1 runs timed for the latency median.
        eval_samples: Held-out inputs for the task metric.
        progress: Called with one short message per step.

    Returns:
        The per-task report.

    Raises:
        BundleError: A graph reads external data its manifest record does not list.
        IntegrityError: A listed file is missing, truncated or fails its sha256.
        ModelError: The source model cannot be rebuilt, or its weights differ from the bundle's.
    """
    manifest = read_manifest(bundle)
    # Every listed file (graphs, their external data, experts), not only those the runs below load.
    progress("check the size and sha256 of every bundle file")
    check_files(Path(bundle), manifest)
    model = manifest["model"]
    source = model.get("source") if isinstance(model, dict) else None
    if not (
        isinstance(source, dict)
        and isinstance(model.get("name"), str)
        and isinstance(source.get("family"), str)
        and isinstance(source.get("config"), dict)
        and isinstance(source.get("state_sha256"), str)
        and isinstance(source.get("weights") or "", str)
        and isinstance(source.get("weights_format", "edgemoe"), str)
    ):
        raise BundleError("the bundle's manifest does not say how to rebuild its source model; recompile it")
    progress(f"rebuild source model {manifest['model']['name']}")
    captured = capture_bundle_source(manifest)
    if captured.source["state_sha256"] != source["state_sha256"]:
        raise ModelError(
            f"the weights of {manifest['model']['name']} differ from those the bundle was compiled from; "
            "recompile the bundle or pass the same checkpoint"
        )
    from ..targets import get_target

    target = get_target(manifest["target"]["name"])
    quantized = manifest.get("quantization", {}).get("avg_expert_bits") is not None
    if tolerance is None and not quantized and not target.checks_outputs:
        tolerance = DEFAULT_TOLERANCE
    progress(f"task metrics on {eval_samples} held-out inputs")
    accuracy = target.verify_accuracy(Path(bundle), manifest, captured.adapter, eval_samples)["tasks"]
    x = target.verify_inputs(manifest, captured.adapter, samples, seed)
    reports = {}
    for task in tasks or tuple(manifest["tasks"]):
        progress(f"verify task {task}")
        session = Session(bundle, task)
        got = session.run(x)
        keep = {li: tuple(s) for li, s in enumerate(manifest["tasks"][task]["experts"])}
        ref = captured.adapter.reference(x, task, keep)
        ref_unpruned = captured.adapter.reference(x, task)
        diff = np.abs(got.astype(np.float64) - ref)
        extra = target.verify_task(Path(bundle), manifest, task, x, session, ref, accuracy[task])
        runs = timing_runs if target.timed_in_verify else 0
        times = [session.timed_run(x[:1])[1] for _ in range(runs + 1)][1:] or [extra.get("latency_ms", 0.0)]
        stats = session.stats
        reports[task] = TaskVerification(
            task=task,
            output_shape=list(got.shape),
            max_abs_error=float(diff.max()),
            mean_abs_error=float(diff.mean()),
            max_abs_error_unpruned=float(np.abs(got.astype(np.float64) - ref_unpruned).max()),
            reference_max_abs=float(np.abs(ref).max()),
            experts_loaded=stats.experts_loaded,
            experts_task=stats.experts_task,
            experts_total=stats.experts_total,
            expert_bytes_loaded=stats.expert_bytes_loaded,
            expert_bytes_total=stats.expert_bytes_total,
            latency_ms=statistics.median(times),
            metric_name=accuracy[task]["metric_name"],
            metric=accuracy[task]["metric"],
            metric_fp32=accuracy[task]["metric_fp32"],
            higher_is_better=accuracy[task]["higher_is_better"],
            passed=bool(extra["passed"]) if "passed" in extra else tolerance is None or bool(diff.max() <= tolerance),
            extra={k: v for k, v in extra.items() if k != "passed"},
        )
    return VerifyReport(
        bundle=str(bundle),
        model=manifest["model"]["name"],
        samples=samples,
        seed=seed,
        tolerance=tolerance,
        quantization=manifest.get("quantization", {}).get("scheme") or ("fixed point" if "hls" in manifest else "fp32"),
        tasks=reports,
    )
