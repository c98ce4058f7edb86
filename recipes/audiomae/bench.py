"""How fast is this recipe's AudioMAE, and how much memory does a training step take, against the reference?

The reference is the official Audio-MAE code's model (facebookresearch/AudioMAE, `models_mae.py`) with its
global decoder (`decoder_mode=0`): the official MAE model on one-channel spectrograms, written out in
core/mae_reference.py. The paper's AudioSet runs used its local, shifted-window decoder (`decoder_mode=1`);
this recipe's decoder attends globally (README), so the global one is the reference that computes what
this recipe computes: from the same weights and noise the same loss and gradients (tests/test_audiomae.py).
The official code lays the spectrogram out as (time, frequency), 1024 x 128, and this recipe as (frequency,
time); the benchmark gives both the same (B, 1, n_mels, frames) input, the same number of patches.

Both steps start from the log-mel spectrogram: the official code computes it in the data loader's workers,
this recipe on the model's device at the start of its training step (the roll-and-scale augmentation and
torchaudio's Kaldi filterbank, `AudioMAE.spectrogram`), which the benchmark leaves out of the timing
(core.bench's: whole training steps, forward, backward, AdamW, in alternating processes).

    python -m recipes.audiomae.bench --size base --batch 8                          # ViT-B, 128 x 1024 log-mel: the paper's
    python -m recipes.audiomae.bench --size base --batch 64 --device cuda --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse

import torch

from core import bench
from core.mae_reference import ReferenceMAE, copy_weights
from recipes.audiomae.model import AudioMAE


def reference_for(model: AudioMAE) -> ReferenceMAE:
    """The reference model of the same shape as `model`."""
    h, enc = model.hparams, model.encoder
    return ReferenceMAE(
        (h.n_mels, h.n_frames), h.patch_size, 1, enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.heads,
        h.decoder_dim, h.decoder_depth, h.decoder_heads, h.mask_ratio, h.norm_pix_loss,
    )


def build(impl: str, args):
    """One training step (forward, backward, AdamW) of either model on a fixed batch of random spectrograms;
    the reference starts from our weights."""
    ours = AudioMAE(
        n_mels=args.n_mels, n_frames=args.frames, patch_size=args.patch_size, size=args.size, encoder_depth=args.depth,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
    )
    # Drawn before the reference's weights, from the same seed on both sides: one batch for both.
    spectrograms = torch.randn(args.batch, 1, args.n_mels, args.frames, device=args.device)
    model = ours if impl == "ours" else reference_for(ours)
    if impl == "reference":
        copy_weights(ours, model)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    loss = (lambda: ours.reconstruct(spectrograms)[0]) if impl == "ours" else (lambda: model(spectrograms)[0])
    return bench.training_step(loss, optimizer, args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_vit_arguments(parser, "base", decoder=(512, 16, 16))
    parser.add_argument("--n-mels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=1024)
    bench.add_arguments(parser, batch=8)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    title = (
        f"AudioMAE ViT-{args.size} (depth {args.depth or 'default'}) on {args.n_mels} x {args.frames} log-mel, "
        f"patch {args.patch_size}, decoder {args.decoder_dim}x{args.decoder_depth}"
    )
    bench.run(build, args, title)


if __name__ == "__main__":
    main()
