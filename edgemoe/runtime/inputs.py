"""Reading inputs for a bundle: ``.npy`` arrays and image files."""

from __future__ import annotations

import math
import warnings
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
        _check_npy_header(p)
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"cannot read {p} as .npy: {exc}") from None
    if suffix in IMAGE_SUFFIXES:
        return _load_image(p, spec)
    raise InputError(f"unsupported input file type '{suffix}' (use .npy or an image: {', '.join(IMAGE_SUFFIXES)})")


# Pixels an input image may have before it is decoded (about 8K x 8K); Pillow's own bomb check
# only starts at 89 million and warns before it errors.
MAX_IMAGE_PIXELS = 64_000_000


def _check_npy_header(path: Path) -> None:
    """The array a ``.npy`` header declares must be exactly what the file holds, before numpy allocates it.

    A header is an untrusted claim: one saying (100000, 100000) float32 on a 1 KB file would
    otherwise have numpy reserve 40 GB first.
    """
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = npy.read_array_header_1_0(f, max_header_size=10_000)
            elif version == (2, 0):
                shape, _fortran, dtype = npy.read_array_header_2_0(f, max_header_size=10_000)
            else:
                raise ValueError(f".npy format version {version} is not read (1.0 and 2.0 are)")
            data_start = f.tell()
    except Exception as exc:  # numpy parses the header text with tokenize and ast: any error means it is garbled
        raise InputError(f"cannot read {path} as .npy: {type(exc).__name__}: {str(exc)[:200]}") from None
    if dtype.hasobject:
        raise InputError(f"{path} holds Python objects (pickles), which are never loaded")
    if any(d < 0 for d in shape):
        raise InputError(f"cannot read {path} as .npy: its header declares the shape {list(shape)}")
    declared = math.prod(shape) * dtype.itemsize  # Python integers: a product of huge sizes cannot wrap
    held = path.stat().st_size - data_start
    if declared != held:
        raise InputError(
            f"{path}: its header declares a {dtype} array of shape {list(shape)} ({declared} bytes), the file holds "
            f"{held} bytes of data"
        )


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
        with warnings.catch_warnings():
            # Pillow's own bomb check warns from 89 Mpx (and fails from twice that) on open: ours is below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
        with img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"image {path} is {img.width}x{img.height} pixels, more than the {MAX_IMAGE_PIXELS:,} an input "
                    "may have (it is resized to the model's input anyway)"
                )
            img = img.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large: {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    except Exception as exc:  # Pillow's decoders raise SyntaxError, ValueError, zlib.error ... on a damaged file
        raise InputError(f"cannot read image {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = (arr - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return arr.transpose(2, 0, 1)[None].astype(np.float32)
