"""Patch masking for masked autoencoders, and the patchify that defines the reconstruction targets.

Every function returns `keep_idx` (B, K), the indices of visible patches in the order the encoder sees
them, and `mask` (B, N), True where a patch is hidden. K is the same for every sample, so visible
tokens batch without padding.
"""

from __future__ import annotations

import math

import torch


def check_ratio(name: str, ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {ratio}")


def whole(x: float) -> int:
    """floor(x) that forgives float error: 10 * (1 - 0.9) is 0.9999999999999998 and must count as 1."""
    return math.floor(x + 1e-6)


def mask_from_keep(keep_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    mask = torch.ones(keep_idx.shape[0], num_patches, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter_(1, keep_idx, False)  # (B, N), True = hidden


def random_mask(
    batch: int, num_patches: int, mask_ratio: float, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniform random masking by sorting noise (He et al., "Masked Autoencoders Are Scalable
    Vision Learners", 2022). Keeps exactly int(N * (1 - mask_ratio)) patches per sample."""
    check_ratio("mask_ratio", mask_ratio)
    keep = visible(whole(num_patches * (1 - mask_ratio)), "mask_ratio", mask_ratio, f"patch of {num_patches}")
    keep_idx = random_keep(batch, num_patches, keep, device, generator)  # (B, K)
    return keep_idx, mask_from_keep(keep_idx, num_patches)


def visible(count: int, name: str, ratio: float, of: str) -> int:
    """`count` of the visible patches (rows, places) that `name`=`ratio` leaves; raises naming the setting when none is."""
    if count < 1:
        raise ValueError(f"{name}={ratio} leaves no visible {of}")
    return count


def random_keep(batch: int, n: int, keep: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """`keep` of `n` indices drawn uniformly per sample by sorting noise, ascending: (B, keep)."""
    noise = torch.rand(batch, n, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def tube_mask(
    batch: int, grid: tuple[int, int, int], mask_ratio: float, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tube masking (Tong et al., "VideoMAE", 2022): one random spatial mask shared by every time step,
    so a hidden patch cannot be copied from the same place in a neighbouring frame. As VideoMAE's
    TubeMaskingGenerator, int(H * W * mask_ratio) places are hidden (176 of 196 at 0.9, 20 visible).

    grid: (T, H, W) tubelet grid, flattened row-major as in core.vit.PatchEmbed.
    """
    check_ratio("mask_ratio", mask_ratio)
    t, h, w = grid
    keep = visible(h * w - whole(h * w * mask_ratio), "mask_ratio", mask_ratio, f"place of {h * w}")
    spatial_keep = random_keep(batch, h * w, keep, device, generator)  # (B, Ks)
    offsets = torch.arange(t, device=spatial_keep.device) * (h * w)  # (T,)
    keep_idx = (offsets.view(1, t, 1) + spatial_keep.unsqueeze(1)).flatten(1)  # (B, T * Ks), sorted
    return keep_idx, mask_from_keep(keep_idx, t * h * w)


def time_freq_mask(
    batch: int,
    grid: tuple[int, int],
    time_mask_ratio: float,
    freq_mask_ratio: float,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured spectrogram masking (Huang et al., "Masked Autoencoders that Listen", 2022): hide whole
    frequency rows and whole time columns of the (F, T) patch grid. Exactly
    int(F * (1 - freq_mask_ratio)) * int(T * (1 - time_mask_ratio)) patches stay visible in every sample, as
    in AudioMAE's random_masking_2d."""
    check_ratio("time_mask_ratio", time_mask_ratio)
    check_ratio("freq_mask_ratio", freq_mask_ratio)
    f, t = grid
    n_f = visible(whole(f * (1 - freq_mask_ratio)), "freq_mask_ratio", freq_mask_ratio, f"frequency row of {f}")
    n_t = visible(whole(t * (1 - time_mask_ratio)), "time_mask_ratio", time_mask_ratio, f"time column of {t}")
    rows = random_keep(batch, f, n_f, device, generator)  # (B, n_f)
    cols = random_keep(batch, t, n_t, device, generator)  # (B, n_t)
    keep_idx = (rows.unsqueeze(2) * t + cols.unsqueeze(1)).flatten(1)  # (B, n_f * n_t), sorted
    return keep_idx, mask_from_keep(keep_idx, f * t)


def patchify(x: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph*pw*C), or (B, C, T, H, W) -> (B, N, pt*ph*pw*C).

    Patches are ordered like core.vit.PatchEmbed's tokens (row-major over the grid)."""
    B, C = x.shape[:2]
    sizes = x.shape[2:]
    if len(sizes) != len(patch_size) or any(s % p for s, p in zip(sizes, patch_size)):
        raise ValueError(f"input of size {tuple(sizes)} cannot be cut into patches of {tuple(patch_size)}")
    grid = [s // p for s, p in zip(sizes, patch_size)]
    split = [v for g, p in zip(grid, patch_size) for v in (g, p)]
    x = x.reshape(B, C, *split)  # (B, C, g1, p1, g2, p2, ...)
    n = len(grid)
    x = x.permute(0, *[2 + 2 * i for i in range(n)], *[3 + 2 * i for i in range(n)], 1)  # (B, g.., p.., C)
    return x.reshape(B, math.prod(grid), math.prod(patch_size) * C)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, ...], grid: tuple[int, ...], channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, prod(patch_size)*C) -> (B, C, *[g * p])."""
    B = patches.shape[0]
    n = len(grid)
    x = patches.reshape(B, *grid, *patch_size, channels)  # (B, g.., p.., C)
    order = [0, 2 * n + 1] + [v for i in range(n) for v in (1 + i, 1 + n + i)]
    x = x.permute(*order)  # (B, C, g1, p1, g2, p2, ...)
    return x.reshape(B, channels, *[g * p for g, p in zip(grid, patch_size)])
