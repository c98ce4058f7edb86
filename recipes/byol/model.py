"""BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020.

Two augmented views of each image. The online network (encoder -> projector -> predictor) predicts the
target network's projection of the other view; the target network (encoder -> projector) is not trained
by gradients but follows the online one as an exponential moving average whose momentum rises from 0.996
to 1 along a cosine. The loss is the normalised MSE 2 - 2 cos(p, z'), summed over both directions. There
are no negatives: the predictor and the slow target keep the representation from collapsing.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from core.augment import IMAGENET_MEAN, IMAGENET_STD, batch_views
from core.export import describe_encoder, validation_view
from core.fsdp import shard_blocks
from core.heads import feature_dim, mlp_head
from core.losses import negative_cosine
from core.momentum import cosine_momentum, momentum_copy, update_momentum
from core.optim import LARS, param_groups, scaled_lr
from core.probe import log_embedding_std
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps


class BYOL(L.LightningModule):
    """backbone: the encoder to pretrain, any core backbone with `embed_dim` (config: `class_path:
    core.resnet.ResNet` or `core.vit.ViT` with its `init_args`); paper: ResNet-50.
    image_size: the side of the views (recorded for export). projector_hidden/projection_dim: the
    projector MLP (paper: 4096, 256); predictor_hidden: the predictor MLP (paper: 4096).
    base_momentum: the target's EMA momentum at step 0, raised to 1 along a cosine (paper: 0.996).
    base_lr: learning rate per 256 samples of effective batch (paper: 0.2); LARS with momentum 0.9 and
    weight decay 1.5e-6, biases and norms excluded from both; linear warmup for `warmup_epochs` (paper: 10),
    then cosine to zero. mean/std: the input normalisation the data transform applies (recorded for export).
    lars_trust: LARS's trust coefficient (paper: 1e-3; solo-learn's CIFAR runs use 0.02, which moves
    weights faster in a short run). lars_clip: cap each layer's scaled rate at the global one (LARC's clip
    mode, on in solo-learn's CIFAR runs; see core.optim.LARS).
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int = 224,
        projector_hidden: int = 4096,
        projection_dim: int = 256,
        predictor_hidden: int = 4096,
        base_momentum: float = 0.996,
        base_lr: float = 0.2,
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
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
        embed_dim = feature_dim(backbone)
        self.backbone = backbone
        self.projector = mlp_head([embed_dim, projector_hidden, projection_dim])
        self.predictor = mlp_head([projection_dim, predictor_hidden, projection_dim])
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)

    def training_step(self, batch, batch_idx):
        x1, x2 = batch_views(batch, "views", self.hparams.image_size, count=2)  # 2 x (B, 3, H, W)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (B, projection_dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(x1)), self.target_projector(self.target_backbone(x2))
        # 2 - 2 cos(p, t) for each direction: the first view predicts the second's target and vice versa.
        loss = (2 + 2 * negative_cosine(p1, t2)) + (2 + 2 * negative_cosine(p2, t1))
        self.log("train/loss", loss, prog_bar=True)
        log_embedding_std(self, z1)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimizer's step, then the target's EMA step: once per optimizer step, so gradient
        accumulation over several batches moves the target once, as one large batch would."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # global_step does not count this step yet: k = 0 for the first, as in the paper's schedule.
        m = cosine_momentum(self.trainer.global_step, self.trainer.estimated_stepping_batches, self.hparams.base_momentum)
        self.update_target(m)
        self.log("train/momentum", m)

    def update_target(self, m: float) -> None:
        update_momentum(self.backbone, self.target_backbone, m)
        update_momentum(self.projector, self.target_projector, m)

    def validation_step(self, batch, batch_idx):
        """Validation batches are clean images for the online probe (core.probe.OnlineProbe calls `embed`);
        there is no pair of views to score a loss on."""

    def embed(self, batch) -> torch.Tensor:
        """The representation: the online encoder's output on clean images, (B, embed_dim)."""
        return self.backbone(batch["image"])

    def configure_model(self):
        shard_blocks(self)  # FSDP2 under ModelParallelStrategy; nothing under DDP or in one process

    def configure_optimizers(self):
        lr = scaled_lr(self.hparams.base_lr, self.trainer)
        online = nn.ModuleList([self.backbone, self.projector, self.predictor])
        optimizer = LARS(param_groups(online, self.hparams.weight_decay), lr=lr, momentum=0.9, trust_coefficient=self.hparams.lars_trust, clip=self.hparams.lars_clip)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, WarmupCosine(warmup, total))}

    def on_save_checkpoint(self, checkpoint):
        spec = {"modality": "image", "size": [self.hparams.image_size] * 2, "mean": list(self.hparams.mean), "std": list(self.hparams.std), **validation_view(self)}
        checkpoint["encoders"] = {"image": describe_encoder("backbone.", self.backbone, spec)}
