"""Fixed-point types per tensor class: from calibrated ranges, or given with ``--fixed``.

A calibrated type gets the integer bits its class's largest magnitude needs plus one guard bit;
the rest of the class's width budget goes to the fraction. ``--fixed`` overrides any class
(``act=ap_fixed<32,10>,weight=ap_fixed<16,2>``) or names a preset (``edge-moe``: Edge-MoE's
hand-chosen types). Values that do not fit their type are reported per tensor.
"""

from __future__ import annotations

import math

from ...errors import ConfigError
from .design import CLASSES, Design
from .fixed import FixedType, check_gelu

# Width budget per class (bits): 32-bit activations and scores, 16-bit parameters.
WIDTHS = {"input": 16, "act": 32, "weight": 16, "embed": 16, "attn_bias": 16, "bias": 16, "norm": 16, "score": 32}

# Edge-MoE's types (include/datatypes.hpp of sharc-lab/Edge-MoE): fm_t <32,10> for activations
# (and, here, attention scores), wt_linear_t <16,2>, wt_attn_bias_t <16,7>, wt_bias_t and
# wt_norm_t <16,5>, wt_patch_embed_t <16,0>, pixel_t ap_ufixed<8,0>.
PRESETS = {
    "edge-moe": {
        "act": "ap_fixed<32,10>",
        "score": "ap_fixed<32,10>",
        "weight": "ap_fixed<16,2>",
        "attn_bias": "ap_fixed<16,7>",
        "bias": "ap_fixed<16,5>",
        "norm": "ap_fixed<16,5>",
        "embed": "ap_fixed<16,0>",
        "input": "ap_ufixed<8,0>",
    }
}


def calibrated_type(max_abs: float, width: int) -> FixedType:
    """The signed type of ``width`` bits that holds ``±max_abs`` with one guard bit to spare."""
    if not math.isfinite(max_abs):
        raise ConfigError(f"a calibrated range is not finite ({max_abs})")
    if max_abs <= 0:
        return FixedType(width, 1)
    need = math.floor(math.log2(max_abs)) + 2  # sign + the bits of the largest magnitude
    return FixedType(width, need + 1)


def parse_fixed(text: str | None) -> dict[str, FixedType]:
    """Parse ``--fixed``: a preset name, ``class=type`` pairs, or both (``edge-moe,act=ap_fixed<32,8>``).

    Raises:
        ConfigError: Unknown class or preset, or a malformed type.
    """
    out: dict[str, FixedType] = {}
    if not text:
        return out
    for part in _split(text):
        if "=" not in part:
            if part not in PRESETS:
                raise ConfigError(
                    f"--fixed: '{part}' is neither a preset ({', '.join(PRESETS)}) nor class=ap_fixed<W,I>"
                )
            out.update({k: FixedType.parse(v) for k, v in PRESETS[part].items()})
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in CLASSES:
            raise ConfigError(f"--fixed: unknown tensor class '{key}' (known: {', '.join(CLASSES)})")
        out[key] = FixedType.parse(value)
    return out


def _split(text: str) -> list[str]:
    """Split on commas outside ``<...>``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def choose_types(ranges: dict[str, float], overrides: dict[str, FixedType]) -> dict[str, FixedType]:
    """Each class's type: the override where given, else calibrated from its range."""
    return {c: overrides.get(c) or calibrated_type(ranges.get(c, 0.0), WIDTHS[c]) for c in CLASSES}


def range_report(sites: dict[str, tuple[str, float]], types: dict[str, FixedType]) -> list[dict]:
    """Tensors whose calibrated magnitude exceeds their type's range (they will saturate)."""
    out = []
    for name, (cls, max_abs) in sorted(sites.items()):
        t = types[cls]
        limit = max(abs(t.min_value), t.max_value)
        if max_abs > limit:
            out.append({"tensor": name, "class": cls, "max_abs": max_abs, "type": str(t), "limit": limit})
    return out


def check_types(design: Design) -> None:
    """Refuse types the kernels cannot compute with exactly.

    Raises:
        ConfigError: Naming the class and the rule it breaks.
    """
    t = design.types
    act, score = t["act"], t["score"]
    if not act.signed or not score.signed:
        raise ConfigError("--fixed: activations and scores need signed types (ap_fixed)")
    if act.width < 12:
        raise ConfigError(f"--fixed: activation type {act} is too narrow (12 bits at least)")
    check_gelu(act)
    if score.frac > 32 or score.frac < 0:
        raise ConfigError(f"--fixed: score type {score} needs 0..32 fraction bits")
    if act.frac - design.ln_shift < 4:
        raise ConfigError(f"--fixed: activation type {act} leaves LayerNorm too few fraction bits")
    for cls in ("weight", "embed", "bias", "attn_bias", "norm"):
        if t[cls].width > 16:
            raise ConfigError(f"--fixed: {cls} type {t[cls]} is wider than the 16-bit parameter words")
    # Bias alignment: a bias joins an accumulator of (input frac + weight frac) fraction bits.
    for x, w, b in (("input", "embed", "bias"), ("act", "embed", "bias"), ("act", "weight", "bias"),
                    ("act", "weight", "attn_bias")):  # fmt: skip
        if t[b].frac > t[x].frac + t[w].frac:
            raise ConfigError(f"--fixed: {b} type {t[b]} has more fraction bits than {x} x {w} products")
    widest = max(design.mlp_hidden, design.expert_hidden, design.dim * 3, design.in_chans * design.patch**2)
    for x, w in (("act", "weight"), ("input", "embed"), ("act", "embed")):
        bits = t[x].width + t[w].width + math.ceil(math.log2(widest + 1)) + 1
        if bits > 63:
            raise ConfigError(f"--fixed: {x} x {w} sums need {bits} bits; narrow the types to stay within 63")
    if design.num_experts > 64:
        raise ConfigError(f"target hls: the gate unit handles up to 64 experts, the model has {design.num_experts}")
