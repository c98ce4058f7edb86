"""SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.

Two augmented views go through one encoder and projector. A predictor MLP on each branch predicts the
other branch's projection, which is held constant (stop-gradient). The loss is the negative cosine
similarity, symmetrised: D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2. There is no momentum encoder, no negative
pair and no need for large batches: the stop-gradient is what keeps the representation from collapsing
(the paper's Sec. 4). The predictor learns at a fixed rate while the rest follows a cosine (Sec. 4.2).
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
from core.optim import scaled_lr
from core.probe import log_embedding_std
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps


def constant(step: int) -> float:
    return 1.0


class SimSiam(L.LightningModule):
    """backbone: the encoder to pretrain, any core backbone with `embed_dim` (config: `class_path:
    core.resnet.ResNet` or `core.vit.ViT` with its `init_args`); paper: ResNet-50.
    image_size: the side of the views (recorded for export).
    projection_dim: width of the 3-layer projector, BatchNorm on every layer including the output
    (paper: 2048); predictor_hidden: the predictor's bottleneck (paper: 512).
    base_lr: learning rate per 256 samples of effective batch (paper: 0.05); SGD with momentum 0.9 and
    weight decay 1e-4 on every parameter, cosine decay after `warmup_epochs` (paper: none at batch 512).
    fix_predictor_lr: keep the predictor at the initial learning rate (paper: yes).
    mean/std: the input normalisation the data transform applies (recorded for export).
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int = 224,
        projection_dim: int = 2048,
        predictor_hidden: int = 512,
        base_lr: float = 0.05,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0,
        fix_predictor_lr: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        # The backbone's class_path and init_args are in the CLI's config.yaml and in the checkpoint's
        # "encoders" entry; a module object in hparams would make the checkpoint need unpickling.
        self.save_hyperparameters(ignore=["backbone"])
        embed_dim = feature_dim(backbone)
        self.backbone = backbone
        self.projector = mlp_head([embed_dim, projection_dim, projection_dim, projection_dim], last_batch_norm=True, last_affine=False)
        self.predictor = mlp_head([projection_dim, predictor_hidden, projection_dim])

    def training_step(self, batch, batch_idx):
        x1, x2 = batch_views(batch, "views", self.hparams.image_size, count=2)  # 2 x (B, 3, H, W)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (B, projection_dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # negative_cosine stops the gradient through its second argument.
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
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
        encoder = [*self.backbone.parameters(), *self.projector.parameters()]
        groups = [{"params": encoder}, {"params": list(self.predictor.parameters())}]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        cosine = WarmupCosine(warmup, total)
        schedules = [cosine, constant if self.hparams.fix_predictor_lr else cosine]  # one per group
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, schedules)}

    def on_save_checkpoint(self, checkpoint):
        spec = {"modality": "image", "size": [self.hparams.image_size] * 2, "mean": list(self.hparams.mean), "std": list(self.hparams.std), **validation_view(self)}
        checkpoint["encoders"] = {"image": describe_encoder("backbone.", self.backbone, spec)}
