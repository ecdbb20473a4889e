"""Loading experts: a bundle's expert blobs, checked against the manifest before use and placed by the executor."""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle.format import check_blob_sizes, decode_expert, read_verified
from ..errors import BundleError
from .executor import Executor


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a checked file's bytes without reading them: size, inode, mtime and ctime."""
    return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


class ExpertStore:
    """The routed expert blobs of a bundle, by ``(layer, expert)``.

    Args:
        root: Bundle folder.
        manifest: Its manifest.
        executor: Places decoded weights where its kernels read them (host memory, a device).
    """

    def __init__(self, root: Path, manifest: dict, executor: Executor):
        self.root = root
        self.executor = executor
        self.records = [{e["index"]: e for e in layer["experts"]} for layer in manifest["moe_layers"]]
        # Blobs whose sha256 was checked, with the file signature they had then.
        self._verified: dict[tuple[int, int], tuple[Path, tuple[int, int, int, int]]] = {}

    def kept_sets(self, task: str, record: dict) -> list[frozenset[int]]:
        """The experts ``task`` may route to, per layer (its manifest ``record``'s kept sets).

        Raises:
            BundleError: A kept expert the bundle does not list.
        """
        kept = [frozenset(s) for s in record["experts"]]
        for li, keep in enumerate(kept):
            missing = keep - set(self.records[li])
            if missing:
                raise BundleError(
                    f"garbled manifest: task '{task}' keeps experts {sorted(missing)} of layer {li}, "
                    "which the bundle does not list"
                )
        return kept

    def check_sizes(self, kept: list[frozenset[int]]) -> None:
        """Check the kept blobs' files hold their records' sizes.

        The cache allocates each expert's buffer from its record's size before the blob's sha256
        check: a record must not make it allocate more than the file holds.
        """
        check_blob_sizes(self.root, (self.records[li][e] for li, keep in enumerate(kept) for e in keep))

    def task_bytes(self, kept: list[frozenset[int]]) -> int:
        """Bytes of the kept experts' blobs."""
        return sum(int(self.records[li][e]["bytes"]) for li, keep in enumerate(kept) for e in keep)

    def read(self, key: tuple[int, int], into: bytearray) -> dict[str, object]:
        """Read an expert blob into ``into`` (its size), sha256-checked on its first load, and place it.

        A reload after eviction skips the hash when the file's size, inode, mtime and ctime are
        still those it had when it was checked (hashing on every swap would cost more than the
        read). The ctime is the kernel's: a rewrite in place changes it even when the writer puts
        the size and mtime back.

        Returns:
            The expert's tensors: views on ``into``, or the executor's copies on its device
            (:meth:`~edgemoe.runtime.executor.Executor.place`).
        """
        record = self.records[key[0]][key[1]]
        known = self._verified.get(key)
        if known is not None:
            path, signature = known
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    st = os.fstat(fd)
                    # One read straight into the buffer the tensors will view.
                    if _signature(st) == signature and os.readv(fd, [into]) == len(into):
                        return self.executor.place(decode_expert(into, record["tensors"]))
                finally:
                    os.close(fd)
            except OSError:
                pass  # fall through to the full check, which reports it
        path = (self.root / record["file"]).resolve()
        st = path.stat() if path.is_file() else None  # before the check: a later change alters the signature
        memoryview(into)[:] = read_verified(self.root, record)  # checked to be the record's size, as ``into``
        weights = decode_expert(into, record["tensors"])
        if st is not None:
            self._verified[key] = (path, _signature(st))
        return self.executor.place(weights)
