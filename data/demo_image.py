"""Demo image set: one shape (the class) in a random color, place, size and rotation on a cluttered textured background.

Everything except the shape is a nuisance factor, so a good representation must ignore color, position, scale,
rotation and background, while raw pixels mostly encode exactly those.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from demo_shapes import (
    SHAPES,
    draw_distractors,
    fix_articles,
    paint_shape,
    pick_color,
    plain_background,
    pixel_grid,
    random_background,
    to_uint8,
)

CLASSES = list(SHAPES)
SIZE = 32
GRID = pixel_grid(SIZE, supersample=3)
CLUTTER_GRID = pixel_grid(SIZE, supersample=2)  # coarser anti-aliasing is plenty for specks and thin lines


def size_word(radius: float) -> str:
    return "small" if radius < 7.5 else "large" if radius > 10 else "medium"


def place_word(center: np.ndarray, size: int) -> str:
    third = size / 3
    col = ("left", "", "right")[min(int(center[0] // third), 2)]
    row = ("top", "", "bottom")[min(int(center[1] // third), 2)]
    if row and col:
        return f"in the {row} {col}"
    if row or col:
        return f"{'at' if row else 'on'} the {row or col}"
    return "in the center"


def image_caption(rng: np.random.Generator, meta: dict) -> str:
    templates = (
        "a {size} {color} {shape} {place} on a {background} background",
        "a {color} {shape} on a {background} background",
        "a picture of a {size} {color} {shape}",
        "{background} background with a {color} {shape} {place}",
        "a {shape}, {color}, {place}",
    )
    return fix_articles(templates[rng.integers(len(templates))].format(**meta))


def render_image(rng: np.random.Generator, label: int, plain: bool = False) -> tuple[np.ndarray, dict]:
    """A (SIZE, SIZE, 3) uint8 image of shape ``CLASSES[label]`` and its metadata (the nuisance factors).

    plain: a flat background and no clutter, the shape's color, place, size and rotation still random: a
    diagnostic set that tells a method defeated by the background from one that does not find shapes at all.
    """
    color_name, color = pick_color(rng)
    kind, canvas = (plain_background if plain else random_background)(rng, SIZE, color)
    # Drawn even when plain leaves it unused, so that the plain set's later draws are those its README runs measured.
    clutter = int(rng.integers(0, 4))
    if not plain:
        draw_distractors(rng, canvas, CLUTTER_GRID, clutter)
    radius = rng.uniform(6.0, 12.0)
    margin = 0.7 * radius
    center = rng.uniform(margin, SIZE - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    paint_shape(canvas, GRID, SHAPES[CLASSES[label]], center, radius, angle, color)
    canvas += rng.normal(0, 0.02, canvas.shape)  # sensor noise over everything
    meta = {
        "shape": CLASSES[label],
        "color": color_name,
        "background": kind,
        "size": size_word(radius),
        "place": place_word(center, SIZE),
        "radius": round(float(radius), 2),
        "center": [round(float(c), 2) for c in center],
        "angle_deg": round(float(np.degrees(angle)), 1),
    }
    return to_uint8(canvas), meta


def image_sample(rng: np.random.Generator, label: int, plain: bool = False) -> dict:
    """Sample members: ``png`` image, ``txt`` caption, ``json`` metadata."""
    pixels, meta = render_image(rng, label, plain)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"png": buf.getvalue(), "txt": image_caption(rng, meta), "json": meta}
