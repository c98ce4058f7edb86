"""Vision Transformer backbone for images, video and spectrograms.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021). Pre-norm blocks, fixed sin-cos position
embeddings (as in MAE, He et al. 2022) and a class token. The patch embedding is a strided convolution:
2D for images and spectrograms, 3D (tubelets) for video (Tong et al., "VideoMAE", 2022).

`ViT.tokens(x, keep_idx)` encodes only the kept patches, which is what makes masked autoencoders cheap:
the encoder never sees mask tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# name: (width, depth, heads), the standard sizes of DeiT/ViT.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of an N-D patch grid, flattened row-major: (prod(grid), dim).

    Each axis gets an even share of the channels (the first axis takes the remainder), and within an
    axis half the channels are sines and half cosines of geometric frequencies (Vaswani et al. 2017).
    The channels run in axis order (rows, then columns); MAE's `get_2d_sincos_pos_embed` puts the columns'
    half first, so its table is this one with the two halves swapped (swap them to load MAE's weights).
    """
    if dim % 2:
        raise ValueError(f"position embedding dim must be even, got {dim}")
    per_axis = 2 * (dim // (2 * len(grid)))
    dims = [dim - per_axis * (len(grid) - 1)] + [per_axis] * (len(grid) - 1)
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for d, pos in zip(dims, coords):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.reshape(-1, 1) * omega  # (N, d/2)
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()  # (N, dim)


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) images or (B, C, T, H, W) clips into patches and project them: (B, N, dim)."""

    def __init__(self, input_size: tuple[int, ...], patch_size: tuple[int, ...], in_chans: int, dim: int):
        super().__init__()
        if len(input_size) != len(patch_size) or len(input_size) not in (2, 3):
            raise ValueError(f"input_size {input_size} and patch_size {patch_size} must both be 2D or 3D")
        for axis, (s, p) in enumerate(zip(input_size, patch_size)):
            if s % p:
                raise ValueError(f"input size {tuple(input_size)} is not divisible by patch size {tuple(patch_size)} (axis {axis})")
        self.input_size, self.patch_size = tuple(input_size), tuple(patch_size)
        self.grid = tuple(s // p for s, p in zip(input_size, patch_size))
        self.num_patches = math.prod(self.grid)
        conv = nn.Conv2d if len(input_size) == 2 else nn.Conv3d
        self.proj = conv(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """any_size: take inputs of other sizes than input_size too, as long as the patches tile them."""
        sizes = tuple(x.shape[2:])
        if not any_size and sizes != self.input_size:
            raise ValueError(f"expected input of spatial size {self.input_size}, got {sizes}")
        if any(s % p for s, p in zip(sizes, self.patch_size)):
            raise ValueError(f"input of size {sizes} is not divisible by the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, dim, *grid) -> (B, N, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, hd)
        # The fused kernel (flash / memory-efficient attention) is the reason not to write softmax(QK^T)V by hand.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Queries from one token set attend to another (the CropMAE decoder, CLIP-style poolers)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        M = context.shape[1]
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, h, N, hd)
        k, v = self.kv(context).view(B, M, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, h, M, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def mlp(dim: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def drop_path(branch: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", 2016): in training, drop a
    residual branch (B, ...) for whole samples with probability `rate` and scale the kept ones by
    1 / (1 - rate), so the expected output is unchanged; at evaluation every branch is kept as it is."""
    if rate == 0.0 or not training:
        return branch
    keep = torch.empty(branch.shape[0], *[1] * (branch.ndim - 1), device=branch.device, dtype=branch.dtype).bernoulli_(1 - rate)
    return branch * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); each branch dropped per sample
    with probability `drop_path_rate` in training (stochastic depth, 0 unless `set_drop_path` sets it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, mlp_ratio)
        self.drop_path_rate = 0.0

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


