"""Reference MoE models shipped with edgemoe, by name, and model config files.

Installed as ``edgemoe.models``. A model is a family plus a config dict. Each family lives in
its own folder with a ``family.py`` that exposes ``NAME``, ``DESCRIPTIONS``, ``WEIGHTS``,
``configs()``, ``normalize(config)`` and ``build(config)``; add a family by adding its module
name to ``_FAMILIES``. ``edgemoe compile`` also accepts a JSON file
``{"base": "<registered name>", ...overrides}`` or ``{"family": ..., ...full config}``, either
with an optional ``"weights"`` checkpoint path (relative to the JSON file) loaded after building
and its ``"weights_format"`` (:data:`WEIGHT_FORMATS`).
Importing this module does not import torch; building a model does.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelError, did_you_mean

_FAMILIES = ("m3vit", "hf", "moe_lm", "bert_moe")
# Checkpoint layouts: edgemoe's own state dicts, and checkpoints saved by the public M³ViT training
# code (family m3vit; see models/m3vit/checkpoint.py), both read by ``load_checkpoint``; and
# transformers checkpoint folders (family hf; models/hf/checkpoint.py), read by the library itself.
WEIGHT_FORMATS = ("edgemoe", "m3vit", "hf")
# Keys of each kind a checkpoint that does not fit names in its error.
_SHOWN_KEYS = 5


def seeded_build(factory: Callable[[Any], Any], cfg: Any) -> Any:
    """``factory(cfg)`` with torch's global RNG seeded by ``cfg.seed`` (restored afterwards), in eval mode.

    The same config always gives the same random initialisation, and callers' RNG streams are untouched.
    """
    import torch

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = factory(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def normalize_dataclass(cls: type, family: str, config: dict) -> dict:
    """Check a (possibly partial) config dict against a family's config dataclass; return the full dict.

    Raises:
        ModelError: Unknown fields, wrong types, or values the dataclass rejects (TypeError/ValueError).
    """
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ModelError(f"unknown {family} config field(s) {', '.join(unknown)} (valid: {', '.join(sorted(fields))})")
    try:
        return dataclasses.asdict(cls(**config))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad {family} config: {exc}") from None


def family_module(name: str) -> ModuleType:
    """The ``family.py`` module of a model family."""
    if name not in _FAMILIES:
        raise ModelError(f"unknown model family '{name}' (known: {', '.join(_FAMILIES)})")
    return importlib.import_module(f"{__name__}.{name}.family")


@dataclass(frozen=True)
class ModelEntry:
    """A resolved model: what to build.

    Attributes:
        name: Model name (registry name, or the config file's ``name``).
        family: Model family (and adapter) name.
        description: One line for ``edgemoe models``.
        config: Full config dict of the family.
        weights: Checkpoint to load after building (a shipped one for registry models), or None.
        weights_format: Layout of ``weights`` (one of :data:`WEIGHT_FORMATS`).
    """

    name: str
    family: str
    description: str
    config: dict
    weights: str | None = None
    weights_format: str = "edgemoe"

    def build(self) -> Any:
        """Build the torch module and load its checkpoint, if any."""
        return self.build_with_notes()[0]

    def param_count(self) -> int | None:
        """Parameters the config builds (at least), computed without building anything.

        The hf family counts its transformers model on torch's meta device (stacked expert
        tensors: no per-expert objects). The native families get a lower bound from their sizes:
        the experts of one MoE layer plus each block's attention and every embedding row; a meta
        build would still create one Python module per expert, which is what an absurd config
        must not get to do. None: no size fields to bound.
        """
        fam = family_module(self.family)
        if hasattr(fam, "param_count"):
            try:
                return fam.param_count(self.config)
            except ModelError:
                raise
            except Exception:  # a config the library cannot build: the real build reports it, by name
                return None
        full = fam.normalize(self.config) if hasattr(fam, "normalize") else dict(self.config)

        def size(key: str) -> int:
            value = full.get(key, 0)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        d = size("dim")
        bound = 2 * size("num_experts") * size("expert_hidden") * d + 4 * d * d * size("depth") + size("vocab_size") * d
        return bound or None

    def check_size(self) -> None:
        """Refuse a config whose fp32 weights alone exceed this machine's available memory.

        A config is an untrusted file: ``num_experts: 100000`` would otherwise allocate until the
        host runs out, minutes later.

        Raises:
            ModelError: The weights do not fit.
        """
        count = self.param_count()
        available = _available_memory()
        if count is None or available is None or 4 * count <= available:
            return
        raise ModelError(
            f"{self.name}: the config builds at least {count:,} parameters ({4 * count / 2**30:.1f} GiB in fp32), "
            f"more than this machine's available memory ({available / 2**30:.1f} GiB); "
            "check its sizes (experts, width, depth)"
        )

    def build_with_notes(self, stream: bool | None = False) -> tuple[Any, list[str]]:
        """:meth:`build`, also returning what loading the checkpoint noted (keys ignored, tensors folded).

        Args:
            stream: A checkpoint folder only: leave its weights on disk and read them per partition
                (None: when the folder is large, see ``models.hf.checkpoint.streams``).
        """
        if self.weights_format == "hf":
            if self.family != "hf":
                raise ModelError(
                    f"weights format hf (a transformers checkpoint folder) is for hf models, not {self.family}"
                )
            from .hf.checkpoint import streams

            if streams(self.weights, stream):  # nothing is allocated for the weights: no size check
                return family_module("hf").build(self.config, folder=self.weights, stream=True), []
            self.check_size()
            return family_module("hf").build(self.config, folder=self.weights), []
        self.check_size()
        module = family_module(self.family).build(self.config)
        notes = load_checkpoint(module, self.weights, self.weights_format) if self.weights else []
        return module, notes


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def load_checkpoint(module, path: str, weights_format: str = "edgemoe") -> list[str]:
    """Load weights safely: safetensors, or a torch file with ``weights_only=True``.

    A safetensors file whose metadata says ``format = edgemoe-int8-rows`` holds its weight
    matrices as int8 plus ``<name>:scale`` (fp32, one absmax scale per row of dim 0); they are
    dequantized to fp32 here, so the loaded module is exactly the dequantized model. Torch files
    may hold numpy scalars besides tensors (training scripts store metrics so); nothing else that
    ``weights_only`` refuses is unpickled.

    Args:
        module: The built model.
        path: Checkpoint file.
        weights_format: ``"edgemoe"``: the model's own state dict. ``"m3vit"``: a checkpoint saved
            by the public M³ViT training code (m3vit family; renamed by ``m3vit.checkpoint``).

    Returns:
        Notes on what the import ignored or changed (empty for the edgemoe format).

    Raises:
        ModelError: The file is missing, unreadable, refused by ``weights_only``, or does not fit
            the model (the message names missing, unexpected and mis-shaped keys).
    """
    p = Path(path)
    if weights_format not in WEIGHT_FORMATS:
        raise ModelError(f"unknown weights format '{weights_format}' (known: {', '.join(WEIGHT_FORMATS)})")
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    state = _read_checkpoint(p)
    notes: list[str] = []
    if weights_format == "m3vit":
        from .m3vit.model import M3ViT

        if not isinstance(module, M3ViT):
            raise ModelError(f"weights format m3vit is for m3vit models, not {type(module).__name__}")
        from .m3vit.checkpoint import from_m3vit

        try:
            state, notes = from_m3vit(state, module)
        except ModelError as exc:
            raise ModelError(f"cannot import M³ViT checkpoint {p}: {exc}") from None
    _check_fits(module, state, p)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's message is a header line ("Error(s) in loading state_dict for M3ViT:") then the errors.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise ModelError(f"cannot load checkpoint {p}: {' '.join(lines)[:300]}") from None
    return notes


def _read_checkpoint(p: Path) -> Any:
    """The tensors of a safetensors file (int8 rows dequantized), or what a torch file holds."""
    import pickle

    import torch
    from safetensors import SafetensorError

    try:
        # A key named twice: every loader keeps one of the two silently, each its own (JSON: the last).
        twice = _safetensors_key_twice(p) if p.suffix == ".safetensors" else _pickled_key_twice(p)
        if twice is not None:
            raise ModelError(f"cannot load checkpoint {p}: it names {_shown(twice)} twice (which one is meant?)")
        if p.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(p))
            with safe_open(str(p), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
            if fmt == "edgemoe-int8-rows":
                scales = {k.removesuffix(":scale"): state.pop(k) for k in [k for k in state if k.endswith(":scale")]}
                for name, scale in scales.items():
                    q = state[name]
                    state[name] = q.float() * scale.float().reshape(-1, *([1] * (q.ndim - 1)))
            return state
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln or "Unsupported" in ln]
        why = lines[0] if lines else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load checkpoint {p}: torch.load(weights_only=True) refuses it ({why}). edgemoe does not "
            "unpickle arbitrary objects; where you trust the file, re-save its tensors alone, e.g. "
            "torch.save({'state_dict': torch.load(f, weights_only=False)['state_dict']}, 'clean.pth')"
        ) from None
    except SafetensorError as exc:  # a truncated, overlapping or random-bytes file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load checkpoint {p}: not a whole safetensors file ({first})") from None
    except Exception as exc:  # torch's unpickler and zip reader raise any type on a damaged file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelError(f"cannot load checkpoint {p}: {type(exc).__name__}: {first}") from None


def _shown(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


# safetensors refuses headers beyond 100 MB; a larger one is not read here either.
_MAX_SAFETENSORS_HEADER = 100_000_000


class KeyNamedTwice(ValueError):
    """A JSON object or pickled dict naming a key twice."""


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` hook: an object naming a key twice is refused (``json`` would keep the last one)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise KeyNamedTwice(key)
        out[key] = value
    return out


def _safetensors_key_twice(p: Path) -> str | None:
    """A key a safetensors header names twice, or None (a header that is not JSON is for safetensors to report)."""
    import struct

    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > min(p.stat().st_size - 8, _MAX_SAFETENSORS_HEADER):
            return None
        text = f.read(n)
    try:
        json.loads(text, object_pairs_hook=unique_pairs)
    except KeyNamedTwice as exc:
        return exc.args[0]
    except (ValueError, RecursionError):
        pass
    return None


def _pickled_key_twice(p: Path) -> object | None:
    """A key a torch file's pickle sets twice on one dict, or None.

    Reads the pickle's opcodes with :mod:`pickletools` (nothing is unpickled): the data pickle of a
    zip checkpoint (``torch.save``'s format), else the first pickles of a legacy file. A stream this
    cannot follow is left to ``torch.load`` to report.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not names:
                    return None
                with z.open(names[0]) as stream:
                    return _key_twice_in(pickletools.genops(stream))
        with open(p, "rb") as f:  # legacy: magic number, protocol, system info, then the data
            for _ in range(4):
                found = _key_twice_in(pickletools.genops(f))
                if found is not None:
                    return found
    except (ValueError, IndexError, KeyError, EOFError, OSError, zipfile.BadZipFile, NotImplementedError):
        pass
    return None


def _key_twice_in(ops) -> object | None:
    """Follow a pickle's stack through its opcodes; return the first key set twice on one dict (else None).

    Values are opaque tokens except constants (strings, numbers), which keys are; each opcode's stack
    effect comes from :mod:`pickletools`' tables, memo entries are tracked, so a dict keeps one
    identity from its creation (``EMPTY_DICT``, ``OrderedDict()``) through its ``SETITEMS``.
    """
    import pickletools

    mark = object()
    stack: list = []
    memo: dict = {}
    seen: dict[int, set] = {}
    tokens: list = []  # every token stays alive, so ids are not reused

    def token() -> object:
        tokens.append(object())
        return tokens[-1]

    def pop_mark() -> list:
        i = len(stack) - 1 - stack[::-1].index(mark)
        items = stack[i + 1 :]
        del stack[i:]
        return items

    for op, arg, _pos in ops:
        name = op.name
        if name == "MARK":
            stack.append(mark)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, token()))
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("SETITEM", "SETITEMS", "DICT"):
            items = [stack.pop(-2), stack.pop()] if name == "SETITEM" else pop_mark()
            if name == "DICT":
                stack.append(token())
            target = stack[-1]
            keys = seen.setdefault(id(target), set())
            for key in items[0::2]:
                if isinstance(key, str | bytes | int | float):
                    if key in keys:
                        return key
                    keys.add(key)
        else:
            before, after = op.stack_before, op.stack_after
            if pickletools.markobject in before:
                pop_mark()
                before = before[: before.index(pickletools.markobject)]
            if before:
                del stack[-len(before) :]
            constant = isinstance(arg, str | bytes | int | float) and not before and name not in ("GLOBAL", "PERSID")
            stack.extend(arg if constant and len(after) == 1 else token() for _ in after)
    return None


