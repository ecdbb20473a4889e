"""onnxruntime executor: runs the ONNX target's graphs.

Execution providers come from the caller (``Session(providers=...)``, ``edgemoe run --providers``)
or else from the bundle's device profile (manifest ``device.onnx_providers``: TensorRT, CUDA, CPU
on a Jetson); those the installed onnxruntime lacks are skipped and CPU always comes last
(:func:`resolve_providers`). TensorRT builds an engine per graph when a session is created; the
engines are cached in the user's cache folder, keyed by the graph's sha256 and the GPU
(:func:`tensorrt_options`), never in the bundle, which stays read-only and verifiable.

A graph's external data (a large graph's weights in a file next to it) is read by edgemoe, not by
onnxruntime: its references are checked against the files the manifest lists with the graph, the
files are read with their size and sha256 checked, and onnxruntime gets their bytes from memory
(:func:`add_external_data`), so it never opens a path the graph names.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...bundle.format import MANIFEST, read_manifest, read_verified
from ...bundle.onnx_data import read_external_data
from ...errors import BundleError, ConfigError, DependencyError, EdgeMoEWarning
from ...runtime.executor import Executor, Graph

CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def provider_name(name: str, known: Iterable[str]) -> str | None:
    """The provider ``name`` stands for: onnxruntime's spelling, any case, or without the suffix (``cuda``).

    Returns:
        The name from ``known`` it matches, or None.
    """
    key = name.strip().lower()
    for p in known:
        if key in (p.lower(), p.lower().removesuffix("executionprovider")):
            return p
    return None


def resolve_providers(requested: Sequence[str], available: Iterable[str]) -> list[str]:
    """The providers a session is created with.

    Args:
        requested: Providers in order of preference (asked for, or the device profile's).
        available: What the installed onnxruntime has (``onnxruntime.get_available_providers()``).

    Returns:
        The requested providers that are available, in order and once each, then CPU (which runs
        whatever the others do not take, and everything when nothing else is left).
    """
    have = set(available)
    out: list[str] = []
    for p in requested:
        if p in have and p != CPU and p not in out:
            out.append(p)
    return [*out, CPU]


def cache_root() -> Path:
    """The user cache folder: ``$EDGEMOE_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/edgemoe``."""
    base = os.environ.get("EDGEMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgemoe"
    )
    return Path(base)


def gpu_key(smi_csv: str | None, visible_devices: str | None, device_id: int = 0) -> str:
    """Folder name for the GPU that CUDA device ``device_id`` is (TensorRT engines are built for one).

    TensorRT engines carry over between GPUs of one model, not across models, so the key is the
    model name. ``nvidia-smi`` lists every GPU in PCI order whatever ``CUDA_VISIBLE_DEVICES`` says,
    while CUDA numbers the visible ones, fastest first: with ``CUDA_VISIBLE_DEVICES`` set, the
    device is its ``device_id``-th entry (an nvidia-smi index or a ``GPU-`` UUID prefix); without,
    nvidia-smi's rows tell it only when they all name the same model. Otherwise (no nvidia-smi, as on
    older JetPack releases, a MIG instance, mixed models) the key is ``cuda<device_id>``.

    Args:
        smi_csv: Output of ``nvidia-smi --query-gpu=name,uuid --format=csv,noheader``, or None.
        visible_devices: ``CUDA_VISIBLE_DEVICES``, or None when unset.
        device_id: The CUDA device the providers run on (onnxruntime's default: 0).
    """
    rows = []
    for line in (smi_csv or "").splitlines():
        name, _, uuid = line.rpartition(",")
        if name.strip() and not name.strip().startswith("["):  # "[N/A]", "[Not Supported]"
            rows.append((name.strip(), uuid.strip()))
    pick = None
    if visible_devices is not None:
        entries = [e.strip() for e in visible_devices.split(",") if e.strip()]
        entry = entries[device_id] if device_id < len(entries) else ""
        if entry.isdigit() and int(entry) < len(rows):
            pick = rows[int(entry)][0]
        elif entry.startswith("GPU-"):
            pick = next((n for n, u in rows if u.startswith(entry)), None)
    elif device_id < len(rows) and len({n for n, _ in rows}) == 1:
        pick = rows[0][0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", pick).strip("-") if pick else f"cuda{device_id}"


@functools.cache
def _nvidia_smi() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,uuid", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def tensorrt_options(graph_sha256: str, gpu: str, ort_version: str, bundle: Path | None = None) -> dict[str, str]:
    """TensorRT provider options for one graph: engine and timing caches in the user cache folder.

    Engines go to ``<cache>/tensorrt/<graph sha256>/<gpu>/onnxruntime-<version>/``. The sha256
    keeps apart graphs that onnxruntime's own engine names would mix up (it names engines after the
    graph's structure, so two bundles of one architecture with other weights would share an engine);
    the onnxruntime version stands for the TensorRT it was built with, whose engines a later TensorRT
    cannot load. The timing cache (per-layer kernel timings, valid for any graph) is shared per GPU.

    Args:
        graph_sha256: The graph's sha256 from its manifest record.
        gpu: :func:`gpu_key` of the GPU.
        ort_version: ``onnxruntime.__version__``.
        bundle: The bundle folder, which the cache must not be inside.

    Raises:
        BundleError: The sha256 is not one (a garbled record).
        ConfigError: The cache folder (``EDGEMOE_CACHE``) lies inside the bundle.
    """
    if not _SHA256.fullmatch(graph_sha256):
        raise BundleError(f"garbled manifest: graph sha256 {graph_sha256!r}")
    base = cache_root() / "tensorrt"
    leaf = f"onnxruntime-{ort_version}"
    engines = base / graph_sha256 / gpu / leaf
    if bundle is not None and Path(bundle).resolve() in (engines.resolve(), *engines.resolve().parents):
        raise ConfigError(f"the TensorRT engine cache {engines} is inside the bundle {bundle}: set EDGEMOE_CACHE")
    return {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(base / "timing" / gpu / leaf),
    }


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


def add_external_data(opts, files: dict[str, bytes], version: str) -> None:
    """Give onnxruntime a graph's external data files from memory, by the location the graph names each with.

    With such a table onnxruntime looks every external reference up in it and fails on a name it
    lacks instead of opening a file. So a graph without data files gets a table too, with one empty
    entry: a reference that slipped past edgemoe's own check fails there, never read from disk.

    Args:
        opts: The session options.
        files: Verified file contents by location (:func:`~edgemoe.bundle.onnx_data.read_external_data`).
        version: ``onnxruntime.__version__``, for the message.

    Raises:
        DependencyError: The graph has external data and this onnxruntime cannot take it from memory.
    """
    if not hasattr(opts, "add_external_initializers_from_files_in_memory"):
        if files:
            raise DependencyError(
                f"onnxruntime {version} cannot take a graph's external data from memory; install a newer onnxruntime"
            )
        return
    names, buffers = (list(files), list(files.values())) if files else (["<none>"], [b""])
    opts.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])


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

    The executor is made before the bundle is read, so the device profile's providers are taken
    from the manifest when the bundle's program is built (:meth:`program`), or, for a graph loaded
    on its own, from the manifest next to it at the first :meth:`load`.

    Args:
        threads: Intra-op threads per session (0: onnxruntime's default).
        providers: Execution providers in order of preference (names as onnxruntime spells them,
            in any case, or short: ``tensorrt``, ``cuda``, ``cpu``), replacing the device profile's;
            empty: the profile's. Those the installed onnxruntime lacks are skipped with a warning.

    Attributes:
        requested: The providers asked for, or else the bundle's device profile lists.
        providers: Those sessions are created with: the available ones of ``requested``, CPU last.
        providers_used: What onnxruntime registered on the sessions loaded so far (in order).

    Raises:
        ConfigError: A provider name onnxruntime does not know.
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 0, providers: tuple[str, ...] = ()):
        import onnxruntime as ort

        self._ort = ort
        self.threads = threads
        self._available = tuple(ort.get_available_providers())
        known = tuple(dict.fromkeys((*self._available, *ort.get_all_providers())))
        explicit = []
        for p in providers:
            found = provider_name(p, known)
            if found is None:
                raise ConfigError(f"unknown onnxruntime execution provider '{p}' (known: {', '.join(known)})")
            explicit.append(found)
        self._explicit = tuple(explicit)
        missing = [p for p in self._explicit if p not in self._available]
        if missing:
            warnings.warn(
                EdgeMoEWarning(
                    f"onnxruntime {ort.__version__} has no {', '.join(missing)} (it has {', '.join(self._available)}); "
                    "CUDA and TensorRT come with onnxruntime-gpu (on Jetson: NVIDIA's build for JetPack)"
                ),
                stacklevel=2,
            )
        self.requested: tuple[str, ...] = self._explicit
        self.providers = resolve_providers(self.requested, self._available)
        self.providers_used: tuple[str, ...] = ()
        self._bundle: Path | None = None
        self._dropped: set[str] = set()
        self._gpu: str | None = None

    def program(self, root: Path, manifest: dict, task: str, recorder=None):
        self._use_bundle(Path(root), manifest)
        return super().program(root, manifest, task, recorder)

    def _use_bundle(self, root: Path, manifest: dict | None) -> None:
        """Take the providers of the bundle's device profile, unless providers were asked for."""
        if self._explicit or self._bundle == root:
            return
        if manifest is None:  # a graph loaded on its own; a staging folder may have no manifest yet
            manifest = read_manifest(root) if (root / MANIFEST).is_file() else {}
        device = manifest.get("device")
        names = device.get("onnx_providers", []) if isinstance(device, dict) else []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BundleError(f"garbled manifest: device.onnx_providers must be a list of names, got {names!r}")
        known = (*self._available, *self._ort.get_all_providers())
        # A name this onnxruntime does not know (a newer provider) is skipped like an unavailable one.
        self.requested = tuple(provider_name(n, known) or n for n in names)
        self._bundle = root
        self._resolve()

    def _resolve(self) -> None:
        self.providers = resolve_providers(self.requested, [p for p in self._available if p not in self._dropped])

    def _session_providers(self, root: Path, record: dict) -> list:
        out: list = []
        for p in self.providers:
            if p != TENSORRT:
                out.append(p)
                continue
            if self._gpu is None:
                self._gpu = gpu_key(_nvidia_smi(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            options = tensorrt_options(record["sha256"], self._gpu, self._ort.__version__, bundle=root)
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                try:
                    Path(options[key]).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot create the TensorRT cache {options[key]}: {exc.strerror or exc}; "
                        "set EDGEMOE_CACHE to a writable folder"
                    ) from None
            out.append((p, options))
        return out

    def load(self, root: Path, record: dict) -> Graph:
        root = Path(root)
        data = read_verified(root, record)  # checked bytes go straight to onnxruntime
        # Its external data: only files listed with it, each checked, before onnxruntime sees the graph.
        files = read_external_data(root, record, data)
        self._use_bundle(root, None)
        while True:
            providers = self._session_providers(root, record)
            opts = session_options(self.threads)
            # The bytes are read as the ONNX protobuf edgemoe checked, never sniffed as ORT's flatbuffer format.
            opts.add_session_config_entry("session.load_model_format", "ONNX")
            add_external_data(opts, files, self._ort.__version__)
            try:
                # No onnxruntime fallback: it prints to stdout (the CLI's --json) and retries only once.
                session = self._ort.InferenceSession(data, opts, providers=providers, enable_fallback=0)
                break
            except Exception as exc:  # onnxruntime raises its own exception types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if "byte limit for embedded initializer" in first:
                    # onnxruntime takes a tensor from memory only up to 2 GiB, and edgemoe never lets
                    # it open a data file itself (it would read it unchecked).
                    raise BundleError(
                        f"onnxruntime cannot load {record['file']}: a tensor above 2 GiB cannot be handed to "
                        f"onnxruntime from checked memory ({first})"
                    ) from None
                if len(self.providers) == 1:
                    raise BundleError(f"onnxruntime cannot load {record['file']}: {first}") from None
                # A provider that fails (TensorRT without its libraries, a GPU out of memory) fails
                # again on the next graph: drop it for this executor and go on with the next one.
                dropped = self.providers[0]
                self._dropped.add(dropped)
                self._resolve()
                warnings.warn(
                    EdgeMoEWarning(
                        f"onnxruntime cannot load {record['file']} with {dropped} ({first}); going on "
                        f"with {', '.join(self.providers)}"
                    ),
                    stacklevel=2,
                )
        self.providers_used = tuple(dict.fromkeys((*self.providers_used, *session.get_providers())))
        return OrtGraph(session, record["file"])
