"""How much can a network learn about the demo classes in a given number of steps, with the labels?

    python data/supervised_reference.py --steps 300                                  # after `make data`
    python data/supervised_reference.py --video --steps 315 --batch-size 32 --lr 1e-3

Trains a core backbone with a linear classifier on the labelled demo images (MAE's crop-and-flip
augmentation, AdamW), then reports the val accuracy of that classifier and the kNN accuracy of the frozen
features (``core.probe.knn_accuracy``, fitted on the train split as ``core.evaluate`` does). It is a
ceiling for the self-supervised demos, which see no labels: a pretraining run that matches it in the same
number of steps would be remarkable. The default backbone is the siamese demos' ResNet-18 of width 32;
``--video`` trains the VideoMAE demo's encoder (a 4-block ViT-tiny over 2x4x4 tubelets of 8 frames at
stride 2, mean-pooled) on the demo clips with that demo's crops, where the class is the motion.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from core.augment import ImageCrop, ImageEval, VideoClip
from core.data import read_batches
from core.finetune import endless
from core.probe import knn_accuracy
from core.resnet import ResNet
from core.vit import ViT

TRAIN, VAL = "{}/train-*.tar", "{}/val-*.tar"


@torch.no_grad()
def features(backbone: torch.nn.Module, pattern: str, transform, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features of a split, in eval mode (BatchNorm's running statistics, which it leaves as
    they are), and the labels; the backbone is in train mode again after."""
    backbone.eval()
    out = [(backbone(b[key]), b["label"]) for b in read_batches(pattern, transform, 100)]
    backbone.train()
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="data/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=32, help="the ResNet's width (images only)")
    parser.add_argument("--small-images", action="store_true", help="the ResNet's CIFAR stem instead of the ImageNet stem")
    parser.add_argument("--video", action="store_true", help="the VideoMAE demo's ViT on the demo clips")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.video:  # the settings of recipes/videomae/configs/demo.yaml
        backbone = ViT((8, 32, 32), (2, 4, 4), 3, size="tiny", depth=4, pool="mean")
        key, augment = "video", VideoClip(8, 2, 32, scale=(0.5, 1.0), flip=False)
        evaluate = VideoClip(8, 2, 32, train=False)
        name = "ViT-tiny, 4 blocks, 2x4x4 tubelets"
    else:
        backbone = ResNet(18, small_images=args.small_images, width=args.width)
        key, augment, evaluate = "image", ImageCrop(32, scale=(0.3, 1.0)), ImageEval(32, resize=32)
        name = f"ResNet-18 width {args.width}"
    train, val = (f"{args.demo}/{split.format(key)}" for split in (TRAIN, VAL))
    head = torch.nn.Linear(backbone.embed_dim, 10)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)

    start = time.perf_counter()
    for _, (x, y) in zip(range(args.steps), endless(train, augment, args.batch_size, key)):
        loss = F.cross_entropy(head(backbone(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    train_x, train_y = features(backbone, train, evaluate, key)
    val_x, val_y = features(backbone, val, evaluate, key)
    with torch.no_grad():
        accuracy = (head(val_x).argmax(1) == val_y).float().mean().item()
    knn = knn_accuracy(train_x, train_y, val_x, val_y)
    print(f"\n| supervised {name}, {args.steps} steps of {args.batch_size} ({seconds:.0f} s) | val acc | kNN acc |")
    print(f"|---|---|---|\n| with labels | {100 * accuracy:.1f} | {100 * knn:.1f} |")


if __name__ == "__main__":
    main()
