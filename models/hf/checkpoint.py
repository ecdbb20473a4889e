"""Checkpoint folders as transformers' ``save_pretrained`` writes them.

A folder holds ``config.json`` (its ``model_type`` picks the arch), the weights as one
``model.safetensors`` or as shards listed in ``model.safetensors.index.json``, and optionally a
tokenizer. The folder is checked before the library reads it (config, every listed shard present,
no shard shorter than its header says), so a broken folder is one line naming the file, not a
traceback from deep inside ``from_pretrained``. The weights are then loaded by the library's own
``from_pretrained`` with the config edgemoe built, because the library converts between its saved
layout and its modules (e.g. Mixtral's per-expert ``w1``/``w2``/``w3`` into stacked tensors).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ...errors import DependencyError, ModelError
from .. import KeyNamedTwice, unique_pairs

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# Keys of config.json that record where the config came from, not fields of the config class.
_PROVENANCE = {"architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "model_type"}


def folder_config(folder: Path) -> dict:
    """The hf family config of a checkpoint folder (``arch`` from ``model_type``, named after the folder).

    Raises:
        ModelError: No or unreadable ``config.json``, no ``model_type``, or broken weight files.
    """
    path = folder / CONFIG
    if not path.is_file():
        raise ModelError(
            f"{folder} is not a checkpoint folder: it has no {CONFIG} (save_pretrained writes config.json "
            "and *.safetensors; a model name or a .json model config is also accepted)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ModelError(f"{path} has no 'model_type' (the transformers arch, e.g. 'mixtral')")
    from ...frontends.hf_archs import ARCHS, UNSUPPORTED_ARCH_REASON

    arch = raw["model_type"]
    if arch not in ARCHS:  # refused from config.json alone, before any weight is read
        why = UNSUPPORTED_ARCH_REASON.get(
            arch, "the hf adapter has no spec for it (where its layers, router and experts live)"
        )
        raise ModelError(f"{path}: model_type '{arch}' is not supported: {why}; supported: {', '.join(ARCHS)}")
    quant_method(raw, path)
    weight_files(folder)
    from .family import config_fields

    # config.json also holds values a config class derives from its fields (SwitchTransformers'
    # encoder_sparse_step); the class recomputes them, and only its fields go into the config.
    known = config_fields(raw["model_type"])
    fields = {k: v for k, v in raw.items() if k not in _PROVENANCE and k in known}
    return {"arch": raw["model_type"], "name": folder.resolve().name, **fields}


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, each checked against its own header (see :func:`weight_headers`)."""
    return list(weight_headers(folder))


def weight_headers(folder: Path) -> dict[Path, tuple[int, dict]]:
    """The folder's safetensors files, each checked against its own header, with (data start, header).

    Raises:
        ModelError: No safetensors file, a shard listed in the index but missing, or a file that is
            not safetensors or is shorter than its header says (an interrupted download or copy).
    """
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"cannot read {index}: {type(exc).__name__}: {exc}") from None
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(
                f"{folder}: {len(missing)} shard(s) listed in {INDEX} are missing: {', '.join(missing[:5])}"
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            extra = f" ({', '.join(bins[:3])} are pickle files, which edgemoe does not unpickle)" if bins else ""
            raise ModelError(f"{folder}: no *.safetensors weights{extra}")
    return {f: _check_safetensors(f) for f in files}


def _check_safetensors(path: Path) -> tuple[int, dict]:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the tensors' bytes.

    Returns:
        The offset of the tensors' bytes and the header (tensor name -> dtype, shape, data offsets).
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            # A tensor named twice: the loader would keep one of the two silently.
            header = json.loads(fh.read(n), object_pairs_hook=unique_pairs)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except KeyNamedTwice as exc:
        raise ModelError(f"{path} names {exc.args[0]!r} twice in its header (which one is meant?)") from None
    except (struct.error, ValueError, KeyError, TypeError, IndexError, RecursionError, AttributeError) as exc:
        raise ModelError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc})") from None
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its header says"
        raise ModelError(
            f"{path} is {what}: its header places {end} bytes of tensors after {8 + n} header bytes, the file "
            f"has {size} bytes (copy or download it again)"
        )
    return 8 + n, header


