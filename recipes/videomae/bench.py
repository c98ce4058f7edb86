"""How fast is this recipe's VideoMAE, and how much memory does a training step take, against the reference?

The reference is the official VideoMAE code's model (MCG-NJU/VideoMAE, `modeling_pretrain.py`, with the
targets and loss of `engine_for_pretraining.py`): a 3D convolution cuts the tubelets, the visible tokens
are picked by boolean indexing with the mask that comes with the batch (`x[~mask]`), there is no class
token, the decoder runs over the visible tokens followed by a mask token for every hidden one and predicts
pixels for the hidden ones only, and the targets are the un-normalised clip's tubelets, each normalised per
channel. `ReferenceVideoMAE` writes that structure out on timm's ViT blocks (timm is a dev extra). Its
attention has a key bias, which VideoMAE leaves out (the softmax cancels it; the cost is one bias add).

This recipe's VideoMAE differs in two ways that cost compute: a class token in the encoder and decoder
(one token more; see README), and a decoder that predicts pixels for every token (the visible ones'
predictions are dropped by the loss). With a class token added (`class_token=True`, for the test only) and
this recipe's weights and mask, the reference computes the same loss, predictions and gradients
(tests/test_videomae.py), so the benchmark compares one method done two ways; it runs the reference as
VideoMAE builds it, without the class token. The timing itself is core.bench's.

    python -m recipes.videomae.bench --size base --batch 4             # ViT-B, 16 x 224 x 224, tubelets 2x16x16: the paper's
    python -m recipes.videomae.bench --size base --batch 64 --device cuda --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from core import bench
from core.augment import IMAGENET_MEAN, IMAGENET_STD
from recipes.videomae.model import VideoMAE


class ReferenceVideoMAE(nn.Module):
    """The official VideoMAE model's structure (Tong et al. 2022) on timm's ViT blocks. forward(videos, mask)
    -> loss, predicted hidden tubelets (B, M, P); videos (B, 3, T, H, W) normalised by ImageNet's mean and
    std, mask (B, N) bool with True where hidden and the same count M in every row, as the data loader's
    tube masks come."""

    def __init__(self, num_frames, image_size, patch_size, tubelet_size, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads, class_token=False):
        super().__init__()
        block = partial(Block, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.patch = (tubelet_size, patch_size, patch_size)
        n = (num_frames // tubelet_size) * (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv3d(3, dim, kernel_size=self.patch, stride=self.patch)
        # Fixed tables, buffers as there. VideoMAE's are 1D sinusoids over the flattened tubelets;
        # `copy_weights` puts this recipe's in (the cost is the same).
        self.register_buffer("pos_embed", torch.zeros(1, n, dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, n, decoder_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.blocks = nn.ModuleList([block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.encoder_to_decoder = nn.Linear(dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, tubelet_size * patch_size**2 * 3)

    def forward(self, videos: torch.Tensor, mask: torch.Tensor):
        x = self.patch_embed(videos).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        B, _, D = x.shape
        x = x[~mask].reshape(B, -1, D)  # (B, K, D): the visible tubelets
        K = x.shape[1]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.encoder_to_decoder(self.norm(x))  # (B, [1 +] K, D')
        pos = self.decoder_pos_embed.expand(B, -1, -1)
        C = x.shape[-1]
        hidden = pos[mask].reshape(B, -1, C)  # (B, M, D')
        x = torch.cat([x[:, :-K], x[:, -K:] + pos[~mask].reshape(B, K, C), self.mask_token + hidden], dim=1)  # (B, [1 +] N, D')
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.head(self.decoder_norm(x[:, -hidden.shape[1]:]))  # (B, M, P): the hidden tubelets only
        with torch.no_grad():  # the targets: the clip back in pixels, each tubelet normalised per channel
            mean = torch.tensor(IMAGENET_MEAN, device=videos.device).view(1, 3, 1, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=videos.device).view(1, 3, 1, 1, 1)
            clip = videos * std + mean
            (pt, ph, pw), (T, H, W) = self.patch, videos.shape[2:]
            tubelets = clip.reshape(B, 3, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
            tubelets = tubelets.reshape(B, -1, pt * ph * pw, 3)  # (B, N, pt*ph*pw, 3): 'b (t h w) (p0 p1 p2) c'
            tubelets = (tubelets - tubelets.mean(dim=-2, keepdim=True)) / (tubelets.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
            labels = tubelets.flatten(2)[mask].reshape(B, -1, pred.shape[-1])  # (B, M, P)
        return F.mse_loss(pred, labels), pred


# This recipe's parameter names -> the reference's.
RENAMES = [
    ("encoder.patch_embed.proj.", "patch_embed."),
    ("encoder.", ""),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.embed.", "encoder_to_decoder."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "head."),
    ("decoder.mask_token", "mask_token"),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
]


def reference_name(name: str) -> str:
    return bench.rename(name, RENAMES)


def reference_for(model: VideoMAE, class_token: bool = False) -> ReferenceVideoMAE:
    """The reference model of the same shape as `model`."""
    h, enc = model.hparams, model.encoder
    return ReferenceVideoMAE(
        h.num_frames, h.image_size, h.patch_size, h.tubelet_size, enc.embed_dim, len(enc.blocks),
        enc.blocks[0].attn.heads, h.decoder_dim, h.decoder_depth, h.decoder_heads, class_token,
    )


@torch.no_grad()
def copy_weights(model: VideoMAE, ref: ReferenceVideoMAE) -> None:
    """Load `model`'s weights and position tables into `ref`; every reference parameter gets one. VideoMAE's
    encoder-to-decoder projection has no bias: this recipe's starts at zero, and must still be zero."""
    if model.decoder.embed.bias.any():
        raise ValueError("the reference's encoder_to_decoder has no bias; this model's decoder.embed.bias is not zero")
    skip = {"decoder.embed.bias"} | (set() if ref.cls_token is not None else {"encoder.cls_token"})
    bench.copy_renamed(model, ref, reference_name, skip)
    ref.pos_embed.copy_(model.encoder.pos_embed)
    ref.decoder_pos_embed.copy_(model.decoder.pos_embed)


def build(impl: str, args):
    """One training step (forward, backward, AdamW) of either model on a fixed batch of random clips; the
    reference starts from our weights and takes a tube mask with the batch, as its data loader gives it."""
    ours = VideoMAE(
        num_frames=args.frames, image_size=args.image_size, patch_size=args.patch_size, tubelet_size=args.tubelet_size,
        size=args.size, encoder_depth=args.depth, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads,
    )
    # Drawn before the reference's weights, from the same seed on both sides: one batch for both.
    videos = torch.randn(args.batch, 3, args.frames, args.image_size, args.image_size, device=args.device)
    model = ours if impl == "ours" else reference_for(ours)
    if impl == "reference":
        copy_weights(ours, model)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    mask = ours.mask(args.batch, args.device)[1]
    loss = (lambda: ours.reconstruct(videos)[0]) if impl == "ours" else (lambda: model(videos, mask)[0])
    return bench.training_step(loss, optimizer, args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_vit_arguments(parser, "base", decoder=(384, 4, 6))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tubelet-size", type=int, default=2)
    bench.add_arguments(parser, batch=4)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    title = (
        f"VideoMAE ViT-{args.size} (depth {args.depth or 'default'}) on {args.frames} x {args.image_size} px, tubelets "
        f"{args.tubelet_size}x{args.patch_size}x{args.patch_size}, decoder {args.decoder_dim}x{args.decoder_depth}"
    )
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
