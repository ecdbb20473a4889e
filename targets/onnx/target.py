"""ONNX target: every partition becomes one ONNX graph, run by onnxruntime on the device.

Graphs are exported with torch's TorchScript-based exporter (about 10x faster than the
dynamo exporter on these small graphs, and it exports the masked top-k gate and the
weight-as-input expert kernel exactly), checked with ``onnx.checker`` and then compared
with the torch module on the example inputs in onnxruntime before they enter a bundle. A graph
above 1 GiB keeps its weights in a data file next to it, listed with the graph (:mod:`.external`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ...config import CompileConfig
from ...devices import DeviceProfile
from ...errors import TargetError
from ...frontends import GraphPartition
from ..base import Target, check_against_torch
from .external import TENSOR_MIN_BYTES, attach_weights, graph_files, normalize_graph

# Exported graphs must reproduce the torch partition to within atol + rtol * |torch| (fp32).


# int8 weights use 7 bits of range (onnxruntime's ``reduce_range``). Its uint8 x int8 matmul kernels
# on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of products in 16 bits with saturation:
# 2 * 255 * 127 overflows, 2 * 255 * 63 does not. Full range gave wrong integer results on such a
# CPU (int8 expert kernel off by up to 0.08; int8-dynamic cosine 0.979), and a bundle may run on
# any x86 host.
INT8_WEIGHT_MAX = 63


def _weights_as_inputs(module, names: tuple[str, ...]):
    """A module running ``module`` with its weights ``names`` passed as trailing arguments (for export)."""
    import torch

    class WeightsAsInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *args):
            # Swapped in by hand: torch.func.functional_call refuses to run under the tracer.
            n = len(args) - len(names)
            slots = [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in names]
            kept = [owner._parameters[leaf] for owner, leaf in slots]
            try:
                for (owner, leaf), value in zip(slots, args[n:], strict=True):
                    owner._parameters[leaf] = value
                return self.inner(*args[:n])
            finally:
                for (owner, leaf), value in zip(slots, kept, strict=True):
                    owner._parameters[leaf] = value

    return WeightsAsInputs().eval()


class OnnxTarget(Target):
    """Emit ONNX graphs for onnxruntime (CPU everywhere, CUDA/TensorRT on Jetson)."""

    name = "onnx"
    executor = "onnxruntime"
    suffix = ".onnx"
    int8_weight_max = INT8_WEIGHT_MAX

    def check_device(self, device: DeviceProfile) -> None:
        # onnxruntime runs on every CPU we profile (x86_64 and aarch64 wheels exist).
        if device.cpu_arch not in ("x86_64", "aarch64", "AMD64", "arm64"):
            raise TargetError(f"target onnx: no onnxruntime build for CPU architecture {device.cpu_arch}")

    def describe(self, cfg: CompileConfig) -> dict:
        import onnx
        import torch

        return {
            "name": self.name,
            "executor": self.executor,
            "opset": cfg.opset,
            "onnx": onnx.__version__,
            "torch": torch.__version__,
        }

    def emit(self, part: GraphPartition, out_dir: Path, cfg: CompileConfig) -> Path:
        import onnx
        import torch

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{part.name}{self.suffix}"
        # Inference graphs: a wrapper left in training mode would make the exporter restore its
        # children (BatchNorm in the conv stem) to training mode after export, and the numeric check
        # would then compare against batch statistics.
        part.module.eval()
        # In a streamed compile the partition's weights are in memory only for torch's outputs and
        # the export; the checks below read the written graph.
        streamed = part.weights is not None
        with part.loaded() as ran, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            want = part.module(*part.example_inputs) if ran is None else ran
            module, args, names, weights = part.module, part.example_inputs, list(part.input_names), {}
            if streamed:
                # A streamed compile's weights go to the data file tensor by tensor (attach_weights),
                # not through the exporter: traced as parameters, each is copied while the graph is
                # built (shape inference evaluates ops on them), as graph inputs it is not.
                weights = {
                    n: p for n, p in module.named_parameters() if p.numel() * p.element_size() >= TENSOR_MIN_BYTES
                }
                module = _weights_as_inputs(module, tuple(weights))
                args, names = (*args, *weights.values()), [*names, *weights]
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=names,
                output_names=list(part.output_names),
                dynamic_axes=part.dynamic_axes,
                opset_version=cfg.opset,
                do_constant_folding=True,
                dynamo=False,
            )
            if streamed:
                attach_weights(path, weights, part.input_names)
                del weights, module, args
        if not streamed:
            normalize_graph(path)  # a large graph's weights into its one listed data file
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise TargetError(f"target onnx: graph {part.name} fails onnx.checker: {exc}") from None
        self._check_numerics(part, path, want)
        return path

    def quantize_graph(self, path: Path, scheme: str, feeds: list, quant) -> None:
        from .quantize import quantize_dense_graph

        quantize_dense_graph(path, scheme, feeds, quant.group_size, quant.calibrator, quant.percentile)

    def quantize_kernel(
        self, src: Path, dst: Path, weights: tuple[str, ...], scheme: str, bits: int, group: int
    ) -> Path:
        from .quantize import rewrite_expert_kernel

        return rewrite_expert_kernel(src, dst, weights, scheme, bits, group)

    def probe_kernel(self, src: Path, weights: tuple[str, ...]) -> tuple[bytes, list[str]]:
        from .quantize import probe_kernel

        return probe_kernel(src, weights)

    def graph_files(self, root: Path, path: Path) -> dict:
        return graph_files(root, path)

    def graph_io(self, path: Path) -> tuple[list[str], list[str]]:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        return [i.name for i in graph.input], [o.name for o in graph.output]

    def _check_numerics(self, part: GraphPartition, path: Path, want) -> None:
        """Run the graph in onnxruntime and compare with the torch module's outputs ``want`` on the example inputs."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # One run on the example inputs: packing the weights for faster matmuls would only hold a second copy.
        opts.add_session_config_entry("session.disable_prepacking", "1")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {n: t.numpy() for n, t in zip(part.input_names, part.example_inputs, strict=True)}
        check_against_torch("onnx", part, sess.run(list(part.output_names), feeds), want)


TARGET = OnnxTarget()
