"""Fixed-point types and the integer arithmetic of the HLS accelerator, in numpy.

A value of type ``ap_fixed<W, I>`` is held as its raw two's-complement integer ``r`` (``value =
r / 2**(W - I)``), ``ap_ufixed<W, I>`` as an unsigned one. Every conversion the accelerator makes
rounds with Vitis's ``AP_RND`` (half way rounds towards plus infinity: ``floor(x + ulp/2)``) and
then saturates (``AP_SAT``); sums and products are exact. The C++ kernels (``cpp/``) and the
emulator (:mod:`.emulate`) follow the same rules, so the emulator reproduces C simulation bit for
bit. Numpy and the standard library only: the runtime (the ``fpga`` executor) imports it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

_TYPE = re.compile(r"^\s*ap_(u?)fixed\s*<\s*(-?\d+)\s*,\s*(-?\d+)\s*>\s*$")


@dataclass(frozen=True)
class FixedType:
    """``ap_fixed<width, int_bits>`` (or ``ap_ufixed``), rounding AP_RND, overflow AP_SAT.

    Attributes:
        width: Total bits.
        int_bits: Integer bits (sign included for signed types); may be <= 0 or > width.
        signed: ``ap_fixed`` (True) or ``ap_ufixed``.
    """

    width: int
    int_bits: int
    signed: bool = True

    @property
    def frac(self) -> int:
        """Fraction bits."""
        return self.width - self.int_bits

    @property
    def raw_min(self) -> int:
        """Smallest raw value."""
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def raw_max(self) -> int:
        """Largest raw value."""
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def max_value(self) -> float:
        """Largest representable value."""
        return self.raw_max / 2.0**self.frac

    @property
    def min_value(self) -> float:
        """Smallest representable value."""
        return self.raw_min / 2.0**self.frac

    def cpp(self) -> str:
        """The C++ type, with the accelerator's rounding and overflow modes."""
        return f"ap_{'' if self.signed else 'u'}fixed<{self.width}, {self.int_bits}, AP_RND, AP_SAT>"

    def __str__(self) -> str:
        return f"ap_{'' if self.signed else 'u'}fixed<{self.width},{self.int_bits}>"

    @classmethod
    def parse(cls, text: str) -> FixedType:
        """Parse ``ap_fixed<W,I>`` / ``ap_ufixed<W,I>``.

        Raises:
            ConfigError: Not such a type, or a width outside 2..32.
        """
        m = _TYPE.match(text)
        if not m:
            raise ConfigError(f"'{text}' is not a fixed-point type (write ap_fixed<W,I> or ap_ufixed<W,I>)")
        t = cls(int(m.group(2)), int(m.group(3)), signed=m.group(1) == "")
        if not 2 <= t.width <= 32:
            raise ConfigError(f"{text}: widths from 2 to 32 bits are supported")
        return t

    def to_json(self) -> str:
        """Manifest form (the type's C++ spelling without modes)."""
        return str(self)


def round_shift(v: np.ndarray, s: int) -> np.ndarray:
    """``v / 2**s`` rounded half up (AP_RND) for ``s > 0``; ``v * 2**-s`` (exact) for ``s <= 0``."""
    if s <= 0:
        return v << -s
    return (v + (1 << (s - 1))) >> s


def saturate(v: np.ndarray, t: FixedType) -> np.ndarray:
    """Clip raw values to ``t``'s range (AP_SAT)."""
    return np.clip(v, t.raw_min, t.raw_max)


def convert(v: np.ndarray, frac: int, t: FixedType) -> np.ndarray:
    """Assign raw values with ``frac`` fraction bits to type ``t`` (round, then saturate)."""
    return saturate(round_shift(np.asarray(v, dtype=np.int64), frac - t.frac), t)


def quantize(x: np.ndarray, t: FixedType) -> np.ndarray:
    """Real values to raw values of ``t`` (as ``ap_fixed``'s conversion from ``double``).

    ``x * 2**frac`` is exact in float64 for float32 inputs, so this is ``floor(x * 2**frac + 1/2)``
    saturated, as Vitis rounds.
    """
    scaled = np.floor(np.asarray(x, dtype=np.float64) * 2.0**t.frac + 0.5)
    lo, hi = float(t.raw_min), float(t.raw_max)
    return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=hi, neginf=lo), lo, hi).astype(np.int64)


