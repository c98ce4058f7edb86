"""How fast is this recipe's BYOL, and how much memory does a training step take, against the reference?

The reference is lightly's BYOL (lightly-ai/lightly, `examples/pytorch/byol.py`): its `BYOLProjectionHead`
and `BYOLPredictionHead`, target copies made by `copy.deepcopy` and frozen, `NegativeCosineSimilarity` on
both directions, `update_momentum` for the target, and lightly's `LARS` (from PyTorch Lightning Bolts) with
the same parameter groups and rates as this recipe's. Both train the same backbone (a core.resnet.ResNet,
torchvision's residual blocks; lightly's example cuts torchvision's ResNet the same way), so what the
benchmark compares is everything around it. From the same weights, the two give the same projections and
predictions, and the same loss and gradients up to lightly's scale (its example averages the two
directions' -cos, this recipe sums the paper's 2 - 2 cos: 4 + 4x lightly's; tests/test_byol.py). Their
LARS steps differ slightly: lightly's trust ratio is ||w|| / (||g|| + wd ||w||), the paper's (and this
recipe's) ||w|| / ||g + wd w||. Each step here is the whole of a training step: both views through the
online and target networks, the loss, backward, LARS, the target's EMA step; ours also computes the
embedding std it logs. The timing itself is core.bench's.

    python -m recipes.byol.bench --batch 128                                 # the demo: ResNet-18 of width 32, 32 px
    python -m recipes.byol.bench --depth 50 --width 64 --image-size 224 --projector-hidden 4096 --projection-dim 256 --predictor-hidden 4096 --batch 16   # the paper's
"""

from __future__ import annotations

import argparse
import copy

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from core import bench
from core.optim import LARS, param_groups
from recipes.byol.model import BYOL


class ReferenceBYOL(nn.Module):
    """lightly's BYOL example: forward(x) is the online prediction, forward_momentum(x) the target's projection."""

    def __init__(self, backbone: nn.Module, embed_dim: int, projector_hidden: int, projection_dim: int, predictor_hidden: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(embed_dim, projector_hidden, projection_dim)
        self.prediction_head = BYOLPredictionHead(projection_dim, predictor_hidden, projection_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        y = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(y))

    def forward_momentum(self, x):
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()

    def loss(self, x0, x1):
        p0, z0 = self(x0), self.forward_momentum(x0)
        p1, z1 = self(x1), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def update_target(self, m: float) -> None:
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


# This recipe's parameter names -> the reference's.
RENAMES = [
    ("target_backbone.", "backbone_momentum."),
    ("target_projector.", "projection_head_momentum.layers."),
    ("projector.", "projection_head.layers."),
    ("predictor.", "prediction_head.layers."),
]


def reference_name(name: str) -> str:
    return bench.rename(name, RENAMES)


def reference_for(model: BYOL) -> ReferenceBYOL:
    """The reference model of the same shape as `model`, its backbone a copy of `model`'s."""
    h = model.hparams
    return ReferenceBYOL(copy.deepcopy(model.backbone), model.backbone.embed_dim, h.projector_hidden, h.projection_dim, h.predictor_hidden)


def build(impl: str, args):
    """One training step of either model on a fixed pair of random views; the reference starts from our
    weights, both take LARS with this recipe's parameter groups and the demo's trust coefficient."""
    backbone, views = bench.resnet_and_views(args)
    ours = BYOL(backbone, args.image_size, args.projector_hidden, args.projection_dim, args.predictor_hidden)
    if impl == "ours":
        def lars(m):
            return LARS(param_groups(nn.ModuleList([m.backbone, m.projector, m.predictor]), 1e-5), lr=0.5, trust_coefficient=0.02)

        return bench.recipe_step(ours, {"views": views}, lars, args, after=lambda: ours.update_target(0.99))

    def lightly_lars(m):
        online = nn.ModuleList([m.backbone, m.projection_head, m.prediction_head])
        return LightlyLARS(param_groups(online, 1e-5), lr=0.5, momentum=0.9, trust_coefficient=0.02)

    model = reference_for(ours)
    return bench.reference_step(model, ours, reference_name, lambda m: m.loss(*views), lightly_lars, args, after=lambda: model.update_target(0.99))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_resnet_arguments(parser)
    parser.add_argument("--projector-hidden", type=int, default=512)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--predictor-hidden", type=int, default=512)
    bench.add_arguments(parser, batch=128)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    title = f"BYOL {bench.resnet_title(args)}, projector {args.projector_hidden}->{args.projection_dim}, predictor {args.predictor_hidden}"
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
