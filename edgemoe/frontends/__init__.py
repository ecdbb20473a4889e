"""Frontends: capture a model into the IR through a family adapter.

To add a family, write one module with a :class:`~edgemoe.frontends.base.ModelAdapter`
subclass (:class:`~edgemoe.frontends.base.NativeAdapter` for edgemoe's own model classes) and
add it to ``_ADAPTERS``; :mod:`edgemoe.frontends.partitions` builds the partitions around the
family's torch modules.
"""

from __future__ import annotations

import importlib

from .base import GraphPartition, ModelAdapter

# family -> "module:class", imported on first use so listing families stays cheap.
_ADAPTERS: dict[str, str] = {
    "m3vit": "edgemoe.frontends.m3vit:M3ViTAdapter",
    "hf": "edgemoe.frontends.hf:HFAdapter",
    "moe_lm": "edgemoe.frontends.moe_lm:MoELMAdapter",
    "bert_moe": "edgemoe.frontends.bert_moe:BertMoEAdapter",
}


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of a model family."""
    from ..errors import ModelError

    if family not in _ADAPTERS:
        raise ModelError(f"no adapter for model family '{family}' (known: {', '.join(sorted(_ADAPTERS))})")
    module, cls = _ADAPTERS[family].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["GraphPartition", "ModelAdapter", "adapter_class"]
