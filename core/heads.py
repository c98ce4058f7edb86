"""Heads that sit on top of a backbone: projection/prediction MLPs and the masked-autoencoder decoder."""

from __future__ import annotations

import torch
from torch import nn

from core.vit import Block, init_weights, sincos_pos_embed


def feature_dim(backbone: nn.Module) -> int:
    """The width of a backbone's pooled features, which the heads on top of it take; a clear error for a
    backbone without an integer ``embed_dim`` (core.resnet.ResNet, core.vit.ViT and core.text encoders have one)."""
    dim = getattr(backbone, "embed_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"backbone {type(backbone).__name__} must have an integer embed_dim (core.resnet.ResNet, core.vit.ViT)")
    return dim


def mlp_head(
    dims: list[int], batch_norm: bool = True, last_batch_norm: bool = False, last_affine: bool = True
) -> nn.Sequential:
    """Linear layers of widths dims[0] -> dims[1] -> ... -> dims[-1], with BatchNorm + ReLU between them.

    BYOL's projector and predictor are [d, 4096, 256] (Grill et al. 2020); SimSiam's projector is
    [d, 2048, 2048, 2048] with a non-affine BatchNorm on its output (Chen & He 2021); Barlow Twins and
    VICReg use [d, 8192, 8192, 8192].
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP head needs at least input and output widths, got {dims}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=not (batch_norm and not last) and not (last and last_batch_norm)))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_batch_norm:
            layers.append(nn.BatchNorm1d(d_out, affine=last_affine))
    return nn.Sequential(*layers)


def scatter_visible(visible: torch.Tensor, keep_idx: torch.Tensor, mask_token: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The full token sequence of a masked autoencoder's decoder: (B, K, D) visible tokens back at their
    places `keep_idx` (B, K), the shared `mask_token` (1, 1, D) at every hidden place. Returns (B, N, D).
    Under autocast the visible tokens come out of a linear layer in bf16 while the token stays float32."""
    B, _, D = visible.shape
    full = mask_token.to(visible.dtype).expand(B, num_patches, D).clone()  # (B, N, D)
    return full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, D), visible)


class MAEDecoder(nn.Module):
    """The light transformer decoder of MAE (He et al. 2022; paper: 512 wide, 8 deep, 16 heads).

    It embeds the encoder's visible tokens, puts a shared learnable mask token at every hidden position,
    adds fixed sin-cos positions and predicts the pixels of every patch.
    """

    def __init__(self, grid: tuple[int, ...], encoder_dim: int, patch_dim: int, dim: int = 512, depth: int = 8, heads: int = 16):
        super().__init__()
        self.num_patches = 1
        for g in grid:
            self.num_patches *= g
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(tuple(grid), dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """tokens: (B, 1 + K, encoder_dim), class token first; keep_idx: (B, K). Returns (B, N, patch_dim)."""
        x = self.embed(tokens)  # (B, 1 + K, dim)
        full = scatter_visible(x[:, 1:], keep_idx, self.mask_token, self.num_patches)  # (B, N, dim)
        x = torch.cat([x[:, :1], full + self.pos_embed], dim=1)  # (B, 1 + N, dim)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x)[:, 1:])  # (B, N, patch_dim)
