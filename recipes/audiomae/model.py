"""AudioMAE: Huang et al., "Masked Autoencoders that Listen", NeurIPS 2022.

Turn each waveform into a Kaldi log-mel spectrogram (128 bins, 10 ms hop, cropped or padded to a fixed
number of frames), cut it into 16x16 patches, hide 80% of them at random, encode the visible ones with a
ViT and let a transformer decoder predict the hidden patches, each normalised by its own mean and std. The
loss is the mean squared error on hidden patches only. After pretraining the decoder is thrown away and the
encoder sees every patch.

The spectrogram is computed here, on the model's device, from the waveforms the data transform gives
(core.augment.AudioClip), so the exported encoder takes waveforms too.
"""

from __future__ import annotations


import lightning as L
import torch

from core.augment import AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD, log_mel
from core.export import describe_encoder
from core.fsdp import shard_blocks
from core.heads import MAEDecoder
from core.losses import masked_patch_loss
from core.masking import check_ratio, patchify, random_mask, time_freq_mask
from core.optim import param_groups, scaled_lr
from core.schedules import WarmupCosine, step_scheduler, warmup_and_total_steps
from core.visualize import pictures_due, pictures_path, reconstruction_rows, save_reconstructions
from core.vit import ViT

MASKINGS = ("random", "time_freq")


def roll_and_scale(waveform: torch.Tensor) -> torch.Tensor:
    """AudioMAE's `roll_mag_aug`: roll each waveform (B, S) circularly by a random shift and scale it by
    Beta(10, 10) + 0.5."""
    B, S = waveform.shape
    shift = torch.randint(S, (B, 1), device=waveform.device)
    rolled = waveform.gather(1, (torch.arange(S, device=waveform.device) - shift) % S)  # (B, S)
    magnitude = torch.distributions.Beta(10.0, 10.0).sample((B, 1)).to(waveform.device) + 0.5
    return rolled * magnitude


