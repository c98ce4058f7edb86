"""Pictures of what a masked autoencoder does: original / masked / reconstruction, saved as PNG."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torchvision.utils import save_image

from core.masking import patchify, unpatchify


def reconstruction_rows(
    x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: tuple[int, ...], norm_pix: bool
) -> list[torch.Tensor]:
    """Three batches shaped like x (B, C, *size): the input with hidden patches blanked, the prediction,
    and the prediction pasted into the visible input. With norm_pix the prediction is in per-patch
    normalised units, so it is mapped back with each target patch's own mean and std, as the MAE demo does."""
    target = patchify(x, patch_size)  # (B, N, P)
    if norm_pix:
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        pred = pred * std + mean
    grid = [s // p for s, p in zip(x.shape[2:], patch_size)]
    hidden = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
    to_image = lambda patches: unpatchify(patches, patch_size, grid, x.shape[1])  # noqa: E731
    return [to_image(target * (1 - hidden)), to_image(pred), to_image(target * (1 - hidden) + pred * hidden)]


def to_display(x: torch.Tensor, mean: list[float] | None = None, std: list[float] | None = None, scale_by: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, C, H, W), clips (B, C, T, H, W) -> displayable (B, C, H, W') in [0, 1]. Clips lay their
    frames side by side; without mean/std (spectrograms) each item is min-max scaled by the range of its own
    values in `scale_by` (the original's, so that a flat prediction shows flat), or in x itself."""
    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().cpu()
        return torch.cat(t.unbind(2), dim=-1) if t.ndim == 5 else t  # (B, C, H, T * W)

    x = flat(x)
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        reference = x if scale_by is None else flat(scale_by)
        lo = reference.amin(dim=(1, 2, 3), keepdim=True)
        hi = reference.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-6)
    return x.clamp(0, 1)


def save_reconstructions(path: str, rows: list[torch.Tensor], mean=None, std=None, max_items: int = 8) -> str:
    """Save a grid whose columns are items and whose rows are `rows` (e.g. original, masked, prediction,
    pasted). Spectrograms are shown with low frequencies at the bottom."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shown = [to_display(r[:max_items], mean, std, scale_by=rows[0][:max_items]) for r in rows]  # rows[0]: the original
    if mean is None:
        shown = [r.flip(-2) for r in shown]
    n = shown[0].shape[0]
    save_image(torch.cat(shown), path, nrow=n, padding=1, pad_value=1.0)
    return path


def pictures_due(trainer, batch_idx: int, every: int) -> bool:
    """Whether this training batch saves pictures: on rank 0, every `every` optimizer steps (0: never), and
    under gradient accumulation on the first micro-batch of the step only (the others share its global step,
    and each would overwrite the file)."""
    return (
        every > 0
        and trainer.global_step % every == 0
        and batch_idx % trainer.accumulate_grad_batches == 0
        and trainer.is_global_zero
    )


def pictures_path(trainer, split: str) -> str:
    """``<the run's log folder>/reconstructions/<split>_step<global step>.png``, the folder found as
    ``Trainer.log_dir`` finds it but without its broadcast: ``log_dir`` is a collective that every rank must
    join, and pictures are saved by rank 0 alone, so under DDP rank 0 would wait in the broadcast while the
    other ranks wait in the gradient all-reduce, for ever."""
    logger = trainer.logger
    if logger is None:
        folder = trainer.default_root_dir
    elif isinstance(logger, (CSVLogger, TensorBoardLogger)):
        folder = logger.log_dir
    else:
        folder = logger.save_dir
    # `fast_dev_run` stands in a logger with no folder: the run's, not the current folder.
    return os.path.join(folder or trainer.default_root_dir, "reconstructions", f"{split}_step{trainer.global_step:07d}.png")
