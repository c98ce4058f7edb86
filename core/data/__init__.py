"""Streaming data from WebDataset tar shards: safe decoders, a LightningDataModule, and shard tools.

See ``core/data/README.md`` for the shard format, the DataModule options and the ``write``/``inspect`` tools.
Names are imported on first use, so that ``python -m core.data.write`` and ``core.data.inspect`` start
without importing Lightning.
"""

import importlib

_HOMES = {
    "decode_sample": "core.data.decoders",
    "RefusedSample": "core.data.decoders",
    "SampleError": "core.data.decoders",
    "UndecodableSample": "core.data.decoders",
    "UnusableSample": "core.data.decoders",
    "expand_urls": "core.data.shards",
    "read_shard": "core.data.shards",
    "NoReadableShards": "core.data.stream",
    "Requires": "core.data.stream",
    "SampleTransform": "core.data.stream",
    "ShardDataModule": "core.data.stream",
    "ShardLoader": "core.data.stream",
    "ShardStream": "core.data.stream",
    "read_batches": "core.data.stream",
    "write_shards": "core.data.write",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'core.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
