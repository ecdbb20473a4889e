"""Tensor-by-tensor reads of a checkpoint folder's safetensors shards.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the tensors' bytes. :class:`CheckpointReader` reads one tensor (or the rows ``[i]`` of one)
with plain file reads into a fresh buffer: no memory map stays open, so the pages of tensors
already used do not count against the process (a mapped 2 GB file touched end to end would).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ...errors import ModelError
from ...frontends.base import nonfinite_kinds
from .checkpoint import weight_headers

# safetensors dtype names -> torch dtype attribute names (float8 / int4 checkpoints are not read).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


_PIECE = 1 << 24  # bytes read per piece when widening or scanning


@dataclass(frozen=True)
class Scan:
    """One read of a whole checkpoint (:meth:`CheckpointReader.scan`).

    Attributes:
        digest: sha256 over every tensor's name, dtype, shape and stored bytes, in name order.
        nonfinite: Tensors holding NaN or Inf, by name: which of the two.
    """

    digest: str
    nonfinite: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor in the file
    end: int


class CheckpointReader:
    """The tensors of a checkpoint folder (one ``model.safetensors`` or the index's shards), read on demand.

    Raises:
        ModelError: A broken folder (see :func:`~.checkpoint.weight_headers`) or a tensor of a dtype
            edgemoe does not read.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        headers = weight_headers(self.folder)  # checked: present, headers whole, sizes match
        self.files = list(headers)
        self._entries: dict[str, _Entry] = {}
        for path, (data, header) in headers.items():
            for name, v in header.items():
                if name == "__metadata__":
                    continue
                lo, hi = (int(x) for x in v["data_offsets"])
                self._entries[name] = _Entry(path, v["dtype"], tuple(int(d) for d in v["shape"]), data + lo, data + hi)
        self._scan: Scan | None = None

    @property
    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(e.end - e.start for e in self._entries.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def nbytes_of(self, key: str) -> int:
        e = self._entries[key]
        return e.end - e.start

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def read(self, key: str, index: int | slice | None = None, dtype=None):
        """Tensor ``key`` (only ``[index]`` of its first dimension, if given) in a buffer of its own.

        Args:
            key: The tensor's name.
            index: Rows of the first dimension to read (None: all).
            dtype: The torch dtype to return (None: as stored). A wider one is filled piece by
                piece, so a bf16 table widened to fp32 never has both copies whole in memory.

        Raises:
            ModelError: No such tensor, an index out of range, or a dtype edgemoe does not read.
        """
        import torch

        entry = self._entries.get(key)
        if entry is None:
            raise ModelError(f"{self.folder}: the checkpoint has no tensor '{key}'")
        name = _DTYPES.get(entry.dtype)
        if name is None:
            raise ModelError(f"{entry.path}: tensor '{key}' is {entry.dtype}, a dtype edgemoe does not read")
        stored = getattr(torch, name)
        shape, start, end = entry.shape, entry.start, entry.end
        if index is not None:
            lo, hi = (index.start, index.stop) if isinstance(index, slice) else (index, index + 1)
            if not shape or index == slice(None) or not 0 <= lo < hi <= shape[0] or getattr(index, "step", None):
                raise ModelError(f"{entry.path}: tensor '{key}' {list(shape)} has no rows {index}")
            row = (end - start) // shape[0]
            start, end = start + lo * row, start + hi * row
            shape = (hi - lo, *shape[1:]) if isinstance(index, slice) else shape[1:]
        # Read straight into a tensor's own storage (a tensor made with frombuffer would not keep a
        # Python buffer alive), widening piece by piece where asked.
        out = torch.empty(shape, dtype=dtype or stored)
        flat = out.view(-1)
        size = stored.itemsize
        piece = torch.empty(_PIECE // size if out.dtype != stored else 0, dtype=stored)
        with entry.path.open("rb") as fh:
            fh.seek(start)
            done = 0
            while done < flat.numel():
                if out.dtype == stored:  # the whole tensor at once, into its own bytes
                    view, n = flat.view(torch.uint8), flat.numel()
                else:
                    n = min(piece.numel(), flat.numel() - done)
                    view = piece[:n].view(torch.uint8)
                if fh.readinto(view.numpy()) != n * size:
                    raise ModelError(f"{entry.path}: tensor '{key}' ends early (truncated file)")
                if out.dtype != stored:
                    flat[done : done + n] = piece[:n]
                done += n
        return out

    def scan(self) -> Scan:
        """Read every tensor once: the checkpoint's digest and its non-finite tensors (cached).

        One pass over the stored bytes in 16 MiB pieces serves both the bundle's ``state_sha256``
        and the compiler's finite check, so a checkpoint is read once before its partitions are.

        Raises:
            ModelError: A tensor ends early (a file truncated since its header was checked).
        """
        if self._scan is None:
            import torch

            h = hashlib.sha256()
            nonfinite: dict[str, tuple[str, ...]] = {}
            buf = torch.empty(_PIECE, dtype=torch.uint8)
            for key in self.keys:
                e = self._entries[key]
                h.update(key.encode())
                h.update(f"{e.dtype}{list(e.shape)}".encode())
                stored = getattr(torch, _DTYPES.get(e.dtype, "uint8"))
                floating = stored if stored.is_floating_point else None
                kinds: set[str] = set()
                with e.path.open("rb") as fh:
                    fh.seek(e.start)
                    left = e.end - e.start
                    while left:
                        n = min(left, _PIECE)  # a multiple of every element size: pieces hold whole values
                        view = buf[:n]
                        if fh.readinto(view.numpy()) != n:
                            raise ModelError(f"{e.path}: tensor '{key}' ends early (truncated file)")
                        h.update(view.numpy())
                        if floating is not None:
                            kinds.update(nonfinite_kinds(view.view(floating)))
                        left -= n
                if kinds:
                    nonfinite[key] = tuple(k for k in ("NaN", "Inf") if k in kinds)
            self._scan = Scan(h.hexdigest(), nonfinite)
        return self._scan

    def digest(self) -> str:
        """sha256 over every tensor's name, dtype, shape and stored bytes, in name order (:meth:`scan`)."""
        return self.scan().digest
