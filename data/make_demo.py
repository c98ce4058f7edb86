"""Build the offline demo shards: image, video, audio and text, deterministically from a seed.

    python data/make_demo.py --out data/demo --seed 0                  # everything (~30 s on 2 cores)
    python data/make_demo.py --out /tmp/demo --only image,audio --scale 0.05
    python data/make_demo.py --out /tmp/demo-plain --only image,video --plain       # a diagnostic set, not the demo

Writes ``<out>/<modality>/{train,val}-%06d.tar`` (text: ``<out>/text/{prose,code}/...``) and an ``info.json``
per modality with the classes, counts, sizes and brace patterns of the shards. Every sample is rendered from
its own generator seeded by (seed, modality, split, index), so the output does not depend on the number of
worker processes; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import time
from multiprocessing import Pool

import numpy as np

import demo_audio
import demo_image
import demo_text
import demo_video
from core.data.write import brace_pattern, write_shards

# modality -> (classes, sample function (rng, label) -> members, samples per split, what the members hold)
LABELED = {
    "image": (
        demo_image.CLASSES,
        demo_image.image_sample,
        {"train": 10_000, "val": 2_000},
        {"png": f"{demo_image.SIZE}x{demo_image.SIZE} RGB image", "txt": "caption", "json": "rendering parameters"},
    ),
    "video": (
        demo_video.CLASSES,
        demo_video.video_sample,
        {"train": 2_000, "val": 500},
        {
            "mp4": f"{demo_video.FRAMES} frames {demo_video.SIZE}x{demo_video.SIZE} at {demo_video.FPS} fps, H.264",
            "txt": "caption",
            "json": "rendering parameters",
        },
    ),
    "audio": (
        demo_audio.CLASSES,
        demo_audio.audio_sample,
        {"train": 4_000, "val": 1_000},
        {
            "flac": f"{demo_audio.SECONDS:g} s mono at {demo_audio.SAMPLE_RATE} Hz, 16 bit",
            "txt": "caption",
            "json": "synthesis parameters",
        },
    ),
}
MODALITIES = (*LABELED, "text")
PLAIN = ("image", "video")  # the sets --plain draws on a flat background without clutter
SPLITS = ("train", "val")
# Several shards per split, so that every rank of a small multi-process run gets whole shards.
SHARDS = {"train": 4, "val": 2}


def encode_member(value) -> bytes:
    """Member bytes: text as utf-8, dicts as sorted JSON (stable bytes), integers as ascii digits."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if isinstance(value, int):
        return str(value).encode("ascii")
    raise TypeError(f"cannot store a {type(value).__name__} as a shard member")


def encode_sample(sample: dict) -> dict:
    return {k: v if k.startswith("__") else encode_member(v) for k, v in sample.items()}


def balanced_label(index: int, num_classes: int) -> int:
    return index % num_classes


def labeled_sample(task: tuple[int, str, str, int, dict]) -> dict:
    """Render sample ``index`` of ``split`` of ``modality``: its own generator, a balanced label, a unique key.
    ``options`` are keyword arguments of the modality's sample function (``plain`` for images and videos)."""
    seed, modality, split, index, options = task
    classes, make_sample, _, _ = LABELED[modality]
    rng = np.random.default_rng([seed, MODALITIES.index(modality), SPLITS.index(split), index])
    label = balanced_label(index, len(classes))
    return encode_sample({"__key__": f"{split}-{index:06d}", "cls": label, **make_sample(rng, label, **options)})


def write_split(samples, directory: str, split: str, count: int) -> dict:
    """Write ``count`` samples into SHARDS[split] shards (fewer if there are fewer samples); return their summary."""
    pattern = os.path.join(directory, f"{split}-%06d.tar")
    for stale in glob.glob(os.path.join(directory, f"{split}-*.tar")):  # from an earlier build at another scale
        os.remove(stale)
    summary = write_shards(samples, pattern, max_count=math.ceil(count / SHARDS[split]), mtime=0)
    return {
        "pattern": os.path.basename(brace_pattern(pattern, summary["shards"])),  # beside info.json: any --out gives the same file
        "samples": summary["samples"],
        "shards": summary["shards"],
        "bytes": summary["bytes"],
    }


def write_info(directory: str, info: dict) -> None:
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def split_count(full: int, scale: float) -> int:
    return max(1, math.ceil(full * scale))


def report(name: str, split: str, summary: dict) -> None:
    size = f"{summary['bytes'] / 1e6:6.1f} MB"
    print(f"{name:>5} {split:>5}: {summary['samples']:6d} samples, {summary['shards']} shards, {size}")


def build_labeled(pool: Pool, out: str, modality: str, seed: int, scale: float, options: dict) -> dict:
    classes, _, full_counts, members = LABELED[modality]
    directory = os.path.join(out, modality)
    info = {"modality": modality, "seed": seed, "classes": classes, "members": {"cls": "class index", **members}}
    if options:
        info["options"] = options
    info["splits"] = {}
    for split in SPLITS:
        count = split_count(full_counts[split], scale)
        tasks = [(seed, modality, split, i, options) for i in range(count)]
        # imap keeps the task order, so the shards come out the same whatever the number of workers.
        info["splits"][split] = write_split(pool.imap(labeled_sample, tasks, chunksize=16), directory, split, count)
        labels = [balanced_label(i, len(classes)) for i in range(count)]
        info["splits"][split]["samples_per_class"] = [labels.count(c) for c in range(len(classes))]
    write_info(directory, info)
    return info


def build_text(out: str, seed: int, scale: float) -> dict:
    """Both text domains; the seed shuffles the order of the chunks within each split."""
    info = {"modality": "text", "seed": seed, "members": {"txt": "document chunk", "json": "source and chunk index"}}
    info["domains"] = {}
    sources = {"prose": demo_text.prose_documents, "code": demo_text.code_documents}
    for domain, documents in sources.items():
        splits = demo_text.text_samples(domain, documents())
        info["domains"][domain] = {}
        for split in SPLITS:
            samples = splits[split]
            random.Random(f"{seed}/{domain}/{split}").shuffle(samples)
            samples = samples[: split_count(len(samples), scale)]  # slicing past the end keeps all
            directory = os.path.join(out, "text", domain)
            info["domains"][domain][split] = write_split(map(encode_sample, samples), directory, split, len(samples))
    write_info(os.path.join(out, "text"), info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(MODALITIES), help=f"comma-separated subset of {MODALITIES}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sample count (e.g. 0.02 for tests)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="images and videos on a flat background without clutter: a diagnostic set, not the demo",
    )
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MODALITIES))
    if unknown:
        parser.error(f"--only: unknown modality {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    if args.plain and os.path.realpath(args.out) == os.path.realpath(os.path.join(os.path.dirname(__file__), "demo")):
        parser.error(f"--plain would overwrite the demo sets in {args.out}: pass another --out")

    start = time.time()
    with Pool(args.workers) as pool:
        # The text corpus needs no pool: build it in one worker while the others render.
        text = pool.apply_async(build_text, (args.out, args.seed, args.scale)) if "text" in only else None
        for modality in (m for m in LABELED if m in only):
            options = {"plain": True} if modality in PLAIN and args.plain else {}
            info = build_labeled(pool, args.out, modality, args.seed, args.scale, options)
            for split, summary in info["splits"].items():
                report(modality, split, summary)
        if text is not None:
            for domain, splits in text.get()["domains"].items():
                for split, summary in splits.items():
                    report(domain, split, summary)
    print(f"done in {time.time() - start:.1f} s: {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
