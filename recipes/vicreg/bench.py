"""How fast is this recipe's VICReg, and how much memory does a training step take, against the reference?

The reference is lightly's VICReg (lightly-ai/lightly, `examples/pytorch/vicreg.py`): its
`VICRegProjectionHead` and `VICRegLoss`, with lightly's `LARS` (from PyTorch Lightning Bolts) on the same
parameter groups and rates as this recipe's. Both train the same backbone (a core.resnet.ResNet), so what
the benchmark compares is everything around it: the expander and the loss, whose variance and covariance
terms work on D x D covariance matrices (8192 x 8192 in the paper). From the same weights the two give the
same loss and gradients (tests/test_vicreg.py). Each step is the whole of a training step: both views
through the network, the loss, backward, LARS; ours also computes the embedding std it logs. The timing
itself is core.bench's.

    python -m recipes.vicreg.bench --batch 128                      # the demo: ResNet-18 of width 32, 32 px, expander 1024 x 3
    python -m recipes.vicreg.bench --depth 50 --width 64 --image-size 224 --expander 8192 --batch 16    # the paper's
"""

from __future__ import annotations

import argparse
import copy

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from core import bench
from core.optim import LARS, param_groups
from recipes.vicreg.model import VICReg


class ReferenceVICReg(nn.Module):
    """lightly's VICReg example: forward(x) is the expander's output."""

    def __init__(self, backbone: nn.Module, embed_dim: int, expander: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = VICRegProjectionHead(input_dim=embed_dim, hidden_dim=expander, output_dim=expander, num_layers=3)
        self.criterion = VICRegLoss()

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def loss(self, x0, x1):
        return self.criterion(self(x0), self(x1))


def reference_name(name: str) -> str:
    return name.replace("projector.", "projection_head.layers.")


def reference_for(model: VICReg) -> ReferenceVICReg:
    """The reference of the same shape as `model`, its backbone a copy of `model`'s (an expander of equal widths)."""
    dims = model.hparams.projector_dims
    if len(dims) != 3 or len(set(dims)) != 1:
        raise ValueError(f"lightly's VICRegProjectionHead has 3 layers of one width; projector_dims={dims}")
    return ReferenceVICReg(copy.deepcopy(model.backbone), model.backbone.embed_dim, dims[0])


def build(impl: str, args):
    """One training step of either model on a fixed pair of random views; the reference starts from our
    weights, both take LARS with this recipe's parameter groups and the demo's rates."""
    backbone, views = bench.resnet_and_views(args)
    ours = VICReg(backbone, args.image_size, [args.expander] * 3)

    def lars(model, lars_class=LARS):
        return lars_class(param_groups(model, 1e-6), lr=0.3, momentum=0.9, trust_coefficient=0.02)

    if impl == "ours":
        return bench.recipe_step(ours, {"views": views}, lars, args)

    return bench.reference_step(reference_for(ours), ours, reference_name, lambda m: m.loss(*views), lambda m: lars(m, LightlyLARS), args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_resnet_arguments(parser)
    parser.add_argument("--expander", type=int, default=1024, help="width of the expander's 3 layers (paper: 8192)")
    bench.add_arguments(parser, batch=128)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    bench.run(build, args, f"VICReg {bench.resnet_title(args)}, expander {args.expander} x 3")


if __name__ == "__main__":
    main()
