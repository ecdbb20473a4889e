"""A transformers model whose weights stay in the checkpoint until a partition needs them.

A streamed compile builds the library's model with every parameter on the meta device (no
memory), captures it as usual, and reads weights from the safetensors shards only where a step
needs them: a graph partition's modules while it is exported and checked, one expert's tensors
while its blob is written, one layer at a time in reference runs. Peak memory is then set by the
largest partition (the embedding or the LM head), not by the model.

Checkpoint keys are mapped to the model's parameters with the library's own conversion table
(``transformers.conversion_mapping``): renamings (Mixtral's ``block_sparse_moe`` -> ``mlp``), and
per-expert tensors the loader merges into stacked parameters (``experts.<e>.gate_proj`` +
``up_proj`` -> ``experts.gate_up_proj``). Expert ``e``'s slice of a stacked parameter is rebuilt
from its own tensors, so no layer's stacked experts are ever assembled.
"""

from __future__ import annotations

import contextlib
import ctypes
import re

import torch
from torch import nn

from ..errors import ModelError

_GLOB = re.compile(r"\\\*")
# The attribute of a streamed model holding its :class:`StreamedWeights` (the adapter finds it there).
STREAM_ATTR = "edgemoe_stream"
# Parameters of at most this many elements are read once and kept (see StreamedWeights).
RESIDENT_MAX = 1 << 18


def trim() -> None:
    """Hand freed heap pages back to the OS (glibc): a partition's tensors, once dropped, should not stay in RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _pattern_regex(pattern: str) -> re.Pattern:
    """A converter's source pattern (``mlp.experts.*.gate_proj.weight``) with the expert index captured."""
    return re.compile(_GLOB.sub(r"(\\d+)", re.escape(pattern)))


