"""Does pretraining give a better start? Fine-tune an exported encoder end to end with a linear classifier
on labelled shards, next to the same architecture from random init, and score both on held-out shards.

    python -m core.finetune runs/videomae-demo/export --num-classes 10 --steps 315 --batch-size 32 --lr 1e-3 --no-flip \
        --train 'data/demo/video/train-{000000..000003}.tar' --val 'data/demo/video/val-{000000..000001}.tar'

Masked autoencoders are judged this way first (MAE, VideoMAE and AudioMAE lead with end-to-end fine-tuning):
their features can hold much that a linear probe on frozen, pooled features cannot read. The schedule is
short and plain: AdamW (0.9, 0.999), weight decay on weights only (not on biases, norms or a ViT's class
token), linear warmup over the first tenth then cosine to zero, and for ViT encoders the layer-wise
learning-rate decay of MAE's and BEiT's fine-tuning (``--layer-decay``: block i of L, counted from 0, trains
at decay^(L - i) x lr, the patch embedding at decay^(L + 1)). ``--drop-path`` (stochastic depth over a ViT's
blocks; MAE fine-tunes ViT-B at 0.1) and ``--label-smoothing`` (MAE: 0.1) are off by default. Not done here,
and part of the papers' 100-epoch recipes: mixup, cutmix, RandAugment.

The training view is the modality's crop (images: random resized crop and flip; clips: a random span of
frames, crop and flip; ``--no-flip`` where left and right are classes); the val view is the deterministic
one that ``core.evaluate`` probes with.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from core.data import Requires, read_batches
from core.evaluate import eval_transform, refuse_shared_shards
from core.export import load_encoder
from core.optim import decayed, param_groups
from core.schedules import WarmupCosine
from core.vit import set_drop_path


def train_transform(spec: dict, scale: tuple[float, float], flip: bool = True):
    """The random training view of raw samples for an exported encoder's input spec."""
    from core import augment

    if spec["modality"] == "image":
        return augment.ImageCrop(spec["size"][0], scale=scale, flip=flip, mean=tuple(spec["mean"]), std=tuple(spec["std"]))
    if spec["modality"] == "video":
        size, mean, std, short_clips = spec["size"][0], tuple(spec["mean"]), tuple(spec["std"]), spec.get("short_clips", "error")
        return augment.VideoClip(spec["frames"], spec["stride"], size, scale=scale, flip=flip, mean=mean, std=std, short_clips=short_clips)
    if spec["modality"] == "audio":  # its spec's mean and std are the log-mel's, applied inside the encoder
        return augment.AudioClip(spec["sample_rate"], spec["seconds"], train=True)
    raise ValueError(f"core.finetune trains image, video and audio encoders, not {spec['modality']!r}")


