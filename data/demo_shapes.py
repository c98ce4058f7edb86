"""Procedural shapes, colors and textured backgrounds shared by the demo image and video sets.

A shape is a function ``(x, y) -> bool`` in its own frame, where the object fits in the unit disk but
for the heart's lobes and the bowtie's corners (``SHAPE_REACH``). ``paint_shape`` places it on a canvas
(center, radius, angle) and anti-aliases it by supersampling the pixels of its bounding box.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np


def star(x: np.ndarray, y: np.ndarray, points: int, inner: float) -> np.ndarray:
    """Inside a star whose ``points`` tips lie on the unit circle and whose notches lie at radius ``inner``.

    A regular n-gon is the star with ``inner = cos(pi / n)`` (the notches sit on the edge midpoints).
    """
    sector = np.pi / points
    tip_angles = 2 * sector * np.arange(-points, points + 1)
    k = np.rint(np.arctan2(y, x) / (2 * sector)).astype(int) + points  # nearest tip
    c, s = np.cos(tip_angles)[k], np.sin(tip_angles)[k]
    # Rotate the nearest tip onto (1, 0) and fold by mirror symmetry, so one edge (tip to notch) decides.
    along, across = x * c + y * s, np.abs(y * c - x * s)
    # Inside = origin side of the line from the tip (1, 0) to the notch (inner cos, inner sin) of the sector.
    return inner * np.sin(sector) * (along - 1) + (1 - inner * np.cos(sector)) * across <= 0


def disk(x, y):
    return np.hypot(x, y) <= 1


def ring(x, y):
    return np.abs(np.hypot(x, y) - 0.78) <= 0.22


def triangle(x, y):
    return star(x, y, 3, np.cos(np.pi / 3))


def square(x, y):
    return star(x, y, 4, np.cos(np.pi / 4))


def five_point_star(x, y):
    return star(x, y, 5, 0.45)


def cross(x, y):
    ax, ay = np.abs(x), np.abs(y)
    return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))


def crescent(x, y):
    return (np.hypot(x, y) <= 1) & (np.hypot(x - 0.5, y) > 0.8)


def heart(x, y):
    # Implicit heart curve (x^2 + y^2 - 1)^3 = x^2 y^3, scaled into the unit disk and centered.
    x, y = x * 1.15, y * 1.15 + 0.15
    x2, q = x * x, x * x + y * y - 1
    return q * q * q <= x2 * y * y * y


def arrow(x, y):
    shaft = (x >= -0.95) & (x <= 0.05) & (np.abs(y) <= 0.22)
    head = (x >= 0.0) & (x <= 0.95) & (np.abs(y) <= 0.75 * (0.95 - x))
    return shaft | head


def bowtie(x, y):
    return (np.abs(x) <= 0.95) & (np.abs(y) <= 0.15 + 0.75 * np.abs(x))


# class name -> shape; the demo image classes, in this order
SHAPES = {
    "circle": disk,
    "ring": ring,
    "triangle": triangle,
    "square": square,
    "star": five_point_star,
    "cross": cross,
    "crescent": crescent,
    "heart": heart,
    "arrow": arrow,
    "bowtie": bowtie,
}

# How far from its center any shape reaches, in radii: the bowtie's corners are at 1.28, the heart's lobes
# at 1.14, the others within 1. Painting only the unit disk's box cut those tips off at some angles.
SHAPE_REACH = 1.3

# Named colors (RGB 0..255); captions use the names, renders jitter the values.
COLORS = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 220, 50),
    "green": (50, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 180),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (130, 80, 40),
}

COLOR_NAMES = list(COLORS)
PALETTE = np.array([COLORS[n] for n in COLOR_NAMES], float)

# Object colors differ from both background colors by at least this RGB distance, so the object stays visible.
MIN_CONTRAST = 150.0

BACKGROUNDS = ("plain", "striped", "checkered", "gradient", "blotchy", "dotted")


class Grid(NamedTuple):
    """Pixel coordinates (u right, v down) of ``supersample**2`` sub-pixel centers per pixel, each (H*ss, W*ss)."""

    u: np.ndarray
    v: np.ndarray
    supersample: int


def pixel_grid(size: int, supersample: int) -> Grid:
    c = ((np.arange(size * supersample) + 0.5) / supersample).astype(np.float32)  # float32: twice the speed
    return Grid(*np.meshgrid(c, c, indexing="xy"), supersample)


def average_subpixels(inside: np.ndarray, ss: int) -> np.ndarray:
    """Anti-alias: mean of each ss x ss block of a (..., H*ss, W*ss) mask -> (..., H, W)."""
    *lead, hs, ws = inside.shape
    return inside.astype(np.float32).reshape(*lead, hs // ss, ss, ws // ss, ss).mean(axis=(-3, -1))


def shape_coverage(shape, grid: Grid, center, radius: float, angle: float) -> np.ndarray:
    """Fraction of each grid pixel covered by ``shape`` at ``center`` (u, v), ``radius`` px, rotated ``angle`` rad."""
    # Python floats keep the float32 grid float32 (a numpy float64 scalar would promote it).
    du, dv = grid.u - float(center[0]), grid.v - float(center[1])
    cos, sin, radius = float(np.cos(angle)), float(np.sin(angle)), float(radius)
    # Inverse rotation into the shape's frame; v points down, so y = -v keeps "counterclockwise" as seen on screen.
    x = (du * cos - dv * sin) / radius
    y = -(du * sin + dv * cos) / radius
    return average_subpixels(shape(x, y), grid.supersample)  # (H*ss, W*ss) -> (H, W)


def segment_coverage(grid: Grid, start, end, width: float) -> np.ndarray:
    """Fraction of each grid pixel within ``width / 2`` of the segment ``start``-``end``."""
    pu, pv = grid.u - float(start[0]), grid.v - float(start[1])
    du, dv = float(end[0] - start[0]), float(end[1] - start[1])
    t = np.clip((pu * du + pv * dv) / max(du * du + dv * dv, 1e-9), 0, 1)
    return average_subpixels((pu - t * du) ** 2 + (pv - t * dv) ** 2 <= (width / 2) ** 2, grid.supersample)


def window(grid: Grid, canvas: np.ndarray, lo, hi) -> tuple[Grid, np.ndarray]:
    """The part of ``grid`` and the (view into) ``canvas`` covering pixel box [lo, hi) (u, v), clipped to the canvas.

    Rendering only the bounding box of an item keeps the supersampled rasterization cheap.
    """
    h, w = canvas.shape[:2]
    u0, v0 = (max(int(np.floor(x)), 0) for x in lo)
    u1, v1 = min(int(np.ceil(hi[0])), w), min(int(np.ceil(hi[1])), h)
    ss = grid.supersample
    rows, cols = slice(v0 * ss, max(v1, v0) * ss), slice(u0 * ss, max(u1, u0) * ss)
    return Grid(grid.u[rows, cols], grid.v[rows, cols], ss), canvas[v0:v1, u0:u1]


def paint_shape(canvas: np.ndarray, grid: Grid, shape, center, radius: float, angle: float, color) -> None:
    """Paint ``shape`` (within ``SHAPE_REACH`` radii of its center) in ``color`` onto ``canvas`` (H, W, 3), in place."""
    reach = SHAPE_REACH * radius + 1
    sub, view = window(grid, canvas, (center[0] - reach, center[1] - reach), (center[0] + reach, center[1] + reach))
    if view.size:
        view[:] = composite(view, shape_coverage(shape, sub, center, radius, angle), color)


def paint_segment(canvas: np.ndarray, grid: Grid, start, end, width: float, color) -> None:
    """Paint a line segment of ``width`` pixels in ``color`` onto ``canvas`` (H, W, 3), in place."""
    reach = width / 2 + 1
    lo = (min(start[0], end[0]) - reach, min(start[1], end[1]) - reach)
    hi = (max(start[0], end[0]) + reach, max(start[1], end[1]) + reach)
    sub, view = window(grid, canvas, lo, hi)
    if view.size:
        view[:] = composite(view, segment_coverage(sub, start, end, width), color)


def composite(canvas: np.ndarray, coverage: np.ndarray, color) -> np.ndarray:
    """``color`` over ``canvas`` (..., H, W, 3) with per-pixel opacity ``coverage`` (..., H, W)."""
    a = coverage[..., None]
    return canvas * (1 - a) + color * a


def pick_color(rng: np.random.Generator, avoid: tuple = (), min_distance: float = 0.0) -> tuple[str, np.ndarray]:
    """A random named color (jittered, in [0, 1]) at least ``min_distance`` (RGB 0..255) from all ``avoid`` colors."""
    ok = np.ones(len(COLOR_NAMES), bool)
    for a in avoid:
        ok &= ((PALETTE - a) ** 2).sum(1) >= min_distance**2
    allowed = np.flatnonzero(ok)
    i = allowed[rng.integers(len(allowed))]
    rgb = np.clip(PALETTE[i] + rng.uniform(-20, 20, 3), 0, 255)
    return COLOR_NAMES[i], rgb / 255


def background(rng: np.random.Generator, kind: str, size: int, colors: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A (size, size, 3) texture of ``kind`` (one of BACKGROUNDS) mixing two colors, with pixel noise."""
    v, u = np.mgrid[0:size, 0:size] + 0.5
    a = rng.uniform(0, np.pi)
    along = u * np.cos(a) + v * np.sin(a)
    across = -u * np.sin(a) + v * np.cos(a)
    if kind == "plain":
        mix = np.zeros((size, size))
    elif kind == "striped":
        mix = (np.sin(2 * np.pi * along / rng.uniform(3, 9) + rng.uniform(0, 2 * np.pi)) > 0).astype(float)
    elif kind == "checkered":
        cell = rng.uniform(3, 8)
        mix = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(float)
    elif kind == "gradient":
        mix = (along - along.min()) / (along.max() - along.min())
    elif kind == "blotchy":
        coarse = rng.random((5, 5))
        idx = np.linspace(0, 4, size)
        i0 = np.minimum(idx.astype(int), 3)
        f = idx - i0
        rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]  # bilinear upsampling, rows then columns
        mix = rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f
        mix = np.clip((mix - 0.5) * 2.5 + 0.5, 0, 1)
    elif kind == "dotted":
        step = rng.uniform(4, 8)
        du = np.mod(along, step) - step / 2
        dv = np.mod(across, step) - step / 2
        mix = (np.hypot(du, dv) <= step * rng.uniform(0.2, 0.35)).astype(float)
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")
    img = colors[0] * (1 - mix[..., None]) + colors[1] * mix[..., None]
    return img + rng.normal(0, rng.uniform(0.01, 0.05), img.shape)


