"""How fast is this recipe's CropMAE, and how much memory does a training step take, against the reference?

The reference is the CropMAE code's model (alexandre-eymael/CropMAE, `models/SiamMAE.py` and
`models/components/DecoderBlock.py`): the official MAE model (core/mae_reference.py) whose encoder runs
once over the whole global view and once over the visible patches of the local view, and whose decoder
blocks are torch's `nn.MultiheadAttention` twice (cross-attention to the embedded global tokens, then
self-attention) and an MLP, post-norm, with dropout 0.1 on each branch and on the attention probabilities.
This recipe's decoder drops the branches only (README); with dropout off, the two compute the same loss
and gradients from the same weights and noise (tests/test_cropmae.py), so the benchmark compares one method
done two ways, each with the paper's dropout.

The official code keeps int(N * (1 - mask_ratio)) local patches, as MAE does: 2 of 196 at the paper's
0.985; this recipe keeps at least one where that gives none (32-px demo images in 4-px patches), and the
reference is given the ratio that keeps as many as this recipe does. The timing is core.bench's: whole
training steps (forward, backward, AdamW) in alternating processes.

    python -m recipes.cropmae.bench --size small --batch 16                         # ViT-S/16, 224 px: the paper's model
    python -m recipes.cropmae.bench --size small --batch 256 --device cuda --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from core import bench, mae_reference
from core.mae_reference import ReferenceMAE
from recipes.cropmae.model import CropMAE


class DecoderBlock(nn.Module):
    """The CropMAE code's decoder block (torch's TransformerDecoderLayer, batch first, post-norm, GELU, its
    blocks in the order cross-attention, MLP, self-attention)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm2(x + self.dropout2(self.multihead_attn(x, memory, memory, need_weights=False)[0]))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x))))))
        return self.norm1(x + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))


class ReferenceCropMAE(ReferenceMAE):
    """forward(global_view, local_view, noise) -> loss, predicted local patches (B, N, P), mask (B, N); `noise`
    (B, N) decides the local view's mask as in ReferenceMAE."""

    def __init__(self, *args, decoder_mlp_dim: int, decoder_dropout: float, **kwargs):
        super().__init__(*args, **kwargs)
        dim, heads, depth = self.decoder_embed.out_features, kwargs["decoder_heads"], kwargs["decoder_depth"]
        self.decoder_blocks = nn.ModuleList([DecoderBlock(dim, heads, decoder_mlp_dim, decoder_dropout) for _ in range(depth)])

    def forward(self, global_view: torch.Tensor, local_view: torch.Tensor, noise: torch.Tensor | None = None):
        context = self.encode(self.patch_embed(global_view) + self.pos_embed[:, 1:])  # (B, 1 + N, D): no masking
        x, mask, restore = self.forward_encoder(local_view, noise)  # (B, 1 + K, D)
        x = self.unshuffle(self.decoder_embed(x), restore)  # (B, 1 + N, D')
        context = self.decoder_embed(context)
        for blk in self.decoder_blocks:
            x = blk(x, context)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, P)
        return self.forward_loss(local_view, pred, mask), pred, mask


# This recipe's decoder blocks -> the reference's; elsewhere the names are core.mae_reference's.
DECODER_BLOCK_RENAMES = [
    ("decoder.blocks.", "decoder_blocks."),
    ("cross.proj.", "multihead_attn.out_proj."),
    ("attn.qkv.weight", "self_attn.in_proj_weight"),
    ("attn.qkv.bias", "self_attn.in_proj_bias"),
    ("attn.proj.", "self_attn.out_proj."),
    ("mlp.0.", "linear1."),
    ("mlp.3.", "linear2."),
    ("norm_attn.", "norm1."),
    ("norm_cross.", "norm2."),
    ("norm_mlp.", "norm3."),
]


