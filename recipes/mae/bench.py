"""How fast is this recipe's MAE, and how much memory does a training step take, against the reference?

The reference is the official MAE code's model (facebookresearch/mae, `models_mae.py`) as it builds it:
timm's ViT `Block` and `PatchEmbed`, masking by shuffling the tokens with an argsort of noise, and a
decoder that appends the mask tokens and unshuffles the sequence with a gather. `ReferenceMAE` below writes
that structure out on timm's blocks (timm is a dev extra). `copy_weights` loads this recipe's weights into
it; with the same noise both compute the same loss and gradients (tests/test_mae.py), so what the
benchmark compares is one computation done two ways.

The benchmark times training steps (forward, backward, AdamW) of each model on random images, each in a
process of its own so that its peak memory is its own: peak CUDA memory allocated on a GPU, the rise of
the process's peak resident memory over what it held before building the model on a CPU. The rounds
alternate (reference, ours, reference, ours, ...) and each keeps its best round, so that a machine that
slows down during the run slows both alike. FLOPs per step are counted by torch's FlopCounterMode (matrix
products and attention, forward and backward); MFU is achieved FLOP/s over the device's peak, when given.

    python -m recipes.mae.bench --size base --batch 8                                   # ViT-B/16, 224 px: the paper's model
    python -m recipes.mae.bench --size base --batch 256 --device cuda --precision bf16-mixed --peak-tflops 989

timm's attention uses torch's fused scaled_dot_product_attention, as this repository's does; the official
code ran on timm 0.3.2, which computed softmax(QK^T)V by hand (`TIMM_FUSED_ATTN=0` gives that back).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core.masking import patchify
from recipes.mae.model import MAE


class ReferenceMAE(nn.Module):
    """The official MAE model's structure (He et al. 2022) on timm's ViT blocks. forward(images, noise)
    -> loss, predicted patches (B, N, P), mask (B, N) with 1 = hidden; `noise` (B, N) decides the mask
    (the lowest noise is kept), drawn with torch.rand when not given, as the official code draws it."""

    def __init__(self, image_size, patch_size, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads, mask_ratio=0.75, norm_pix_loss=True):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

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
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


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
    params = dict(ref.named_parameters())
    unset = set(params)
    for name, value in model.named_parameters():
        params[reference_name(name)].copy_(value)
        unset.discard(reference_name(name))
    for table, source in (("pos_embed", model.encoder.pos_embed), ("decoder_pos_embed", model.decoder.pos_embed)):
        params[table][:, 1:].copy_(source)  # the class token's row stays zero
        unset.discard(table)
    if unset:
        raise RuntimeError(f"reference parameters without a counterpart: {sorted(unset)}")


def build(impl: str, args) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The model and its training loss on a batch of images; the reference starts from our weights."""
    ours = MAE(
        image_size=args.image_size, patch_size=args.patch_size, size=args.size, encoder_depth=args.depth,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
    )
    if impl == "ours":
        return ours, lambda images: ours.reconstruct(images)[0]
    ref = reference_for(ours)
    copy_weights(ours, ref)
    return ref, lambda images: ref(images)[0]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(impl: str, args) -> dict:
    """Time `args.steps` training steps of one implementation after `args.warmup`; runs in its own process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resident_bytes()
    model, loss_of = build(impl, args)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def step():
        with autocast:
            loss = loss_of(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"impl": impl, "seconds_per_step": seconds, "flops_per_step": counter.get_total_flops(), "peak_memory_bytes": peak}


def run_isolated(impl: str, args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (impl, args))


def compare(args) -> dict:
    """Best round of each implementation, and ours over the reference."""
    best, rounds = {}, {"reference": [], "ours": []}
    for _ in range(args.rounds):
        for impl in rounds:
            result = run_isolated(impl, args)
            rounds[impl].append(result["seconds_per_step"])
            if impl not in best or result["seconds_per_step"] < best[impl]["seconds_per_step"]:
                best[impl] = result
    for impl, result in best.items():
        result["rounds_seconds_per_step"] = rounds[impl]
        result["images_per_second"] = args.batch / result["seconds_per_step"]
        result["tflops"] = result["flops_per_step"] / result["seconds_per_step"] / 1e12
        result["mfu"] = result["tflops"] / args.peak_tflops if args.peak_tflops else None
    ours, ref = best["ours"], best["reference"]
    ratios = {
        "time": ours["seconds_per_step"] / ref["seconds_per_step"],
        "memory": ours["peak_memory_bytes"] / ref["peak_memory_bytes"],
        "flops": ours["flops_per_step"] / ref["flops_per_step"],
    }
    return {"setup": vars(args), "reference": ref, "ours": ours, "ours_over_reference": ratios}


def table(report: dict) -> str:
    s = report["setup"]
    memory = "peak CUDA memory" if s["device"].startswith("cuda") else "peak RSS rise"
    lines = [
        f"MAE ViT-{s['size']} (depth {s['depth'] or 'default'}) on {s['image_size']} px, patch {s['patch_size']}, decoder "
        f"{s['decoder_dim']}x{s['decoder_depth']}, batch {s['batch']}, {s['precision']}, {s['device']}; best of "
        f"{s['rounds']} rounds of {s['steps']} steps",
        f"| model | s/step | images/s | GFLOP/step | TFLOP/s | MFU | {memory} (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("reference", "ours"):
        r = report[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {r['seconds_per_step']:.3f} | {r['images_per_second']:.1f} | {r['flops_per_step'] / 1e9:.1f} | "
            f"{r['tflops']:.2f} | {mfu} | {r['peak_memory_bytes'] / 1e9:.2f} |"
        )
    spread = "; ".join(f"{name} " + ", ".join(f"{t:.3f}" for t in report[name]["rounds_seconds_per_step"]) for name in ("reference", "ours"))
    lines.append(f"s/step by round: {spread}")
    q = report["ours_over_reference"]
    lines.append(f"ours / reference: time {q['time']:.2f}x, memory {q['memory']:.2f}x, FLOPs {q['flops']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", help="ViT size of the encoder (core.vit.VIT_SIZES)")
    parser.add_argument("--depth", type=int, default=None, help="encoder blocks, if not the size's")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak at this precision, for MFU (H100/H200 SXM bf16 dense: 989)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = compare(args)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