def to_float(raw: np.ndarray, t: FixedType | int) -> np.ndarray:
    """Raw values of ``t`` (or with that many fraction bits) to float64."""
    frac = t if isinstance(t, int) else t.frac
    return np.asarray(raw, dtype=np.float64) / 2.0**frac


def floor_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division rounding down (C++ division truncates: the kernels use a helper that floors)."""
    return np.floor_divide(a, b)


def round_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` rounded half up, for ``b > 0``: ``floor((2a + b) / 2b)``."""
    return np.floor_divide(2 * np.asarray(a, dtype=np.int64) + b, 2 * np.asarray(b, dtype=np.int64))


def isqrt(v: np.ndarray) -> np.ndarray:
    """Exact ``floor(sqrt(v))`` of non-negative int64 values (< 2**62)."""
    v = np.asarray(v, dtype=np.int64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    for _ in range(3):  # float64's estimate is within one of the root below 2**62
        r = np.where(r * r > v, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of int64 arrays, exact, through float64 BLAS where the sums are small enough.

    ``a`` is split into 16-bit limbs so each float64 product sum stays below 2**53; the limbs'
    results recombine exactly in int64 (the caller bounds the true result below 2**63).
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    k = a.shape[-1]
    bmax = int(np.abs(b).max(initial=0))
    if bmax == 0 or a.size == 0:
        return np.zeros((*a.shape[:-1], b.shape[-1]), dtype=np.int64)
    limb_bits = 53 - max(1, int(bmax).bit_length()) - max(1, int(k).bit_length())
    if limb_bits < 4:
        return a @ b  # numpy's integer matmul: exact, slower
    amax = int(np.abs(a).max(initial=0))
    if amax.bit_length() <= limb_bits:
        return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    limb_bits = min(limb_bits, 16)
    bf = b.astype(np.float64)
    out = np.zeros((*a.shape[:-1], b.shape[-1]), dtype=np.int64)
    shift, rest = 0, a
    mask = (1 << limb_bits) - 1
    while True:
        last = int(np.abs(rest).max(initial=0)).bit_length() <= limb_bits
        limb = rest if last else rest & mask  # the top limb keeps the sign
        out += np.rint(limb.astype(np.float64) @ bf).astype(np.int64) << shift
        if last:
            return out
        rest = rest >> limb_bits
        shift += limb_bits


# -- lookup tables (the same numbers go into the C++ header) --------------------------------------
GELU_RANGE = 8  # the table covers [-8, 8): below, GELU is 0 to 1e-15; above, it is x
GELU_STEP_BITS = 6  # 1/64 between entries: linear interpolation error < 3e-5
EXP_STEP_BITS = 8  # 2**f on [0, 1) in 256 steps: interpolation error < 3e-6 (relative)
EXP_FRAC = 30  # fraction bits of the 2**f table
LOG2E_FRAC = 24
LOG2E_RAW = round(math.log2(math.e) * (1 << LOG2E_FRAC))
EXP_ARG_FRAC = 16  # fraction bits of x * log2(e) before the table
EXP_CUTOFF = 24  # exp(x) for x < -24 is 0 at any probability width used (< 4e-11)


def gelu_table(act: FixedType) -> np.ndarray:
    """GELU (erf form) at ``-8 + j/64``, ``j = 0..1024``, as raw values of ``act``."""
    n = 2 * GELU_RANGE * (1 << GELU_STEP_BITS) + 1
    xs = [-GELU_RANGE + j / (1 << GELU_STEP_BITS) for j in range(n)]
    return quantize(np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs]), act)


def exp2_table() -> np.ndarray:
    """``2**(j/256)``, ``j = 0..256``, with :data:`EXP_FRAC` fraction bits."""
    n = (1 << EXP_STEP_BITS) + 1
    return np.array([round(2.0 ** (j / (1 << EXP_STEP_BITS)) * (1 << EXP_FRAC)) for j in range(n)], dtype=np.int64)


def check_gelu(act: FixedType) -> None:
    """Refuse activation types the GELU table cannot index.

    Raises:
        ConfigError: Fewer than 6 fraction bits, or an integer part below the table's range.
    """
    if act.frac < GELU_STEP_BITS:
        raise ConfigError(f"activation type {act} has {act.frac} fraction bits; GELU's table needs {GELU_STEP_BITS}")
    if act.width + GELU_STEP_BITS - act.frac > 40:
        raise ConfigError(f"activation type {act} is too wide for GELU's table index")
