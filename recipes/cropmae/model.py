"""CropMAE: Eymaël, Vandeghen, Cioppa, Giancola, Ghanem, Van Droogenbroeck, "Efficient Image Pre-Training
with Siamese Cropped Masked Autoencoders", ECCV 2024.

SiamMAE (Gupta et al. 2023) reconstructs a heavily masked future video frame from an unmasked past frame.
CropMAE replaces the two frames by two crops of one still image: a global view, and a local crop taken
inside it. One ViT (shared weights, "Siamese") encodes the whole global view and the few visible patches
of the local view (98.5% hidden: 2 of 196 patches at 224 px). A decoder whose local tokens (visible ones
plus a mask token at every hidden place) cross-attend to the encoded global tokens predicts the pixels of
the local view; the loss is on its hidden patches only. Almost nothing of the local view is visible, so
the model must find where the crop lies in the global view and copy it, at scale: the encoder learns
features that match across views. After pretraining the decoder is thrown away and the encoder sees every
patch of an image.
"""

from __future__ import annotations


import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from core.augment import IMAGENET_MEAN, IMAGENET_STD
from core.export import describe_encoder, validation_view
from core.fsdp import shard_blocks
from core.heads import scatter_visible
from core.losses import masked_patch_loss
from core.masking import check_ratio, patchify, random_mask, whole
from core.optim import param_groups, scaled_lr
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps
from core.visualize import pictures_due, pictures_path, reconstruction_rows, save_reconstructions
from core.vit import Attention, CrossAttention, ViT, init_weights, sincos_pos_embed

# The fixed view pair of the validation loss: the whole image as the global view and its central crop,
# 0.67 of the side (45% of the area, inside the paper's 30-60% local scale), as the local view.
VAL_LOCAL_SIDE = 0.67


class CrossSelfBlock(nn.Module):
    """The SiamMAE/CropMAE decoder block, in the CropMAE code's order: cross-attention to the other view's
    tokens, MLP, then self-attention, each added back and followed by LayerNorm (post-norm, like torch's
    TransformerDecoderLayer with norm_first=False). Dropout on each branch as in that layer; the attention
    probabilities themselves are not dropped here."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.cross = CrossAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))
        self.attn = Attention(dim, heads)
        self.norm_cross, self.norm_mlp, self.norm_attn = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm_cross(x + self.drop(self.cross(x, context)))
        x = self.norm_mlp(x + self.drop(self.mlp(x)))
        return self.norm_attn(x + self.drop(self.attn(x)))


class CropMAEDecoder(nn.Module):
    """Predicts every patch of the local view (B, N, patch_dim) from its encoded visible tokens and the
    encoded global view. One linear embedding serves both views, as in the CropMAE code."""

    def __init__(self, grid: tuple[int, int], encoder_dim: int, patch_dim: int, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(tuple(grid), dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([CrossSelfBlock(dim, heads, mlp_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, local_tokens: torch.Tensor, keep_idx: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """local_tokens (B, 1 + K, encoder_dim), keep_idx (B, K), global_tokens (B, 1 + N, encoder_dim),
        class tokens first. Returns (B, N, patch_dim)."""
        context = self.embed(global_tokens)  # (B, 1 + N, dim)
        x = self.embed(local_tokens)  # (B, 1 + K, dim)
        full = scatter_visible(x[:, 1:], keep_idx, self.mask_token, self.num_patches)  # (B, N, dim)
        x = torch.cat([x[:, :1], full + self.pos_embed], dim=1)  # (B, 1 + N, dim)
        for block in self.blocks:
            x = block(x, context)
        return self.pred(self.norm(x)[:, 1:])  # (B, N, patch_dim)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible: int(N * (1 - mask_ratio)) as in MAE, but at least one. 98.5% of the 64 patches
    of a 32-px image in 4-px patches would leave none; one is the nearest ratio (98.4%)."""
    return max(1, whole(num_patches * (1 - mask_ratio)))


