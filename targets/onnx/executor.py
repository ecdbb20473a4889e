"""onnxruntime executor: runs the ONNX target's graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...bundle.format import read_verified
from ...errors import BundleError
from ...runtime.executor import Executor, Graph


def session_options(threads: int = 0):
    """Session options for onnxruntime, as the runtime uses them.

    Args:
        threads: Intra-op threads (0: onnxruntime's default, one per physical core).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # A bundle runs many small sessions one after another: idle workers that spin steal the
    # cores from the next session (measured 7x slower at 2 threads; benchmarks/RESULTS.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class OrtGraph(Graph):
    """One onnxruntime inference session."""

    def __init__(self, session, name: str):
        self._session = session
        self.name = name
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self._session.run(None, dict(zip(self.input_names, inputs, strict=True))))


class OrtExecutor(Executor):
    """Creates onnxruntime sessions from verified graph bytes.

    Args:
        threads: Intra-op threads per session (0: onnxruntime's default).
        providers: Execution providers in order of preference; those not available in the
            installed onnxruntime are skipped (CPU is always last).
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 0, providers: tuple[str, ...] = ()):
        import onnxruntime as ort

        self._ort = ort
        available = set(ort.get_available_providers())
        self.providers = [p for p in providers if p in available and p != "CPUExecutionProvider"]
        self.providers.append("CPUExecutionProvider")
        self.threads = threads

    def load(self, root: Path, record: dict) -> Graph:
        data = read_verified(root, record)  # checked bytes go straight to onnxruntime
        opts = session_options(self.threads)
        try:
            session = self._ort.InferenceSession(data, opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {record['file']}: {str(exc).splitlines()[0]}") from None
        return OrtGraph(session, record["file"])
