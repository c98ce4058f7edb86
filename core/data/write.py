"""Write samples into WebDataset tar shards.

A sample is a dict: ``{"__key__": "000042", "jpg": b"...", "cls": b"3", "txt": b"a red circle"}``.
Each member is stored as ``<key>.<extension>``; readers pick a decoder by the extension.

As a tool, it turns folders of media, caption tables (CSV/JSONL) or text files into shards::

    python -m core.data.write --out out/train-%06d.tar folder photos/          # class sub-folders -> labels
    python -m core.data.write --out out/train-%06d.tar table captions.csv      # path,caption[,label]
    python -m core.data.write --out out/train-%06d.tar text corpus/ --per-line

Media bytes are stored as they are (no re-encoding). Keys come from the relative path (folders, text) or
the row number (tables), so they are stable across runs and unique.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import random
import re
from typing import Iterable, Iterator

import webdataset as wds

from core.data.decoders import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, member_extension


def write_shards(
    samples: Iterable[dict], pattern: str, max_count: int = 10_000, max_bytes: int = 1 << 30, mtime: float | None = None
) -> dict:
    """Write ``samples`` to shards named by ``pattern`` (e.g. ``out/train-%06d.tar``).

    A new shard starts when the current one holds ``max_count`` samples or ``max_bytes`` bytes. ``mtime`` stamps
    every member (default: now); a fixed value makes the same samples give byte-identical shards.
    Returns a summary: number of samples, shards, bytes and the extensions seen.
    """
    os.makedirs(os.path.dirname(os.path.abspath(pattern)), exist_ok=True)
    n, extensions = 0, set()
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=mtime) as sink:
        for sample in samples:
            sink.write(sample)
            extensions.update(k for k in sample if not k.startswith("__"))
            n += 1
        shards = sink.shard
    files = [pattern % i for i in range(shards)]
    return {
        "samples": n,
        "shards": len(files),
        "bytes": sum(os.path.getsize(f) for f in files if os.path.exists(f)),
        "extensions": sorted(extensions),
        "files": files,
    }


MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | AUDIO_EXTENSIONS | VIDEO_EXTENSIONS
MEDIA_KINDS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS, "any": MEDIA_EXTENSIONS}


def sample_key(name: str) -> str:
    """A tar-safe key from a relative path: readers split members at the first dot, so only ``[A-Za-z0-9_-]``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def media_member(path: str) -> dict[str, bytes]:
    """``{extension: file bytes}`` for a media file, stored as-is (no re-encoding)."""
    ext = member_extension(path)
    if ext not in MEDIA_EXTENSIONS:
        raise ValueError(f"{path}: .{ext} is not a media extension ({', '.join(sorted(MEDIA_EXTENSIONS))})")
    with open(path, "rb") as f:
        return {ext: f.read()}


def unique_keys(samples: Iterable[dict]) -> Iterator[dict]:
    """Pass samples through, raising on a repeated key (two inputs that map to the same key)."""
    seen: dict[str, str] = {}
    for sample in samples:
        key, origin = sample["__key__"], sample.pop("__origin__")
        if key in seen:
            raise ValueError(f"{origin} and {seen[key]} both get the key {key!r}; rename one of them")
        seen[key] = origin
        yield sample


def _media_files(folder: str, extensions: frozenset[str], recursive: bool) -> list[str]:
    pattern = os.path.join(glob.escape(folder), "**" if recursive else "", "*")
    files = glob.glob(pattern, recursive=recursive)
    return sorted(f for f in files if os.path.isfile(f) and member_extension(f) in extensions)


