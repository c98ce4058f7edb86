"""Time and peak memory of a recipe's training step against a reference implementation of the same method.

A recipe's `bench.py` supplies `build(impl, args)`, which builds one implementation ("reference" or "ours")
on `args.device` with its optimizer and a fixed batch and returns a function that runs one training step
(forward, backward, optimizer step and whatever else the method does per step, e.g. an EMA update). This
module times those steps, each implementation in a process of its own so that its peak memory is its own:
peak CUDA memory allocated on a GPU, the rise of the process's peak resident memory over what it held
before building the model on a CPU. The rounds alternate (reference, ours, reference, ours, ...) and each
implementation keeps its best round, so that a machine that slows down during the run slows both alike.
FLOPs per step are counted by torch's FlopCounterMode (matrix products, convolutions and attention, forward
and backward); MFU is achieved FLOP/s over the device's peak, when given.

A bench module imports its reference's packages (timm, lightly) at module level: both processes then hold
them before the memory baseline, which would otherwise charge their import (20-odd MB) to the reference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import warnings
from collections.abc import Callable, Collection

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.resnet import ResNet

IMPLS = ("reference", "ours")
Build = Callable[[str, argparse.Namespace], Callable[[], None]]


def add_arguments(parser: argparse.ArgumentParser, batch: int) -> None:
    """The timing options every benchmark takes; `batch` is the default batch size."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak at this precision, for MFU (H100/H200 SXM bf16 dense: 989)")
    parser.add_argument("--json", help="also write the report here")


def training_step(
    loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    args,
    before_step: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """One step: `loss()` under autocast when `args.precision` is bf16-mixed, backward, `before_step()`
    (gradient clipping, say), the optimizer's step, then `after()` (an EMA update, say)."""
    device_type = torch.device(args.device).type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        if after is not None:
            after()

    step.optimizer = optimizer  # what a test checks the step moved
    return step


def add_vit_arguments(parser: argparse.ArgumentParser, size: str, decoder: tuple[int, int, int]) -> None:
    """The encoder and decoder options of the masked autoencoders' benchmarks, with the recipe's paper model
    as the defaults: the encoder's named `size` and the decoder's (width, depth, heads)."""
    dim, depth, heads = decoder
    parser.add_argument("--size", default=size, help="ViT size of the encoder (core.vit.VIT_SIZES)")
    parser.add_argument("--depth", type=int, default=None, help="encoder blocks, if not the size's")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--decoder-dim", type=int, default=dim)
    parser.add_argument("--decoder-depth", type=int, default=depth)
    parser.add_argument("--decoder-heads", type=int, default=heads)


def add_resnet_arguments(parser: argparse.ArgumentParser, image_size: bool = True) -> None:
    """The backbone options of the siamese benchmarks; the defaults are the demos' ResNet-18 of width 32.
    image_size: also the views' side (DINO's benchmark has its crop sizes instead)."""
    parser.add_argument("--depth", type=int, default=18, help="ResNet depth (18, 34, 50)")
    parser.add_argument("--width", type=int, default=32, help="channels of the ResNet's first stage (paper: 64)")
    parser.add_argument("--small-images", action="store_true", help="the CIFAR stem (3x3 conv, no max-pool)")
    if image_size:
        parser.add_argument("--image-size", type=int, default=32)


def resnet_and_views(args) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A core.resnet.ResNet as `add_resnet_arguments` set it, and a fixed pair of random views on the device."""
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device) for _ in range(2)]
    return resnet(args), views


def resnet(args) -> ResNet:
    return ResNet(depth=args.depth, width=args.width, small_images=args.small_images)


def resnet_title(args, pixels: str | None = None) -> str:
    """`pixels`: what the views are, when not `args.image_size`."""
    stem = "CIFAR stem" if args.small_images else "ImageNet stem"
    return f"ResNet-{args.depth} of width {args.width} ({stem}) on {pixels or f'{args.image_size} px'}"


def recipe_step(module, batch: dict, make_optimizer: Callable, args, **hooks) -> Callable[[], None]:
    """A recipe's own `training_step(batch, 0)` as the loss of `training_step`, outside a Trainer (its
    `self.log` calls are dropped); `make_optimizer(module)` builds the optimizer once it is on the device."""
    warnings.filterwarnings("ignore", message=".*self.log.*")
    module.to(args.device)
    return training_step(lambda: module.training_step(batch, 0), make_optimizer(module), args, **hooks)


def reference_step(reference, ours, reference_name: Callable[[str], str], loss: Callable, make_optimizer: Callable, args, **hooks) -> Callable[[], None]:
    """The reference's step from `ours`'s weights (`copy_renamed`): `loss(reference)` as the loss of
    `training_step`; `make_optimizer(reference)` builds the optimizer once it is on the device."""
    copy_renamed(ours, reference, reference_name)
    reference.to(args.device)
    return training_step(lambda: loss(reference), make_optimizer(reference), args, **hooks)


def rename(name: str, renames: list[tuple[str, str]]) -> str:
    """A parameter's name in the reference: each (old, new) part replaced in turn."""
    for old, new in renames:
        name = name.replace(old, new)
    return name


