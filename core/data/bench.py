"""How fast do two-view batches come out of the data path? Samples per second from shards to finished,
normalized views, for BYOL's two-view augmentation done three ways, measured in one run:

- torchvision: torchvision's per-image ColorJitter chain in the data workers (the reference);
- worker: ``core.augment.TwoViews`` in the data workers (its batched color steps run per image there);
- device: ``TwoViews(device_color=True)``: workers crop and flip, the color steps run on each whole batch
  in the training process (here on the CPU, as ``ShardDataModule`` would on the device).

    python -m core.data.bench --train 'data/demo/image/train-{000000..000003}.tar' --size 32

The training process runs with --threads threads, as a trainer would; nothing trains, so this is the rate
the data path could feed a network that costs nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms import v2

from core.augment import IMAGENET_MEAN, IMAGENET_STD, MIN_BLUR_KERNEL, TwoViews, _image, _labelled, blur_kernel_size
from core.data import read_batches


class TorchvisionTwoViews:
    """BYOL's two views with torchvision's per-image transforms (blur p=1.0 / 0.1 when the views are large
    enough for it, as in ``TwoViews``)."""

    def __init__(self, size: int, scale: tuple[float, float]):
        kernel = blur_kernel_size(size)

        def view(blur: float, solarize: float):
            steps = [
                v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(0.2),
            ]
            steps += [v2.RandomApply([v2.GaussianBlur(kernel, (0.1, 2.0))], p=blur)] if kernel >= MIN_BLUR_KERNEL else []
            steps += [v2.RandomSolarize(128, p=solarize)] if solarize else []
            return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        self.views = [view(1.0, 0.0), view(0.1, 0.2)]

    def __call__(self, sample: dict) -> dict:
        image = _image(sample)
        return _labelled(sample, {"views": [view(image) for view in self.views]})


def samples_per_second(transform, pattern: str, batch_size: int, batches: int, workers: int) -> float:
    on_device = getattr(transform, "on_device", None)
    loader = iter(read_batches(pattern, transform, batch_size, num_workers=workers))
    next(loader)  # worker start-up is not throughput
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), loader):
        batch = on_device(batch) if on_device else batch
        seen += len(batch["views"][0])
    return seen / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="image shards (one pass must hold batches + 1 batches)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = (0.3, 1.0)
    ways = {
        "torchvision (reference)": TorchvisionTwoViews(args.size, scale),
        "worker": TwoViews(args.size, scale=scale),
        "device": TwoViews(args.size, scale=scale, device_color=True),
    }
    rates = {name: samples_per_second(t, args.train, args.batch_size, args.batches, args.workers) for name, t in ways.items()}
    reference = rates["torchvision (reference)"]
    print(f"\n| two views of {args.size} px, {args.workers} worker(s), {args.threads} threads | samples/s | vs reference |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / reference:.2f}x |")


if __name__ == "__main__":
    main()