def folder_classes(root: str) -> list[str]:
    """Class names of a folder: its sub-folders, sorted (label = index); ``[]`` for a flat folder."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def shuffled_order(items: list, seed: int | None) -> list:
    """``items`` in a random order drawn from ``seed`` (``None``: as they are). Shards are written shuffled
    because readers take them in order: a stream's shuffle buffer only mixes samples a few shards apart, and
    evaluation and fine-tuning read shards front to back, so class-sorted shards give one-class batches."""
    if seed is None:
        return items
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def folder_samples(root: str, kind: str = "any", seed: int | None = None) -> Iterator[dict]:
    """Samples from a folder of image, audio or video files, in the order ``shuffled_order(seed)`` gives.

    Class sub-folders give ``cls`` (the sorted class index) and a ``txt`` caption (the class name); a flat
    folder gives unlabelled samples. A ``<name>.txt`` file next to a media file is its caption instead.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder")
    extensions, classes = MEDIA_KINDS[kind], folder_classes(root)
    top_level = _media_files(root, extensions, recursive=False)
    if classes and top_level:
        raise ValueError(f"{root} has both class folders {classes} and loose media files, e.g. {top_level[0]}")
    files = [(f, None) for f in top_level]
    for label, name in enumerate(classes):
        files += [(f, label) for f in _media_files(os.path.join(root, name), extensions, recursive=True)]
    if not files:
        raise FileNotFoundError(f"no {kind} files ({', '.join(sorted(extensions))}) in {root}")
    for path, label in shuffled_order(files, seed):
        relative = os.path.relpath(path, root)
        sample = {"__key__": sample_key(relative), "__origin__": path, **media_member(path)}
        caption_file = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(caption_file):
            sample["txt"] = _read_text(caption_file).strip().encode("utf-8")
        elif label is not None:
            sample["txt"] = classes[label].encode("utf-8")
        if label is not None:
            sample["cls"] = str(label).encode("ascii")
        yield sample


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not utf-8 text: {error}") from error