def reference_name(name: str) -> str:
    """A parameter's name in the reference. The cross-attention's `q` and `kv` are the two parts (rows
    [:D] and [D:]) of `multihead_attn.in_proj_weight`/`in_proj_bias`: see `cross_attention_parts`."""
    if name.startswith("decoder.blocks."):
        return bench.rename(name, DECODER_BLOCK_RENAMES)
    return mae_reference.reference_name(name)


def cross_attention_parts(model: CropMAE, ref: ReferenceCropMAE):
    """(this recipe's cross-attention parameter, the reference's parameter, the rows it takes there), for
    the query and key-value projections packed in nn.MultiheadAttention's in_proj."""
    for mine, theirs in zip(model.decoder.blocks, ref.decoder_blocks):
        D = mine.cross.q.out_features
        for kind in ("weight", "bias"):
            packed = getattr(theirs.multihead_attn, f"in_proj_{kind}")
            yield getattr(mine.cross.q, kind), packed, slice(0, D)
            yield getattr(mine.cross.kv, kind), packed, slice(D, 3 * D)


def reference_for(model: CropMAE, dropout: float | None = None) -> ReferenceCropMAE:
    """The reference model of the same shape as `model`, keeping as many local patches; `dropout`: the
    decoder's, the model's when not given."""
    h, enc = model.hparams, model.encoder
    n = enc.num_patches
    mask_ratio = 1 - model.num_visible / n
    if int(n * (1 - mask_ratio)) != model.num_visible:
        raise ValueError(f"no mask ratio keeps {model.num_visible} of {n} patches by int() rounding")
    return ReferenceCropMAE(
        (h.image_size, h.image_size), h.patch_size, 3, enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.heads,
        decoder_dim=h.decoder_dim, decoder_depth=h.decoder_depth, decoder_heads=h.decoder_heads, mask_ratio=mask_ratio,
        norm_pix_loss=h.norm_pix_loss, decoder_mlp_dim=h.decoder_mlp_dim, decoder_dropout=h.decoder_dropout if dropout is None else dropout,
    )  # fmt: skip


@torch.no_grad()
def copy_weights(model: CropMAE, ref: ReferenceCropMAE) -> None:
    """Load `model`'s weights into `ref`; every reference parameter gets one."""
    packed = set()
    for mine, theirs, rows in cross_attention_parts(model, ref):
        theirs[rows].copy_(mine)
        packed.add(id(mine))
    cross = {name for name, p in model.named_parameters() if id(p) in packed}
    in_proj = {name for name, _ in ref.named_parameters() if ".multihead_attn.in_proj_" in name}
    mae_reference.copy_weights(model, ref, reference_name, skip=cross, unmatched=in_proj)


def build(impl: str, args):
    """One training step (forward, backward, AdamW) of either model on a fixed pair of random views; the
    reference starts from our weights."""
    ours = CropMAE(
        image_size=args.image_size, patch_size=args.patch_size, size=args.size, encoder_depth=args.depth,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
        decoder_mlp_dim=args.decoder_mlp_dim, decoder_dropout=args.dropout, mask_ratio=args.mask_ratio,
    )  # fmt: skip
    # Drawn before the reference's weights, from the same seed on both sides: one batch for both.
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device) for _ in range(2)]
    model = ours if impl == "ours" else reference_for(ours)
    if impl == "reference":
        copy_weights(ours, model)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    loss = (lambda: ours.reconstruct(*views)[0]) if impl == "ours" else (lambda: model(*views)[0])
    return bench.training_step(loss, optimizer, args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_vit_arguments(parser, "small", decoder=(256, 4, 8))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.985)
    parser.add_argument("--decoder-mlp-dim", type=int, default=2048)
    parser.add_argument("--dropout", type=float, default=0.1, help="the decoder's (paper: 0.1)")
    bench.add_arguments(parser, batch=16)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    title = (
        f"CropMAE ViT-{args.size} (depth {args.depth or 'default'}) on {args.image_size} px, patch {args.patch_size}, "
        f"mask {args.mask_ratio}, decoder {args.decoder_dim}x{args.decoder_depth}"
    )
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
