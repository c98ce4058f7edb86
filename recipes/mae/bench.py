"""How fast is this recipe's MAE, and how much memory does a training step take, against the reference?

The reference is the official MAE code's model (facebookresearch/mae, `models_mae.py`) as it builds it,
written out on timm's blocks in core/mae_reference.py (timm is a dev extra). `copy_weights` loads this
recipe's weights into it; with the same noise both compute the same loss and gradients (tests/test_mae.py),
so what the benchmark compares is one computation done two ways.

The benchmark (core.bench) times training steps (forward, backward, AdamW) of each model on random
images, each in a process of its own, in alternating rounds, with FLOPs and peak memory.

    python -m recipes.mae.bench --size base --batch 8                                   # ViT-B/16, 224 px: the paper's model
    python -m recipes.mae.bench --size base --batch 256 --device cuda --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse

import torch

from core import bench
from core.mae_reference import ReferenceMAE, copy_weights
from recipes.mae.model import MAE


def reference_for(model: MAE) -> ReferenceMAE:
    """The reference model of the same shape as `model`."""
    h, enc = model.hparams, model.encoder
    return ReferenceMAE(
        (h.image_size, h.image_size), h.patch_size, 3, enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.heads,
        h.decoder_dim, h.decoder_depth, h.decoder_heads, h.mask_ratio, h.norm_pix_loss,
    )


def build(impl: str, args):
    """One training step (forward, backward, AdamW) of either model on a fixed batch of random images; the
    reference starts from our weights."""
    ours = MAE(
        image_size=args.image_size, patch_size=args.patch_size, size=args.size, encoder_depth=args.depth,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
    )
    # Drawn before the reference's weights, from the same seed on both sides: one batch for both.
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    model = ours if impl == "ours" else reference_for(ours)
    if impl == "reference":
        copy_weights(ours, model)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    loss = (lambda: ours.reconstruct(images)[0]) if impl == "ours" else (lambda: model(images)[0])
    return bench.training_step(loss, optimizer, args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_vit_arguments(parser, "base", decoder=(512, 8, 16))
    parser.add_argument("--image-size", type=int, default=224)
    bench.add_arguments(parser, batch=8)
    args = parser.parse_args(argv)
    title = (
        f"MAE ViT-{args.size} (depth {args.depth or 'default'}) on {args.image_size} px, patch {args.patch_size}, "
        f"decoder {args.decoder_dim}x{args.decoder_depth}"
    )
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