def init_weights(module: nn.Module) -> None:
    """The MAE initialisation: xavier-uniform linears (and patch projections, as if linear), unit norms.
    Every bias starts at zero; the official MAE code leaves the patch projection's at PyTorch's default draw
    (uniform in +-1/sqrt(fan_in)), a difference of one vector at initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_trunc_normal(module: nn.Module) -> None:
    """DeiT's and DINO's initialisation: truncated-normal linears (std 0.02, zero biases; cut at +-2, their
    codes' bound, so in effect a normal), unit norms; patch projections keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth over a ViT's blocks, rising linearly from 0 at the first to `rate` at the last (the
    schedule of DeiT, DINO and MAE's fine-tuning); 0 turns it off."""
    for block, r in zip(vit.blocks, torch.linspace(0, rate, len(vit.blocks)).tolist()):
        block.drop_path_rate = r
    if hasattr(vit, "config"):  # what an export rebuilds (DINO's teacher: none, whatever its student's)
        vit.config["drop_path"] = rate


class ViT(nn.Module):
    """A ViT encoder. `forward(x)` gives one embedding per input, (B, dim); `tokens(x, keep_idx)` the tokens.

    input_size: (H, W) for images and spectrograms (mel bins, frames), (T, H, W) for video.
    patch_size: (p, p), or (t, p, p) tubelets for video.
    size: a named size (tiny/small/base/large/huge); `dim`/`depth`/`heads` override it.
    pool: "cls" (the class token, as MAE's linear probe uses) or "mean" (average of patch tokens).
    drop_path: stochastic depth, rising linearly over the blocks from 0 to this rate at the last one
    (DeiT's and DINO's schedule; DINO's ViT-S: 0.1). 0 (the default) in masked-autoencoder pretraining.
    pos_embed: "sincos" (fixed, as MAE's; `sincos_pos_embed`) or "learned" (a trained table, DeiT's and DINO's).
    init: "mae" (xavier-uniform linears, `init_weights`) or "trunc_normal" (DeiT's and DINO's, `init_trunc_normal`).
    """

    def __init__(
        self,
        input_size: tuple[int, ...] = (224, 224),
        patch_size: tuple[int, ...] = (16, 16),
        in_chans: int = 3,
        size: str = "base",
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        drop_path: float = 0.0,
        pos_embed: str = "sincos",
        init: str = "mae",
    ):
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"size={size!r} is not one of {sorted(VIT_SIZES)}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r} must be 'cls' or 'mean'")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path} must be in [0, 1)")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed={pos_embed!r} must be 'sincos' or 'learned'")
        if init not in ("mae", "trunc_normal"):
            raise ValueError(f"init={init!r} must be 'mae' or 'trunc_normal'")
        width, n_blocks, n_heads = VIT_SIZES[size]
        dim, depth, heads = dim or width, depth or n_blocks, heads or n_heads
        self.config = dict(
            input_size=list(input_size), patch_size=list(patch_size), in_chans=in_chans, size=size,
            dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, pool=pool, drop_path=drop_path,
            pos_embed=pos_embed, init=init,
        )
        self.embed_dim, self.pool = dim, pool
        self.patch_embed = PatchEmbed(tuple(input_size), tuple(patch_size), in_chans, dim)
        self.grid, self.num_patches = self.patch_embed.grid, self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(self.grid, dim).unsqueeze(0), persistent=False)
        else:  # the patches' rows only: a class token's row would just add to the learned class token
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, self.num_patches, dim), std=0.02))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        set_drop_path(self, drop_path)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if init == "mae":
            init_weights(self)
            nn.init.normal_(self.cls_token, std=0.02)
        else:
            init_trunc_normal(self)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, grid: tuple[int, ...]) -> torch.Tensor:
        """The position table (1, N, dim) of a patch grid: the ViT's own, or for another grid of a 2D input
        (a smaller crop) the table resized to it by bicubic interpolation, as DINO's `interpolate_pos_encoding`."""
        if grid == self.grid:
            return self.pos_embed
        if len(grid) != 2:
            raise ValueError(f"positions for a {grid} grid: only 2D position tables are resized, this ViT's grid is {self.grid}")
        table = self.pos_embed.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)  # (1, dim, gh, gw)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)  # (1, dim, h, w)
        return table.flatten(2).transpose(1, 2)  # (1, h * w, dim)

    def tokens(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None, any_size: bool = False) -> torch.Tensor:
        """Encode (B, C, *input_size) inputs to (B, 1 + K, dim): the class token then the K kept patches.

        keep_idx: (B, K) indices of the patches to encode (see core.masking); None keeps all N patches.
        any_size: also take 2D inputs of another size that the patches tile (DINO's local crops), their
        patches given the position table resized to their grid.
        """
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_embed.patch_size))
        x = self.patch_embed(x, any_size) + self.positions(grid)  # (B, N, dim)
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + K, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # (B, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.tokens(x))
