"""Error classes, each with its own CLI exit code.

The CLI prints ``error: <message>`` on one line and exits with the class's code. The codes
are part of the documented interface (README, "Exit codes"): do not renumber them.
"""

from __future__ import annotations

from typing import ClassVar


class EdgeMoEError(Exception):
    """Base class of every error the tool reports to a user."""

    exit_code = 1


class ModelError(EdgeMoEError):
    """Unknown model name, or a model file that cannot be loaded."""

    exit_code = 3


class ConfigError(EdgeMoEError):
    """A model or compile configuration that breaks an invariant (e.g. top-k > experts)."""

    exit_code = 4


class BundleError(EdgeMoEError):
    """Not a bundle, or a missing / garbled / incompatible manifest."""

    exit_code = 5


class IntegrityError(BundleError):
    """A bundle file is missing, truncated or does not match its sha256."""

    exit_code = 6


class OutputPathError(EdgeMoEError):
    """The output path exists and is not a bundle (it is never overwritten)."""

    exit_code = 7


class TaskError(EdgeMoEError):
    """A task name the model or bundle does not have."""

    exit_code = 8


class InputError(EdgeMoEError):
    """An input file that cannot be read or does not fit the model's input."""

    exit_code = 9


class VerificationError(EdgeMoEError):
    """``verify`` found an error above the tolerance."""

    exit_code = 10


class TargetError(EdgeMoEError):
    """Unknown target or device, or a target that cannot build this model."""

    exit_code = 11


class DependencyError(EdgeMoEError):
    """A command needs a package this install does not have (e.g. the compiler on a device)."""

    exit_code = 12

    # Packages by the extra that provides them, for the hint in the message.
    EXTRAS: ClassVar[dict[str, str]] = {
        "torch": "compiler",
        "onnx": "compiler",
        "safetensors": "compiler",
        "onnxruntime": "runtime",
        "PIL": "runtime",
        "tvm": "tvm",
        "tvm_ffi": "tvm",
    }

    @classmethod
    def from_import(cls, exc: ImportError) -> DependencyError:
        """Turn a missing-module error into a message naming the extra to install."""
        top = (exc.name or "").split(".")[0]
        extra = cls.EXTRAS.get(top, "compiler")
        return cls(
            f"this command needs the {extra} part of edgemoe ('{top}' is not installed): pip install 'edgemoe[{extra}]'"
        )


class RemoteError(EdgeMoEError):
    """A remote device (TVM RPC server or tracker) cannot be reached, fails or stops answering."""

    exit_code = 13


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the known names closest to a mistyped ``name``, else ``""``.

    Appended to "unknown X" messages so a typo costs one read, not a scan of the whole list.
    """
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"


class EdgeMoEWarning(UserWarning):
    """Something the user should know that does not stop the command (printed as ``warning: ...``)."""


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        EdgeMoEError,
        ModelError,
        ConfigError,
        BundleError,
        IntegrityError,
        OutputPathError,
        TaskError,
        InputError,
        VerificationError,
        TargetError,
        DependencyError,
        RemoteError,
    )
}
