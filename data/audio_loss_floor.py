"""How low can AudioMAE's normalised masked-patch loss go on the demo audio?

    python data/audio_loss_floor.py --clips 40 --draws 24

Each demo clip is a sound event in random background noise. The noise draw itself cannot be predicted
from anything, so part of every patch's normalised log-mel values is out of reach of any model. This
script renders each clip once more with `--draws` other noise draws (the same event, noise colour and
SNR), takes their mean log-mel spectrogram as the clip's expected spectrogram, and scores an oracle that
predicts every patch from that expectation and the patch's own mean and std, which a model does not get.
No model can score below this oracle on average; the estimate is high by about 1/draws of the noise
variance (the expectation carries 1/draws of it). It uses the AudioMAE demo's front end (128 mel bins,
10 ms hop, 25 ms window, 96 frames, 16x16 patches) and prints the oracle's loss next to predicting zero.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from core.augment import log_mel
from core.masking import patchify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_audio  # noqa: E402  (a sibling script, not a package)


def renders(clip_seed: int, draws: int) -> np.ndarray:
    """(1 + draws, samples): a clip drawn as the demo set draws them, each row with another noise draw."""
    colored_noise = demo_audio.colored_noise
    rows = []
    try:
        for draw in range(1 + draws):
            noise_rng = np.random.default_rng([clip_seed, draw])
            # The noise is drawn last from the clip's generator; everything before it (event, gain, SNR) repeats.
            demo_audio.colored_noise = lambda rng, n, exponent: colored_noise(noise_rng, n, exponent)
            clip, _ = demo_audio.render_clip(np.random.default_rng(clip_seed), clip_seed % len(demo_audio.CLASSES))
            rows.append(clip)
    finally:
        demo_audio.colored_noise = colored_noise
    return np.stack(rows)


def loss_floor(clips: int, draws: int, patch: int = 16) -> tuple[float, float]:
    """(oracle loss, predict-zero loss), each the mean squared error on per-patch normalised targets."""
    oracle, zero = [], []
    for seed in range(clips):
        spec = log_mel(torch.from_numpy(renders(seed, draws)), demo_audio.SAMPLE_RATE, 128, 10.0, 25.0, frames=96)
        patches = patchify(spec, (patch, patch))  # (1 + draws, N, patch * patch)
        x, expected = patches[0], patches[1:].mean(0)  # one realisation; its expectation from the other draws
        mean, std = x.mean(-1, keepdim=True), (x.var(-1, keepdim=True) + 1e-6).sqrt()
        target = (x - mean) / std  # core.losses.masked_patch_loss's normalised target
        best = (expected - expected.mean(-1, keepdim=True)) / std
        oracle.append(((target - best) ** 2).mean().item())
        zero.append((target**2).mean().item())
    return float(np.mean(oracle)), float(np.mean(zero))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--draws", type=int, default=24, help="noise draws that estimate each clip's expected spectrogram")
    args = parser.parse_args(argv)
    oracle, zero = loss_floor(args.clips, args.draws)
    print(f"oracle loss {oracle:.3f}, predict-zero loss {zero:.3f} ({args.clips} clips, {args.draws} noise draws each)")


if __name__ == "__main__":
    main()
