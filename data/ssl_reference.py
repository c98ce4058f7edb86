"""BYOL, SimSiam, VICReg and DINO written out again in plain PyTorch and torchvision, sharing no training code
with the recipes: a check that a recipe's result on the demo images is the method's and not a bug of ours.

    python data/ssl_reference.py byol --steps 700          # after `make data`
    python data/ssl_reference.py vicreg --steps 700 --demo /tmp/demo-plain
    python data/ssl_reference.py dino --steps 400
    python data/ssl_reference.py byol --init-backbone vicreg.pt   # from --save-backbone vicreg.pt

The images are read from the shards with tarfile and PIL (not core.data), each view is drawn per image
by torchvision's transforms (not core.augment), the ResNet-18 is built from torchvision's BasicBlock (not
core.resnet), and the optimizer is plain SGD with a cosine schedule, as lightly's CIFAR-10 benchmarks train
these methods (lr 0.06 x batch / 128, momentum 0.9, weight decay 5e-4); DINO takes its paper's AdamW
instead: with that SGD its student's outputs went uniform (the loss at ln K) within 100 steps. Only the
score is shared: the kNN accuracy of the frozen features, fitted on the train split and scored on the val
split (``core.probe.knn_accuracy``, as ``core.evaluate`` does), printed every ``--eval-every`` steps with
the loss (for BYOL and SimSiam the mean negative cosine; BYOL's normalised MSE is 2 + 2 x that).
The views follow the siamese demo configs: crops of 30-100%, flip, the demos' stronger color jitter with
p 0.8, grayscale, solarize 20% of the time in the second view; DINO's demo takes two global crops of
40-100% at 32 px and four local crops of 10-40% at 16 px, and a head of 1024 prototypes.
"""

from __future__ import annotations

import argparse
import copy
import glob
import io
import math
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.transforms import v2

