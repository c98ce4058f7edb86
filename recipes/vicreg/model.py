"""VICReg: Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022.

Two augmented views go through one encoder and a wide projector ("expander"). Three terms on the
embeddings: invariance, the mean squared distance between the two views; variance, a hinge that keeps the
standard deviation of every dimension over the batch above 1 (this is what forbids collapse); covariance,
the squared off-diagonal covariances, which decorrelates the dimensions. Variance and covariance are
computed over the global batch.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from core.augment import IMAGENET_MEAN, IMAGENET_STD, batch_views
from core.export import describe_encoder, validation_view
from core.fsdp import shard_blocks
from core.heads import feature_dim, mlp_head
from core.losses import vicreg_loss
from core.optim import LARS, param_groups, scaled_lr
from core.probe import log_embedding_std
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps


class VICReg(L.LightningModule):
    """backbone: the encoder to pretrain, any core backbone with `embed_dim` (config: `class_path:
    core.resnet.ResNet` or `core.vit.ViT` with its `init_args`); paper: ResNet-50.
    image_size: the side of the views (recorded for export).
    projector_dims: widths of the expander's layers after the encoder (paper: 8192, 8192, 8192).
    sim_weight / var_weight / cov_weight: the invariance, variance and covariance coefficients
    (paper: 25, 25, 1).
    base_lr: learning rate per 256 samples of effective batch (paper: 0.2); LARS with momentum 0.9 and
    weight decay 1e-6, biases and norms excluded from both; linear warmup for `warmup_epochs` (paper: 10),
    then cosine to 1/1000 of the peak. mean/std: the input normalisation of the data transform (for export).
    lars_trust: LARS's trust coefficient (paper: 1e-3; solo-learn's CIFAR runs use 0.02, which moves
    weights faster in a short run). lars_clip: cap each layer's scaled rate at the global one (LARC's clip
    mode, on in solo-learn's CIFAR runs; see core.optim.LARS).
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int = 224,
        projector_dims: list[int] = [8192, 8192, 8192],
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        base_lr: float = 0.2,
        weight_decay: float = 1e-6,
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
        # Variance and covariance over every rank's samples (gather keeps the gradients); the invariance
        # term is a per-sample mean, made global by DDP's gradient averaging.
        h = self.hparams
        loss = vicreg_loss(z1, z2, h.sim_weight, h.var_weight, h.cov_weight, gather=True)
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
        lr = scaled_lr(self.hparams.base_lr, self.trainer)
        optimizer = LARS(param_groups(self, self.hparams.weight_decay), lr=lr, momentum=0.9, trust_coefficient=self.hparams.lars_trust, clip=self.hparams.lars_clip)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, WarmupCosine(warmup, total, min_ratio=1e-3))}

    def on_save_checkpoint(self, checkpoint):
        spec = {"modality": "image", "size": [self.hparams.image_size] * 2, "mean": list(self.hparams.mean), "std": list(self.hparams.std), **validation_view(self)}
        checkpoint["encoders"] = {"image": describe_encoder("backbone.", self.backbone, spec)}
