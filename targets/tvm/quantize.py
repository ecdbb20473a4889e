"""Quantized partitions for the TVM target: fp16, int8 (static) and int8-dynamic, as torch rewrites.

onnxruntime's quantizers write operators Relax cannot import (QLinear*, MatMulNBits,
MatMulIntegerToFloat), so this target quantizes the torch partitions themselves before
``torch.export``, with the arithmetic of onnxruntime's QDQ format:

- weights: symmetric int8 per output channel (``w ≈ q · scale``), stored as int8 constants in the
  library or, for expert kernels, fed as int8 inputs from the expert's blob — 4× fewer bytes;
- activations entering each weight matmul (``nn.Linear``, ``nn.Conv2d``, ``x @ w`` in a kernel):
  uint8 asymmetric, ``(clamp(⌊x / s + ½⌋ + zp, 0, 255) − zp) · s``, with (s, zp) calibrated on the
  task's calibration feeds (``int8``) or taken from the tensor's own range at run time
  (``int8-dynamic``). Activation × activation matmuls (attention) stay float, as in the ONNX target;
- ``fp16``: weights stored as float16, computed in float32.

Rounding is ``⌊· + ½⌋`` rather than round-half-even so that torch and TVM agree bit for bit on
where a value lands, and the compiled library can be held to the same 1e-4 check as fp32.
Group-wise n-bit (``int4``, mixed precision) has no Relax path here and is refused at compile time.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import TargetError
from ...passes.calibrate_activations import activation_range, uint8_qparams
from ...quantization import quantize_int8_per_channel

SCHEMES = ("fp16", "int8", "int8-dynamic")


def refuse(scheme: str) -> None:
    """Raise the compile-time error for a scheme this target cannot build.

    Raises:
        TargetError: ``scheme`` is not one of :data:`SCHEMES`.
    """
    if scheme not in SCHEMES:
        raise TargetError(
            f"target tvm does not support quantization scheme '{scheme}': group-wise n-bit weights "
            "(int4, mixed precision) need MatMulNBits, which Relax cannot import; use --target onnx "
            f"for '{scheme}', or --quant {'|'.join(SCHEMES)} with --target tvm"
        )


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """uint8 quantize-dequantize of ``x`` with scale ``scale`` and (float) zero point ``zp``."""
    return (torch.clamp(torch.floor(x / scale + 0.5) + zp, 0.0, 255.0) - zp) * scale


def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """uint8 quantize-dequantize with the range of ``x`` itself (always containing 0)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    span = hi - lo
    scale = torch.where(span > 0, span / 255.0, torch.ones_like(span))
    zp = torch.clamp(torch.floor(-lo / scale + 0.5), 0.0, 255.0)
    return fake_quant(x, scale, zp)


