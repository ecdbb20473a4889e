"""Quantized ONNX graphs: dense partitions with onnxruntime's tools, expert kernels by rewrite.

Dense partitions (weights are initializers) go through onnxruntime's own quantizers:
``quantize_static`` (QDQ on the inputs of weight MatMuls, Gemms and Convs: per-channel symmetric
int8 weights, calibrated uint8 activations),
``quantize_dynamic`` and ``MatMulNBitsQuantizer`` (4-bit weight-only). fp16 stores float
initializers as float16 with a Cast back to float32 (CPU onnxruntime has few fp16 kernels).

Expert kernels take their weights as graph inputs, which those tools do not quantize, so the
fp32 kernel is rewritten here: every MatMul whose weight is a graph input gets the quantized
form of that input (see :mod:`edgemoe.quantization` for the blob tensors it consumes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...bundle.onnx_data import external_refs
from ...errors import TargetError
from ...quantization import nbits_shapes
from .external import external_data_threshold, normalize_graph, save_graph

MS_DOMAIN = "com.microsoft"


def _weight_matmuls(model, weight_names: Iterable[str]) -> list:
    names = set(weight_names)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in names]


def _input_shape(model, name: str) -> list[int]:
    for i in model.graph.input:
        if i.name == name:
            return [d.dim_value for d in i.type.tensor_type.shape.dim]
    raise TargetError(f"kernel has no input {name}")


def _ensure_ms_opset(model) -> None:
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def rewrite_expert_kernel(
    src: Path, dst: Path, weights: Sequence[str], scheme: str, bits: int = 0, group: int = 32
) -> Path:
    """Write a quantized variant of an fp32 expert kernel.

    Args:
        src: fp32 kernel (inputs: tokens, then the expert's tensors).
        dst: Output path.
        weights: Names of the 2-D weight inputs to quantize (each feeds a MatMul as its B).
        scheme: ``fp16``, ``int8``, ``int8-dynamic`` or ``nbits``.
        bits: For ``nbits``: 2, 4 or 8.
        group: For ``nbits``: group size along the input dimension.

    Returns:
        ``dst``.
    """
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    matmuls = _weight_matmuls(model, weights)
    if {m.input[1] for m in matmuls} != set(weights):
        raise TargetError(f"kernel {src.name}: not every weight in {list(weights)} feeds a MatMul")
    shapes = {w: _input_shape(model, w) for w in weights}
    keep_inputs = [i for i in graph.input if i.name not in set(weights)]
    new_inputs, new_nodes = [], []
    vi = helper.make_tensor_value_info
    for mm in matmuls:
        w = mm.input[1]
        k, n = shapes[w]
        a = mm.input[0]
        out = mm.output[0]
        if scheme == "fp16":
            new_inputs.append(vi(w, TP.FLOAT16, [k, n]))
            new_nodes.append(
                (
                    mm,
                    [
                        helper.make_node("Cast", [w], [f"{w}.f32"], to=TP.FLOAT),
                        helper.make_node("MatMul", [a, f"{w}.f32"], [out]),
                    ],
                )
            )
        elif scheme == "nbits":
            packed, scales = nbits_shapes(k, n, bits, group)
            new_inputs += [vi(f"{w}.q", TP.UINT8, list(packed)), vi(f"{w}.scales", TP.FLOAT, list(scales))]
            node = helper.make_node(
                "MatMulNBits",
                [a, f"{w}.q", f"{w}.scales"],
                [out],
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=bits,
                block_size=group,
            )
            new_nodes.append((mm, [node]))
        elif scheme == "int8-dynamic":
            new_inputs += [vi(f"{w}.q", TP.INT8, [k, n]), vi(f"{w}.scale", TP.FLOAT, [n])]
            p = f"{w}.dyn"
            new_nodes.append(
                (
                    mm,
                    [
                        helper.make_node("DynamicQuantizeLinear", [a], [f"{p}.aq", f"{p}.as", f"{p}.azp"]),
                        helper.make_node("MatMulInteger", [f"{p}.aq", f"{w}.q", f"{p}.azp"], [f"{p}.acc"]),
                        helper.make_node("Cast", [f"{p}.acc"], [f"{p}.accf"], to=TP.FLOAT),
                        helper.make_node("Mul", [f"{p}.accf", f"{p}.as"], [f"{p}.y1"]),
                        helper.make_node("Mul", [f"{p}.y1", f"{w}.scale"], [out]),
                    ],
                )
            )
        elif scheme == "int8":
            # Explicit integer matmul (uint8 activations x int8 weights, scaled to float in the same
            # op). With a QuantizeLinear/DequantizeLinear pair around a float MatMul instead, the
            # kernel is whatever onnxruntime's graph optimizer makes of it: with the weights fed as
            # inputs it ran 7x slower than the fp32 kernel (208 vs 30 us per call, 6 tokens).
            # The activation's scale and zero point are one-element vectors (per-tensor).
            new_inputs += [
                vi(f"{w}.q", TP.INT8, [k, n]),
                vi(f"{w}.scale", TP.FLOAT, [n]),
                vi(f"{w}.act_scale", TP.FLOAT, [1]),
                vi(f"{w}.act_zp", TP.UINT8, [1]),
            ]
            p = f"{w}.s8"
            new_nodes.append(
                (
                    mm,
                    [
                        helper.make_node("QuantizeLinear", [a, f"{w}.act_scale", f"{w}.act_zp"], [f"{p}.aq"]),
                        helper.make_node(
                            "MatMulIntegerToFloat",
                            [f"{p}.aq", f"{w}.q", f"{w}.act_scale", f"{w}.scale", f"{w}.act_zp"],
                            [out],
                            domain=MS_DOMAIN,
                        ),
                    ],
                )
            )
        else:
            raise TargetError(f"target onnx: no expert kernel for scheme '{scheme}'")
    replaced = {id(mm): nodes for mm, nodes in new_nodes}
    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(keep_inputs + new_inputs)
    if scheme in ("nbits", "int8"):
        _ensure_ms_opset(model)
    onnx.checker.check_model(model)
    save_graph(model, dst)
    return dst


def probe_kernel(src: Path, weights: Sequence[str]) -> tuple[bytes, list[str]]:
    """The fp32 kernel with the activation entering each weight MatMul as an extra output.

    Returns:
        The probe graph's bytes and, per weight, the name of the output holding its activation.
    """
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    model = onnx.load(str(src))
    outs = []
    for w in weights:
        (mm,) = [m for m in _weight_matmuls(model, [w])]
        model.graph.output.append(helper.make_tensor_value_info(mm.input[0], TP.FLOAT, None))
        outs.append(mm.input[0])
    return model.SerializeToString(), outs


DENSE_INT8_OPS = ("MatMul", "Gemm", "Conv")


def activation_matmuls(model) -> list[str]:
    """Names of the MatMuls without a constant operand (attention's q @ k^T and attn @ v).

    Static int8 leaves these in float: they hold no weights to shrink, both operands would get
    per-tensor ranges fitted on calibration data, and keeping them float measurably lowered the
    error of the trained m3vit-tiny at no latency cost. Nameless nodes are named here, as
    onnxruntime excludes nodes by name.
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or any(x in constants for x in node.input):
            continue
        if not node.name:
            node.name = f"edgemoe.activation_matmul.{i}"
        out.append(node.name)
    return out


class _Reader:
    """onnxruntime CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        # The histogram calibrators read the data twice (ranges, then histograms).
        self._it = iter(self._feeds)


def quantize_dense_graph(
    path: Path,
    scheme: str,
    feeds: list[dict[str, np.ndarray]],
    group: int = 32,
    calibrator: str = "minmax",
    percentile: float = 99.99,
) -> None:
    """Quantize a dense partition in place with onnxruntime's tooling.

    Args:
        path: The fp32 ONNX file (rewritten).
        scheme: ``fp16``, ``int8``, ``int8-dynamic`` or ``int4``.
        feeds: Calibration feeds (``int8`` only): the graph's recorded inputs.
        group: Block size of ``int4``.
        calibrator: ``minmax`` or ``percentile`` (``int8``).
        percentile: Percentile kept by the percentile calibrator.
    """
    import logging

    import onnx
    import onnxruntime

    tmp = path.with_name(path.stem + ".q.onnx")
    # A graph with a data file is above the threshold: the quantizers must write theirs the same way
    # (their output may exceed protobuf's 2 GB too); normalize_graph then moves it to the bundle's name.
    large = bool(external_refs(path.read_bytes())) or path.stat().st_size > external_data_threshold()
    # onnxruntime's quantizers log advice on every call through the root logger; keep the CLI quiet.
    onnxruntime.set_default_logger_severity(3)
    logging.disable(logging.WARNING)
    try:
        _quantize_dense(path, tmp, scheme, feeds, group, calibrator, percentile, large)
    finally:
        logging.disable(logging.NOTSET)
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)
    normalize_graph(path)
    for leftover in path.parent.glob(path.stem + "*-inferred.onnx*"):
        leftover.unlink()


def _quantize_dense(
    path: Path, tmp: Path, scheme: str, feeds, group: int, calibrator: str, percentile: float, large: bool
) -> None:
    import onnx

    if scheme == "int8":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not feeds:
            raise TargetError(f"target onnx: no calibration data recorded for {path.name}")
        model = onnx.load(str(path))
        # Dense partitions are calibrated with MinMax: onnxruntime 1.32's histogram calibrators
        # (percentile, entropy) collect nothing on these graphs ("Histogram has not been collected").
        # The percentile calibrator applies to expert activations, which edgemoe calibrates itself.
        method = CalibrationMethod.MinMax
        extra = {
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
            # Output Q/DQ pairs only serve a quantized consumer; here every consumer is a float op
            # (bias Add, reshapes), so they would only add a rounding step. Without them a
            # weight MatMul runs as one int8 matmul with a float output (MatMulIntegerToFloat).
            "OpTypesToExcludeOutputQuantization": list(DENSE_INT8_OPS),
        }
        quantize_static(
            model,
            str(tmp),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # 7-bit weights: see target.INT8_WEIGHT_MAX
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            op_types_to_quantize=list(DENSE_INT8_OPS),
            nodes_to_exclude=activation_matmuls(model),
            use_external_data_format=large,
            extra_options=extra,
        )
    elif scheme == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(path),
            str(tmp),
            per_channel=True,
            reduce_range=True,  # 7-bit weights: see target.INT8_WEIGHT_MAX
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            use_external_data_format=large,
        )
    elif scheme == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=group, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(tmp), large)
    elif scheme == "fp16":
        save_graph(_fp16_weights(onnx.load(str(path))), tmp)
    else:
        raise TargetError(f"target onnx: no dense quantization for scheme '{scheme}'")


def _fp16_weights(model):
    """Store float32 initializers with more than 16 values as float16, cast back at run time."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TP.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size <= 16:
            continue
        name = init.name
        half = numpy_helper.from_array(arr.astype(np.float16), f"{name}.f16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [f"{name}.f16"], [name], to=TP.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model