def center_crop_resized(images: torch.Tensor, side: float) -> torch.Tensor:
    """The central `side` fraction (per axis) of (B, C, H, W) images, resized back to (H, W)."""
    H, W = images.shape[-2:]
    h, w = round(H * side), round(W * side)
    top, left = (H - h) // 2, (W - w) // 2
    crop = images[..., top : top + h, left : left + w]
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False, antialias=False)


class CropMAE(L.LightningModule):
    """image_size/patch_size/size/encoder_depth/pool: the ViT encoder (paper: 224, 16, small; the
    evaluation is label propagation on patch features, the probes here pool the class token by default).
    decoder_*: the cross-self decoder (paper, ViT-S: 4 blocks, 256 wide, 8 heads, MLP 2048, dropout 0.1).
    mask_ratio: of the local view's patches (paper: 0.985; at least one patch stays visible).
    base_lr: learning rate per 256 images of effective batch (paper: 1e-4 at batch 2048); AdamW, betas
    (0.9, 0.95), weight decay 0.05 on weights only; linear warmup for `warmup_epochs` (paper: 5% of 400
    epochs), then cosine to 0.
    mean/std: the input normalisation the data transform applies (recorded for export and pictures).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        size: str = "small",
        encoder_depth: int | None = None,
        pool: str = "cls",
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        decoder_dropout: float = 0.1,
        mask_ratio: float = 0.985,
        norm_pix_loss: bool = True,
        base_lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 20,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        pictures_every_n_steps: int = 1000,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_ratio("mask_ratio", mask_ratio)
        self.patch = (patch_size, patch_size)
        self.encoder = ViT((image_size, image_size), self.patch, 3, size=size, depth=encoder_depth, pool=pool)
        self.decoder = CropMAEDecoder(
            self.encoder.grid, self.encoder.embed_dim, patch_size * patch_size * 3,
            decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim, decoder_dropout,
        )  # fmt: skip
        self.num_visible = visible_count(self.encoder.num_patches, mask_ratio)

    def reconstruct(self, global_view: torch.Tensor, local_view: torch.Tensor, generator: torch.Generator | None = None):
        """Both views (B, 3, H, W) -> loss, predicted local patches (B, N, P), mask (B, N)."""
        N = self.encoder.num_patches
        keep_idx, mask = random_mask(local_view.shape[0], N, 1 - self.num_visible / N, local_view.device, generator)
        global_tokens = self.encoder.tokens(global_view)  # (B, 1 + N, D): every patch of the global view
        local_tokens = self.encoder.tokens(local_view, keep_idx)  # (B, 1 + K, D): the few visible local patches
        pred = self.decoder(local_tokens, keep_idx, global_tokens)  # (B, N, P)
        loss = masked_patch_loss(pred, patchify(local_view, self.patch), mask, self.hparams.norm_pix_loss)
        return loss, pred, mask

    def training_step(self, batch, batch_idx):
        loss, pred, mask = self.reconstruct(batch["global"], batch["local"])
        self.log("train/loss", loss, prog_bar=True)
        if pictures_due(self.trainer, batch_idx, self.hparams.pictures_every_n_steps):
            self.save_pictures(batch["global"], batch["local"], pred, mask, "train")
        return loss

    def validation_step(self, batch, batch_idx):
        # A fixed view pair and a fixed mask per batch index, so the validation loss moves only when the model does.
        images = batch["image"]
        local_view = center_crop_resized(images, VAL_LOCAL_SIDE)
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss, pred, mask = self.reconstruct(images, local_view, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.save_pictures(images, local_view, pred, mask, "val")

    def embed(self, batch) -> torch.Tensor:
        """The representation: every patch visible, no masking (what the online probe and export use)."""
        return self.encoder(batch["image"])

    def save_pictures(self, global_view, local_view, pred, mask, split: str) -> None:
        """Rows: global view, local view, masked local view, prediction, prediction pasted into the visible patches."""
        rows = [global_view, local_view] + reconstruction_rows(local_view, pred.detach(), mask, self.patch, self.hparams.norm_pix_loss)
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
