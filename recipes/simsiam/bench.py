"""How fast is this recipe's SimSiam, and how much memory does a training step take, against the reference?

The reference is lightly's SimSiam (lightly-ai/lightly, `examples/pytorch/simsiam.py`): its
`SimSiamProjectionHead` and `SimSiamPredictionHead` and `NegativeCosineSimilarity` on both directions, the
projections detached, with SGD on the same parameter groups as this recipe's. Both train the same backbone
(a core.resnet.ResNet), so what the benchmark compares is everything around it. From the same weights the
two give the same loss and gradients (tests/test_simsiam.py). Each step is the whole of a training step:
both views through the network, the loss, backward, SGD; ours also computes the embedding std it logs. The
timing itself is core.bench's.

    python -m recipes.simsiam.bench --batch 128                     # the demo: ResNet-18 of width 32, 32 px, projector 512, predictor 128
    python -m recipes.simsiam.bench --depth 50 --width 64 --image-size 224 --projection-dim 2048 --predictor-hidden 512 --batch 16   # the paper's
"""

from __future__ import annotations

import argparse
import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from torch import nn

from core import bench
from recipes.simsiam.model import SimSiam


class ReferenceSimSiam(nn.Module):
    """lightly's SimSiam example: forward(x) -> (the projection, detached; the prediction)."""

    def __init__(self, backbone: nn.Module, embed_dim: int, projection_dim: int, predictor_hidden: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimSiamProjectionHead(embed_dim, projection_dim, projection_dim)
        self.prediction_head = SimSiamPredictionHead(projection_dim, predictor_hidden, projection_dim)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return z.detach(), self.prediction_head(z)

    def loss(self, x0, x1):
        (z0, p0), (z1, p1) = self(x0), self(x1)
        return 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))


def reference_name(name: str) -> str:
    return name.replace("projector.", "projection_head.layers.").replace("predictor.", "prediction_head.layers.")


def reference_for(model: SimSiam) -> ReferenceSimSiam:
    """The reference of the same shape as `model`, its backbone a copy of `model`'s."""
    h = model.hparams
    return ReferenceSimSiam(copy.deepcopy(model.backbone), model.backbone.embed_dim, h.projection_dim, h.predictor_hidden)


def build(impl: str, args):
    """One training step of either model on a fixed pair of random views; the reference starts from our
    weights, both take SGD with the demo's rate and weight decay."""
    backbone, views = bench.resnet_and_views(args)
    ours = SimSiam(backbone, args.image_size, args.projection_dim, args.predictor_hidden)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    if impl == "ours":
        return bench.recipe_step(ours, {"views": views}, sgd, args)
    return bench.reference_step(reference_for(ours), ours, reference_name, lambda m: m.loss(*views), sgd, args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_resnet_arguments(parser)
    parser.add_argument("--projection-dim", type=int, default=512, help="width of the 3-layer projector (paper: 2048)")
    parser.add_argument("--predictor-hidden", type=int, default=128, help="the predictor's bottleneck (paper: 512)")
    bench.add_arguments(parser, batch=128)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    bench.run(build, args, f"SimSiam {bench.resnet_title(args)}, projector {args.projection_dim}, predictor {args.predictor_hidden}")


if __name__ == "__main__":
    main()