class AudioMAE(L.LightningModule):
    """sample_rate/seconds: the waveforms the data transform gives (paper: 16 kHz, 10 s AudioSet clips).
    n_mels/hop_ms/win_ms/n_frames: the log-mel front end (paper: 128 bins, 10 ms hop, 25 ms window, 1024
    frames: the 998 frames of 10 s zero-padded); fbank_mean/fbank_std normalise it (AudioSet's statistics).
    patch_size/size/encoder_depth/pool: the ViT encoder (paper: 16x16 patches, base, mean pooling).
    decoder_*: the decoder (paper: 16 layers, 512 wide, 16 heads; the paper's AudioSet decoder attends in
    local shifted windows, this one attends globally).
    masking: "random" (unstructured, mask_ratio of the patches: the paper's choice for pretraining, 0.8) or
    "time_freq" (whole time columns and frequency rows of the patch grid, time_mask_ratio/freq_mask_ratio).
    roll_mag_aug: roll each training waveform by a random shift and scale its magnitude (paper: on).
    base_lr: learning rate per 256 clips of effective batch (paper: 2e-4 at batch 512); AdamW, betas
    (0.9, 0.95), weight decay 1e-4 on weights only; linear warmup for `warmup_epochs` (paper: 3), then cosine.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        seconds: float = 10.0,
        n_mels: int = 128,
        hop_ms: float = 10.0,
        win_ms: float = 25.0,
        n_frames: int = 1024,
        fbank_mean: float = AUDIOSET_FBANK_MEAN,
        fbank_std: float = AUDIOSET_FBANK_STD,
        patch_size: int = 16,
        size: str = "base",
        encoder_depth: int | None = None,
        pool: str = "mean",
        decoder_dim: int = 512,
        decoder_depth: int = 16,
        decoder_heads: int = 16,
        masking: str = "random",
        mask_ratio: float = 0.8,
        time_mask_ratio: float = 0.6,
        freq_mask_ratio: float = 0.5,
        norm_pix_loss: bool = True,
        roll_mag_aug: bool = True,
        base_lr: float = 2e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 3,
        pictures_every_n_steps: int = 1000,
    ):
        super().__init__()
        self.save_hyperparameters()
        if masking not in MASKINGS:
            raise ValueError(f"masking={masking!r} must be one of {MASKINGS}")
        check_ratio("mask_ratio", mask_ratio)  # both maskings' ratios: a config may switch between them
        check_ratio("time_mask_ratio", time_mask_ratio)
        check_ratio("freq_mask_ratio", freq_mask_ratio)
        self.samples = round(sample_rate * seconds)
        self.patch = (patch_size, patch_size)
        self.encoder = ViT((n_mels, n_frames), self.patch, 1, size=size, depth=encoder_depth, pool=pool)
        self.decoder = MAEDecoder(self.encoder.grid, self.encoder.embed_dim, patch_size * patch_size, decoder_dim, decoder_depth, decoder_heads)
        self.mask(1, torch.Generator())  # ratios that leave nothing of this grid visible fail here, not at the first step

    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) waveforms -> (B, 1, n_mels, n_frames) normalised log-mel, the encoder's input."""
        if waveform.ndim != 2 or waveform.shape[1] != self.samples:
            raise ValueError(
                f"AudioMAE expects waveforms (B, sample_rate * seconds) = (B, {self.samples}), got {tuple(waveform.shape)}; "
                "set the data transform's sample_rate/seconds to the model's"
            )
        hp = self.hparams
        return log_mel(waveform, hp.sample_rate, hp.n_mels, hp.hop_ms, hp.win_ms, hp.fbank_mean, hp.fbank_std, frames=hp.n_frames)

    def mask(self, batch: int, generator: torch.Generator | None = None):
        hp = self.hparams
        if hp.masking == "time_freq":
            return time_freq_mask(batch, self.encoder.grid, hp.time_mask_ratio, hp.freq_mask_ratio, self.device, generator)
        return random_mask(batch, self.encoder.num_patches, hp.mask_ratio, self.device, generator)

    def reconstruct(self, spec: torch.Tensor, generator: torch.Generator | None = None):
        """spec (B, 1, n_mels, n_frames) -> loss, predicted patches (B, N, P), mask (B, N)."""
        keep_idx, mask = self.mask(spec.shape[0], generator)
        tokens = self.encoder.tokens(spec, keep_idx)  # (B, 1 + K, D): visible patches only
        pred = self.decoder(tokens, keep_idx)  # (B, N, P)
        loss = masked_patch_loss(pred, patchify(spec, self.patch), mask, self.hparams.norm_pix_loss)
        return loss, pred, mask

    def training_step(self, batch, batch_idx):
        waveform = batch["audio"]
        if self.hparams.roll_mag_aug:
            waveform = roll_and_scale(waveform)
        spec = self.spectrogram(waveform)
        loss, pred, mask = self.reconstruct(spec)
        self.log("train/loss", loss, prog_bar=True)
        if pictures_due(self.trainer, batch_idx, self.hparams.pictures_every_n_steps):
            self.save_pictures(spec, pred, mask, "train")
        return loss

    def validation_step(self, batch, batch_idx):
        # A fixed mask per batch index, so the validation loss moves only when the model does.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        spec = self.spectrogram(batch["audio"])
        loss, pred, mask = self.reconstruct(spec, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.save_pictures(spec, pred, mask, "val")

    def embed(self, batch) -> torch.Tensor:
        """The representation: every patch visible, no masking (what the online probe and export use)."""
        return self.encoder(self.spectrogram(batch["audio"]))

    def save_pictures(self, spec, pred, mask, split: str) -> None:
        """Rows: spectrogram, masked, prediction, prediction pasted into the visible patches."""
        rows = [spec] + reconstruction_rows(spec, pred.detach(), mask, self.patch, self.hparams.norm_pix_loss)
        save_reconstructions(pictures_path(self.trainer, split), rows)

    def configure_model(self):
        shard_blocks(self)  # FSDP2 under ModelParallelStrategy; nothing under DDP or in one process

    def configure_optimizers(self):
        lr = scaled_lr(self.hparams.base_lr, self.trainer)
        optimizer = torch.optim.AdamW(param_groups(self, self.hparams.weight_decay), lr=lr, betas=self.hparams.betas)
        warmup, total = warmup_and_total_steps(self.trainer, self.hparams.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, WarmupCosine(warmup, total))}

    def on_save_checkpoint(self, checkpoint):
        hp = self.hparams
        spec = {
            "modality": "audio", "sample_rate": hp.sample_rate, "seconds": hp.seconds, "n_mels": hp.n_mels,
            "hop_ms": hp.hop_ms, "win_ms": hp.win_ms, "mean": hp.fbank_mean, "std": hp.fbank_std, "frames": hp.n_frames,
        }
        checkpoint["encoders"] = {"audio": describe_encoder("encoder.", self.encoder, spec)}
