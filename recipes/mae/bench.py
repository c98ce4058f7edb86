"""How fast is this recipe's MAE, and how much memory does a training step take, against the reference?

The reference is the official MAE code's model (facebookresearch/mae, `models_mae.py`) as it builds it:
timm's ViT `Block` and `PatchEmbed`, masking by shuffling the tokens with an argsort of noise, and a
decoder that appends the mask tokens and unshuffles the sequence with a gather. `ReferenceMAE` below writes
that structure out on timm's blocks (timm is a dev extra). `copy_weights` loads this recipe's weights into
it; with the same noise both compute the same loss and gradients (tests/test_mae.py), so what the
benchmark compares is one computation done two ways.

The benchmark (core.bench) times training steps (forward, backward, AdamW) of each model on random
images, each in a process of its own, in alternating rounds, with FLOPs and peak memory.

    python -m recipes.mae.bench --size base --batch 8                                   # ViT-B/16, 224 px: the paper's model
    python -m recipes.mae.bench --size base --batch 256 --device cuda --precision bf16-mixed --peak-tflops 989

timm's attention uses torch's fused scaled_dot_product_attention, as this repository's does; the official
code ran on timm 0.3.2, which computed softmax(QK^T)V by hand (`TIMM_FUSED_ATTN=0` gives that back).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from core import bench
from core.masking import patchify
from recipes.mae.model import MAE


class ReferenceMAE(nn.Module):
    """The official MAE model's structure (He et al. 2022) on timm's ViT blocks. forward(images, noise)
    -> loss, predicted patches (B, N, P), mask (B, N) with 1 = hidden; `noise` (B, N) decides the mask
    (the lowest noise is kept), drawn with torch.rand when not given, as the official code draws it."""

    def __init__(self, image_size, patch_size, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads, mask_ratio=0.75, norm_pix_loss=True):
        super().__init__()
        block = partial(Block, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed sin-cos positions with a zero row for the class token, stored as frozen parameters as there.
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # (B, N, D)
        B, N, D = x.shape
        keep = int(N * (1 - self.mask_ratio))
        noise = torch.rand(B, N, device=x.device) if noise is None else noise
        shuffle = noise.argsort(dim=1)  # (B, N): kept patches first
        restore = shuffle.argsort(dim=1)
        x = x.gather(1, shuffle[:, :keep, None].expand(-1, -1, D))  # (B, K, D)
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)  # (B, N), in patch order
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)  # (B, 1 + K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))  # (B, 1 + K, D')
        hidden = self.mask_token.expand(B, N - keep, -1)
        seq = torch.cat([x[:, 1:], hidden], dim=1).gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))  # unshuffled, (B, N, D')
        x = torch.cat([x[:, :1], seq], dim=1) + self.decoder_pos_embed  # (B, 1 + N, D')
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, P)
        target = patchify(images, (self.patch_size, self.patch_size))
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask


# This recipe's parameter names -> the reference's, by the parts of the name that differ.
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


def reference_for(model: MAE) -> ReferenceMAE:
    """The reference model of the same shape as `model`."""
    h, enc = model.hparams, model.encoder
    return ReferenceMAE(
        h.image_size, h.patch_size, enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.heads,
        h.decoder_dim, h.decoder_depth, h.decoder_heads, h.mask_ratio, h.norm_pix_loss,
    )


@torch.no_grad()
def copy_weights(model: MAE, ref: ReferenceMAE) -> None:
    """Load `model`'s weights and position tables into `ref`; every reference parameter gets one."""
    bench.copy_renamed(model, ref, reference_name, unmatched={"pos_embed", "decoder_pos_embed"})
    ref.pos_embed[:, 1:].copy_(model.encoder.pos_embed)  # the class token's row stays zero
    ref.decoder_pos_embed[:, 1:].copy_(model.decoder.pos_embed)


def build(impl: str, args):
    """One training step (forward, backward, AdamW) of either model on a fixed batch of random images; the
    reference starts from our weights."""
    ours = MAE(
        image_size=args.image_size, patch_size=args.patch_size, size=args.size, encoder_depth=args.depth,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
    )
    model = ours if impl == "ours" else reference_for(ours)
    if impl == "reference":
        copy_weights(ours, model)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    loss = (lambda: ours.reconstruct(images)[0]) if impl == "ours" else (lambda: model(images)[0])
    return bench.training_step(loss, optimizer, args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", help="ViT size of the encoder (core.vit.VIT_SIZES)")
    parser.add_argument("--depth", type=int, default=None, help="encoder blocks, if not the size's")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    bench.add_arguments(parser, batch=8)
    args = parser.parse_args(argv)
    title = (
        f"MAE ViT-{args.size} (depth {args.depth or 'default'}) on {args.image_size} px, patch {args.patch_size}, "
        f"decoder {args.decoder_dim}x{args.decoder_depth}"
    )
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
