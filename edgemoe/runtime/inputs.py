"""Reading inputs for a bundle: ``.npy`` arrays and image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def load_input(path: str | Path, spec: dict) -> np.ndarray:
    """Load an input file for a bundle whose input is described by ``spec`` (manifest ``input``).

    ``.npy`` files are taken as they are (with or without the batch axis). Images are
    resized to the model's input size, scaled to [0, 1] and normalised with the
    manifest's mean and std.

    Raises:
        InputError: Missing, unreadable or unsupported file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"cannot read {p} as .npy: {exc}") from None
    if suffix in IMAGE_SUFFIXES:
        return _load_image(p, spec)
    raise InputError(f"unsupported input file type '{suffix}' (use .npy or an image: {', '.join(IMAGE_SUFFIXES)})")


def _load_image(path: Path, spec: dict) -> np.ndarray:
    pre = spec.get("preprocess")
    if not pre or pre.get("kind") != "image":
        raise InputError("this bundle's model does not take images; pass a .npy array")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError("reading images needs Pillow: pip install 'edgemoe[runtime]'") from None
    _, channels, height, width = spec["shape"]
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = (arr - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return arr.transpose(2, 0, 1)[None].astype(np.float32)
