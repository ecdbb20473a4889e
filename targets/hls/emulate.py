"""The accelerator's dataflow in numpy: bit-exact in fixed point, or in float64 for calibration.

:func:`forward` walks the model as the kernels in ``cpp/`` do — stem, then per block LayerNorm,
attention with a single-pass (online) softmax, dense MLP or MoE (gate, top-k, per-expert queues,
experts applied in ascending order), final norm, the task's head — with the arithmetic of a
``Math``: :class:`FixedMath` reproduces C simulation bit for bit (same rounding, saturation,
lookup tables and operation order wherever order matters); :class:`FloatMath` runs the same graph
in float64, which the compiler uses to calibrate value ranges and to check the lowering against
PyTorch. Numpy only: ``verify`` and the accuracy report need no C++ compiler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import fixed
from .design import RSTD_FRAC, Design

Params = Callable[[str], np.ndarray]
ExpertWeights = Callable[[int, int], dict]
Observer = Callable[[str, str, np.ndarray], None]  # (site name, tensor class, values)


class FloatMath:
    """float64 arithmetic (the reference the fixed point is measured against)."""

    def __init__(self, design: Design, observe: Observer | None = None):
        self.d = design
        self.observe = observe or (lambda _site, _cls, _v: None)

    def input(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def linear(self, x, w, b, site: str):
        y = x @ w.T + b
        self.observe(site, "act", y)
        return y

    def conv(self, x, w, b, stride: int, pad: int, relu: bool, site: str):
        cols, (ho, wo) = _im2col(x, w.shape[-1], stride, pad)
        y = cols @ w.reshape(w.shape[0], -1).T + b
        y = np.maximum(y, 0) if relu else y
        y = y.transpose(0, 2, 1).reshape(x.shape[0], w.shape[0], ho, wo)
        self.observe(site, "act", y)
        return y

    def add(self, a, b, site: str):
        y = a + b
        self.observe(site, "act", y)
        return y

    def layernorm(self, x, g, b, name: str, site: str):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + self.d.eps[name]) * g + b
        self.observe(site, "act", y)
        return y

    def gelu(self, x, site: str):
        y = 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))
        self.observe(site, "act", y)
        return y

    def attention(self, qkv, site: str):
        d = self.d
        q, k, v = _split_heads(qkv, d.heads)
        scale = 2.0**-d.scale_shift if d.scale_shift >= 0 else 1.0  # folded scales are in q already
        s = q @ k.swapaxes(-1, -2) * scale
        self.observe(site + ".scores", "score", s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y = _merge_heads(p @ v)
        self.observe(site, "act", y)
        return y

    def gate(self, h, w, b, window: np.ndarray, keep: np.ndarray, site: str):
        logits = h @ w.T + b
        self.observe(site + ".logits", "score", logits)
        z = np.where(window, logits, -np.inf)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return _top_k(np.where(keep, p, -1.0), p, self.d.top_k)

    def combine_init(self, shape):
        return np.zeros(shape)

    def combine_add(self, acc, tok, y, p):
        acc[tok] += y * p[:, None]

    def combine_end(self, acc, site: str):
        self.observe(site, "act", acc)
        return acc

    def output(self, y) -> np.ndarray:
        return y


class FixedMath:
    """The accelerator's fixed-point arithmetic on raw integers (int64), bit-exact with C simulation."""

    def __init__(self, design: Design):
        self.d = design
        self.t = design.types
        self.A = design.types["act"]
        self.S = design.types["score"]
        self.fp = design.prob_frac
        self._gelu = fixed.gelu_table(self.A)
        self._exp2 = fixed.exp2_table()

    def input(self, x: np.ndarray) -> np.ndarray:
        return fixed.quantize(x, self.t["input"])

    def _frac(self, cls: str) -> int:
        return self.t[cls].frac

    def _affine(self, x, fx: int, w, fw: int, b, fb: int) -> tuple[np.ndarray, int]:
        acc = fixed.exact_matmul(x, w.T) + (b << (fx + fw - fb))
        return acc, fx + fw

    def linear(self, x, w, b, site: str, wcls: str = "weight", bcls: str = "bias", xfrac: int | None = None):
        acc, frac = self._affine(x, self.A.frac if xfrac is None else xfrac, w, self._frac(wcls), b, self._frac(bcls))
        return fixed.convert(acc, frac, self.A)

    def conv(self, x, w, b, stride: int, pad: int, relu: bool, site: str, xfrac: int | None = None):
        cols, (ho, wo) = _im2col(x, w.shape[-1], stride, pad)
        fx = self.A.frac if xfrac is None else xfrac
        acc, frac = self._affine(cols, fx, w.reshape(w.shape[0], -1), self._frac("embed"), b, self._frac("bias"))
        y = fixed.convert(acc, frac, self.A)
        y = np.maximum(y, 0) if relu else y
        return y.transpose(0, 2, 1).reshape(x.shape[0], w.shape[0], ho, wo)

    def add(self, a, b, site: str):
        return fixed.saturate(a + b, self.A)

    def layernorm(self, x, g, b, name: str, site: str):
        d, fa = self.d, self.A.frac
        n = x.shape[-1]
        mean = fixed.round_div(x.sum(-1, keepdims=True), n)
        c = x - mean
        cs = fixed.round_shift(c, d.ln_shift)
        var = fixed.round_div((cs * cs).sum(-1, keepdims=True), n) + d.eps_raw(name)
        fs, guard = fa - d.ln_shift, d.ln_guard
        sd = fixed.isqrt(var << (2 * guard))  # sqrt with fs + guard fraction bits
        rstd = fixed.floor_div(np.int64(1) << (RSTD_FRAC + fs + guard), sd)
        norm = fixed.convert(c * rstd, fa + RSTD_FRAC, self.A)
        fn = self._frac("norm")
        return fixed.convert(norm * g + (b << fa), fa + fn, self.A)

    def gelu(self, x, site: str):
        fa, step = self.A.frac, fixed.GELU_STEP_BITS
        lo = fixed.GELU_RANGE << fa
        u = x + lo
        inside = (u >= 0) & (u < 2 * lo)
        uc = np.clip(u, 0, 2 * lo - 1)
        j = uc >> (fa - step)
        t = uc & ((1 << (fa - step)) - 1)
        tab = self._gelu
        y = tab[j] + fixed.round_shift((tab[j + 1] - tab[j]) * t, fa - step)
        return np.where(inside, fixed.saturate(y, self.A), np.where(u < 0, 0, x))

    def exp(self, z: np.ndarray, zfrac: int) -> np.ndarray:
        """``exp(z)`` for raw ``z <= 0`` with ``zfrac`` fraction bits, as a probability (``prob_frac`` bits)."""
        cut = np.int64(fixed.EXP_CUTOFF) << zfrac
        zc = np.maximum(z, -cut)
        u = fixed.round_shift(zc * fixed.LOG2E_RAW, zfrac + fixed.LOG2E_FRAC - fixed.EXP_ARG_FRAC)
        n = u >> fixed.EXP_ARG_FRAC  # <= 0
        f = u & ((1 << fixed.EXP_ARG_FRAC) - 1)
        sb = fixed.EXP_ARG_FRAC - fixed.EXP_STEP_BITS
        j, t = f >> sb, f & ((1 << sb) - 1)
        tab = self._exp2
        val = tab[j] + fixed.round_shift((tab[j + 1] - tab[j]) * t, sb)
        sh = fixed.EXP_FRAC - self.fp - n
        out = (val + (np.int64(1) << (sh - 1))) >> sh
        return np.where(z < -cut, 0, out)

    def attention(self, qkv, site: str):
        d, fa = self.d, self.A.frac
        kq = d.qk_shift
        q, k, v = (fixed.round_shift(t, kq) for t in _split_heads(qkv, d.heads))
        fq = fa - kq
        dot = fixed.exact_matmul(q, k.swapaxes(-1, -2))  # 2 fq fraction bits
        s = fixed.convert(dot, 2 * fq + max(d.scale_shift, 0), self.S)
        fp, one = self.fp, np.int64(1) << self.fp
        n = s.shape[-1]
        # Single pass over the keys: running max m, running sum l, running numerator acc (rescaled
        # whenever the max grows), exactly as the kernel streams them.
        m = s[..., 0].copy()
        lsum = np.full(m.shape, one, dtype=np.int64)
        acc = np.broadcast_to(v[..., 0:1, :] << fp, (*m.shape, v.shape[-1])).copy()
        for j in range(1, n):
            sj = s[..., j]
            up = sj > m
            e = self.exp(-np.abs(sj - m), self.S.frac)
            vj = v[..., j, :][..., None, :]
            lsum = np.where(up, fixed.round_shift(lsum * e, fp) + one, lsum + e)
            upv = up[..., None]
            ev = e[..., None]
            acc = np.where(upv, fixed.round_shift(acc * ev, fp) + (vj << fp), acc + ev * vj)
            m = np.where(up, sj, m)
        out = fixed.saturate(fixed.round_div(acc << kq, lsum[..., None]), self.A)
        return _merge_heads(out)

    def gate(self, h, w, b, window: np.ndarray, keep: np.ndarray, site: str):
        acc, frac = self._affine(h, self.A.frac, w, self._frac("weight"), b, self._frac("bias"))
        logits = fixed.convert(acc, frac, self.S)
        low = np.int64(np.iinfo(np.int64).min // 2)
        z = np.where(window, logits, low)
        mx = z.max(-1, keepdims=True)
        e = np.where(window, self.exp(np.minimum(z - mx, 0), self.S.frac), 0)
        total = e.sum(-1, keepdims=True)
        p = fixed.round_div(e << self.fp, total)
        return _top_k(np.where(keep, logits, low), p, self.d.top_k)

    def combine_init(self, shape):
        return np.zeros(shape, dtype=np.int64)

    def combine_add(self, acc, tok, y, p):
        acc[tok] += y * p[:, None]

    def combine_end(self, acc, site: str):
        return fixed.convert(acc, self.A.frac + self.fp, self.A)

    def output(self, y) -> np.ndarray:
        return y


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # the compiler's environment has scipy
    except ImportError:  # a runtime-only install: slower, same values
        from math import erf as erf1

        erf = np.vectorize(erf1)
    return erf(x)


# -- the dataflow ------------------------------------------------------------------------------
def forward(
    design: Design,
    math,
    x: np.ndarray,
    task: str,
    params: Params,
    experts: ExpertWeights,
    routes: list | None = None,
) -> np.ndarray:
    """Run one task on a batch.

    Args:
        design: The accelerator.
        math: :class:`FixedMath` (raw integers in and out) or :class:`FloatMath`.
        x: Input batch (B, C, H, W): real values (the math converts them).
        task: Task name.
        params: Dense tensor by name (raw or float, matching ``math``).
        experts: (layer, expert) -> {"w1", "b1", "w2", "b2"}.
        routes: If a list, each MoE layer's (experts (B*N, k), probabilities (B*N, k)) is appended.

    Returns:
        The task's output: raw values of the activation type (fixed) or floats, shaped
        (B, channels, H, W), or (B, tokens, dim) for a backbone task.
    """
    d = design
    t = d.tasks.index(task)
    xin = math.input(x)
    fixed_math = isinstance(math, FixedMath)
    h = xin
    stages = d.stem_stages
    for i, (_ci, _co, _kk, stride, pad, _h) in enumerate(stages):
        relu = d.stem == "conv" and i < len(stages) - 1
        kw = {"xfrac": d.types["input"].frac} if fixed_math and i == 0 else {}
        h = math.conv(h, params(f"stem.{i}.w"), params(f"stem.{i}.b"), stride, pad, relu, f"stem.{i}", **kw)
    b = h.shape[0]
    tokens = h.reshape(b, d.dim, -1).transpose(0, 2, 1)
    cls = np.broadcast_to(params("cls") if d.cls_token else np.zeros(d.dim, dtype=tokens.dtype), (b, 1, d.dim))
    xs = math.add(np.concatenate([cls, tokens], axis=1), params("pos")[None], "embed")
    layer = 0
    for blk in range(d.depth):
        p = f"b{blk}"
        n1 = math.layernorm(xs, params(f"{p}.ln1.g"), params(f"{p}.ln1.b"), f"{p}.ln1", f"{p}.ln1")
        qkv = math.linear(n1, params(f"{p}.qkv.w"), params(f"{p}.qkv.b"), f"{p}.qkv", **_cls(math, "attn_bias"))
        att = math.attention(qkv, f"{p}.attn")
        xs = math.add(
            xs, math.linear(att, params(f"{p}.proj.w"), params(f"{p}.proj.b"), f"{p}.proj", **_cls(math, "attn_bias")),
            f"{p}.res1",
        )  # fmt: skip
        n2 = math.layernorm(xs, params(f"{p}.ln2.g"), params(f"{p}.ln2.b"), f"{p}.ln2", f"{p}.ln2")
        if blk in d.moe_blocks:
            y = _moe(d, math, n2, t, layer, params, experts, routes, f"{p}.moe")
            layer += 1
        else:
            hid = math.gelu(math.linear(n2, params(f"{p}.fc1.w"), params(f"{p}.fc1.b"), f"{p}.fc1"), f"{p}.gelu")
            y = math.linear(hid, params(f"{p}.fc2.w"), params(f"{p}.fc2.b"), f"{p}.fc2")
        xs = math.add(xs, y, f"{p}.res2")
    if d.final_norm:
        xs = math.layernorm(xs, params("norm.g"), params("norm.b"), "norm", "norm")
    ch = d.head_channels[t]
    if not ch:
        return math.output(xs)
    hn = math.layernorm(xs[:, 1:], params(f"head{t}.ln.g"), params(f"head{t}.ln.b"), f"head{t}.ln", f"head{t}.ln")
    y = math.linear(hn, params(f"head{t}.w"), params(f"head{t}.b"), f"head{t}")
    gh, gw = d.grid
    pp = d.patch
    y = y.reshape(b, gh, gw, pp, pp, ch).transpose(0, 5, 1, 3, 2, 4).reshape(b, ch, gh * pp, gw * pp)
    return math.output(y)


def _cls(math, bias_cls: str) -> dict:
    return {"bcls": bias_cls} if isinstance(math, FixedMath) else {}


def _moe(d: Design, math, h, t: int, layer: int, params: Params, experts: ExpertWeights, routes, site: str):
    """Gate, top-k, per-expert token queues; experts in ascending order, each on its queue."""
    b, n, dim = h.shape
    flat = h.reshape(b * n, dim)
    window = np.zeros(d.num_experts, dtype=bool)
    window[list(d.windows[t][layer])] = True
    keep = np.zeros(d.num_experts, dtype=bool)
    keep[list(d.kept[t][layer])] = True
    idx, prob = math.gate(flat, params(f"gate{t}.{layer}.w"), params(f"gate{t}.{layer}.b"), window, keep, site)
    if routes is not None:
        routes.append((idx, prob))
    acc = math.combine_init(flat.shape)
    fixed_math = isinstance(math, FixedMath)
    for e in np.unique(idx):
        tok, slot = np.nonzero(idx == e)
        w = experts(layer, int(e))
        kw = {"bcls": "bias"} if fixed_math else {}
        hid = math.gelu(math.linear(flat[tok], w["w1"], w["b1"], f"{site}.w1", **kw), f"{site}.gelu")
        y = math.linear(hid, w["w2"].T, w["b2"], f"{site}.w2", **kw)
        math.combine_add(acc, tok, y, prob[tok, slot])
    return math.combine_end(acc, site).reshape(b, n, dim)


def _top_k(key: np.ndarray, prob: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` experts with the largest ``key`` (ties: the lower index first) and their ``prob``."""
    order = np.argsort(-key, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(prob, order, axis=-1)


def _split_heads(qkv: np.ndarray, heads: int):
    b, n, three_d = qkv.shape
    hd = three_d // (3 * heads)
    parts = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def _merge_heads(y: np.ndarray) -> np.ndarray:
    b, h, n, hd = y.shape
    return y.transpose(0, 2, 1, 3).reshape(b, n, h * hd)


def _im2col(x: np.ndarray, k: int, stride: int, pad: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Patches of ``x`` (B, C, H, W) as rows (B, Ho*Wo, C*k*k), channel-major like a conv weight."""
    b, c, hh, ww = x.shape
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (hh + 2 * pad - k) // stride + 1, (ww + 2 * pad - k) // stride + 1
    sb, sc, sh, sw = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, (b, ho, wo, c, k, k), (sb, sh * stride, sw * stride, sc, sh, sw), writeable=False
    )
    return view.reshape(b, ho * wo, c * k * k), (ho, wo)
