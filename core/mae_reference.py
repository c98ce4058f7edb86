"""The official MAE code's model (facebookresearch/mae, `models_mae.py`) written out on timm's ViT blocks:
the reference that the masked autoencoders' benchmarks (recipes/mae, recipes/audiomae, recipes/cropmae
`bench.py`) time the recipes against.

As the official code builds it: timm's `Block` and `PatchEmbed`, fixed sin-cos positions with a zero row
for the class token, masking by shuffling the tokens with an argsort of noise, and a decoder that appends
the mask tokens and unshuffles the sequence with a gather, then predicts pixels for every token, the class
token's included. Audio-MAE's model (facebookresearch/AudioMAE, `models_mae.py` with its global decoder,
`decoder_mode=0`) is this one on one-channel spectrograms; CropMAE's (alexandre-eymael/CropMAE, `SiamMAE.py`)
subclasses it, as here (recipes/cropmae/bench.py). `copy_weights` loads a recipe's `ViT` encoder and
`MAEDecoder` into it; each recipe's test shows that the two then compute the same loss and gradients.

timm is a dev extra; its attention uses torch's fused scaled_dot_product_attention, as this repository's
does (the official code ran on timm 0.3.2, which computed softmax(QK^T)V by hand: `TIMM_FUSED_ATTN=0`).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from core import bench
from core.masking import patchify

# A recipe's parameter names (`encoder`: core.vit.ViT, `decoder`: core.heads.MAEDecoder) -> the reference's.
RENAMES = [
    ("encoder.blocks.", "blocks."),
    ("encoder.", ""),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "decoder_pred."),
    ("decoder.mask_token", "mask_token"),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
]


def reference_name(name: str) -> str:
    return bench.rename(name, RENAMES)


class ReferenceMAE(nn.Module):
    """The official MAE model's structure (He et al. 2022). forward(images, noise) -> loss, predicted
    patches (B, N, P), mask (B, N) with 1 = hidden; `noise` (B, N) decides the mask (the lowest noise is
    kept), drawn with torch.rand when not given, as the official code draws it. image_size: (H, W)."""

    def __init__(
        self, image_size: tuple[int, int], patch_size: int, in_chans: int, dim: int, depth: int, heads: int,
        decoder_dim: int, decoder_depth: int, decoder_heads: int, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
    ):  # fmt: skip
        super().__init__()
        block = partial(Block, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
        self.patch_embed = PatchEmbed(tuple(image_size), patch_size, in_chans, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed positions stored as frozen parameters, as there.
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, K, D), positions added -> the class token and the blocks: (B, 1 + K, D)."""
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """-> encoded visible tokens (B, 1 + K, D), mask (B, N), the order that unshuffles (B, N)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # (B, N, D)
        B, N, D = x.shape
        keep = int(N * (1 - self.mask_ratio))
        noise = torch.rand(B, N, device=x.device) if noise is None else noise
        shuffle = noise.argsort(dim=1)  # (B, N): kept patches first
        restore = shuffle.argsort(dim=1)
        # repeat, not expand, as models_mae.py: gather keeps its index for the backward, and the reference's
        # memory is the official code's, a full int64 (B, K, D) index here and (B, N, D') in unshuffle.
        x = x.gather(1, shuffle[:, :keep, None].repeat(1, 1, D))  # (B, K, D)
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        return self.encode(x), mask.gather(1, restore), restore  # the mask in patch order

    def unshuffle(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Embedded visible tokens (B, 1 + K, D') -> with a mask token at every hidden place, in patch order,
        positions added: (B, 1 + N, D')."""
        B, N = restore.shape
        hidden = self.mask_token.repeat(B, N + 1 - x.shape[1], 1)
        seq = torch.cat([x[:, 1:], hidden], dim=1).gather(1, restore[..., None].repeat(1, 1, x.shape[-1]))  # (B, N, D')
        return torch.cat([x[:, :1], seq], dim=1) + self.decoder_pos_embed

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.unshuffle(self.decoder_embed(x), restore)  # (B, 1 + N, D')
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, P)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(images, (self.patch_size, self.patch_size))
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        x, mask, restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(x, restore)
        return self.forward_loss(images, pred, mask), pred, mask


@torch.no_grad()
def copy_weights(model: nn.Module, ref: ReferenceMAE, reference_name=reference_name, skip=(), unmatched=()) -> None:
    """Load a recipe's weights (`model.encoder`, and `model.decoder`'s embedding, mask token, norm and
    prediction) and position tables into `ref`; every reference parameter gets one. `reference_name`, `skip`
    and `unmatched` as in core.bench.copy_renamed, for a decoder of another structure (CropMAE's)."""
    bench.copy_renamed(model, ref, reference_name, skip=skip, unmatched={"pos_embed", "decoder_pos_embed", *unmatched})
    ref.pos_embed[:, 1:].copy_(model.encoder.pos_embed)  # the class token's row stays zero
    ref.decoder_pos_embed[:, 1:].copy_(model.decoder.pos_embed)
