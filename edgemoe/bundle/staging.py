"""Build a folder (a bundle, a device package) beside its output path and rename it into place.

Nothing half-written ever sits at the output: the folder is assembled in a hidden staging folder
next to it (same file system, so the final rename is atomic) and renamed only when complete. A
failed build removes its staging folder; one a killed process left behind is removed by the next
build to the same path. An existing output is replaced only if it is of the same kind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputPathError
from .format import is_bundle


@dataclass(frozen=True)
class OutputKind:
    """What an output folder holds: its name in messages and how to recognise one.

    Attributes:
        name: ``bundle``, ``package``.
        recognise: True for a folder that already is one (only such a folder is replaced).
    """

    name: str
    recognise: Callable[[Path], bool]


BUNDLE = OutputKind("bundle", is_bundle)

# Errors of the output storage whatever file was being written (a write() names none).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def check_output_path(out: Path, kind: OutputKind = BUNDLE) -> None:
    """Refuse an output path that exists and is not a ``kind`` (it is never overwritten).

    Raises:
        OutputPathError: ``out`` is a file, or a folder of something else.
    """
    if out.exists() and not kind.recognise(out):
        what = "folder" if out.is_dir() else "file"
        raise OutputPathError(
            f"output path {out} exists and is a {what}, not an edgemoe {kind.name}; choose another path"
        )


def open_staging(out: Path, kind: OutputKind = BUNDLE) -> Path:
    """Create the hidden staging folder for ``out`` (removing what killed builds left there).

    Raises:
        OutputPathError: ``out`` is taken by something else, or its parent cannot be written.
    """
    check_output_path(out, kind)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out, kind)
        staging = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as exc:
        raise OutputPathError(f"cannot write a {kind.name} at {out}: {os_reason(exc)}") from None
    return staging


def install(staging: Path, out: Path, kind: OutputKind = BUNDLE) -> None:
    """Rename the finished staging folder to ``out``, replacing an older ``kind`` there."""
    check_output_path(out, kind)  # again: something may have appeared there while we built
    if not out.exists():
        staging.rename(out)
        return
    backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(backup)
    try:
        staging.rename(out)
    except BaseException:
        backup.rename(out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def discard(staging: Path | None, out: Path, exc: BaseException, kind: OutputKind = BUNDLE) -> BaseException:
    """Remove a failed build's staging folder; return the error to raise for ``exc``.

    A storage failure of the output (disk full, read-only, vanished folder) becomes an
    :class:`~edgemoe.errors.OutputPathError` that says where; anything else is returned as is.
    """
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    if isinstance(exc, OSError) and (exc.errno in _STORAGE_ERRNOS or _inside(exc.filename, out.parent)):
        return OutputPathError(f"cannot write the {kind.name} at {out}: {os_reason(exc)}")
    return exc


@contextlib.contextmanager
def discard_on_failure(out: Path, staging: Callable[[], Path | None], kind: OutputKind = BUNDLE) -> Iterator[None]:
    """Inside: a build of ``out`` in the folder ``staging()`` returns (None: not opened yet).

    On any exception the staging folder is removed (:func:`discard`) and the error re-raised, a
    storage failure of the output as an :class:`~edgemoe.errors.OutputPathError` saying where.
    """
    try:
        yield
    except BaseException as exc:
        folder = staging()
        if folder is None:
            raise
        err = discard(folder, out, exc, kind)
        if err is exc:
            raise
        raise err from None


def remove_stale_staging(out: Path, kind: OutputKind = BUNDLE) -> list[Path]:
    """Remove what killed builds of ``out`` left beside it; return what was removed.

    A staging folder is named after its process id (``.<name>.staging-<pid>-<random>``): one whose
    process is gone was left by a build that was killed (an exception removes its own). The backup
    of a replaced output (``.<name>.old-<random>``) only outlives an interrupted rename; it goes once
    a ``kind`` is at ``out`` again (before that it may be the only copy). Folders of live builds are
    left alone.
    """
    removed = []
    for path in out.parent.glob(f".{out.name}.*"):
        rest = path.name[len(out.name) + 2 :]
        if rest.startswith("staging-"):
            pid = rest.split("-")[1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
        elif not (rest.startswith("old-") and kind.recognise(out)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def os_reason(exc: OSError) -> str:
    """``No space left on device (writing .../graphs/x.onnx)``: the OS's reason and the file."""
    reason = exc.strerror or type(exc).__name__
    return f"{reason} ({exc.filename})" if exc.filename else reason


def _inside(filename, folder: Path) -> bool:
    if not filename:
        return False
    try:
        return Path(os.fsdecode(filename)).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