def background_colors(rng: np.random.Generator, object_color: np.ndarray) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """A random texture kind and its two colors: the first keeps clear of ``object_color``; the second is a
    blend of it with another that does, and may itself come close (data/nuisance_cues.py measures how often)."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    _, c0 = pick_color(rng, avoid=(object_color * 255,), min_distance=MIN_CONTRAST)
    _, c1 = pick_color(rng, avoid=(object_color * 255,), min_distance=MIN_CONTRAST)
    return kind, (c0, c0 + rng.uniform(0.2, 0.6) * (c1 - c0))  # a blend: the texture is milder than the object's contrast


def random_background(rng: np.random.Generator, size: int, object_color: np.ndarray) -> tuple[str, np.ndarray]:
    """A random texture kind and its (size, size, 3) render in `background_colors`."""
    kind, colors = background_colors(rng, object_color)
    return kind, background(rng, kind, size, colors)


def plain_background(rng: np.random.Generator, size: int, object_color: np.ndarray) -> tuple[str, np.ndarray]:
    """One flat color that keeps clear of ``object_color``: the background of the ``make_demo.py --plain`` diagnostic sets."""
    _, color = pick_color(rng, avoid=(object_color * 255,), min_distance=MIN_CONTRAST)
    return "plain", np.broadcast_to(color, (size, size, 3)).copy()


def draw_distractors(rng: np.random.Generator, canvas: np.ndarray, grid: Grid, count: int) -> None:
    """Paint ``count`` small clutter items (thin lines and specks) in random colors onto ``canvas`` (H, W, 3)."""
    size = canvas.shape[0]
    for _ in range(count):
        _, color = pick_color(rng)
        start = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            a = rng.uniform(0, 2 * np.pi)
            end = start + rng.uniform(4, 11) * np.array([np.cos(a), np.sin(a)])
            paint_segment(canvas, grid, start, end, rng.uniform(0.8, 1.6), color)
        else:
            paint_shape(canvas, grid, disk, start, rng.uniform(0.8, 2.0), 0.0, color)


def fix_articles(text: str) -> str:
    """'a orange' -> 'an orange' in generated captions."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
