"""MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.

Hide 75% of the image patches at random, encode only the visible ones with a ViT, and let a light
transformer decoder predict the pixels of the hidden ones. The loss is the mean squared error on hidden
patches only, against per-patch normalised pixels. After pretraining, the decoder is thrown away and the
encoder sees every patch.
"""

from __future__ import annotations


import lightning as L
import torch

from core.augment import IMAGENET_MEAN, IMAGENET_STD
from core.export import describe_encoder, validation_view
from core.fsdp import shard_blocks
from core.heads import MAEDecoder
from core.losses import masked_patch_loss
from core.masking import patchify, random_mask
from core.optim import param_groups, scaled_lr
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps
from core.visualize import pictures_due, pictures_path, reconstruction_rows, save_reconstructions
from core.vit import ViT


class MAE(L.LightningModule):
    """image_size/patch_size/size/encoder_depth: the ViT encoder (paper: 224, 16, base).
    pool: the representation the probes and the export take, "cls" (the paper's linear probe) or "mean".
    decoder_*: the decoder (paper: 512 wide, 8 deep, 16 heads).
    mask_ratio: the share of patches hidden (paper: 0.75). norm_pix_loss: targets normalised per patch (paper: on).
    base_lr: the learning rate per 256 samples of effective batch (paper: 1.5e-4); AdamW with betas
    (0.9, 0.95) and weight decay 0.05 on weights only; linear warmup for `warmup_epochs`, then cosine.
    mean/std: the input normalisation the data transform applies (recorded for export and pictures).
    pictures_every_n_steps: reconstruction pictures to the run's log folder (0: none).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        size: str = "base",
        encoder_depth: int | None = None,
        pool: str = "cls",
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        pictures_every_n_steps: int = 1000,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.patch = (patch_size, patch_size)
        self.encoder = ViT((image_size, image_size), self.patch, 3, size=size, depth=encoder_depth, pool=pool)
        # A mask_ratio that leaves no patch visible fails here, not at the first step (own generator: the init is unchanged).
        random_mask(1, self.encoder.num_patches, mask_ratio, generator=torch.Generator())
        patch_dim = patch_size * patch_size * 3
        self.decoder = MAEDecoder(self.encoder.grid, self.encoder.embed_dim, patch_dim, decoder_dim, decoder_depth, decoder_heads)

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """images (B, 3, H, W) -> loss, predicted patches (B, N, P), mask (B, N)."""
        keep_idx, mask = random_mask(images.shape[0], self.encoder.num_patches, self.hparams.mask_ratio, images.device, generator)
        tokens = self.encoder.tokens(images, keep_idx)  # (B, 1 + K, D): visible patches only
        pred = self.decoder(tokens, keep_idx)  # (B, N, P)
        loss = masked_patch_loss(pred, patchify(images, self.patch), mask, self.hparams.norm_pix_loss)
        return loss, pred, mask

    def training_step(self, batch, batch_idx):
        loss, pred, mask = self.reconstruct(batch["image"])
        self.log("train/loss", loss, prog_bar=True)
        if pictures_due(self.trainer, batch_idx, self.hparams.pictures_every_n_steps):
            self.save_pictures(batch["image"], pred, mask, "train")
        return loss

    def validation_step(self, batch, batch_idx):
        # A fixed mask per batch index, so the validation loss moves only when the model does.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss, pred, mask = self.reconstruct(batch["image"], generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.save_pictures(batch["image"], pred, mask, "val")

    def embed(self, batch) -> torch.Tensor:
        """The representation: every patch visible, no masking (what the online probe and export use)."""
        return self.encoder(batch["image"])

    def save_pictures(self, images, pred, mask, split: str) -> None:
        rows = [images] + reconstruction_rows(images, pred.detach(), mask, self.patch, self.hparams.norm_pix_loss)
        save_reconstructions(pictures_path(self.trainer, split), rows, self.hparams.mean, self.hparams.std)

    def configure_model(self):
        shard_blocks(self)  # FSDP2 under ModelParallelStrategy; nothing under DDP or in one process

    def configure_optimizers(self):
        lr = scaled_lr(self.hparams.base_lr, self.trainer)
        optimizer = torch.optim.AdamW(param_groups(self, self.hparams.weight_decay), lr=lr, betas=self.hparams.betas)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, WarmupCosine(warmup, total))}

    def on_save_checkpoint(self, checkpoint):
        size = [self.hparams.image_size] * 2
        spec = {"modality": "image", "size": size, "mean": list(self.hparams.mean), "std": list(self.hparams.std), **validation_view(self)}
        checkpoint["encoders"] = {"image": describe_encoder("encoder.", self.encoder, spec)}
