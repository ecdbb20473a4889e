"""Procedural multi-task scenes for M³ViT: RGB image, per-pixel class and per-pixel depth.

A scene is a textured ground plane (depth grows towards a horizon) with 3-8 flat shapes
of 6 classes standing on it at random depths. A shape's apparent size shrinks with its
depth and its base sits where the ground has the same depth, so both size and image
height are depth cues; nearer shapes are drawn last and occlude farther ones. Each class has its
own hue (jittered, random saturation and brightness) while ground and sky colours are fully random,
so a class is told by hue and outline together: with outline alone (random shape colours) a
ViT trained from scratch on 2 CPU cores for 45 minutes learnt figure/ground but not the classes.

Everything is numpy and deterministic in the seed (``numpy.random.default_rng(seed)``), so
the runtime and the demo can use it without torch. Seeds below ``HELD_OUT_START`` are for
training; evaluation draws from ``HELD_OUT_START`` upwards.

Run ``python -m edgemoe.models.m3vit.scenes --png out/scene.png --seed 7`` to write one
scene (also ``--labels-png`` / ``--depth-png`` for its ground truth).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 128, 256
CLASSES = ("background", "circle", "square", "triangle", "bar", "cross", "ring")
NUM_CLASSES = len(CLASSES)
# Depth range of the scene in metres-like units (ground plane up to the horizon / sky).
NEAR, FAR = 1.5, 12.0
# First seed of the held-out range; training scenes use seeds below it.
HELD_OUT_START = 1_000_000_000
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = cells, cells * 2
    grid = rng.random((gh + 1, gw + 1), dtype=np.float32)
    ys = np.linspace(0, gh, h, dtype=np.float32)
    xs = np.linspace(0, gw, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), gh - 1)
    x0 = np.minimum(xs.astype(np.int64), gw - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random background pattern, shape (h, w) in [0, 1]: noise, stripes, gradient or checker."""
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        return _smooth_noise(rng, h, w, int(rng.integers(2, 9)))
    if kind == 1:
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30)
        return 0.5 + 0.5 * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period))
    if kind == 2:
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    cell = rng.uniform(8, 32)
    return ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of class ``cls`` and radius ``r`` in rotated local coordinates (u, v)."""
    if cls == 1:  # circle
        return u * u + v * v <= r * r
    if cls == 2:  # square
        s = r * 0.8
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if cls == 3:  # equilateral triangle: three half-planes
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            m &= u * np.cos(a) + v * np.sin(a) <= r * 0.5
        return m
    if cls == 4:  # bar (elongated ellipse)
        return (u / r) ** 2 + (v / (0.38 * r)) ** 2 <= 1.0
    if cls == 5:  # cross
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if cls == 6:  # ring
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"no shape for class {cls}")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, 3).astype(np.float32)


def _class_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """RGB of a shape: the class's hue (evenly spaced, jittered by ±0.04) at random saturation and value."""
    hue = ((cls - 1) / (NUM_CLASSES - 1) + rng.uniform(-0.04, 0.04)) % 1.0
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
    # HSV → RGB: each channel's distance around the hue circle from its primary.
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def make_scene(seed: int, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one scene.

    Args:
        seed: Scene seed; the same seed always gives the same scene.
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        ``(image, labels, depth)``: uint8 (H, W, 3) RGB, int64 (H, W) class per pixel (0 background,
        1..6 ``CLASSES[1:]``), float32 (H, W) depth per pixel.
    """
    rng = np.random.default_rng(int(seed))
    h, w = height, width
    # Ground plane below a horizon, sky (at FAR) above it. Depth ~ 1 / (rows below the horizon).
    horizon = float(rng.uniform(0.15, 0.45) * h)
    rows = np.arange(h, dtype=np.float32) + 0.5
    below = np.clip(rows - horizon, 1e-3, None)
    k = NEAR * (h - horizon)  # depth NEAR at the bottom row
    row_depth = np.where(rows > horizon, np.minimum(k / below, FAR), FAR).astype(np.float32)
    depth = np.repeat(row_depth[:, None], w, axis=1)

    ground = _texture(rng, h, w)
    sky = _texture(rng, h, w)
    c_ground = [_random_colour(rng), _random_colour(rng)]
    c_sky = [_random_colour(rng), _random_colour(rng)]
    img = np.where(
        (rows > horizon)[:, None, None],
        c_ground[0] + (c_ground[1] - c_ground[0]) * ground[..., None],
        c_sky[0] + (c_sky[1] - c_sky[0]) * sky[..., None],
    ).astype(np.float32)
    # Haze: far ground fades towards the sky's first colour (another depth cue).
    haze = ((depth - NEAR) / (FAR - NEAR))[..., None] * 0.4
    img = img * (1 - haze) + c_sky[0] * haze
    labels = np.zeros((h, w), dtype=np.int64)

    n = int(rng.integers(3, 9))
    obj_depth = np.sort(rng.uniform(NEAR + 0.3, 0.6 * FAR, n))[::-1]  # far to near: near ones occlude
    yy_full, xx_full = np.mgrid[0:h, 0:w].astype(np.float32)
    for d in obj_depth:
        cls = int(rng.integers(1, NUM_CLASSES))
        r = float(np.clip(rng.uniform(0.8, 1.2) * 110.0 / d, 5.0, 0.4 * h))
        # Base on the ground row of depth d (clamped to the image), centre one radius above it.
        base = min(horizon + k / d, h - 1.0)
        cy = base - r * rng.uniform(0.7, 1.0)
        cx = rng.uniform(0.05 * w, 0.95 * w)
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        theta = rng.uniform(0, 2 * np.pi)
        dy, dx = yy_full[y0:y1, x0:x1] + 0.5 - cy, xx_full[y0:y1, x0:x1] + 0.5 - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        m = _shape_mask(cls, u, v, r)
        colour = _class_colour(rng, cls)
        # Mild shading across the shape so it is not perfectly flat.
        shade = 1.0 + 0.15 * (u / r)[..., None]
        img[y0:y1, x0:x1][m] = np.clip(colour * shade, 0, 1)[m]
        labels[y0:y1, x0:x1][m] = cls
        depth[y0:y1, x0:x1][m] = np.float32(d)

    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, labels, depth.astype(np.float32)


def normalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, H, W, 3) images to float32 (N, 3, H, W), scaled to [0, 1] then normalised per channel."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def make_batch(
    seeds: Sequence[int],
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    height: int = HEIGHT,
    width: int = WIDTH,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scenes for a list of seeds as model inputs and targets.

    Args:
        seeds: One seed per scene.
        mean: Per-channel normalisation mean (the model config's ``mean``).
        std: Per-channel normalisation std (the model config's ``std``).
        height: Image height.
        width: Image width.

    Returns:
        ``(x, labels, depth)``: float32 (N, 3, H, W) normalised images, int64 (N, H, W), float32 (N, H, W).
    """
    scenes = [make_scene(s, height, width) for s in seeds]
    images = np.stack([s[0] for s in scenes])
    return (
        normalize_images(images, mean, std),
        np.stack([s[1] for s in scenes]),
        np.stack([s[2] for s in scenes]),
    )


# Colours of the 7 classes for mask images (background dark grey).
PALETTE = np.array(
    [[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]],
    dtype=np.uint8,
)


def _depth_picture(depth: np.ndarray) -> np.ndarray:
    """Depth as greyscale, min-max scaled per image, near = bright (as ``edgemoe run --png`` draws it)."""
    lo, hi = float(depth.min()), float(depth.max())
    return ((hi - depth) / max(hi - lo, 1e-6) * 255.0 + 0.5).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a scene (and optionally its ground truth) as PNG files."""
    ap = argparse.ArgumentParser(prog="python -m edgemoe.models.m3vit.scenes", description=__doc__.splitlines()[0])
    ap.add_argument("--png", required=True, help="output PNG of the RGB scene")
    ap.add_argument("--seed", type=int, default=HELD_OUT_START, help="scene seed (default: first held-out seed)")
    ap.add_argument("--labels-png", help="also write the ground-truth class mask (palette colours)")
    ap.add_argument("--depth-png", help="also write the ground-truth depth (greyscale, near = bright)")
    args = ap.parse_args(argv)
    from PIL import Image

    image, labels, depth = make_scene(args.seed)
    for path, arr in (
        (args.png, image),
        (args.labels_png, PALETTE[labels] if args.labels_png else None),
        (args.depth_png, None if not args.depth_png else _depth_picture(depth)),
    ):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
