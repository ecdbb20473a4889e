"""Stage 1b: refuse a model whose weights hold NaN or Inf, naming the tensors.

A non-finite weight compiles and runs without complaint and turns every output it reaches into
NaN; from a checkpoint someone else trained, that is a broken file, not a model to deploy.
"""

from __future__ import annotations

import warnings

from ..config import CompileConfig
from ..errors import EdgeMoEWarning, ModelError
from ..stages import CompileState, Stage
from .capture_model import CapturedModel

SHOWN = 5  # tensors named in the error (the count says how many more)


def check_finite_weights(captured: CapturedModel, allow: bool = False) -> list[str]:
    """The model's parameters that hold NaN or Inf (empty if none).

    Args:
        captured: The captured model (its adapter's torch module, or a streamed checkpoint's scan).
        allow: Return the names instead of refusing (``--allow-nonfinite``).

    Raises:
        ModelError: Some parameter holds NaN or Inf and ``allow`` is False.
    """
    found = captured.adapter.nonfinite_weights()
    bad = [f"{name} ({'/'.join(kinds)})" for name, kinds in found.items()]
    if bad and not allow:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise ModelError(
            f"{captured.ir.name}: non-finite weights in {', '.join(bad[:SHOWN])}{more}: every output they reach "
            "would be NaN (--allow-nonfinite compiles it anyway)"
        )
    return bad


def check_weights_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``check-weights``: refuse non-finite weights, or warn by name with ``allow_nonfinite``."""
    for name in check_finite_weights(state.captured, cfg.allow_nonfinite):
        warnings.warn(EdgeMoEWarning(f"non-finite weights compiled as asked: {name}"), stacklevel=2)
    return state


STAGE = Stage(
    "check-weights",
    check_weights_stage,
    lambda s: {"nonfinite": check_finite_weights(s.captured, allow=True)},
)
