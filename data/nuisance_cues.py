"""How much of each demo set's class its nuisance factors give away, from the generators' own draws.

    python data/nuisance_cues.py            # about 20 s

The sets are meant to make the class invariant to the nuisances (data/README.md). Three draws of the
generators fall short of that, and this script measures by how much, so that a reader can weigh them:

- video: a moving object's path stays in the frame, so its first position tells left from right (and up
  from down); growing and shrinking objects start smaller or larger than the others; only blinking clips
  have empty frames. Score: kNN (k=25) on the first frame's object x, y, radius and visibility alone.
- audio: the event is scaled by its peak and the noise set relative to the event's RMS, so the noise floor
  follows the class's peak-to-RMS ratio (click trains are spiky). Score: nearest class median of the noise
  floor (RMS before the onset, dBFS) alone.
- image: a textured background's second color is a blend of two colors that keep clear of the object,
  and the blend itself may not. Share of textured backgrounds whose blend comes within MIN_CONTRAST.

Each is a single number from one nuisance; chance is 10%.
"""

from __future__ import annotations

import numpy as np

import demo_audio
import demo_shapes
import demo_video


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, k: int = 25) -> float:
    mean, std = train.mean(0), train.std(0) + 1e-9
    train, test = (train - mean) / std, (test - mean) / std
    distances = ((test[:, None] - train[None]) ** 2).sum(-1)  # (n_test, n_train)
    votes = train_labels[np.argsort(distances, axis=1)[:, :k]]  # (n_test, k)
    predicted = np.array([np.bincount(row, minlength=10).argmax() for row in votes])
    return float((predicted == test_labels).mean())


def video_first_frame(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for i in range(n):
        center, radius, _, visible = demo_video.trajectory(rng, demo_video.CLASSES[i % 10])
        features.append([center[0, 0], center[0, 1], radius[0] * visible[0], visible[0]])
        labels.append(i % 10)
    return np.array(features), np.array(labels)


def audio_noise_floor(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    floors, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        clip, meta = demo_audio.render_clip(rng, i % 10)
        before = clip[: int(meta["onset_s"] * demo_audio.SAMPLE_RATE)]
        if len(before) >= 800:  # 50 ms of noise alone
            floors.append(10 * np.log10(np.mean(before.astype(np.float64) ** 2)))
            labels.append(i % 10)
    return np.array(floors), np.array(labels)


def blended_background_distance(n: int, seed: int) -> np.ndarray:
    """RGB distance (0..255) from the object's color to a textured background's blended color, as
    demo_shapes.random_background draws them."""
    rng = np.random.default_rng(seed)
    distances = []
    for _ in range(n):
        _, color = demo_shapes.pick_color(rng)
        kind, (c0, c1) = demo_shapes.background_colors(rng, color)
        if kind != "plain":
            distances.append(np.linalg.norm((c1 - color) * 255))
    return np.array(distances)


def main() -> None:
    train, train_labels = video_first_frame(5000, seed=1)
    test, test_labels = video_first_frame(2000, seed=2)
    print(f"video: 10-class kNN from the first frame's object x, y, radius, visibility: {knn_accuracy(train, train_labels, test, test_labels):.1%}")
    sides = (train_labels == 0) | (train_labels == 1)
    x, right = train[sides, 0], train_labels[sides] == 1
    print(f"video: moving left vs right from the first frame's x alone: {max(((x < t) == right).mean() for t in np.linspace(0, 32, 321)):.1%}")

    floors, labels = audio_noise_floor(3000, seed=1)
    medians = np.array([np.median(floors[labels == c]) for c in range(10)])
    predicted = np.abs(floors[:, None] - medians[None]).argmin(1)
    print(f"audio: 10-class from the noise floor alone (nearest class median): {(predicted == labels).mean():.1%}")
    print("audio: noise floor median per class (dBFS): " + ", ".join(f"{name} {m:.1f}" for name, m in zip(demo_audio.CLASSES, medians)))

    distances = blended_background_distance(20000, seed=1)
    print(f"image: textured backgrounds whose blended color is within {demo_shapes.MIN_CONTRAST:.0f} of the object's: "
          f"{(distances < demo_shapes.MIN_CONTRAST).mean():.1%} (within 80: {(distances < 80).mean():.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
