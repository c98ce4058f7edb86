"""Barlow Twins: Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021.

Two augmented views go through one encoder and a wide projector. The cross-correlation matrix of the two
views' embeddings, each standardised over the global batch, is pushed to the identity: the diagonal to 1
(invariance to the augmentations) and the off-diagonal, weighted by lambda, to 0 (redundancy reduction:
every dimension carries different information). Constant embeddings cannot satisfy the diagonal, which is
what prevents collapse without negatives, predictor or momentum encoder.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from core.augment import IMAGENET_MEAN, IMAGENET_STD, batch_views
from core.export import describe_encoder, validation_view
from core.fsdp import shard_blocks
from core.heads import feature_dim, mlp_head
from core.losses import barlow_twins_loss
from core.optim import LARS, param_groups, scaled_lr
from core.probe import log_embedding_std
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps


class BarlowTwins(L.LightningModule):
    """backbone: the encoder to pretrain, any core backbone with `embed_dim` (config: `class_path:
    core.resnet.ResNet` or `core.vit.ViT` with its `init_args`); paper: ResNet-50.
    image_size: the side of the views (recorded for export).
    projector_dims: widths of the projector's layers after the encoder (paper: 8192, 8192, 8192).
    lambd: weight of the off-diagonal (redundancy) term (paper: 5e-3).
    lr_weights / lr_biases: learning rates per 256 samples of effective batch for the weights and for the
    biases and norm parameters (paper: 0.2 and 0.0048); LARS with momentum 0.9, weight decay 1.5e-6 and
    both decay and adaptation off for biases and norms; linear warmup for `warmup_epochs` (paper: 10), then
    cosine to 1/1000 of the peak. mean/std: the input normalisation of the data transform (for export).
    lars_trust: LARS's trust coefficient (paper: 1e-3; solo-learn's CIFAR runs use 0.02, which moves
    weights faster in a short run). lars_clip: cap each layer's scaled rate at the global one (LARC's clip
    mode, on in solo-learn's CIFAR runs; see core.optim.LARS).
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int = 224,
        projector_dims: list[int] = [8192, 8192, 8192],
        lambd: float = 5e-3,
        lr_weights: float = 0.2,
        lr_biases: float = 0.0048,
        weight_decay: float = 1.5e-6,
        lars_trust: float = 1e-3,
        lars_clip: bool = False,
        warmup_epochs: float = 10,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        # The backbone's class_path and init_args are in the CLI's config.yaml and in the checkpoint's
        # "encoders" entry; a module object in hparams would make the checkpoint need unpickling.
        self.save_hyperparameters(ignore=["backbone"])
        embed_dim = feature_dim(backbone)
        if not projector_dims:
            raise ValueError("projector_dims must name at least the output width")
        self.backbone = backbone
        self.projector = mlp_head([embed_dim, *projector_dims])

    def training_step(self, batch, batch_idx):
        x1, x2 = batch_views(batch, "views", self.hparams.image_size, count=2)  # 2 x (B, 3, H, W)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (B, D)
        # Standardisation and cross-correlation over every rank's samples (gather keeps the gradients).
        loss = barlow_twins_loss(z1, z2, lambd=self.hparams.lambd, gather=True)
        self.log("train/loss", loss, prog_bar=True)
        log_embedding_std(self, z1)
        return loss

    def validation_step(self, batch, batch_idx):
        """Validation batches are clean images for the online probe (core.probe.OnlineProbe calls `embed`);
        there is no pair of views to score a loss on."""

    def embed(self, batch) -> torch.Tensor:
        """The representation: the encoder's output on clean images, (B, embed_dim)."""
        return self.backbone(batch["image"])

    def configure_model(self):
        shard_blocks(self)  # FSDP2 under ModelParallelStrategy; nothing under DDP or in one process

    def configure_optimizers(self):
        weights, biases = param_groups(self, self.hparams.weight_decay)  # biases and norms: no decay, no LARS
        weights["lr"] = scaled_lr(self.hparams.lr_weights, self.trainer)
        biases["lr"] = scaled_lr(self.hparams.lr_biases, self.trainer)
        optimizer = LARS([weights, biases], lr=weights["lr"], momentum=0.9, trust_coefficient=self.hparams.lars_trust, clip=self.hparams.lars_clip)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, WarmupCosine(warmup, total, min_ratio=1e-3))}

    def on_save_checkpoint(self, checkpoint):
        spec = {"modality": "image", "size": [self.hparams.image_size] * 2, "mean": list(self.hparams.mean), "std": list(self.hparams.std), **validation_view(self)}
        checkpoint["encoders"] = {"image": describe_encoder("backbone.", self.backbone, spec)}
