"""Device profiles: named data about the hardware a bundle is built for.

Figures are from vendor data sheets (source noted per entry; derived figures and estimates say
so). A compile records the profile in the manifest and targets check they can build for it; the
swap scheduler (:mod:`edgemoe.schedule`) reads the weight memory, the bandwidth of each tier the
experts move between and the compute throughput. User-defined profiles come from a TOML or JSON
file (:func:`load_profiles`).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError, TargetError, did_you_mean

GiB = 1 << 30


@dataclass(frozen=True)
class FpgaResources:
    """The programmable logic of an FPGA device (what ``--target hls`` builds against).

    Attributes:
        part: Vivado part number.
        clock_mhz: Kernel clock the design is estimated at.
        dsp: DSP slices (DSP48E2).
        bram_18k: 18 Kb block RAMs.
        uram: 288 Kb UltraRAMs.
        lut: Look-up tables.
        ff: Flip-flops.
        axi_ports: AXI ports from the PL to DDR (one per m_axi bundle carrying weights).
        axi_port_gbs: Bandwidth of one such port, GB/s.
        source: Where the figures come from.
    """

    part: str
    clock_mhz: float
    dsp: int
    bram_18k: int
    uram: int
    lut: int
    ff: int
    axi_ports: int = 2
    axi_port_gbs: float = 4.8
    source: str = ""


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
        weight_memory_bytes: Memory left for expert weights once OS, runtime and trunk run (0: unknown).
        storage_gbs: Storage -> RAM read bandwidth, GB/s (where experts are paged in from).
        host_to_device_gbs: Host RAM -> accelerator memory, GB/s (0: unified memory, no copy).
        onchip_gbs: DDR -> on-chip memory (FPGA BRAM/URAM), GB/s (0: no such tier).
        compute_gflops: Sustained fp32 throughput for the simulator, GFLOP/s.
        tier_sources: Per figure above, where it comes from (and whether it is an estimate).
        fpga: The programmable logic, for FPGA devices (None: no FPGA).
        onnx_providers: onnxruntime execution providers an ONNX bundle for this device runs with,
            in order of preference (empty: CPU). Those the installed onnxruntime lacks are skipped
            at run time; ``edgemoe run --providers`` overrides the list.
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
    weight_memory_bytes: int = 0
    storage_gbs: float = 0.0
    host_to_device_gbs: float = 0.0
    onchip_gbs: float = 0.0
    compute_gflops: float = 0.0
    tier_sources: dict = field(default_factory=dict, compare=False)
    fpga: FpgaResources | None = None
    onnx_providers: tuple[str, ...] = ()

    def load_gbs(self) -> float:
        """Bandwidth of the slowest tier an expert crosses from storage to where it runs, GB/s."""
        tiers = [b for b in (self.storage_gbs, self.host_to_device_gbs, self.onchip_gbs) if b > 0]
        return min(tiers) if tiers else 0.0

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
        weight_memory_bytes=mem // 2,
        storage_gbs=2.0,
        compute_gflops=50.0,
        tier_sources={
            "weight_memory_bytes": "estimate: half of physical memory",
            "storage_gbs": "estimate: NVMe-class SSD read, not measured",
            "compute_gflops": "estimate: a few x86 cores with AVX2, not measured",
        },
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


# onnxruntime providers of the Jetsons, best first: TensorRT, CUDA for what TensorRT leaves, then CPU.
_JETSON_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_JETSON_PROVIDERS_SOURCE = (
    "onnxruntime docs, TensorRT Execution Provider: pre-built onnxruntime-gpu packages for JetPack (Jetson "
    "Zoo) carry the TensorRT and CUDA providers; CPU runs what they do not take"
)

# Memory, tier and compute figures of the built-in profiles, with their sources. Jetsons share
# one LPDDR between CPU and GPU (no host -> device copy); the FPGAs stream expert weights from
# PS DDR into on-chip BRAM/URAM through the AXI HP ports.
_TIERS: dict[str, dict] = {
    "jetson-orin-nano-8gb": {
        "weight_memory_bytes": 6 * GiB,
        "storage_gbs": 2.0,
        "compute_gflops": 1280.0,
        "onnx_providers": _JETSON_PROVIDERS,
        "tier_sources": {
            "weight_memory_bytes": "estimate: 8 GiB LPDDR5 less ~2 GiB for L4T, CUDA context and trunk",
            "storage_gbs": "estimate: NVMe SSD on the dev kit's M.2 Key M slot, PCIe Gen3 x4 (3.9 GB/s link, "
            "DS-11105-001); ~2 GB/s sustained read",
            "host_to_device_gbs": "0: unified memory (DS-11105-001), the GPU reads DRAM directly",
            "compute_gflops": "derived: 1024 CUDA cores x 625 MHz x 2 FLOP (DS-11105-001), fp32 peak",
            "onnx_providers": _JETSON_PROVIDERS_SOURCE,
        },
    },
    "jetson-agx-orin-64gb": {
        "weight_memory_bytes": 56 * GiB,
        "storage_gbs": 5.0,
        "compute_gflops": 5325.0,
        "onnx_providers": _JETSON_PROVIDERS,
        "tier_sources": {
            "weight_memory_bytes": "estimate: 64 GiB LPDDR5 less ~8 GiB for L4T, CUDA context and trunk",
            "storage_gbs": "estimate: NVMe SSD on PCIe Gen4 x4 (7.9 GB/s link, DS-10662-001); ~5 GB/s sustained",
            "host_to_device_gbs": "0: unified memory (DS-10662-001)",
            "compute_gflops": "derived: 2048 CUDA cores x 1.3 GHz x 2 FLOP (DS-10662-001), fp32 peak",
            "onnx_providers": _JETSON_PROVIDERS_SOURCE,
        },
    },
    "jetson-xavier-nx": {
        "weight_memory_bytes": 6 * GiB,
        "storage_gbs": 1.5,
        "compute_gflops": 845.0,
        "onnx_providers": _JETSON_PROVIDERS,
        "tier_sources": {
            "weight_memory_bytes": "estimate: 8 GiB LPDDR4x less ~2 GiB for L4T, CUDA context and trunk",
            "storage_gbs": "estimate: NVMe SSD on the dev kit's M.2 Key M, PCIe Gen3 x4 (DS-09693-001); "
            "~1.5 GB/s sustained",
            "host_to_device_gbs": "0: unified memory (DS-09693-001)",
            "compute_gflops": "derived: 384 CUDA cores x 1.1 GHz x 2 FLOP (DS-09693-001), fp32 peak",
            "onnx_providers": _JETSON_PROVIDERS_SOURCE,
        },
    },
    "raspberry-pi-5": {
        "weight_memory_bytes": 6 * GiB,
        "storage_gbs": 0.45,
        "compute_gflops": 153.6,
        "tier_sources": {
            "weight_memory_bytes": "estimate: 8 GiB less ~2 GiB for Raspberry Pi OS and the trunk",
            "storage_gbs": "estimate: NVMe via M.2 HAT on the PCIe 2.0 x1 port (5 GT/s, product brief); "
            "~0.45 GB/s sustained",
            "compute_gflops": "derived: 4 Cortex-A76 x 2.4 GHz x 16 fp32 FLOP/cycle (2x128-bit NEON FMA), peak",
        },
    },
    "zcu104": {
        "fpga": FpgaResources(
            "xczu7ev-ffvc1156-2-e",
            300.0,
            1728,
            624,
            96,
            230400,
            460800,
            2,
            4.8,
            "AMD/Xilinx DS891 (Zynq UltraScale+ MPSoC overview): XCZU7EV 1,728 DSP, 312 BRAM36 (624 BRAM18K), "
            "96 URAM, 230,400 LUT, 460,800 FF; UG1085: 128-bit HP ports; 300 MHz as Edge-MoE on ZCU102",
        ),
        "weight_memory_bytes": 1 * GiB,
        "storage_gbs": 0.08,
        "onchip_gbs": 4.8,
        "compute_gflops": 345.0,
        "tier_sources": {
            "weight_memory_bytes": "estimate: 2 GiB PS DDR4 less ~1 GiB for PetaLinux, buffers and trunk",
            "storage_gbs": "estimate: microSD (SD 3.0 UHS-I, UG1267), ~80 MB/s sustained",
            "onchip_gbs": "derived: one 128-bit AXI HP port at 300 MHz into BRAM/URAM (UG1085 HP port width)",
            "compute_gflops": "estimate: 1728 DSP48E2 (DS891) / 3 DSP per fp32 FMA x 2 FLOP x 300 MHz",
        },
    },
    "zcu102": {
        "fpga": FpgaResources(
            "xczu9eg-ffvb1156-2-e",
            300.0,
            2520,
            1824,
            0,
            274080,
            548160,
            2,
            4.8,
            "AMD/Xilinx DS891: XCZU9EG 2,520 DSP, 912 BRAM36 (1,824 BRAM18K), no URAM, 274,080 LUT, 548,160 FF; "
            "UG1085: 128-bit HP ports; 300 MHz: Edge-MoE's clock on this board",
        ),
        "weight_memory_bytes": 3 * GiB,
        "storage_gbs": 0.08,
        "onchip_gbs": 4.8,
        "compute_gflops": 504.0,
        "tier_sources": {
            "weight_memory_bytes": "estimate: 4 GiB PS DDR4 less ~1 GiB for PetaLinux, buffers and trunk",
            "storage_gbs": "estimate: microSD (SD 3.0 UHS-I, UG1182), ~80 MB/s sustained",
            "onchip_gbs": "derived: one 128-bit AXI HP port at 300 MHz into BRAM (UG1085 HP port width)",
            "compute_gflops": "estimate: 2520 DSP48E2 (DS891) / 3 DSP per fp32 FMA x 2 FLOP x 300 MHz",
        },
    },
}


def device_profiles() -> dict[str, DeviceProfile]:
    """Every known device profile, by name (``host`` first)."""
    return {p.name: p for p in (_host(), *(replace(p, **_TIERS.get(p.name, {})) for p in _PROFILES))}


_FIELDS = {f.name: f.type for f in fields(DeviceProfile)}
_NUMERIC = ("memory_bytes", "weight_memory_bytes", "memory_bandwidth_gbs", "storage_gbs", "host_to_device_gbs")
_NUMERIC += ("onchip_gbs", "compute_gflops")


def _profile_from_dict(name: str, entry: dict, origin: str) -> DeviceProfile:
    if not isinstance(entry, dict):
        raise ConfigError(f"{origin}: device '{name}' must be a table of fields, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS) - {"name"})
    if unknown:
        raise ConfigError(f"{origin}: device '{name}' has unknown fields {unknown} (known: {sorted(_FIELDS)})")
    base = dict(entry)
    values: dict = {"description": name, "cpu_arch": "unknown", "cpu": "", "accelerator": "none", "cuda_arch": ""}
    values.update({"memory_bandwidth_gbs": 0.0, "source": f"user-defined ({origin})"})
    values.update(base)
    values["name"] = name
    if "fpga" in values:
        values["fpga"] = _fpga_from_dict(name, values["fpga"], origin)
    if "onnx_providers" in values:
        values["onnx_providers"] = _providers_from_list(name, values["onnx_providers"], origin)
    for key in _NUMERIC:
        value = values.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{origin}: device '{name}' field {key} must be a number >= 0, got {value!r}")
    if "memory_bytes" not in values:
        raise ConfigError(f"{origin}: device '{name}' needs memory_bytes")
    if not values.get("weight_memory_bytes"):
        values["weight_memory_bytes"] = values["memory_bytes"]
    return DeviceProfile(**{k: values[k] for k in _FIELDS if k in values})


def _providers_from_list(name: str, value, origin: str) -> tuple[str, ...]:
    # Names are checked against onnxruntime at run time, on the device: this module stays import-free.
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ConfigError(
            f"{origin}: device '{name}' field onnx_providers must be a list of onnxruntime provider names "
            f'(e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]), got {value!r}'
        )
    return tuple(p.strip() for p in value)


def _fpga_from_dict(name: str, entry, origin: str) -> FpgaResources:
    known = {f.name for f in fields(FpgaResources)}
    if not isinstance(entry, dict):
        raise ConfigError(f"{origin}: device '{name}' field fpga must be a table ({', '.join(sorted(known))})")
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{origin}: device '{name}' fpga has unknown fields {unknown} (known: {sorted(known)})")
    missing = sorted({"part", "clock_mhz", "dsp", "bram_18k", "lut", "ff"} - set(entry))
    if missing:
        raise ConfigError(f"{origin}: device '{name}' fpga needs {', '.join(missing)}")
    for key, value in entry.items():
        if key in ("part", "source"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{origin}: device '{name}' fpga.{key} must be a number >= 0, got {value!r}")
    return FpgaResources(**{"uram": 0, "source": f"user-defined ({origin})", **entry})


def load_profiles(path: str | Path) -> dict[str, DeviceProfile]:
    """Device profiles from a TOML or JSON file.

    The file holds one table per device (``[my-board]`` in TOML, ``{"my-board": {...}}`` in JSON),
    each with :class:`DeviceProfile` fields; ``memory_bytes`` is required, the rest default to
    "unknown" (0). Example::

        [my-board]
        memory_bytes = 4294967296
        weight_memory_bytes = 2147483648
        storage_gbs = 0.5
        compute_gflops = 100.0
        onnx_providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]   # best first (default: CPU)

        [my-board.fpga]            # an FPGA board (--target hls): its programmable logic
        part = "xczu5ev-sfvc784-1-e"
        clock_mhz = 250
        dsp = 1248
        bram_18k = 288
        uram = 64
        lut = 117120
        ff = 234240
        axi_port_gbs = 4.0

    Raises:
        ConfigError: The file cannot be read or parsed, or a field is unknown, not a number or (for
            ``onnx_providers``) not a list of names.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read device profiles {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ConfigError(f"reading {path} needs Python >= 3.11 (tomllib); use a .json file") from None
            data = tomllib.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"cannot parse device profiles {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"device profiles {path}: expected one table per device")
    return {name: _profile_from_dict(name, entry, str(path)) for name, entry in data.items()}


def get_device(name: str) -> DeviceProfile:
    """Look up a device profile by name, or read it from a ``.toml`` / ``.json`` file with one device.

    Raises:
        TargetError: Unknown name.
        ConfigError: A profile file that is unreadable, invalid or holds more than one device.
    """
    if name.lower().endswith((".toml", ".json")):
        loaded = load_profiles(name)
        if len(loaded) != 1:
            raise ConfigError(f"device file {name} holds {len(loaded)} devices ({', '.join(loaded)}); expected one")
        return next(iter(loaded.values()))
    profiles = device_profiles()
    if name not in profiles:
        raise TargetError(f"unknown device '{name}'{did_you_mean(name, profiles)} (known: {', '.join(profiles)})")
    return profiles[name]
