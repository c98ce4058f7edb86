"""Demo video set: a shape on a static cluttered background; the class is how it moves, not what it is.

Any single frame is ambiguous (shape, color, start position, size and background are random), so the label
needs temporal information: the direction of a translation, the sense of a rotation, growing vs shrinking, etc.
"""

from __future__ import annotations

import io

import av
import numpy as np

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

CLASSES = [
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating clockwise",
    "rotating counterclockwise",
    "growing",
    "shrinking",
    "circling",
    "blinking",
]
# Shapes whose rotation is visible (the circle and the ring look the same at every angle).
MOVERS = [name for name in SHAPES if name not in ("circle", "ring")]
SIZE, FRAMES, FPS = 32, 16, 8
GRID = pixel_grid(SIZE, supersample=2)


def trajectory(rng: np.random.Generator, motion: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame object center (T, 2) (u right, v down), radius (T,), angle (T,) and visibility (T,) for ``motion``."""
    t = np.arange(FRAMES) / (FRAMES - 1)  # 0 .. 1
    radius = np.full(FRAMES, rng.uniform(4.5, 8.0))
    angle = np.full(FRAMES, rng.uniform(0, 2 * np.pi))
    visible = np.ones(FRAMES)
    center = np.tile(rng.uniform(radius[0] + 1, SIZE - radius[0] - 1, 2), (FRAMES, 1))
    direction = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
    if motion in direction:
        step = np.array(direction[motion])
        travel = rng.uniform(8, 18)
        # Keep the whole path inside the frame (up to a sliver of the object) along the motion axis.
        reach = np.where(step != 0, travel / 2 + 0.5 * radius[0], radius[0])
        mid = rng.uniform(reach, SIZE - reach)
        center = mid + (t[:, None] - 0.5) * travel * step
    elif motion.startswith("rotating"):
        sense = -1 if motion == "rotating clockwise" else 1  # angles are counterclockwise on screen
        angle = angle + sense * np.radians(rng.uniform(6, 14)) * np.arange(FRAMES)
    elif motion in ("growing", "shrinking"):
        small, large = rng.uniform(2.5, 4.0), rng.uniform(8.0, 11.0)
        radius = small * (large / small) ** (t if motion == "growing" else 1 - t)
        center = np.tile(rng.uniform(large * 0.7, SIZE - large * 0.7, 2), (FRAMES, 1))
    elif motion == "circling":
        orbit = rng.uniform(4, 8)
        turn = rng.choice((-1, 1)) * rng.uniform(1.2, 2.0) * np.pi * t + rng.uniform(0, 2 * np.pi)
        hub = rng.uniform(orbit + radius[0] * 0.6, SIZE - orbit - radius[0] * 0.6, 2)
        center = hub + orbit * np.stack([np.cos(turn), np.sin(turn)], 1)
    elif motion == "blinking":
        period = int(rng.integers(3, 7))
        visible = ((np.arange(FRAMES) + rng.integers(2 * period)) // period % 2).astype(float)
    else:
        raise ValueError(f"unknown motion {motion!r}; expected one of {CLASSES}")
    return center, radius, angle, visible


def render_clip(rng: np.random.Generator, label: int, plain: bool = False) -> tuple[np.ndarray, dict]:
    """(FRAMES, SIZE, SIZE, 3) uint8 frames of a random shape doing ``CLASSES[label]``, and the clip's metadata.
    plain: a flat background and no clutter (the diagnostic set of ``make_demo.py --plain``)."""
    shape = MOVERS[rng.integers(len(MOVERS))]
    color_name, color = pick_color(rng)
    kind, scene = (plain_background if plain else random_background)(rng, SIZE, color)
    # Drawn even when plain leaves it unused, so that the plain set's later draws are those its README runs measured.
    clutter = int(rng.integers(1, 5))
    if not plain:
        draw_distractors(rng, scene, GRID, clutter)
    center, radius, angle, visible = trajectory(rng, CLASSES[label])
    frames = np.repeat(scene[None].astype(np.float32), FRAMES, axis=0)  # (T, H, W, 3)
    for i in np.flatnonzero(visible):
        paint_shape(frames[i], GRID, SHAPES[shape], center[i], radius[i], angle[i], color)
    frames += 0.015 * rng.standard_normal(frames.shape, dtype=np.float32)
    meta = {"motion": CLASSES[label], "shape": shape, "color": color_name, "background": kind}
    return to_uint8(frames), meta


def encode_mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """H.264 (libx264, yuv420p) mp4 of (T, H, W, 3) uint8 frames; bit-exact flags keep the bytes reproducible."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        # One thread: x264's output then depends only on the input, and tiny frames gain nothing from threads.
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "superfast", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def video_caption(rng: np.random.Generator, meta: dict) -> str:
    templates = (
        "a {color} {shape} {motion} on a {background} background",
        "a {shape} {motion}",
        "video of a {color} {shape} {motion}",
        "a {color} shape {motion} over a {background} background",
    )
    return fix_articles(templates[rng.integers(len(templates))].format(**meta))


def video_sample(rng: np.random.Generator, label: int, plain: bool = False) -> dict:
    """Sample members: ``mp4`` clip, ``txt`` caption, ``json`` metadata."""
    frames, meta = render_clip(rng, label, plain)
    return {"mp4": encode_mp4(frames), "txt": video_caption(rng, meta), "json": meta}
