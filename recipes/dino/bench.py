"""How fast is this recipe's DINO, and how much memory does a training step take, against the reference?

The reference is the official DINO code's training step (facebookresearch/dino, `main_dino.py`,
`vision_transformer.py`, `utils.py`), written out below: `MultiCropWrapper` (crops of one size share a
backbone pass, the head runs once over all of them), `DINOHead` (its last layer weight-normalised with the
norm frozen at 1, `norm_last_layer`; torch's parametrization, as `nn.utils.weight_norm` is deprecated),
`DINOLoss` (the center moves inside the loss, all-reduced over ranks), `clip_gradients` (each parameter's
gradient clipped on its own, reading each norm back to the host with `.item()`),
`cancel_gradients_last_layer`, and the teacher's EMA as a loop over the parameters. Both train the same
backbone (a core.vit.ViT with DINO's learned positions and initialisation, resized position table for the
local crops: DINO's `interpolate_pos_encoding` samples at a scale factor nudged by 0.1, a few points off
the exact grid, at the same cost; or, `--backbone resnet`, the demo's core.resnet.ResNet, which DINO's code
would take from torchvision with its classifier removed), so what the benchmark compares is everything
around it. From the same
weights and crops, the two give the same loss, clipped gradients, teacher step and center
(tests/test_dino.py). Each step here is the whole of a training step at epoch 0 (the prototypes frozen, as
in DINO's first epoch): the teacher on the global crops, the student on all of them, the loss, backward,
clipping, AdamW, the teacher's and the center's EMA steps; ours also computes the teacher's entropy, the
KL and the embedding std it logs. Under bf16-mixed the two part in one place: ours computes the prototypes'
cosines in float32 (the head's logits are cosines near 1, which bf16 spaces by 2^-8), the official head in
bf16: for the ViT-S at batch 128 with 65,536 prototypes, about 110 GFLOP a step run in float32 instead of bf16
(counted, not yet timed apart on a GPU), which the ratio includes. The timing itself is core.bench's.

    python -m recipes.dino.bench --batch 8                            # the paper's ViT-S/16: 2 x 224 px + 10 x 96 px crops, 65536 prototypes
    python -m recipes.dino.bench --backbone resnet --global-size 32 --local-size 16 --local-crops 4 \
        --out-dim 1024 --hidden-dim 512 --bottleneck-dim 128 --batch 128      # the demo's ResNet-18 of width 32
    python -m recipes.dino.bench --batch 128 --device cuda --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core import bench
from core.optim import param_groups
from core.vit import ViT, set_drop_path
from recipes.dino.model import DINO, encode


class DINOHead(nn.Module):
    """DINO's head (`vision_transformer.py`, nlayers 3, no BatchNorm, norm_last_layer=True)."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0  # the rows' norm g
        norm.data.fill_(1)
        norm.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """DINO's `MultiCropWrapper`: a list of crops -> the head's outputs for all of them, (crops x B, K)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        idx_crops = torch.cumsum(torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            # the backbone on any crop size (`encode`: the position table resized for the local crops)
            output = torch.cat((output, encode(self.backbone, torch.cat(x[start_idx:end_idx]))))
            start_idx = end_idx
        return self.head(output)


class DINOLoss(nn.Module):
    """DINO's `DINOLoss` at a fixed teacher temperature (the schedule's value at this epoch)."""

    def __init__(self, out_dim, ncrops, teacher_temp, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.teacher_temp, self.center_momentum, self.ncrops = student_temp, teacher_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def clip_gradients(model, clip):
    """DINO's `utils.clip_gradients`."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """DINO's `utils.cancel_gradients_last_layer`."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class ReferenceDINO(nn.Module):
    """DINO's student and teacher (`main_dino.py`): the teacher a copy of the student without stochastic
    depth, frozen, given the student's weights."""

    def __init__(self, backbone, out_dim, hidden_dim, bottleneck_dim, ncrops, teacher_temp, student_temp, center_momentum):
        super().__init__()
        self.student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim))
        teacher_backbone = copy.deepcopy(backbone)
        if isinstance(backbone, ViT):
            set_drop_path(teacher_backbone, 0.0)
        self.teacher = MultiCropWrapper(teacher_backbone, DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss = DINOLoss(out_dim, ncrops, teacher_temp, student_temp, center_momentum)

    def loss(self, images):
        """images: the 2 global crops, then the local ones (`train_one_epoch`)."""
        teacher_output = self.teacher(images[:2])  # only the 2 global views pass through the teacher
        student_output = self.student(images)
        return self.dino_loss(student_output, teacher_output)

    @torch.no_grad()
    def update_teacher(self, m):
        for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


# This recipe's parameter names -> the reference's, by their prefix.
PREFIXES = [("teacher_backbone.", "teacher.backbone."), ("teacher_head.", "teacher.head."), ("backbone.", "student.backbone."), ("head.", "student.head.")]


def reference_name(name: str) -> str:
    for ours, ref in PREFIXES:
        if name.startswith(ours):
            name = ref + name[len(ours):]
            break
    return name.replace("head.prototypes", "head.last_layer.parametrizations.weight.original1")


def reference_for(model: DINO, n_local: int) -> ReferenceDINO:
    """The reference of the same shape as `model`, its backbone a copy of `model`'s, for 2 global crops
    and `n_local` local ones."""
    h = model.hparams
    return ReferenceDINO(copy.deepcopy(model.backbone), h.out_dim, h.hidden_dim, h.bottleneck_dim, 2 + n_local, h.teacher_temp, h.student_temp, h.center_momentum)


def copy_weights(model: DINO, ref: ReferenceDINO) -> None:
    """Load `model`'s weights, the teacher's included, into `ref`; every reference parameter but the frozen
    prototype norms (1, as ours) gets one."""
    norms = {f"{net}.head.last_layer.parametrizations.weight.original0" for net in ("student", "teacher")}
    bench.copy_renamed(model, ref, reference_name, unmatched=norms)


def build(impl: str, args):
    """One training step of either model on fixed random crops; the reference starts from our weights, both
    take AdamW with this recipe's parameter groups, at epoch 0 (prototypes frozen) and momentum 0.996."""
    if args.backbone == "resnet":
        backbone = bench.resnet(args)
    else:
        backbone = ViT((args.global_size,) * 2, (args.patch_size,) * 2, 3, size=args.size, drop_path=0.1, pos_embed="learned", init="trunc_normal")
    ours = DINO(
        backbone, args.global_size, args.local_size, args.out_dim, args.hidden_dim, args.bottleneck_dim,
        clip_grad=3.0, teacher_temp=0.04, freeze_last_layer_epochs=1,
    )  # fmt: skip
    crops = [torch.randn(args.batch, 3, args.global_size, args.global_size, device=args.device) for _ in range(2)]
    crops += [torch.randn(args.batch, 3, args.local_size, args.local_size, device=args.device) for _ in range(args.local_crops)]
    if impl == "ours":
        warnings.filterwarnings("ignore", message=".*embeddings have collapsed.*")  # random crops, a random network

        def adamw(m):
            return torch.optim.AdamW(param_groups(nn.ModuleList([m.backbone, m.head]), 0.04), lr=5e-4)

        batch = {"global_views": crops[:2], "local_views": crops[2:]}
        clip = lambda: ours.on_before_optimizer_step(None)  # noqa: E731 (the hook reads no optimizer)
        return bench.recipe_step(ours, batch, adamw, args, before_step=clip, after=lambda: ours.update_teacher(0.996))
    model = reference_for(ours, args.local_crops)
    copy_weights(ours, model)
    model.to(args.device)
    optimizer = torch.optim.AdamW(param_groups(model.student, 0.04), lr=5e-4)

    def before_step():
        clip_gradients(model.student, 3.0)
        cancel_gradients_last_layer(0, model.student, 1)

    return bench.training_step(lambda: model.loss(crops), optimizer, args, before_step=before_step, after=lambda: model.update_teacher(0.996))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=["vit", "resnet"], default="vit", help="paper: vit (ViT-S/16); the demo's: resnet")
    parser.add_argument("--size", default="small", help="ViT size (core.vit.VIT_SIZES); paper: small")
    parser.add_argument("--patch-size", type=int, default=16)
    bench.add_resnet_arguments(parser, image_size=False)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--out-dim", type=int, default=65536, help="prototypes K")
    parser.add_argument("--hidden-dim", type=int, default=2048, help="the head's MLP width")
    parser.add_argument("--bottleneck-dim", type=int, default=256, help="the head's output before the prototypes")
    bench.add_arguments(parser, batch=8)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    crops = f"2 x {args.global_size} px + {args.local_crops} x {args.local_size} px crops"
    network = bench.resnet_title(args, crops) if args.backbone == "resnet" else f"ViT-{args.size}/{args.patch_size} on {crops}"
    title = f"DINO {network}, {args.out_dim} prototypes, head {args.hidden_dim} -> {args.bottleneck_dim}"
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
