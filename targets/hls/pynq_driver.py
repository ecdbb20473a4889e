"""The ``fpga`` executor's board driver: the bitstream as a PYNQ overlay, buffers in DDR.

On a Zynq board with PYNQ installed, ``EDGEMOE_FPGA=pynq edgemoe run BUNDLE`` loads
``edgemoe.bit`` (with its ``edgemoe.hwh``) from the bundle folder (or ``$EDGEMOE_BITSTREAM``),
allocates every buffer with ``pynq.allocate`` (physically contiguous DDR the accelerator's AXI
masters read) and calls the HLS IP through PYNQ's register interface. It offers the same calls as
the C-simulation driver (:class:`~.executor.CsimDriver`), so the executor does not know which one
runs. ``pynq`` is imported only here, only on a board.

Not yet run on a board (no ZCU102/ZCU104 in CI): its calls are tested against the C simulation
standing in for the board's PYNQ objects (tests/test_hls.py).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from ...errors import BundleError, DependencyError

ENV_BITSTREAM = "EDGEMOE_BITSTREAM"
IP_NAME = "edgemoe_top"


class PynqDriver:
    """The accelerator on a Zynq board, through PYNQ.

    Args:
        root: The bundle folder (holding ``edgemoe.bit`` / ``edgemoe.hwh`` unless the environment says otherwise).
        pynq: The ``pynq`` module (default: imported here); any object with ``Overlay`` and ``allocate``.
    """

    name = "pynq"

    def __init__(self, root: Path, pynq=None):
        if pynq is None:
            try:
                pynq = importlib.import_module("pynq")
            except ImportError:
                raise DependencyError(
                    "EDGEMOE_FPGA=pynq needs PYNQ (on the board: pip install pynq); off the board use the "
                    "C simulation (unset EDGEMOE_FPGA)"
                ) from None
        bit = Path(os.environ.get(ENV_BITSTREAM) or Path(root) / "edgemoe.bit")
        if not bit.is_file():
            raise BundleError(
                f"no bitstream at {bit}: build it from the bundle's hls/ project (hls/README.md) and copy "
                f"edgemoe.bit and edgemoe.hwh there, or set {ENV_BITSTREAM}"
            )
        self._pynq = pynq
        self.overlay = pynq.Overlay(str(bit))
        names = [n for n in getattr(self.overlay, "ip_dict", {}) if IP_NAME in n]
        if not names:
            raise BundleError(f"the overlay {bit.name} has no {IP_NAME} IP (found: {', '.join(self.overlay.ip_dict)})")
        self.ip = getattr(self.overlay, names[0])

    def alloc(self, words: int, dtype) -> np.ndarray:
        """A contiguous DDR buffer (``pynq.allocate``: a numpy array with a physical address)."""
        buf = self._pynq.allocate(shape=(words,), dtype=dtype)
        buf[:] = 0
        return buf

    def to_device(self, buf) -> None:
        """Flush the host's writes to DDR (the CPU caches are not coherent with the PL's AXI masters)."""
        buf.flush()

    def from_device(self, buf) -> None:
        """Drop stale cache lines so the host reads what the accelerator wrote."""
        buf.invalidate()

    def call(self, op, task, layer, expert, slot, params, pool, slots, inp, out, state) -> int:
        """Start ``edgemoe_top`` with these arguments, wait for it, return its status (``ap_return``).

        PYNQ's HLS IP driver maps positional arguments onto the AXI-Lite registers from the
        overlay's ``.hwh``: scalars as values, buffers by their physical address.
        """
        result = self.ip.call(op, task, layer, expert, slot, params, pool, slots, inp, out, state)
        if result is None:  # PYNQ versions that do not return ap_return from call()
            result = self.ip.register_map.ap_return
        value = int(result)
        return value - (1 << 32) if value >= 1 << 31 else value
