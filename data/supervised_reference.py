"""How much can a network learn about the demo image classes in a given number of steps, with the labels?

    python data/supervised_reference.py --steps 300            # after `make data`

Trains a core backbone with a linear classifier on the labelled demo images (MAE's crop-and-flip
augmentation, AdamW), then reports the val accuracy of that classifier and the kNN accuracy of the frozen
features (``core.probe.knn_accuracy``, fitted on the train split as ``core.evaluate`` does). It is a
ceiling for the self-supervised demos, which see no labels: a pretraining run that matches it in the same
number of steps would be remarkable. The default backbone is the siamese demos' ResNet-18 of width 32.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from core.augment import ImageCrop, ImageEval
from core.data import read_batches
from core.probe import knn_accuracy
from core.resnet import ResNet

TRAIN, VAL = "image/train-*.tar", "image/val-*.tar"


@torch.no_grad()
def features(backbone: torch.nn.Module, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    batches = list(read_batches(pattern, ImageEval(32, resize=32), 500))
    backbone.train()
    return torch.cat([backbone(b["image"]) for b in batches]), torch.cat([b["label"] for b in batches])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="data/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--small-images", action="store_true", help="the CIFAR stem instead of the ImageNet stem")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    backbone = ResNet(18, small_images=args.small_images, width=args.width)
    head = torch.nn.Linear(backbone.embed_dim, 10)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    augment = ImageCrop(32, scale=(0.3, 1.0))

    def epochs():  # each pass draws new crops (itertools.cycle would replay the first pass's)
        while True:
            yield from read_batches(f"{args.demo}/{TRAIN}", augment, args.batch_size, num_workers=1)

    start = time.perf_counter()
    for _, batch in zip(range(args.steps), epochs()):
        loss = F.cross_entropy(head(backbone(batch["image"])), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    train_x, train_y = features(backbone, f"{args.demo}/{TRAIN}")
    val_x, val_y = features(backbone, f"{args.demo}/{VAL}")
    with torch.no_grad():
        accuracy = (head(val_x).argmax(1) == val_y).float().mean().item()
    knn = knn_accuracy(train_x, train_y, val_x, val_y)
    print(f"\n| supervised ResNet-18 width {args.width}, {args.steps} steps of {args.batch_size} ({seconds:.0f} s) | val acc | kNN acc |")
    print(f"|---|---|---|\n| with labels | {100 * accuracy:.1f} | {100 * knn:.1f} |")


if __name__ == "__main__":
    main()
