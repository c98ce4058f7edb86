"""DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.

Self-distillation with no labels. A student (encoder + DINOHead) sees every crop of an image, two large
global crops and several small local ones (multi-crop); a teacher, the exponential moving average of the
student, sees only the global crops. The student is trained to match, with cross-entropy, the teacher's
output distribution over K prototypes on every other crop. The teacher's outputs are centred (a running
mean of its logits is subtracted) and sharpened (a low temperature); centring alone would spread the
outputs uniformly and sharpening alone would put everything in one prototype: together they avoid
collapse. The teacher's temperature warms up, its momentum rises to 1 along a cosine, the weight decay
rises from 0.04 to 0.4 along a cosine.
"""

from __future__ import annotations

import math
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from core.augment import IMAGENET_MEAN, IMAGENET_STD, batch_views
from core.export import describe_encoder, validation_view
from core.fsdp import local_tensors, shard_blocks, whole_norms
from core.heads import feature_dim
from core.losses import dino_center, dino_collapse_diagnostics, dino_loss, dino_targets
from core.momentum import cosine_momentum, momentum_copy, update_momentum
from core.optim import param_groups, scaled_lr
from core.probe import log_embedding_std
from core.schedules import WarmupCosine, cosine_ramp, step_scheduler, warmup_and_total_steps
from core.vit import ViT, init_trunc_normal, set_drop_path


