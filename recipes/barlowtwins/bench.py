"""How fast is this recipe's Barlow Twins, and how much memory does a training step take, against the reference?

The reference is lightly's Barlow Twins (lightly-ai/lightly, `examples/pytorch/barlowtwins.py`): its
`BarlowTwinsProjectionHead` and `BarlowTwinsLoss`, with lightly's `LARS` (from PyTorch Lightning Bolts) on
the same parameter groups and rates as this recipe's. Both train the same backbone (a core.resnet.ResNet),
so what the benchmark compares is everything around it: the projector and the loss, which builds the
D x D cross-correlation matrix (8192 x 8192 in the paper). From the same weights the two give the same
loss and gradients, once lightly's standardisation (BatchNorm's) has its eps of 1e-5 on the variance set
near 0 (tests/test_barlowtwins.py). Each step is the whole of a training step: both views through the network, the
loss, backward, LARS; ours also computes the embedding std it logs. The timing itself is core.bench's.

    python -m recipes.barlowtwins.bench --batch 128                      # the demo: ResNet-18 of width 32, 32 px, projector 1024 x 3
    python -m recipes.barlowtwins.bench --depth 50 --width 64 --image-size 224 --projector 8192 --batch 16    # the paper's
"""

from __future__ import annotations

import argparse
import copy

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from core import bench
from core.optim import LARS, param_groups
from recipes.barlowtwins.model import BarlowTwins


class ReferenceBarlowTwins(nn.Module):
    """lightly's Barlow Twins example: forward(x) is the projector's output."""

    def __init__(self, backbone: nn.Module, embed_dim: int, hidden: int, out: int, lambd: float):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BarlowTwinsProjectionHead(embed_dim, hidden, out)
        self.criterion = BarlowTwinsLoss(lambda_param=lambd)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def loss(self, x0, x1):
        return self.criterion(self(x0), self(x1))


def reference_name(name: str) -> str:
    return name.replace("projector.", "projection_head.layers.")


def reference_for(model: BarlowTwins) -> ReferenceBarlowTwins:
    """The reference of the same shape as `model`, its backbone a copy of `model`'s (a 3-layer projector)."""
    dims = model.hparams.projector_dims
    if len(dims) != 3 or dims[0] != dims[1]:
        raise ValueError(f"lightly's BarlowTwinsProjectionHead has 3 layers, the first two of one width; projector_dims={dims}")
    return ReferenceBarlowTwins(copy.deepcopy(model.backbone), model.backbone.embed_dim, dims[0], dims[2], model.hparams.lambd)


def build(impl: str, args):
    """One training step of either model on a fixed pair of random views; the reference starts from our
    weights, both take LARS with this recipe's parameter groups and the demo's rates."""
    backbone, views = bench.resnet_and_views(args)
    ours = BarlowTwins(backbone, args.image_size, [args.projector] * 3)

    def lars(model, lars_class=LARS):
        weights, biases = param_groups(model, 1.5e-6)
        weights["lr"], biases["lr"] = 0.3, 0.03
        return lars_class([weights, biases], lr=0.3, momentum=0.9, trust_coefficient=0.02)

    if impl == "ours":
        return bench.recipe_step(ours, {"views": views}, lars, args)

    return bench.reference_step(reference_for(ours), ours, reference_name, lambda m: m.loss(*views), lambda m: lars(m, LightlyLARS), args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_resnet_arguments(parser)
    parser.add_argument("--projector", type=int, default=1024, help="width of the projector's 3 layers (paper: 8192)")
    bench.add_arguments(parser, batch=128)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    bench.run(build, args, f"Barlow Twins {bench.resnet_title(args)}, projector {args.projector} x 3")


if __name__ == "__main__":
    main()