def table_rows(path: str) -> list[dict]:
    """Rows of a CSV (with a header line) or JSONL (one object per line) file."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def table_labels(values: list) -> tuple[list[int], list[str]]:
    """Integer labels as they are; class names mapped to their sorted index. Returns (labels, class names)."""
    if all(isinstance(v, int) or (isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip())) for v in values):
        return [int(v) for v in values], []
    classes = sorted({str(v) for v in values})
    return [classes.index(str(v)) for v in values], classes


def table_samples(
    path: str, path_column: str = "path", caption_column: str = "caption", label_column: str | None = None,
    seed: int | None = None,
) -> tuple[Iterator[dict], list[str]]:
    """Samples from a CSV/JSONL of (media path, caption[, label]), in the order ``shuffled_order(seed)`` gives;
    media paths are relative to the table. Keys are row numbers.

    ``label_column`` names the labels' column; by default a column ``label`` is used when the table has one.
    Every row has a label or none does: a table labelled in part, or a named label column that no row
    fills, is refused rather than written without its labels.
    Returns the samples and the class names when labels are names rather than integers.
    """
    rows = table_rows(path)
    for number, row in enumerate(rows):
        missing = [c for c in (path_column, caption_column) if c not in row]
        if missing:
            raise ValueError(f"{path} row {number}: no column {missing} (has {sorted(row)})")
    column = label_column or "label"
    unlabelled = [number for number, row in enumerate(rows) if row.get(column) in (None, "")]
    if label_column is not None and rows and len(unlabelled) == len(rows):
        raise ValueError(f"{path}: no row has a label in column {label_column!r} (columns: {sorted(rows[0])})")
    if 0 < len(unlabelled) < len(rows):
        listed = ", ".join(map(str, unlabelled[:10])) + (", ..." if len(unlabelled) > 10 else "")
        raise ValueError(f"{path}: {len(unlabelled)} of {len(rows)} rows have no {column!r} (rows {listed}): label every row or none")
    has_labels = bool(rows) and not unlabelled
    labels, classes = table_labels([row[column] for row in rows]) if has_labels else ([None] * len(rows), [])
    width = len(str(max(len(rows) - 1, 0)))

    def samples() -> Iterator[dict]:
        for number, row, label in shuffled_order(list(zip(range(len(rows)), rows, labels)), seed):
            media = os.path.join(os.path.dirname(path), row[path_column])
            if not os.path.isfile(media):
                raise FileNotFoundError(f"{path} row {number}: media file {media} does not exist")
            sample = {"__key__": f"{number:0{width}d}", "__origin__": f"{path} row {number}", **media_member(media)}
            sample["txt"] = str(row[caption_column]).encode("utf-8")
            if label is not None:
                sample["cls"] = str(label).encode("ascii")
            yield sample

    return samples(), classes


def text_samples(paths: list[str], per_line: bool = False, seed: int | None = None) -> Iterator[dict]:
    """Samples of ``txt`` from text files (folders are searched for ``*.txt``): one per file, or one per
    non-empty line with ``per_line``. ``seed`` shuffles the files (a file's lines stay in their order)."""
    files = []  # (file, its name relative to the path given)
    for path in paths:
        if os.path.isdir(path):
            files += [(f, os.path.relpath(f, path)) for f in _media_files(path, frozenset({"txt"}), recursive=True)]
        else:
            files.append((path, os.path.basename(path)))
    if not files:
        raise FileNotFoundError(f"no .txt files in {paths}")
    for file, name in shuffled_order(files, seed):
        key, text = sample_key(name), _read_text(file)
        if not per_line:
            yield {"__key__": key, "__origin__": file, "txt": text.encode("utf-8")}
            continue
        for number, line in enumerate(text.splitlines()):
            if line.strip():
                origin = f"{file} line {number + 1}"
                yield {"__key__": f"{key}_{number:07d}", "__origin__": origin, "txt": line.encode("utf-8")}


def brace_pattern(pattern: str, shards: int) -> str:
    """The brace pattern naming the written shards: ``out/train-%06d.tar`` -> ``out/train-{000000..000002}.tar``."""
    return re.sub(r"%0?(\d*)d", lambda m: "{" + f"{0:0{m[1] or 1}d}..{shards - 1:0{m[1] or 1}d}" + "}", pattern)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m core.data.write", description="Write media, captions or text into WebDataset tar shards."
    )
    parser.add_argument("--out", required=True, help="shard name pattern, e.g. out/train-%%06d.tar")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard, at most")
    parser.add_argument("--max-bytes", type=int, default=1 << 30, help="start a new shard once one holds this many bytes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order")
    parser.add_argument("--in-order", action="store_true", help="keep the input order (sorted files, table rows) instead")
    inputs = parser.add_subparsers(dest="input", required=True)
    folder = inputs.add_parser("folder", help="image/audio/video files, flat or in class sub-folders")
    folder.add_argument("root")
    folder.add_argument("--media", choices=sorted(MEDIA_KINDS), default="any", help="which files to take")
    table = inputs.add_parser("table", help="CSV or JSONL of (media path, caption[, label])")
    table.add_argument("file")
    table.add_argument("--path-column", default="path")
    table.add_argument("--caption-column", default="caption")
    table.add_argument("--label-column", default=None, help="the labels' column (default: label, when the table has one)")
    text = inputs.add_parser("text", help="text files: one document per file, or per line")
    text.add_argument("paths", nargs="+", help=".txt files or folders of them")
    text.add_argument("--per-line", action="store_true", help="one document per non-empty line")
    args = parser.parse_args(argv)
    if "%" not in args.out:
        parser.error(f"--out {args.out!r} needs a shard number field such as %06d")

    classes: list[str] = []
    seed = None if args.in_order else args.seed
    if args.input == "folder":
        samples, classes = folder_samples(args.root, args.media, seed), folder_classes(args.root)
    elif args.input == "table":
        samples, classes = table_samples(args.file, args.path_column, args.caption_column, args.label_column, seed)
    else:
        samples = text_samples(args.paths, args.per_line, seed)
    summary = write_shards(unique_keys(samples), args.out, args.max_count, args.max_bytes)
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards, {summary['bytes']:,} bytes")
    print(f"shards: {brace_pattern(args.out, summary['shards'])}")
    print(f"extensions: {', '.join(summary['extensions'])}")
    if classes:
        print("classes: " + ", ".join(f"{i}={name}" for i, name in enumerate(classes)))
    return summary


if __name__ == "__main__":
    main()
