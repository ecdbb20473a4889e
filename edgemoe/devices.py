"""Device profiles: named data about the hardware a bundle is built for.

Figures are from vendor data sheets (source noted per entry). Scheduling (memory budgets,
bandwidth tiers) builds on these; for now a compile records the profile in the manifest and
targets check they can build for it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

from .errors import TargetError

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    """One device.

    Attributes:
        name: Registry name (``--device``).
        description: One line for ``edgemoe devices``.
        cpu_arch: CPU architecture (``x86_64`` or ``aarch64``).
        cpu: CPU cores, in words.
        accelerator: GPU / FPGA in words, or "none".
        cuda_arch: CUDA SM architecture (e.g. ``sm_87``), or "" without a CUDA GPU.
        memory_bytes: Physical memory shared by OS, runtime and weights.
        memory_bandwidth_gbs: Peak DRAM bandwidth, GB/s.
        source: Where the figures come from.
    """

    name: str
    description: str
    cpu_arch: str
    cpu: str
    accelerator: str
    cuda_arch: str
    memory_bytes: int
    memory_bandwidth_gbs: float
    source: str

    def to_json(self) -> dict:
        """Manifest / ``--json`` form."""
        return asdict(self)


def _host() -> DeviceProfile:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    return DeviceProfile(
        name="host",
        description="the machine running edgemoe (CPU)",
        cpu_arch=platform.machine() or "unknown",
        cpu=f"{os.cpu_count()} cores",
        accelerator="none",
        cuda_arch="",
        memory_bytes=mem,
        memory_bandwidth_gbs=0.0,
        source="measured at run time (os.sysconf)",
    )


_PROFILES: tuple[DeviceProfile, ...] = (
    DeviceProfile(
        "jetson-orin-nano-8gb",
        "NVIDIA Jetson Orin Nano 8GB",
        "aarch64",
        "6x Cortex-A78AE",
        "Ampere GPU, 1024 CUDA cores",
        "sm_87",
        8 * GiB,
        68.0,
        "NVIDIA Jetson Orin Nano series data sheet (DS-11105-001): 8GB 128-bit LPDDR5, 68 GB/s",
    ),
    DeviceProfile(
        "jetson-agx-orin-64gb",
        "NVIDIA Jetson AGX Orin 64GB",
        "aarch64",
        "12x Cortex-A78AE",
        "Ampere GPU, 2048 CUDA cores",
        "sm_87",
        64 * GiB,
        204.8,
        "NVIDIA Jetson AGX Orin series data sheet (DS-10662-001): 64GB 256-bit LPDDR5, 204.8 GB/s",
    ),
    DeviceProfile(
        "jetson-xavier-nx",
        "NVIDIA Jetson Xavier NX 8GB",
        "aarch64",
        "6x Carmel (ARMv8.2)",
        "Volta GPU, 384 CUDA cores",
        "sm_72",
        8 * GiB,
        59.7,
        "NVIDIA Jetson Xavier NX data sheet (DS-09693-001): 8GB 128-bit LPDDR4x, 59.7 GB/s",
    ),
    DeviceProfile(
        "raspberry-pi-5",
        "Raspberry Pi 5 (8GB)",
        "aarch64",
        "4x Cortex-A76 @ 2.4 GHz",
        "none",
        "",
        8 * GiB,
        17.1,
        "Raspberry Pi 5 product brief: LPDDR4X-4267 SDRAM (32-bit, 17.1 GB/s peak)",
    ),
    DeviceProfile(
        "zcu104",
        "Xilinx Zynq UltraScale+ ZCU104 (XCZU7EV)",
        "aarch64",
        "4x Cortex-A53",
        "XCZU7EV programmable logic (1728 DSP, 11 Mb BRAM, 27 Mb URAM)",
        "",
        2 * GiB,
        19.2,
        "AMD/Xilinx UG1267 ZCU104 board guide: 2GB 64-bit DDR4-2400 on the PS (19.2 GB/s)",
    ),
    DeviceProfile(
        "zcu102",
        "Xilinx Zynq UltraScale+ ZCU102 (XCZU9EG)",
        "aarch64",
        "4x Cortex-A53",
        "XCZU9EG programmable logic (2520 DSP, 32.1 Mb BRAM)",
        "",
        4 * GiB,
        19.2,
        "AMD/Xilinx UG1182 ZCU102 board guide: 4GB 64-bit DDR4-2400 on the PS (19.2 GB/s)",
    ),
)


def device_profiles() -> dict[str, DeviceProfile]:
    """Every known device profile, by name (``host`` first)."""
    return {p.name: p for p in (_host(), *_PROFILES)}


def get_device(name: str) -> DeviceProfile:
    """Look up a device profile by name."""
    profiles = device_profiles()
    if name not in profiles:
        raise TargetError(f"unknown device '{name}' (known: {', '.join(profiles)})")
    return profiles[name]