# FX keeps these as calls (their bodies are traced later, by torch.export).
fx.wrap("fake_quant")
fx.wrap("dynamic_fake_quant")


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of a Linear/Conv weight (output channels on axis 0)."""
    flat = w.detach().reshape(w.shape[0], -1).T.numpy()  # (fan-in, out): the layout of quantize_int8_per_channel
    # TVM compiles its own dense kernels (no onnxruntime uint8 x int8 kernel to saturate): full range.
    q, scale = quantize_int8_per_channel(flat, "weight", limit=127)
    return torch.from_numpy(np.ascontiguousarray(q.T)).reshape(w.shape), torch.from_numpy(scale)


class _QuantWeight(nn.Module):
    """A Linear or Conv2d whose weight is stored quantized and whose input is fake-quantized."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, scheme: str, act: tuple[float, float] | None):
        super().__init__()
        self.layer_kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        self.conv_args = (
            {}
            if isinstance(layer, nn.Linear)
            else {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        )
        self.scheme = scheme
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        w = layer.weight.detach()
        if scheme == "fp16":
            self.register_buffer("w", w.to(torch.float16))
        else:
            q, scale = _int8_rows(w)
            self.register_buffer("w_q", q)
            self.register_buffer("w_scale", scale.reshape(-1, *([1] * (w.dim() - 1))))
        if scheme == "int8":
            scale, zp = uint8_qparams(*act) if act is not None else (np.float32(1.0), np.uint8(0))
            self.register_buffer("act_scale", torch.tensor(float(scale)))
            self.register_buffer("act_zp", torch.tensor(float(zp)))

    def weight(self) -> torch.Tensor:
        if self.scheme == "fp16":
            return self.w.to(torch.float32)
        return self.w_q.to(torch.float32) * self.w_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8":
            x = fake_quant(x, self.act_scale, self.act_zp)
        elif self.scheme == "int8-dynamic":
            x = dynamic_fake_quant(x)
        if self.layer_kind == "linear":
            return F.linear(x, self.weight(), self.bias)
        return F.conv2d(x, self.weight(), self.bias, **self.conv_args)


def _weight_layers(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def calibrate_dense(
    module: nn.Module, input_names: Sequence[str], feeds: list[dict], calibrator: str, percentile: float
) -> dict[str, tuple[float, float]]:
    """Range of the input of every Linear / Conv2d of ``module`` over the calibration feeds.

    Raises:
        TargetError: There are no feeds to calibrate on.
    """
    if not feeds:
        raise TargetError("target tvm: int8 needs calibration feeds for every dense partition")
    module.eval()  # BatchNorm in inference mode, as the partition is exported
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name in _weight_layers(module):
        sub = module.get_submodule(name)
        hooks.append(sub.register_forward_pre_hook(lambda _m, a, n=name: seen.setdefault(n, []).append(a[0].numpy())))
    try:
        with torch.no_grad():
            for feed in feeds:
                module(*(torch.from_numpy(np.asarray(feed[n])) for n in input_names))
    finally:
        for h in hooks:
            h.remove()
    return {
        n: activation_range(np.concatenate([v.ravel() for v in vals]), calibrator, percentile)
        for n, vals in seen.items()
    }


def quantize_dense(module: nn.Module, scheme: str, ranges: dict[str, tuple[float, float]] | None) -> nn.Module:
    """A copy of ``module`` with every Linear / Conv2d quantized by ``scheme``."""
    out = copy.deepcopy(module).eval()
    if type(out) in (nn.Linear, nn.Conv2d):  # the partition is one layer (an LM head)
        return _QuantWeight(out, scheme, (ranges or {}).get(""))
    for name in _weight_layers(out):
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        layer = getattr(parent, attr)
        setattr(parent, attr, _QuantWeight(layer, scheme, (ranges or {}).get(name)))
    return out


# -- expert kernels: weights are graph inputs, rewritten on the FX graph ---------------------------
def _trace(module: nn.Module, name: str) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # FX raises assorted errors on control flow it cannot trace
        raise TargetError(f"target tvm: cannot rewrite expert kernel {name} for quantization: {exc}") from None


def _weight_matmuls(gm: fx.GraphModule, weight: fx.Node, name: str) -> list[fx.Node]:
    """The ``x @ weight`` nodes; any other use of a weight cannot be quantized here."""
    uses = list(weight.users)
    for u in uses:
        if not (u.op == "call_function" and u.target in (operator.matmul, torch.matmul) and u.args[1] is weight):
            raise TargetError(f"target tvm: kernel weight {name} is used by {u.format_node()}, not by x @ {name}")
    return uses


def kernel_input_names(params: Sequence[str], matrices: Sequence[str], scheme: str) -> list[str]:
    """Inputs of a quantized kernel, named as the expert blob's tensors (see quantize_weights)."""
    names = ["x"]
    for p in params:
        if p not in matrices or scheme == "fp16":
            names.append(p)
        elif scheme == "int8":
            names += [f"{p}.q", f"{p}.scale", f"{p}.act_scale", f"{p}.act_zp"]
        else:
            names += [f"{p}.q", f"{p}.scale"]
    return names


def quantize_kernel_module(
    module: nn.Module, params: Sequence[str], matrices: Sequence[str], scheme: str, name: str
) -> fx.GraphModule:
    """``module(x, *weights)`` rewritten to take each matrix quantized, in :func:`kernel_input_names` order."""
    gm = _trace(module, name)
    graph = gm.graph
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    weight_nodes = dict(zip(params, holders[1:], strict=True))  # holders[0] is x
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for p in params:
        old = weight_nodes[p]
        if p not in matrices:
            with graph.inserting_before(old):
                new = graph.placeholder(f"{p}_f32")
            old.replace_all_uses_with(new)
            graph.erase_node(old)
            continue
        uses = _weight_matmuls(gm, old, p)
        with graph.inserting_before(old):
            if scheme == "fp16":
                holders_p = [graph.placeholder(f"{p}_f16")]
            elif scheme == "int8":
                holders_p = [graph.placeholder(f"{p}_{s}") for s in ("q", "scale", "act_scale", "act_zp")]
            else:
                holders_p = [graph.placeholder(f"{p}_{s}") for s in ("q", "scale")]
        with graph.inserting_before(first_op):
            if scheme == "fp16":
                w = graph.call_method("to", (holders_p[0], torch.float32))
            else:
                q = graph.call_method("to", (holders_p[0], torch.float32))
                w = graph.call_function(operator.mul, (q, holders_p[1]))
            zp = graph.call_method("to", (holders_p[3], torch.float32)) if scheme == "int8" else None
        for use in uses:
            with graph.inserting_before(use):
                if scheme == "int8":
                    xq = graph.call_function(fake_quant, (use.args[0], holders_p[2], zp))
                elif scheme == "int8-dynamic":
                    xq = graph.call_function(dynamic_fake_quant, (use.args[0],))
                else:
                    xq = use.args[0]
            use.args = (xq, w)
        graph.erase_node(old)
    graph.lint()
    gm.recompile()
    return gm


def probe_kernel_module(module: nn.Module, params: Sequence[str], matrices: Sequence[str], name: str) -> fx.GraphModule:
    """``module(x, *weights) -> (y, *activation entering each matrix's matmul)`` (calibration)."""
    gm = _trace(module, name)
    graph = gm.graph
    holders = dict(zip(params, [n for n in graph.nodes if n.op == "placeholder"][1:], strict=True))
    acts = []
    for m in matrices:
        uses = _weight_matmuls(gm, holders[m], m)
        if len(uses) != 1:
            raise TargetError(f"target tvm: kernel weight {m} of {name} is used {len(uses)} times; cannot calibrate")
        acts.append(uses[0].args[0])
    (output,) = [n for n in graph.nodes if n.op == "output"]
    (y,) = output.args
    output.args = ((y, *acts),)
    graph.lint()
    gm.recompile()
    return gm


def example_kernel_inputs(
    x: torch.Tensor, params: dict[str, torch.Tensor], matrices: Sequence[str], scheme: str
) -> tuple[torch.Tensor, ...]:
    """Example inputs of a quantized kernel from the fp32 kernel's example weights."""
    out = [x]
    lo, hi = float(min(x.min(), 0)), float(max(x.max(), 0))
    for p, w in params.items():
        if p not in matrices:
            out.append(w)
        elif scheme == "fp16":
            out.append(w.to(torch.float16))
        else:
            q, scale = quantize_int8_per_channel(w.numpy(), p)
            out += [torch.from_numpy(q), torch.from_numpy(scale)]
            if scheme == "int8":
                # Every matmul's example activation range: the kernel input's (a stand-in, checked to 1e-4 only).
                s, zp = uint8_qparams(lo, hi)
                out += [torch.tensor([s], dtype=torch.float32), torch.tensor([zp], dtype=torch.uint8)]
    return tuple(out)


# A rounding tie x / s = k + ½ may land on either side in torch and in the compiled code (they
# evaluate x / s with different float operations), moving that element by one activation quantum;
# everything else must agree to the fp32 bar.
MAX_OFF_FRACTION = 1e-3


def check_quantized(target: str, part, got) -> None:
    """Compare a quantized library's outputs with its torch module, allowing rare one-quantum flips.

    Raises:
        TargetError: More than :data:`MAX_OFF_FRACTION` of an output's values are off, or any
            value is off by more than 5 % of the output's range.
    """
    from ..base import CHECK_ATOL, CHECK_RTOL

    with torch.no_grad():
        want = part.module(*part.example_inputs)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):
        raise TargetError(f"target {target}: {part.name} returns {len(got)} outputs, torch gives {len(want)}")
    for name, g, w in zip(part.output_names, got, want, strict=True):
        w = w.numpy()
        if g.shape != w.shape:
            raise TargetError(f"target {target}: {part.name}.{name} has shape {g.shape}, torch gives {w.shape}")
        err = np.abs(g.astype(np.float64) - w.astype(np.float64))
        off = err > CHECK_ATOL + CHECK_RTOL * np.abs(w)
        span = float(np.abs(w).max()) if w.size else 0.0
        if off.mean() > MAX_OFF_FRACTION or (err.size and err.max() > 0.05 * max(span, 1e-6)):
            raise TargetError(
                f"target {target}: quantized {part.name}.{name} differs from torch by {err.max():.3g} "
                f"({off.mean():.2%} of values off)"
            )
