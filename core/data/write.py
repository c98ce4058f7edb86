"""Write samples into WebDataset tar shards.

A sample is a dict: ``{"__key__": "000042", "jpg": b"...", "cls": b"3", "txt": b"a red circle"}``.
Each member is stored as ``<key>.<extension>``; readers pick a decoder by the extension.
"""

from __future__ import annotations

import os
from typing import Iterable

import webdataset as wds


def write_shards(samples: Iterable[dict], pattern: str, max_count: int = 10_000, max_bytes: int = 1 << 30) -> dict:
    """Write ``samples`` to shards named by ``pattern`` (e.g. ``out/train-%06d.tar``).

    A new shard starts when the current one holds ``max_count`` samples or ``max_bytes`` bytes.
    Returns a summary: number of samples, shards, bytes and the extensions seen.
    """
    os.makedirs(os.path.dirname(os.path.abspath(pattern)), exist_ok=True)
    n, extensions = 0, set()
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0) as sink:
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
