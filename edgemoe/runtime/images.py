"""PNG pictures of a run: the input image and each dense task output (numpy + Pillow, no torch).

* ``input.png``: the input de-normalised with the manifest's ``preprocess`` mean/std (image
  models), otherwise min-max scaled.
* ``<task>.png``: a dense output ``(1, C, H, W)``; with ``C > 1`` channels (class scores) the
  argmax coloured with a fixed palette, with one channel (e.g. depth) min-max scaled to
  greyscale, small values bright (near = bright for depth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

# Distinct colours for class maps; class 0 (background in the reference scenes) is dark grey.
PALETTE = np.array(
    [
        [40, 40, 40],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
    ],
    dtype=np.uint8,
)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise InputError("writing PNGs needs Pillow: pip install 'edgemoe[runtime]'") from None
    return Image


def _scale01(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def input_image(x: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 (H, W, 3) or (H, W) picture of a ``(1, C, H, W)`` model input.

    Raises:
        InputError: The input is not one image-like ``(1, C, H, W)`` array with 1 or 3 channels.
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3):
        raise InputError(f"--png needs an image-like input (1, 1 or 3, H, W), got shape {tuple(x.shape)}")
    img = x[0].transpose(1, 2, 0).astype(np.float64)
    pre = spec.get("preprocess") or {}
    if pre.get("kind") == "image":
        img = np.clip(img * np.asarray(pre["std"]) + np.asarray(pre["mean"]), 0.0, 1.0)
    else:
        img = _scale01(img)
    img = (img * 255.0 + 0.5).astype(np.uint8)
    return img[..., 0] if img.shape[-1] == 1 else img


def output_image(y: np.ndarray) -> np.ndarray:
    """uint8 picture of a dense ``(1, C, H, W)`` task output: palette argmax (C > 1) or greyscale (C == 1).

    Raises:
        InputError: The output is not a dense ``(1, C, H, W)`` map.
    """
    y = np.asarray(y)
    if y.ndim != 4 or y.shape[0] != 1:
        raise InputError(f"--png needs a dense (1, C, H, W) task output, got shape {tuple(y.shape)}")
    if y.shape[1] == 1:
        return ((1.0 - _scale01(y[0, 0])) * 255.0 + 0.5).astype(np.uint8)
    return PALETTE[y[0].argmax(0) % len(PALETTE)]


def write_pngs(directory: str | Path, x: np.ndarray, y: np.ndarray, spec: dict, task: str) -> list[str]:
    """Write ``input.png`` and ``<task>.png`` into ``directory`` (created if needed).

    Args:
        directory: Output folder.
        x: The model input, shape (1, C, H, W).
        y: The task output, shape (1, C, H, W).
        spec: The manifest's ``input`` entry (for de-normalisation).
        task: Task name (file name of the output picture).

    Returns:
        The paths written.

    Raises:
        InputError: Input or output not image-like, or the folder cannot be written.
    """
    image = _pil()
    out = Path(directory)
    pictures = {"input.png": input_image(x, spec), f"{task}.png": output_image(y)}
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, arr in pictures.items():
            path = out / name
            image.fromarray(arr).save(path)
            written.append(str(path))
    except OSError as exc:
        raise InputError(f"cannot write PNGs to {out}: {exc}") from None
    return written