# Quantized checkpoints the library dequantizes offline, by arch: GPT-OSS's MXFP4 experts (FP4 values
# in 32-wide blocks with a shared power-of-two scale) widen exactly to float32.
DEQUANTIZED = {"mxfp4": ("gpt_oss",)}


def quant_method(raw: dict, path: Path) -> str | None:
    """The checkpoint's ``quantization_config.quant_method`` (None: float weights).

    Raises:
        ModelError: A quantization edgemoe does not dequantize for this arch. Loaded with a float
            config its tensors (blocks + scales, GPTQ packs) would not be read and the experts
            would compile from random init.
    """
    quant = raw.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    if raw.get("model_type") not in DEQUANTIZED.get(method, ()):
        known = "; ".join(f"{m} ({', '.join(a)})" for m, a in DEQUANTIZED.items())
        raise ModelError(
            f"{path}: a quantized checkpoint (quantization_config, quant_method '{method}') is not supported for "
            f"model_type '{raw.get('model_type')}': edgemoe compiles float checkpoints (float32 / bfloat16 / "
            f"float16) and dequantizes {known}; dequantize it first"
        )
    return method


def _folder(folder: str) -> tuple[Path, dict]:
    """A checkpoint folder's path and its config.json (empty if absent: the caller had it checked).

    Raises:
        ModelError: No such folder.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"checkpoint folder not found: {path}")
    return path, json.loads((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}


def load_folder(cls, cfg, folder: str):
    """The library's model of ``cls`` with config ``cfg`` and the folder's weights, float32, eval mode.

    Raises:
        ModelError: The folder or its weight files are broken (checked before the library reads them).
    """
    import torch

    path, raw = _folder(folder)
    weight_files(path)
    if quant_method(raw, path / CONFIG) is not None:
        # The library dequantizes on load when the config carries the checkpoint's quantization (on a
        # CPU it widens the MXFP4 blocks to the parameters' dtype); it needs accelerate for that.
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise DependencyError(
                f"{path} holds MXFP4 weights: transformers dequantizes them with accelerate (pip install 'edgemoe[hf]')"
            )
        cfg.quantization_config = raw["quantization_config"]
    model = cls.from_pretrained(str(path), config=cfg, dtype=torch.float32, local_files_only=True)
    return model.eval()


# Checkpoints larger than this compile streamed unless told otherwise (``--stream`` / ``--no-stream``).
STREAM_ABOVE = 1 << 30


def streams(folder: str, stream: bool | None) -> bool:
    """Whether a compile of ``folder`` reads its weights per partition (None: when they exceed :data:`STREAM_ABOVE`)."""
    if stream is not None:
        return stream
    return sum(f.stat().st_size for f in weight_files(Path(folder))) > STREAM_ABOVE


def stream_folder(cls, cfg, folder: str):
    """The library's model of ``cls`` with config ``cfg``, parameters on the meta device, weights left in ``folder``.

    The model carries a :class:`~edgemoe.frontends.hf_stream.StreamedWeights` that reads them
    tensor by tensor as the compile needs them.

    Raises:
        ModelError: The folder is broken, holds quantized weights, or its tensors do not map onto the model.
    """
    from accelerate import init_empty_weights

    from ...frontends.hf_stream import STREAM_ATTR, StreamedWeights
    from .stream import CheckpointReader

    path, raw = _folder(folder)
    if quant_method(raw, path / CONFIG) is not None:
        raise ModelError(
            f"{path} holds quantized ({raw['quantization_config'].get('quant_method')}) weights, which transformers "
            "dequantizes as it loads the whole model: compile it with --no-stream"
        )
    reader = CheckpointReader(path)
    with init_empty_weights(include_buffers=False):
        model = cls(cfg)
    setattr(model, STREAM_ATTR, StreamedWeights(model.eval(), reader))
    return model