def _numpy_scalar_globals() -> list:
    """Pickle globals that rebuild numpy scalars (numbers from a dtype and bytes; no code runs).

    numpy 1.x pickles name the module ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``.
    """
    import numpy as np

    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    # Number and bool dtypes only: not object, void (structured) or string dtypes.
    plain = ("Bool", "Int", "UInt", "Byte", "UByte", "Short", "UShort", "Long", "ULong", "Float", "Double", "Half")
    plain += ("LongLong", "ULongLong", "LongDouble", "Complex", "CDouble", "CFloat", "CLongDouble")
    names = [n for n in dir(np.dtypes) if n.endswith("DType") and n.removesuffix("DType").rstrip("0123456789") in plain]
    dtypes = [getattr(np.dtypes, n) for n in names]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def _check_fits(module, state: Any, p: Path) -> None:
    """Raise a ModelError naming the missing, unexpected and mis-shaped keys, if there are any."""
    import torch

    if not isinstance(state, dict):
        raise ModelError(f"cannot load checkpoint {p}: it holds a {type(state).__name__}, not a state dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    # A float parameter from integer, bool or complex data: not this model's weights (a cast would hide it).
    mistyped = [
        f"{k} ({str(state[k].dtype).removeprefix('torch.')}, model {str(v.dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if isinstance(state.get(k), torch.Tensor) and v.is_floating_point() and not state[k].is_floating_point()
    ]
    misshaped = [
        f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
        if isinstance(state[k], torch.Tensor)
        else f"{k} (a {type(state[k]).__name__}, not a tensor)"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape))
    ]
    parts = [
        f"{len(keys)} {kind} key(s): {', '.join(keys[:_SHOWN_KEYS])}{', ...' if len(keys) > _SHOWN_KEYS else ''}"
        for kind, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("mis-typed", mistyped),
        )
        if keys
    ]
    if parts:
        name = getattr(getattr(module, "cfg", None), "name", type(module).__name__)
        raise ModelError(f"checkpoint {p} does not fit {name}: {'; '.join(parts)}")


