"""Calibrate value ranges on the lowered model and turn its tensors into fixed-point images."""

from __future__ import annotations

import dataclasses

import numpy as np

from ...bundle.format import encode_expert
from .design import Design, Tensor, pack
from .emulate import FloatMath, forward
from .fixed import FixedType, quantize
from .lower import Lowered


def calibrate(lowered: Lowered, inputs: np.ndarray, tasks: tuple[str, ...]) -> tuple[dict, dict]:
    """Largest magnitudes, per tensor class and per tensor, of the float model on calibration inputs.

    Activation sites come from running every task; parameters from their values.

    Returns:
        (class -> max |value|, site or tensor name -> (class, max |value|)).
    """
    sites: dict[str, tuple[str, float]] = {}

    def observe(site: str, cls: str, v: np.ndarray) -> None:
        m = float(np.abs(v).max(initial=0.0))
        prev = sites.get(site, (cls, 0.0))[1]
        sites[site] = (cls, max(prev, m))

    d = lowered.design
    for task in tasks:
        forward(d, FloatMath(d, observe), inputs, task, lambda n: lowered.params[n][0], _float_experts(lowered))
    observe("input", "input", inputs)
    for name, (arr, cls) in lowered.params.items():
        observe(name, cls, arr)
    for (layer, e), tensors in lowered.experts.items():
        for name, arr in tensors.items():
            observe(f"expert.L{layer}.E{e}.{name}", "bias" if name.startswith("b") else "weight", arr)
    classes: dict[str, float] = {}
    for cls, m in sites.values():
        classes[cls] = max(classes.get(cls, 0.0), m)
    return classes, sites


def _float_experts(lowered: Lowered):
    return lambda layer, e: lowered.experts[(layer, e)]


def quantize_design(
    lowered: Lowered, types: dict[str, FixedType], tiles: dict
) -> tuple[Design, np.ndarray, dict[tuple[int, int], tuple[bytes, list[dict]]]]:
    """The design with types, tiles and layout; the dense parameter image; the expert blobs.

    Returns:
        (design, parameter image as 16-bit words, per (layer, expert) the blob and its tensor records).
    """
    raw = {name: (quantize(arr, types[cls]), cls) for name, (arr, cls) in lowered.params.items()}
    layout, image = pack(raw, types)
    blobs = {}
    expert_layout: dict[str, Tensor] = {}
    for key, tensors in lowered.experts.items():
        q = {
            name: quantize(arr, types["bias" if name.startswith("b") else "weight"]).astype(np.int16)
            for name, arr in tensors.items()
        }
        blob, records = encode_expert(q)
        if len(blob) % 64:
            blob += b"\0" * (64 - len(blob) % 64)  # pool slots start on an AXI burst boundary
        blobs[key] = (blob, records)
        if not expert_layout:
            expert_layout = {
                r["name"]: Tensor(
                    r["offset"] // 2, tuple(r["shape"]), "bias" if r["name"].startswith("b") else "weight"
                )
                for r in records
            }
    words = len(next(iter(blobs.values()))[0]) // 2 if blobs else 0
    design = dataclasses.replace(
        lowered.design,
        types=dict(types),
        tiles=dict(tiles),
        params=layout,
        params_words=len(image),
        expert=expert_layout,
        expert_words=words,
    )
    return design, image, blobs
