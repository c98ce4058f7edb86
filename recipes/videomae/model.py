"""VideoMAE: Tong et al., "VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised
Video Pre-Training", NeurIPS 2022.

Cut a clip into 2-frame tubelets, hide 90% of them with *tube masking* (one random spatial mask shared by
every time step, so a hidden patch cannot be copied from the same place in the next frame), encode the
visible tubelets with a ViT and let a light decoder predict the pixels of the hidden ones, each tubelet
normalised per channel by its own mean and std. The decoder runs over all tokens (visible tokens plus a
mask token at every hidden place) and the loss is taken on the hidden tubelets only: the same objective
as VideoMAE's decoder, which predicts only the hidden tokens. After pretraining the decoder is thrown away
and the encoder sees every tubelet.
"""

from __future__ import annotations


import lightning as L
import torch

from core.augment import IMAGENET_MEAN, IMAGENET_STD
from core.export import describe_encoder, validation_view
from core.fsdp import shard_blocks
from core.heads import MAEDecoder
from core.losses import masked_patch_loss
from core.masking import patchify, random_mask, tube_mask
from core.optim import param_groups, scaled_lr
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps
from core.visualize import pictures_due, pictures_path, reconstruction_rows, save_reconstructions
from core.vit import ViT

MASKINGS = ("tube", "random")


def tubelet_targets(video: torch.Tensor, patch_size: tuple[int, int, int], normalize: bool, per_channel: bool = True):
    """VideoMAE's reconstruction targets: (B, 3, T, H, W) -> (B, N, pt*ph*pw*3), and the per-tubelet
    (mean, std), each (B, N, 1, 3) per channel or (B, N, 1, 1) per tubelet, that map normalised predictions
    back to pixels (None without `normalize`).

    per_channel: each tubelet normalised per channel (unbiased std, + 1e-6), as VideoMAE's `normlize_target`;
    otherwise over all its values at once, as MAE and MAE-ST (Feichtenhofer et al., "Masked Autoencoders As
    Spatiotemporal Learners", 2022). On small tubelets of a flat background, one channel's std is sensor
    noise, so a per-channel target is mostly noise; a per-tubelet target keeps the colour contrast.
    VideoMAE first undoes the ImageNet normalisation; a per-channel affine map leaves the per-channel
    normalised tubelet unchanged, so that step is skipped here.
    """
    patches = patchify(video, patch_size)  # (B, N, P * C), channels last
    if not normalize:
        return patches, None
    B, N, _ = patches.shape
    patches = patches.view(B, N, -1, video.shape[1])  # (B, N, P, C)
    dims = 2 if per_channel else (2, 3)
    mean = patches.mean(dim=dims, keepdim=True)
    std = patches.var(dim=dims, unbiased=True, keepdim=True).sqrt() + 1e-6
    return ((patches - mean) / std).flatten(2), (mean, std)