def layer_decay_groups(backbone: nn.Module, head: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with an ``lr_scale`` each. For a ViT (a module with ``blocks``; an exported encoder's
    backbone), the patch embedding, class token and positions count as layer 0, block i as
    layer i + 1, the final norm and the head as layer L + 1, and layer l trains at layer_decay^(L + 1 - l) x lr
    (BEiT, Bao et al. 2022; MAE's fine-tuning); other backbones train every parameter at lr.
    Weight decay skips biases and norms (``core.optim.decayed``) and, as MAE's fine-tuning does, the class
    token and a learned position table (its pretraining decays them: timm's ``add_weight_decay`` goes by
    dimensions alone)."""
    vit = getattr(backbone, "backbone", backbone)  # core.export.Encoder wraps the ViT
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        return [{**g, "lr_scale": 1.0} for g in param_groups(nn.ModuleList([backbone, head]), weight_decay)]
    last = len(blocks) + 1

    def layer(name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return last if name.startswith("norm.") else 0

    named = [(layer(n), n, p) for n, p in vit.named_parameters()] + [(last, "head", p) for p in head.parameters()]
    groups: dict[tuple[float, bool], dict] = {}
    for depth, name, p in named:
        scale, decay = layer_decay ** (last - depth), decayed(p) and name not in ("cls_token", "pos_embed")
        group = groups.setdefault((scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


def check_labels(labels: torch.Tensor, head: nn.Linear, split: str) -> None:
    if labels.max() >= head.out_features:
        raise ValueError(f"label {int(labels.max())} in the {split} shards: num_classes={head.out_features} takes labels 0 to {head.out_features - 1}")


def train_classifier(
    backbone: nn.Module, head: nn.Module, batches, steps: int, lr: float, weight_decay: float = 0.05, layer_decay: float = 1.0,
    label_smoothing: float = 0.0,
) -> float:
    """Train ``head(backbone(x))`` with cross-entropy for ``steps`` batches of ``(x, label)``; returns the seconds
    taken. AdamW, warmup over the first tenth of the steps then cosine to zero (see the module docstring)."""
    groups = layer_decay_groups(backbone, head, weight_decay, layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    schedule = WarmupCosine(warmup_steps=max(steps // 10, 1), total_steps=steps)
    backbone.train()
    start = time.perf_counter()
    for step, (x, y) in zip(range(steps), batches):
        check_labels(y, head, "training")
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] * schedule(step)
        loss = F.cross_entropy(head(backbone(x)), y, label_smoothing=label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def endless(pattern: str, transform, batch_size: int, key: str):
    """(x, label) batches over the shards, pass after pass; each pass draws new random views (one loader,
    whose workers seed from its pass count: a new loader each pass would repeat the first pass's crops). The
    shards are read front to back, in the order they were written: write them shuffled (``core.data.write``
    does), or class-sorted shards give one-class batches."""
    loader = read_batches(pattern, Requires(transform, ["label"], "core.finetune"), batch_size, num_workers=1)
    while True:
        for batch in loader:
            yield batch[key], batch["label"]


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, pattern: str, transform, key: str) -> float:
    backbone.eval()
    correct = total = 0
    for batch in read_batches(pattern, Requires(transform, ["label"], "core.finetune"), 100):
        check_labels(batch["label"], head, "val")
        correct += (head(backbone(batch[key])).argmax(1) == batch["label"]).sum().item()
        total += len(batch["label"])
    return correct / total


def finetune(
    path: str, train: str, val: str, num_classes: int, steps: int, batch_size: int, lr: float, weight_decay: float = 0.05,
    layer_decay: float = 1.0, scale: tuple[float, float] = (0.3, 1.0), flip: bool = True, drop_path: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, dict]:
    """{"pretrained" | "random init": {"val_acc", "seconds"}}: the exported encoder and the same architecture at
    random init, each fine-tuned the same way on the same batches."""
    for option, value in (("num_classes", num_classes), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{option}={value} must be at least 1")
    if not 0 <= drop_path < 1:
        raise ValueError(f"drop_path={drop_path} must be in [0, 1)")
    refuse_shared_shards(train, val, "the fine-tuned models would be scored on samples they were trained on")
    results = {}
    for name, pretrained in (("pretrained", True), ("random init", False)):
        torch.manual_seed(0)  # the random init's weights, the head's and the order of the crops
        encoder = load_encoder(path, pretrained=pretrained)
        spec, key = encoder.input, encoder.input["modality"]
        if drop_path and not hasattr(encoder.backbone, "blocks"):
            raise ValueError(f"drop_path={drop_path}: stochastic depth is a ViT's, and this export's encoder is a {type(encoder.backbone).__name__}")
        if drop_path or hasattr(encoder.backbone, "blocks"):  # 0 too: an export may carry its pretraining's rate
            set_drop_path(encoder.vit_backbone(), drop_path)
        head = nn.Linear(encoder.embed_dim, num_classes)
        batches = endless(train, train_transform(spec, scale, flip), batch_size, key)
        seconds = train_classifier(encoder, head, batches, steps, lr, weight_decay, layer_decay, label_smoothing)
        results[name] = {"val_acc": accuracy(encoder, head, val, eval_transform(spec), key), "seconds": seconds}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="folder written by python -m core.export")
    parser.add_argument("--train", required=True, help="labelled shards to fine-tune on")
    parser.add_argument("--val", required=True, help="held-out labelled shards to score on")
    parser.add_argument("--num-classes", type=int, required=True, help="labels run from 0 to this - 1")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (of the last layers, with --layer-decay)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=1.0, help="ViT layer-wise lr decay (MAE fine-tunes ViT-B at 0.65, VideoMAE at 0.75)")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.3, 1.0), help="crop area range of the training view")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal flip (where left and right are classes)")
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth at a ViT's last block (MAE's ViT-B: 0.1)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="MAE's fine-tuning: 0.1")
    args = parser.parse_args(argv)
    results = finetune(
        args.encoder, args.train, args.val, args.num_classes, args.steps, args.batch_size, args.lr, args.weight_decay, args.layer_decay,
        tuple(args.scale), not args.no_flip, args.drop_path, args.label_smoothing,
    )
    print(f"\n| fine-tuned ({args.encoder}, {args.steps} steps of {args.batch_size}) | val acc | time |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['val_acc']:.1f} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