from core.probe import knn_accuracy

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def read_images(pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``.png`` and its ``.cls`` in the shards matching `pattern`: (N, 3, H, W) uint8 and (N,) labels."""
    images, labels = [], []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(files):
            if name.endswith(".png"):
                images.append(torch.from_numpy(np.array(Image.open(io.BytesIO(files[name])).convert("RGB"))).permute(2, 0, 1))
                labels.append(int(files[name[: -len(".png")] + ".cls"]))
    if not images:
        raise FileNotFoundError(f"no .png samples in {pattern}")
    return torch.stack(images), torch.tensor(labels)


def resnet18(width: int) -> nn.Sequential:
    """torchvision's ResNet-18 layout with the ImageNet stem at `width` channels (64 in the paper), pooled."""

    def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        down = None if stride == 1 else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        return nn.Sequential(BasicBlock(c_in, c_out, stride, down), BasicBlock(c_out, c_out))

    net = nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        stage(width, width, 1), stage(width, 2 * width, 2), stage(2 * width, 4 * width, 2), stage(4 * width, 8 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # (B, 3, H, W) -> (B, 8 * width)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def mlp(*dims: int) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU between the widths, a plain Linear at the end."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1]))


class DINOHead(nn.Module):
    """Caron et al. 2021: an MLP with GELU to a bottleneck, L2-normalised, then cosine similarities with
    K unit-norm prototypes (the paper's weight-normalised last layer with its norm fixed)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int = 128, prototypes: int = 1024):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes.weight, dim=-1))  # (B, K)


def view_transform(solarize: float, size: int = 32, scale: tuple[float, float] = (0.3, 1.0)) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.8, 0.5)], p=0.8),
        v2.RandomGrayscale(0.4),
        v2.RandomSolarize(128, p=solarize),
    ])


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - MEAN) / STD


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Bardes et al. 2022: invariance 25, variance 25, covariance 1, written as the paper's Eq. 6 (and
    solo-learn) sum the two branches' variance terms. The official code and the recipe
    (core.losses.vicreg_loss) average them: this variance term weighs twice theirs."""

    def variance(z):
        return F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()

    def covariance(z):
        z = z - z.mean(0)
        c = z.T @ z / (len(z) - 1)  # (D, D)
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / z.shape[1]

    return 25 * F.mse_loss(z1, z2) + 25 * (variance(z1) + variance(z2)) + covariance(z1) + covariance(z2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=["byol", "simsiam", "vicreg", "dino"])
    parser.add_argument("--demo", default="data/demo")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.06, help="SGD rate per 128 samples, lightly's CIFAR-10 one (DINO takes its paper's AdamW rate)")
    parser.add_argument("--width", type=int, default=32, help="32: the siamese demos' ResNet-18 width")
    parser.add_argument("--hidden", type=int, default=1024, help="the heads' hidden width")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--save-backbone", help="write the trained backbone's state dict here")
    parser.add_argument("--init-backbone", help="start from this state dict (from --save-backbone) instead of random init")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_x, train_y = read_images(f"{args.demo}/image/train-*.tar")
    val_x, val_y = read_images(f"{args.demo}/image/val-*.tar")

    backbone = resnet18(args.width)
    if args.init_backbone:  # e.g. VICReg's features: does another method keep them, or leave them?
        backbone.load_state_dict(torch.load(args.init_backbone, weights_only=True))
    dim = 8 * args.width
    views = [view_transform(0.0), view_transform(0.2)]
    if args.method == "vicreg":
        projector, predictor = mlp(dim, args.hidden, args.hidden, args.hidden), nn.Identity()
    elif args.method == "dino":
        projector, predictor = DINOHead(dim, args.hidden), nn.Identity()
        views = [view_transform(0.0, scale=(0.4, 1.0)), view_transform(0.2, scale=(0.4, 1.0))]
        views += [view_transform(0.0, size=16, scale=(0.1, 0.4)) for _ in range(4)]
        center = torch.zeros(1, projector.prototypes.out_features)
    else:  # BYOL's and SimSiam's heads, --hidden wide (1024; the recipes' demos use 512) to a 256-wide output
        projector, predictor = mlp(dim, args.hidden, 256), mlp(256, args.hidden, 256)
    online = nn.ModuleList([backbone, projector, predictor])
    # BYOL's target and DINO's teacher: the online encoder and projector, moved only by their EMA.
    target = copy.deepcopy(nn.ModuleList([backbone, projector])).requires_grad_(False) if args.method in ("byol", "dino") else None
    if args.method == "dino":  # the paper's AdamW (lr 5e-4 x batch / 256, weight decay 0.04, gradients clipped at 3)
        lr = 5e-4 * args.batch_size / 256
        optimizer = torch.optim.AdamW(online.parameters(), lr=lr, weight_decay=0.04)
    else:
        lr = args.lr * args.batch_size / 128
        optimizer = torch.optim.SGD(online.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    @torch.no_grad()
    def knn() -> float:
        backbone.eval()
        train_f = torch.cat([backbone(normalize(x)) for x in train_x.split(500)])
        val_f = torch.cat([backbone(normalize(x)) for x in val_x.split(500)])
        backbone.train()
        return 100 * knn_accuracy(train_f, train_y, val_f, val_y)

    print(f"| step | loss | kNN acc |\n|---|---|---|\n| 0 | | {knn():.1f} |", flush=True)
    start, generator = time.perf_counter(), torch.Generator().manual_seed(0)
    for step in range(args.steps):
        progress = step / args.steps
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * progress)) / 2
        images = train_x[torch.randint(len(train_x), (args.batch_size,), generator=generator)]
        crops = [normalize(torch.stack([view(image) for image in images])) for view in views]  # [(B, 3, size, size)]
        if args.method == "dino":
            student = [F.log_softmax(projector(backbone(x)) / 0.1, dim=-1) for x in crops]  # [(B, K)]
            with torch.no_grad():
                teacher = [target[1](target[0](x)) for x in crops[:2]]  # the global crops only
            targets = [F.softmax((t - center) / 0.04, dim=-1) for t in teacher]  # centred, sharpened
            pairs = [(-q * student[j]).sum(-1).mean() for i, q in enumerate(targets) for j in range(len(crops)) if j != i]
            loss = sum(pairs) / len(pairs)
            center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
        elif args.method == "vicreg":
            x1, x2 = crops
            loss = vicreg_loss(projector(backbone(x1)), projector(backbone(x2)))
        else:
            x1, x2 = crops
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            if args.method == "byol":
                with torch.no_grad():
                    t1, t2 = target[1](target[0](x1)), target[1](target[0](x2))
            else:  # SimSiam: the other view's projection, without its gradient
                t1, t2 = z1.detach(), z2.detach()
            loss = -(F.cosine_similarity(predictor(z1), t2).mean() + F.cosine_similarity(predictor(z2), t1).mean()) / 2
        optimizer.zero_grad()
        loss.backward()
        if args.method == "dino":
            nn.utils.clip_grad_norm_(online.parameters(), 3.0)
        optimizer.step()
        if target is not None:  # the target follows by EMA, momentum 0.99 -> 1 along a cosine
            momentum = 1 - 0.01 * (1 + math.cos(math.pi * progress)) / 2
            with torch.no_grad():
                for t, o in zip(target.parameters(), online[:2].parameters()):
                    t.mul_(momentum).add_(o, alpha=1 - momentum)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"| {step + 1} | {loss.item():.3f} | {knn():.1f} |", flush=True)
    print(f"\n{args.method}: {args.steps} steps of {args.batch_size} in {time.perf_counter() - start:.0f} s")
    if args.save_backbone:
        torch.save(backbone.state_dict(), args.save_backbone)


if __name__ == "__main__":
    main()