class DINOHead(nn.Module):
    """The DINO projection head (Caron et al. 2021, Sec. 3.1 and App. C): a 3-layer MLP with GELU
    (hidden 2048) down to a 256-d bottleneck, L2-normalised, then a weight-normalised linear layer to K
    prototypes (paper: 65536). The prototypes' norm is fixed to 1 (the paper's `norm_last_layer`, which
    stabilises training), so the logits are cosine similarities."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        init_trunc_normal(self.mlp)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        # nn.Linear's default init, as DINO's last layer keeps (its truncated-normal init covers the MLP only).
        # Only the rows' directions are learned, and an Adam step turns a row by about lr / its norm, so
        # smaller rows would turn faster: std 0.02 gives norm 0.32 where this gives 0.58.
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim)
        # Cosines in float32 at least, also under bf16 autocast: bf16 spaces them by 2^-8 near 1, which the
        # teacher's temperature (0.04) turns into logit steps of 0.1.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            prototypes = self.prototypes.to(dtype)  # (K, bottleneck_dim)
            # Unit rows by torch's fused weight-norm kernel with every norm g = 1, as DINO's weight-normalised
            # last layer: forward and backward 2.4x faster than F.normalize over 65536 x 256 values on a CPU.
            unit = torch._weight_norm(prototypes, prototypes.new_ones(prototypes.shape[0], 1), 0)
            return x.to(dtype) @ unit.T  # (B, K)


@torch.no_grad()
def clip_each_gradient(parameters, max_norm: float) -> None:
    """DINO's `clip_gradients`: scale each parameter's gradient down to norm `max_norm` on its own, never up
    (torch's clip_grad_norm_ scales all of them by their total norm instead). The norms take one fused
    kernel, and under FSDP one collective (core.fsdp.whole_norms)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        scales = (max_norm / (whole_norms(grads) + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local_tensors(grads), list(scales.unbind()))


def encode(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """backbone(images) -> (B, D), also for a ViT on crops smaller than its input size (the local crops):
    their patches get the ViT's position table resized to their grid (`ViT.positions`), as DINO's
    `interpolate_pos_encoding` does. A ResNet takes any size as it is."""
    if isinstance(backbone, ViT):
        return backbone.pool_tokens(backbone.tokens(images, any_size=True))
    return backbone(images)


class DINO(L.LightningModule):
    """backbone: the encoder to pretrain, any core backbone with `embed_dim` (config: `class_path:
    core.vit.ViT` or `core.resnet.ResNet` with its `init_args`; its input size is the global crop size);
    paper: ViT-S/16. global_size/local_size: sides of the global and local crops (paper: 224, 96).
    out_dim/hidden_dim/bottleneck_dim: DINOHead (paper: 65536, 2048, 256).
    student_temp: paper 0.1. teacher_temp: the teacher's temperature after a linear warmup from
    warmup_teacher_temp over warmup_teacher_temp_epochs (paper: 0.04 -> 0.04, or 0.04 -> 0.07 over 30).
    center_momentum: EMA of the teacher's mean logits (paper: 0.9). base_momentum: the teacher's EMA
    momentum at step 0, raised to 1 along a cosine (paper: 0.996).
    base_lr: learning rate per 256 samples of effective batch (paper: 5e-4); linear warmup for
    `warmup_epochs` (paper: 10), then cosine to `min_lr` (paper: 1e-6). optimizer: "adamw" (the paper's,
    for ViTs) or "sgd" with momentum 0.9 (the official code's ResNet-50 setting: lr 0.03, decay 1e-4 held, weight_decay_end 1e-4 too). weight_decay -> weight_decay_end:
    cosine schedule of the decay on weights (paper: 0.04 -> 0.4); biases and norms are not decayed.
    freeze_last_layer_epochs: the prototypes get no update during the first epochs (paper: 1).
    clip_grad: each parameter's gradient norm is clipped to this on its own, as DINO's code does (paper: 3;
    Lightning's `gradient_clip_val` clips the norm of all of them together instead); None: no clipping.
    The teacher never drops paths: a ViT student's stochastic depth (`drop_path`, paper: 0.1) stays with the
    student, as DINO's code builds its teacher without it.
    mean/std: the input normalisation of the data transform (recorded for export).
    """

    def __init__(
        self,
        backbone: nn.Module,
        global_size: int = 224,
        local_size: int = 96,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        base_lr: float = 5e-4,
        min_lr: float = 1e-6,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        warmup_epochs: float = 10,
        optimizer: str = "adamw",
        freeze_last_layer_epochs: int = 1,
        clip_grad: float | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        # The backbone's class_path and init_args are in the CLI's config.yaml and in the checkpoint's
        # "encoders" entry; a module object in hparams would make the checkpoint need unpickling.
        self.save_hyperparameters(ignore=["backbone"])
        embed_dim = feature_dim(backbone)
        if isinstance(backbone, ViT) and backbone.patch_embed.input_size != (global_size, global_size):
            raise ValueError(f"the ViT's input_size {backbone.patch_embed.input_size} must be the global crop size {global_size}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={optimizer!r} must be 'adamw' or 'sgd'")
        for name, value in {"base_momentum": base_momentum, "center_momentum": center_momentum}.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.backbone = backbone
        self.head = DINOHead(embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher_backbone = momentum_copy(self.backbone)
        if isinstance(self.teacher_backbone, ViT):
            set_drop_path(self.teacher_backbone, 0.0)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_means: list[torch.Tensor] = []  # (1, K) per micro-batch of this optimizer step

    def teacher_temperature(self) -> float:
        """Linear warmup over the first epochs, per epoch as in the paper's code."""
        h = self.hparams
        if self.current_epoch >= h.warmup_teacher_temp_epochs:
            return h.teacher_temp
        return h.warmup_teacher_temp + (h.teacher_temp - h.warmup_teacher_temp) * self.current_epoch / max(h.warmup_teacher_temp_epochs - 1, 1)

    def training_step(self, batch, batch_idx):
        h = self.hparams
        global_views = batch_views(batch, "global_views", h.global_size, count=2)  # 2 x (B, 3, G, G)
        local_views = batch_views(batch, "local_views", h.local_size) if batch.get("local_views") else []  # N x (B, 3, l, l)
        n = global_views[0].shape[0]
        with torch.no_grad():
            teacher = self.teacher_head(encode(self.teacher_backbone, torch.cat(global_views))).chunk(2)  # 2 x (B, K)
        # Crops of one size share a backbone pass, and the head one pass over all crops (DINO's
        # MultiCropWrapper): the prototypes are normalised once per step, not once per crop size.
        features = [encode(self.backbone, torch.cat(global_views))]  # (2B, D)
        if local_views:
            features.append(encode(self.backbone, torch.cat(local_views)))  # (N B, D)
        student = list(self.head(torch.cat(features)).split(n))  # 2 + N views of (B, K), globals first
        temp = self.teacher_temperature()
        targets = dino_targets(list(teacher), self.center, temp)  # centred and sharpened: 2 x (B, K)
        loss = dino_loss(student, targets, h.student_temp)
        # The paper's collapse watch (Fig. 7): entropy near ln K means uniform outputs, near 0 one prototype.
        entropy, kl = dino_collapse_diagnostics(targets, loss)
        self.teacher_means.append(torch.cat(teacher).mean(dim=0, keepdim=True))  # the center moves in optimizer_step
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/teacher_temp", temp)
        self.log("train/teacher_entropy", entropy)
        self.log("train/kl", kl)
        log_embedding_std(self, student[0])
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.hparams.clip_grad is not None:
            clip_each_gradient(self.parameters(), self.hparams.clip_grad)
        # The paper freezes the prototypes at first: their early updates destabilise training.
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            self.head.prototypes.grad = None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The weight decay of this step, the optimizer's step, then the teacher's and the center's EMA steps:
        once per optimizer step, so gradient accumulation moves them once, as one large batch would."""
        h = self.hparams
        total = self.trainer.estimated_stepping_batches
        optimizer.param_groups[0]["weight_decay"] = cosine_ramp(self.trainer.global_step / total, h.weight_decay, h.weight_decay_end)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # global_step does not count this step yet: k = 0 for the first, as in the paper's schedule.
        m = cosine_momentum(self.trainer.global_step, total, h.base_momentum)
        self.update_teacher(m)
        self.log("train/momentum", m)
        self.log("train/weight_decay", optimizer.param_groups[0]["weight_decay"])

    def update_teacher(self, m: float) -> None:
        """The teacher's EMA step at momentum m, then the center's."""
        # Parameters only, as DINO's code: the teacher's BatchNorm statistics come from its own passes over the
        # global crops; the student's also follow the local crops, which would skew the teacher's features.
        update_momentum(self.backbone, self.teacher_backbone, m, copy_buffers=False)
        update_momentum(self.head, self.teacher_head, m, copy_buffers=False)
        self.move_center()

    def move_center(self) -> None:
        """The center's EMA step on the teacher's mean output over this optimizer step's micro-batches and every
        rank: once per optimizer step, so with gradient accumulation every micro-batch is centred alike and the
        center moves once, as with one large batch (DINO's code, without accumulation, moves it every step)."""
        self.center.copy_(dino_center(self.center, self.teacher_means, self.hparams.center_momentum))
        self.teacher_means = []

    def validation_step(self, batch, batch_idx):
        """Validation batches are clean images for the online probe (core.probe.OnlineProbe calls `embed`);
        there are no crops to score a loss on."""

    def embed(self, batch) -> torch.Tensor:
        """The representation: the teacher's encoder on clean images, (B, embed_dim). The paper evaluates
        the teacher, which is better than the student throughout training."""
        return self.teacher_backbone(batch["image"])

    def configure_model(self):
        shard_blocks(self)  # FSDP2 under ModelParallelStrategy; nothing under DDP or in one process

    def configure_optimizers(self):
        h = self.hparams
        lr = scaled_lr(h.base_lr, self.trainer)
        groups = param_groups(nn.ModuleList([self.backbone, self.head]), h.weight_decay)  # decayed group first
        if h.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        warmup, total = warmup_and_total_steps(self.trainer, h.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, WarmupCosine(warmup, total, min_ratio=h.min_lr / lr))}

    def on_save_checkpoint(self, checkpoint):
        spec = {"modality": "image", "size": [self.hparams.global_size] * 2, "mean": list(self.hparams.mean), "std": list(self.hparams.std), **validation_view(self)}
        checkpoint["encoders"] = {"image": describe_encoder("teacher_backbone.", self.teacher_backbone, spec)}