@torch.no_grad()
def copy_renamed(
    model: torch.nn.Module, reference: torch.nn.Module, reference_name: Callable[[str], str], skip: Collection[str] = (), unmatched: Collection[str] = ()
) -> None:
    """Copy each parameter of `model` (but those named in `skip`) into the reference's parameter named
    `reference_name(name)`; every reference parameter but those named in `unmatched` must get one."""
    params = dict(reference.named_parameters())
    unset, source = set(params) - set(unmatched), {}
    for name, value in model.named_parameters():
        if name in skip:
            continue
        target = reference_name(name)
        # copy_ broadcasts: a (1, 4) weight would fill a (3, 4) one without an error.
        if target not in params:
            raise RuntimeError(f"{name!r} maps to the reference's {target!r}, which it does not have")
        if target in source:
            raise RuntimeError(f"{name!r} and {source[target]!r} both map to the reference's {target!r}")
        if params[target].shape != value.shape:
            raise RuntimeError(f"{name!r} {tuple(value.shape)} maps to the reference's {target!r} {tuple(params[target].shape)}")
        params[target].copy_(value)
        source[target] = name
        unset.discard(target)
    if unset:
        raise RuntimeError(f"reference parameters without a counterpart: {sorted(unset)}")


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (`VmRSS`), or its peak (`VmHWM`) since `reset_peak_resident`: one source
    for both (`ru_maxrss` lags `/proc/self/statm`, and a step that allocates little read a negative rise)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_resident() -> None:
    """Set the peak (`VmHWM`) back to what is resident now (Linux 4.0 and later), so that it is this step's,
    not the imports'."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(build: Build, impl: str, args) -> dict:
    """Time `args.steps` training steps of one implementation after `args.warmup`; runs in its own process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_resident()
    before = resident_bytes()
    step = build(impl, args)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident_bytes("VmHWM") - before
    return {"impl": impl, "seconds_per_step": seconds, "flops_per_step": counter.get_total_flops(), "peak_memory_bytes": peak}


def run_isolated(build: Build, impl: str, args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (build, impl, args))


def compare(build: Build, args) -> dict:
    """Best round of each implementation, and ours over the reference."""
    best, rounds = {}, {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
        for impl in IMPLS:
            result = run_isolated(build, impl, args)
            rounds[impl].append(result["seconds_per_step"])
            if impl not in best or result["seconds_per_step"] < best[impl]["seconds_per_step"]:
                best[impl] = result
    for impl, result in best.items():
        result["rounds_seconds_per_step"] = rounds[impl]
        result["samples_per_second"] = args.batch / result["seconds_per_step"]
        result["tflops"] = result["flops_per_step"] / result["seconds_per_step"] / 1e12
        result["mfu"] = result["tflops"] / args.peak_tflops if args.peak_tflops else None
    ours, ref = best["ours"], best["reference"]
    ratios = {
        "time": ours["seconds_per_step"] / ref["seconds_per_step"],
        "memory": ours["peak_memory_bytes"] / ref["peak_memory_bytes"] if ref["peak_memory_bytes"] > 0 else None,
        "flops": ours["flops_per_step"] / ref["flops_per_step"],
    }
    return {"setup": vars(args), "reference": ref, "ours": ours, "ours_over_reference": ratios}


def table(report: dict, title: str) -> str:
    s = report["setup"]
    memory = "peak CUDA memory" if s["device"].startswith("cuda") else "peak RSS rise"
    lines = [
        f"{title}, batch {s['batch']}, {s['precision']}, {s['device']}; best of {s['rounds']} rounds of {s['steps']} steps",
        f"| model | s/step | samples/s | GFLOP/step | TFLOP/s | MFU | {memory} (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in IMPLS:
        r = report[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {r['seconds_per_step']:.3f} | {r['samples_per_second']:.1f} | {r['flops_per_step'] / 1e9:.1f} | "
            f"{r['tflops']:.2f} | {mfu} | {r['peak_memory_bytes'] / 1e9:.2f} |"
        )
    spread = "; ".join(f"{name} " + ", ".join(f"{t:.3f}" for t in report[name]["rounds_seconds_per_step"]) for name in IMPLS)
    lines.append(f"s/step by round: {spread}")
    q = report["ours_over_reference"]
    memory = f"{q['memory']:.2f}x" if q["memory"] is not None else "-"  # a reference whose peak did not rise
    lines.append(f"ours / reference: time {q['time']:.2f}x, memory {memory}, FLOPs {q['flops']:.2f}x")
    return "\n".join(lines)


def run(build: Build, args, title: str) -> dict:
    """Compare, print the table, write the JSON report if asked."""
    report = compare(build, args)
    print(table(report, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report