class VideoMAE(L.LightningModule):
    """num_frames/stride/image_size: the clip the data transform gives (paper: 16 frames, stride 4 on
    Kinetics, 2 on Something-Something v2, 224 px); `stride` is recorded for export (core.evaluate samples
    clips with it). patch_size/tubelet_size: tubelets of tubelet_size x patch_size x patch_size (paper: 2x16x16).
    norm_pix_loss/norm_per_channel: normalised targets, per channel (VideoMAE) or per tubelet (MAE-ST);
    see `tubelet_targets`.
    size/encoder_depth/pool: the ViT encoder (paper: base, mean pooling of the patch tokens).
    decoder_*: the decoder (paper, ViT-B: 4 blocks, 384 wide, 6 heads).
    masking: "tube" (the paper's: one spatial mask for every time step) or "random" (each tubelet on its own,
    the spacetime-agnostic masking of MAE-ST, Feichtenhofer et al. 2022; VideoMAE ablates it and keeps tubes),
    mask_ratio of the tubelets either way (paper: tube, 0.9).
    base_lr: learning rate per 256 clips of effective batch (paper: 1.5e-4); AdamW, betas (0.9, 0.95),
    weight decay 0.05 on weights only; linear warmup for `warmup_epochs`, then cosine down to
    `min_lr_ratio` x the peak (VideoMAE: min_lr 1e-5 / lr 1.5e-4).
    mean/std: the input normalisation the data transform applies (recorded for export and pictures).
    """

    def __init__(
        self,
        num_frames: int = 16,
        stride: int = 4,
        image_size: int = 224,
        patch_size: int = 16,
        tubelet_size: int = 2,
        size: str = "base",
        encoder_depth: int | None = None,
        pool: str = "mean",
        decoder_dim: int = 384,
        decoder_depth: int = 4,
        decoder_heads: int = 6,
        masking: str = "tube",
        mask_ratio: float = 0.9,
        norm_pix_loss: bool = True,
        norm_per_channel: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40,
        min_lr_ratio: float = 1e-5 / 1.5e-4,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        pictures_every_n_steps: int = 1000,
    ):
        super().__init__()
        self.save_hyperparameters()
        if masking not in MASKINGS:
            raise ValueError(f"masking={masking!r} must be one of {MASKINGS}")
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.patch = (tubelet_size, patch_size, patch_size)
        input_size = (num_frames, image_size, image_size)
        self.encoder = ViT(input_size, self.patch, 3, size=size, depth=encoder_depth, pool=pool)
        patch_dim = tubelet_size * patch_size * patch_size * 3
        self.decoder = MAEDecoder(self.encoder.grid, self.encoder.embed_dim, patch_dim, decoder_dim, decoder_depth, decoder_heads)
        self.mask(1, "cpu", torch.Generator())  # a mask_ratio that leaves nothing visible fails here, not at the first step

    def check_clip(self, video: torch.Tensor) -> None:
        expected = (3, self.hparams.num_frames, self.hparams.image_size, self.hparams.image_size)
        if tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"VideoMAE expects clips (B, 3, num_frames, image_size, image_size) = (B, {', '.join(map(str, expected))}), "
                f"got {tuple(video.shape)}; set the data transform's num_frames/size to the model's num_frames/image_size"
            )

    def mask(self, batch: int, device, generator: torch.Generator | None = None):
        """(B, K) indices of the visible tubelets and the (B, N) mask, True where hidden."""
        if self.hparams.masking == "random":
            return random_mask(batch, self.encoder.num_patches, self.hparams.mask_ratio, device, generator)
        return tube_mask(batch, self.encoder.grid, self.hparams.mask_ratio, device, generator)

    def reconstruct(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """video (B, 3, T, H, W) -> loss, predicted tubelets (B, N, P), mask (B, N), target (mean, std) or None."""
        self.check_clip(video)
        keep_idx, mask = self.mask(video.shape[0], video.device, generator)
        tokens = self.encoder.tokens(video, keep_idx)  # (B, 1 + K, D): visible tubelets only
        pred = self.decoder(tokens, keep_idx)  # (B, N, P)
        target, stats = tubelet_targets(video, self.patch, self.hparams.norm_pix_loss, self.hparams.norm_per_channel)
        loss = masked_patch_loss(pred, target, mask, norm_pix=False)  # targets are normalised above
        return loss, pred, mask, stats

    def training_step(self, batch, batch_idx):
        loss, pred, mask, stats = self.reconstruct(batch["video"])
        self.log("train/loss", loss, prog_bar=True)
        if pictures_due(self.trainer, batch_idx, self.hparams.pictures_every_n_steps):
            self.save_pictures(batch["video"], pred, mask, stats, "train")
        return loss

    def validation_step(self, batch, batch_idx):
        # A fixed mask per batch index, so the validation loss moves only when the model does.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss, pred, mask, stats = self.reconstruct(batch["video"], generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.save_pictures(batch["video"], pred, mask, stats, "val")

    def embed(self, batch) -> torch.Tensor:
        """The representation: every tubelet visible, no masking (what the online probe and export use)."""
        return self.encoder(batch["video"])

    def save_pictures(self, video, pred, mask, stats, split: str) -> None:
        """Rows: original, masked, prediction, prediction pasted into the visible tubelets; frames side by side."""
        pred = pred.detach()
        if stats is not None:  # back from per-tubelet, per-channel normalised units to the input's units
            mean, std = stats
            pred = (pred.view(*mean.shape[:2], -1, mean.shape[-1]) * std + mean).flatten(2)
        rows = [video] + reconstruction_rows(video, pred, mask, self.patch, norm_pix=False)
        save_reconstructions(pictures_path(self.trainer, split), rows, self.hparams.mean, self.hparams.std)

    def on_fit_start(self):
        # The clips are cut by the data transforms, the export records the model's stride for core.evaluate:
        # a transform at another stride would train on clips the export then describes wrongly.
        datamodule = self.trainer.datamodule
        for split in ("train_transform", "val_transform"):
            transform = getattr(datamodule, split, None)
            for key in ("stride", "num_frames"):
                if hasattr(transform, key) and getattr(transform, key) != self.hparams[key]:
                    raise ValueError(
                        f"data.{split}'s {key} is {getattr(transform, key)} and model.{key} is {self.hparams[key]}: "
                        "set them alike (the export records the model's for core.evaluate and core.finetune)"
                    )

    def configure_model(self):
        shard_blocks(self)  # FSDP2 under ModelParallelStrategy; nothing under DDP or in one process

    def configure_optimizers(self):
        lr = scaled_lr(self.hparams.base_lr, self.trainer)
        # VideoMAE's no_weight_decay list: its tokens (the class token is ours; VideoMAE has none, see README).
        groups = param_groups(self, self.hparams.weight_decay, skip={"encoder.cls_token", "decoder.mask_token"})
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=self.hparams.betas)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        schedule = WarmupCosine(warmup, total, min_ratio=self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, schedule)}

    def on_save_checkpoint(self, checkpoint):
        hp = self.hparams
        spec = {
            "modality": "video", "frames": hp.num_frames, "stride": hp.stride, "size": [hp.image_size] * 2,
            "mean": list(hp.mean), "std": list(hp.std), **validation_view(self),
        }
        checkpoint["encoders"] = {"video": describe_encoder("encoder.", self.encoder, spec)}