def model_entries() -> dict[str, ModelEntry]:
    """Every registered reference model, by name."""
    out = {}
    for fam_name in _FAMILIES:
        fam = family_module(fam_name)
        folder = Path(fam.__file__).parent
        for name, config in fam.configs().items():
            weights = fam.WEIGHTS.get(name)
            out[name] = ModelEntry(
                name, fam.NAME, fam.DESCRIPTIONS.get(name, name), config, str(folder / weights) if weights else None
            )
    return out


def resolve_model(spec: str) -> ModelEntry:
    """A registry name, a path to a JSON model config, or a checkpoint folder, resolved to what to build.

    Raises:
        ModelError: Unknown name, unreadable file, or unknown config fields.
    """
    entries = model_entries()
    if spec in entries:
        return entries[spec]
    path = Path(spec)
    if path.is_dir():
        from .hf.checkpoint import folder_config

        config = family_module("hf").normalize(folder_config(path))
        return ModelEntry(config["name"], "hf", f"checkpoint folder {path}", config, str(path.resolve()), "hf")
    if path.suffix != ".json":
        raise ModelError(
            f"unknown model '{spec}'{did_you_mean(spec, entries)} (known: {', '.join(sorted(entries))}; or a .json "
            "model config, or a "
            "checkpoint folder written by save_pretrained)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"model config {path} must be a JSON object")
    # Optional checkpoint to load over the built model; a relative path is relative to the config file.
    weights = raw.pop("weights", None)
    if weights is not None and not isinstance(weights, str):
        raise ModelError(f"model config {path}: 'weights' must be a path string")
    weights_format = raw.pop("weights_format", "edgemoe")
    if weights_format not in WEIGHT_FORMATS:
        raise ModelError(f"model config {path}: 'weights_format' must be one of {', '.join(WEIGHT_FORMATS)}")
    if weights:
        weights = str((path.parent / weights).resolve())
    if "base" in raw:
        base = raw.pop("base")
        if base not in entries:
            raise ModelError(f"model config {path}: unknown base model '{base}'")
        family, config = entries[base].family, {**entries[base].config, "name": f"{base}-custom", **raw}
    elif "family" in raw:
        family, config = raw.pop("family"), raw
    else:
        raise ModelError(f"model config {path} needs a 'base' (registered model) or a 'family'")
    config = family_module(family).normalize(config)
    return ModelEntry(config["name"], family, f"from {path}", config, weights, weights_format)
