"""The one typed configuration of a compile."""

from __future__ import annotations

from dataclasses import dataclass, field

from .quantization import QuantConfig


@dataclass(frozen=True)
class CompileConfig:
    """Everything a compile needs to know besides the model itself.

    Attributes:
        model: Registry name of the model (``edgemoe models`` lists them).
        target: Backend name (``onnx``).
        device: Device profile name (``edgemoe devices`` lists them).
        tasks: Tasks to build; empty means every task of the model.
        prune: Drop experts a task never selects on calibration data (task-level models).
        prune_below: With ``prune``: also drop experts that get less than this share of the task's
            routed (token, slot) assignments on calibration data (0: only never-selected ones).
        calib_samples: Calibration inputs per task for routing profiles.
        calib_seed: Seed of the calibration inputs.
        weights: Optional checkpoint (safetensors, or a torch file loaded with weights_only).
        stream: A checkpoint folder: read its weights tensor by tensor as each partition is
            emitted instead of loading the model (peak memory set by the largest partition, not
            the model; target onnx). None: stream folders whose weights exceed 1 GiB.
        weights_format: Layout of ``weights``: ``edgemoe`` (the model's own state dict) or ``m3vit``
            (a checkpoint saved by the public M³ViT training code, m3vit family).
        opset: ONNX opset of exported graphs.
        model_family: With ``model_config``: build this family from that config instead of
            resolving ``model`` (how ``verify`` rebuilds a bundle's source model).
        model_config: Full family config dict, or None.
        quant: Quantization of the bundle (default: none, fp32).
        memory_budget: Expert memory to plan swapping for on ``device``: ``NN%`` of routed expert
            bytes or a byte size (``6MB``, ``100000``); the budget is checked as at session start
            and a swap schedule is stored in the manifest. None: no check, no schedule.
        fixed: Target hls: fixed-point types per tensor class overriding the calibrated ones
            (``act=ap_fixed<32,10>,weight=ap_fixed<16,2>``, or a preset such as ``edge-moe``). None:
            every type from the calibrated ranges.
        tuning_db: Target tvm: a MetaSchedule database folder (``edgemoe tune``) whose schedules
            the libraries are built with. None: untuned.
        max_seq: Causal LMs: also emit generation graphs (each trunk segment on a key/value cache
            of this many positions, prompt and new tokens together) for ``edgemoe generate``.
            None: no generation graphs.
        allow_nonfinite: Compile a model whose weights hold NaN or Inf (warned about by name)
            instead of refusing it.
    """

    model: str
    target: str = "onnx"
    device: str = "host"
    tasks: tuple[str, ...] = ()
    prune: bool = True
    prune_below: float = 0.0
    calib_samples: int = 8
    calib_seed: int = 1234
    weights: str | None = None
    weights_format: str = "edgemoe"
    stream: bool | None = None
    opset: int = 17
    model_family: str | None = None
    model_config: dict | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    memory_budget: str | None = None
    tuning_db: str | None = None
    fixed: str | None = None
    max_seq: int | None = None
    allow_nonfinite: bool = False
