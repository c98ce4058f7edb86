"""Raw-input baselines on the demo sets: a linear probe and kNN on raw pixels / frames / log-mel spectrograms.

    python data/probe_raw.py --demo data/demo                 # after `make data`
    python data/probe_raw.py --demo data/demo --only image

A pretrained encoder is only useful on the demo data if its frozen features beat these numbers: the classes
are built to be hard for raw inputs (random color, position, size, background, pitch, loudness, noise, ...).
The probe is ``core.probe.linear_probe_accuracy`` (multinomial logistic regression on standardized features,
full-batch L-BFGS) and ``core.probe.knn_accuracy`` (weighted kNN, k=20), the probes the recipes log, on the
inputs as stored (unnormalised pixels, every frame, the whole clip's log-mel). The recipes' READMEs take their
"raw input" rows from ``core.evaluate`` instead, which probes the view an exported encoder sees (its normalisation,
its clip and frames) with 100 L-BFGS iterations: close to these numbers, not equal (image kNN 19.9 there, 18.6 here).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from core.augment import log_mel
from core.data import read_batches
from core.probe import knn_accuracy, linear_probe_accuracy

MODALITIES = ("image", "video", "audio")


def raw_input(sample: dict) -> dict:
    """The undecorated input of a decoded sample as a float tensor: pixels, frames or waveform; and its label."""
    if "image" in sample:
        x = torch.from_numpy(np.array(sample["image"])).float() / 255  # (H, W, 3)
    elif "video" in sample:
        x = sample["video"].frames().float() / 255  # (T, H, W, 3)
    else:
        x = sample["audio"].samples().mean(0)  # (channels, S) -> (S,)
    return {"x": x, "label": sample["label"]}


def load_split(pattern: str, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) raw features and (N,) labels of every sample of the shards ``pattern``."""
    xs, ys = [], []
    for batch in read_batches(pattern, transform=raw_input, batch_size=256):
        x = batch["x"]
        if modality == "audio":
            x = log_mel(x, sample_rate=16_000)  # (B, S) -> (B, 1, n_mels, frames), the audio recipes' input
        xs.append(x.flatten(1))
        ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


def split_pattern(demo: str, modality: str, split: str) -> str:
    """The shard pattern of ``split`` from ``<demo>/<modality>/info.json``, relative to where the info lies."""
    with open(os.path.join(demo, modality, "info.json")) as f:
        info = json.load(f)
    return os.path.join(demo, modality, os.path.basename(info["splits"][split]["pattern"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="data/demo", help="folder written by data/make_demo.py")
    parser.add_argument("--only", default=",".join(MODALITIES), help=f"comma-separated subset of {MODALITIES}")
    parser.add_argument("--steps", type=int, default=300, help="L-BFGS iterations of the linear probe")
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MODALITIES))
    if unknown:
        parser.error(f"--only: unknown modality {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")

    print(f"{'modality':<9}{'raw input':<26}{'dims':>7}{'train':>7}{'val':>6}{'linear':>9}{'kNN-20':>9}{'time':>7}")
    inputs = {"image": "pixels", "video": "pixels of all frames", "audio": "log-mel (128 bins)"}
    for modality in only:
        start = time.time()
        train_x, train_y = load_split(split_pattern(args.demo, modality, "train"), modality)
        val_x, val_y = load_split(split_pattern(args.demo, modality, "val"), modality)
        linear = linear_probe_accuracy(train_x, train_y, val_x, val_y, steps=args.steps)
        knn = knn_accuracy(train_x, train_y, val_x, val_y, k=20)
        print(
            f"{modality:<9}{inputs[modality]:<26}{train_x.shape[1]:>7}{len(train_y):>7}{len(val_y):>6}"
            f"{linear:>9.1%}{knn:>9.1%}{time.time() - start:>6.0f}s"
        )


if __name__ == "__main__":
    main()
