"""Quantization schemes and the numpy codecs for expert weights.

Dense partitions (trunk segments, heads) are quantized with onnxruntime's own tools; experts
are data, so their weights are quantized here, one expert at a time, into blobs whose
tensors the target's quantized expert kernels take as inputs:

- ``fp16``: weights stored as float16, cast back to float32 in the kernel.
- ``int8`` (static): per-output-channel symmetric int8 weights; the activation entering each
  matmul is quantized with a range calibrated on the tokens routed to that expert.
- ``int8-dynamic``: per-output-channel symmetric int8 weights; activations quantized per call.
- ``int4`` and mixed precision: group-wise symmetric weight-only quantization to 2, 4 or 8 bits
  in onnxruntime's MatMulNBits layout (groups of ``group_size`` along the input dimension).

Biases, norms and everything 1-D stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

SCHEMES = ("fp32", "fp16", "int8", "int8-dynamic", "int4")
CALIBRATORS = ("minmax", "percentile")
NBITS = (2, 4, 8)  # what MatMulNBits runs; mixed precision chooses among these
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a bundle.

    Attributes:
        scheme: Scheme of the dense partitions and (without a budget) of every expert.
        group_size: Group size of int4 / mixed-precision weights (32, 64 or 128).
        calibrator: Activation range calibrator for ``int8`` (``minmax`` or ``percentile``).
        percentile: Percentile of ``|activation|`` kept by the percentile calibrator.
        weight_budget: Byte budget of all shipped expert weights (mixed precision), or None.
        avg_bits: Average bits per expert weight (mixed precision), or None.
        bit_choices: Bit-widths mixed precision may give an expert.
        eval_samples: Held-out inputs for the accuracy report.
    """

    scheme: str = "fp32"
    group_size: int = 32
    calibrator: str = "minmax"
    percentile: float = 99.99
    weight_budget: int | None = None
    avg_bits: float | None = None
    bit_choices: tuple[int, ...] = NBITS
    eval_samples: int = 16

    @property
    def mixed(self) -> bool:
        """Whether per-expert bit-widths are chosen by the solver."""
        return self.weight_budget is not None or self.avg_bits is not None

    @property
    def active(self) -> bool:
        """Whether anything is quantized at all."""
        return self.scheme != "fp32" or self.mixed

    def validate(self) -> QuantConfig:
        """Raise :class:`ConfigError` on an inconsistent configuration."""
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.calibrator not in CALIBRATORS:
            raise ConfigError(f"unknown calibrator '{self.calibrator}' (known: {', '.join(CALIBRATORS)})")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.weight_budget is not None and self.avg_bits is not None:
            raise ConfigError("give either a weight budget or an average bit-width, not both")
        if self.weight_budget is not None and self.weight_budget <= 0:
            raise ConfigError(f"weight budget must be positive, got {self.weight_budget}")
        if self.avg_bits is not None and not min(self.bit_choices) <= self.avg_bits <= max(self.bit_choices):
            raise ConfigError(
                f"average bits {self.avg_bits} is outside the available bit-widths {list(self.bit_choices)}"
            )
        if not self.bit_choices or any(b not in NBITS for b in self.bit_choices):
            raise ConfigError(f"bit choices must be drawn from {NBITS}, got {list(self.bit_choices)}")
        return self


def check_finite(name: str, w: np.ndarray) -> None:
    """Refuse NaN / Inf weights, naming the tensor (they would poison every scale).

    Raises:
        ConfigError: The tensor holds NaN or Inf.
    """
    if not np.isfinite(w).all():
        bad = int((~np.isfinite(w)).sum())
        raise ConfigError(f"tensor {name} holds {bad} NaN/Inf value(s); cannot quantize it")


# -- per-channel int8 ---------------------------------------------------------------------------
def quantize_int8_per_channel(w: np.ndarray, name: str = "weight", limit: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (last axis) of a (K, N) weight.

    Args:
        w: The weight.
        name: Its name, for errors.
        limit: Largest magnitude of ``q``: the target's ``int8_weight_max`` (onnxruntime's integer
            kernels take 63, see ``targets/onnx/target.py``).

    Returns:
        ``q`` int8 (K, N) in [-limit, limit] and ``scale`` float32 (N,), with ``w ≈ q * scale``.
        An all-zero channel gets scale 1 (any scale reproduces it exactly).
    """
    check_finite(name, w)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / limit, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -limit, limit).astype(np.int8)
    return q, scale


def dequantize_int8_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8_per_channel`."""
    return q.astype(np.float32) * scale


# -- group-wise n-bit in MatMulNBits layout ------------------------------------------------------
def nbits_shapes(k: int, n: int, bits: int, group: int) -> tuple[tuple[int, int, int], tuple[int]]:
    """Shapes of the packed weight (N, blocks, bytes per block) and of the scales (N * blocks)."""
    blocks = math.ceil(k / group)
    return (n, blocks, group * bits // 8), (n * blocks,)


def quantize_nbits(w: np.ndarray, bits: int, group: int, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Group-wise symmetric quantization of a (K, N) weight, packed as MatMulNBits expects.

    Each output column is cut into groups of ``group`` along K (zero-padded at the end); a
    group's scale maps its largest magnitude to ``2**(bits-1) - 1``; values are stored
    unsigned with the implicit zero point ``2**(bits-1)``, ``8 / bits`` per byte, low bits first.

    Returns:
        ``packed`` uint8 (N, blocks, group*bits/8) and ``scales`` float32 (N*blocks,).
    """
    if bits not in NBITS:
        raise ConfigError(f"{bits}-bit weights are not supported (choose from {NBITS})")
    check_finite(name, w)
    k, n = w.shape
    blocks = math.ceil(k / group)
    padded = np.zeros((blocks * group, n), np.float32)
    padded[:k] = w
    g = padded.T.reshape(n, blocks, group)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(g).max(axis=-1)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = (np.clip(np.rint(g / scales[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    per = 8 // bits
    q = q.reshape(n, blocks, group // per, per)
    packed = np.zeros((n, blocks, group // per), np.uint8)
    for i in range(per):
        packed |= (q[..., i] << (bits * i)).astype(np.uint8)
    return packed, scales.reshape(-1)


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, k: int, bits: int, group: int) -> np.ndarray:
    """Inverse of :func:`quantize_nbits`: the (K, N) float32 weight the kernel computes with."""
    n, blocks, _ = packed.shape
    per = 8 // bits
    mask = (1 << bits) - 1
    q = np.stack([(packed >> (bits * i)) & mask for i in range(per)], axis=-1).reshape(n, blocks, group)
    vals = (q.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(n, blocks, 1)
    return vals.reshape(n, blocks * group)[:, :k].T.copy()


def nbits_bytes(k: int, n: int, bits: int, group: int) -> int:
    """Stored bytes of a (K, N) weight at ``bits`` (packed values + float32 scales)."""
    packed, scales = nbits_shapes(k, n, bits, group)
    return math.prod(packed) + 4 * scales[0]