class StreamedWeights:
    """Parameters of ``model`` (built on the meta device) read from ``reader`` on demand.

    Args:
        model: The library's model, parameters on the meta device, buffers real.
        reader: The checkpoint folder's tensors (:class:`models.hf.stream.CheckpointReader`).

    Raises:
        ModelError: A parameter has no checkpoint tensor, or the library merges expert tensors in a
            way a streamed read does not rebuild (checkpoint tensors no parameter takes are
            ignored, as the library's loader ignores them).
    """

    def __init__(self, model: nn.Module, reader):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            apply_converters,
            apply_renamings,
        )

        self.model, self.reader = model, reader
        self._names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        state = model.state_dict()
        self.dense: dict[str, str] = {}  # parameter or buffer name -> checkpoint key
        self.merged: dict[str, tuple[tuple[str, ...], dict[str, dict[int, str]]]] = {}
        for key in reader.keys:
            renamed = apply_renamings(key, renamings)
            target, pattern = apply_converters(renamed, converters)
            if pattern is None:
                self.dense[target if target in state or key not in state else key] = key
                continue
            conv = by_pattern[pattern]
            ops = [type(op) for op in conv.operations]
            if ops not in ([MergeModulelist], [MergeModulelist, Concatenate]) or any(
                getattr(op, "dim", 0) != d for op, d in zip(conv.operations, (0, 1), strict=False)
            ):
                how = ", ".join(o.__name__ for o in ops)
                raise ModelError(
                    f"{reader.folder}: transformers builds {target} from {key} with {how}, which a streamed "
                    "compile does not rebuild per expert (compile with --no-stream)"
                )
            found = _pattern_regex(pattern).search(renamed)
            _, per = self.merged.setdefault(target, (tuple(conv.source_patterns), {}))
            per.setdefault(pattern, {})[int(found.group(1))] = key
        # Tied parameters (an LM head sharing the embedding) are saved once, under the source's name.
        for tied, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
            if tied not in self.dense and source in self.dense and getattr(model.config, "tie_word_embeddings", False):
                self.dense[tied] = self.dense[source]
        missing = [n for n, p in model.named_parameters() if n not in self.dense and n not in self.merged]
        if missing:
            raise ModelError(
                f"{reader.folder}: {len(missing)} parameter(s) of {type(model).__name__} are not in the checkpoint "
                f"(e.g. {', '.join(missing[:3])})"
            )
        # Buffers and small parameters (norms, biases, routers, position-bias tables) are read now and
        # stay: modules read them before calling the submodule that holds them (T5's position bias
        # takes its device from the table), and together they are a small share of the model.
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in self.dense:
                    buf.copy_(self._read(name, buf.shape).to(buf.dtype))
        for prefix, module in model.named_modules(remove_duplicate=False):
            for name, p in list(module._parameters.items()):
                full = f"{prefix}.{name}" if prefix else name
                if p is not None and p.is_meta and p.numel() <= RESIDENT_MAX and full in self.dense:
                    module._parameters[name] = nn.Parameter(self._read(full, p.shape), requires_grad=False)

    # -- reads -----------------------------------------------------------------------------
    def _read(self, name: str, shape) -> torch.Tensor:
        t = self.reader.read(self.dense[name], dtype=torch.float32)
        if tuple(t.shape) != tuple(shape):
            raise ModelError(
                f"{self.reader.folder}: tensor '{self.dense[name]}' is {list(t.shape)}, "
                f"{type(self.model).__name__} expects {list(shape)} for {name}"
            )
        return t

    def expert_slice(self, name: str, rows: int | slice) -> torch.Tensor:
        """Rows ``rows`` of stacked expert parameter ``name`` (``[e]``: expert e's slice), float32.

        A parameter the library merges from per-expert tensors is rebuilt from expert ``rows``' own
        tensors (concatenated in the converter's order: gate, then up); one saved stacked is read
        in part.
        """
        if name in self.merged:
            if not isinstance(rows, int):
                raise ModelError(f"{name} is merged from per-expert tensors: read one expert at a time")
            sources, per = self.merged[name]
            try:
                parts = [self.reader.read(per[p][rows], dtype=torch.float32) for p in sources]
            except KeyError:
                raise ModelError(f"{self.reader.folder}: expert {rows} of {name} is not in the checkpoint") from None
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if name not in self.dense:
            raise ModelError(f"{self.reader.folder}: the checkpoint has no tensor for {name}")
        return self.reader.read(self.dense[name], rows, dtype=torch.float32)

    # -- materialising modules -------------------------------------------------------------
    def _load(self, module: nn.Module, prefix: str) -> list[tuple[nn.Module, str]]:
        """Read ``module``'s own parameters still on the meta device; return which."""
        read = []
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                full = f"{prefix}{name}"
                if full not in self.dense:
                    raise ModelError(
                        f"{full} is read whole in this arch's forward, but the checkpoint holds it per expert "
                        "(compile with --no-stream)"
                    )
                module._parameters[name] = nn.Parameter(self._read(full, p.shape), requires_grad=False)
                read.append((module, name))
        return read

    @staticmethod
    def _unload(read: list[tuple[nn.Module, str]]) -> None:
        for module, name in read:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)

    def path(self, module: nn.Module) -> str:
        """The dotted name of ``module`` in the model."""
        return self._names[id(module)]

    def _prefix(self, module: nn.Module) -> str:
        name = self._names.get(id(module))
        return f"{name}." if name else ""

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, examples: tuple | None = None, whole: bool = False):
        """Inside: the parameters of every submodule of ``module`` that runs are read from the checkpoint.

        With ``examples``, ``module`` runs on them first (so everything it uses is read), and the
        parameters it does not use are detached until exit: an exporter that lists a module's
        parameters then sees only real tensors. Without, modules are read as they are called;
        with ``whole``, every parameter under ``module`` is read up front. Everything read is
        dropped again on exit.

        Yields:
            That first run's outputs (a target's reference outputs: no second forward), or None
            without ``examples``.
        """
        done: list[tuple[nn.Module, str]] = []
        if whole:
            for m in module.modules():
                done += self._load(m, self._prefix(m))

        def read(mod, _args):
            done.extend(self._load(mod, self._prefix(mod)))

        hooks = [
            m.register_forward_pre_hook(read)
            for m in module.modules()
            if id(m) in self._names and any(p is not None and p.is_meta for p in m._parameters.values())
        ]
        detached: list[tuple[nn.Module, str, nn.Parameter]] = []
        outputs = None
        try:
            if examples is not None:
                with torch.no_grad():
                    outputs = module(*examples)
                for h in hooks:
                    h.remove()
                hooks = []
                for m in module.modules():
                    for name, p in list(m._parameters.items()):
                        if p is not None and p.is_meta:
                            detached.append((m, name, p))
                            m._parameters[name] = None
            yield outputs
        finally:
            for h in hooks:
                h.remove()
            for m, name, p in detached:
                m._parameters[name] = p
            self._unload(done)
            trim()
