"""Stream batches from WebDataset tar shards into a Lightning Trainer.

The pipeline for one DataLoader worker is a chain of small generators:

    training:    resampled shard URLs -> raw samples -> shuffle buffer -> decode, transform   (one chain per
                 source) -> weighted mix of the sources -> batch
    validation:  this rank's and worker's shards, each once -> raw samples -> decode, transform -> batch

Training streams are infinite, so an epoch is a fixed number of batches, identical on every rank, and DDP
never waits on a rank that ran out of data. Rank and world size come from the Trainer, never from
environment variables. Samples are decoded only by ``core.data.decoders`` (nothing is unpickled).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from core.data.decoders import EncodedAudio, EncodedVideo, RefusedSample, SampleError, UnusableSample, decode_sample, decoded_whole
from core.data.shards import expand_urls, listing, read_shard

log = logging.getLogger(__name__)


def quiet_lightning_warnings() -> None:
    """Two Lightning warnings about what these loaders do by design. Set when a datamodule is made (not at
    import, which a `warnings.catch_warnings` block around it, as pytest's, would undo)."""
    # The training loader's length is exact by construction (a fixed number of batches drawn from an infinite
    # stream), which is what this generic warning about IterableDataset lengths is worried about.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)
    # A resumed run draws a new stream from its resume step (core/data/README.md: a resume is not exact),
    # which is what the warning about loaders without `state_dict` on a mid-epoch resume is about.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch", category=UserWarning)


SampleTransform = Callable[[dict], dict]
COUNTERS = ("samples_read", "samples_skipped", "samples_refused", "shard_errors")


class NoReadableShards(RuntimeError):
    """Not a single sample could be read from a stream's shards (all missing, corrupt or undecodable)."""


class StreamStats:
    """Sample counters in shared memory, one row per DataLoader worker, readable from the main process."""

    def __init__(self, names: list[str], num_workers: int):
        self.names = list(names)
        self.table = torch.zeros(max(1, num_workers), len(self.names), dtype=torch.int64).share_memory_()
        self._warned: set[tuple[str, str]] = set()  # per process: each problem is logged once

    def add(self, name: str, n: int = 1) -> None:
        worker = get_worker_info()
        self.table[worker.id if worker else 0, self.names.index(name)] += n

    def totals(self) -> dict[str, int]:
        return dict(zip(self.names, self.table.sum(0).tolist()))

    def warn_once(self, url: str, key: str, message: str) -> None:
        if (url, key) not in self._warned:
            self._warned.add((url, key))
            log.warning(message)


@dataclass
class ShardRead:
    """One pass over one shard: its raw samples (known once the pass ends), how many were decoded, how many well."""

    url: str
    total: int | None = None
    done: int = 0
    good: int = 0
    error: str = "no samples"  # why the latest sample (or the shard itself) failed

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


class ReadHealth:
    """Stops an endless stream that can read nothing: raises once the latest finished pass over *every*
    shard gave no decodable sample, or, before any sample was decoded, once `first_tries` different shards
    gave none (read no sample at all). A shard revives as soon as a pass over it gives one.

    Passes are tracked (rather than, say, a run of failures) because the shuffle buffer interleaves samples of
    many passes: a few bad samples in a row say nothing about whether good ones exist. The early rule is for
    sources that never worked (a mistyped bucket, missing credentials): shards drawn with replacement reach
    every one of N only after about N ln N draws, 98,000 failing commands for 10,000 shards."""

    def __init__(self, urls: list[str], first_tries: int = 16):
        self.urls = set(urls)
        self.first_tries = min(len(self.urls), first_tries)
        self.dead: dict[str, str] = {}  # url -> why its latest finished pass gave nothing
        self.any_good = False

    def record(self, read: ShardRead) -> None:
        # A shard that gave raw samples counts too: behind a shuffle buffer, none is decoded until it fills,
        # while shards that fail to open are dead at once.
        self.any_good |= read.good > 0 or bool(read.total)
        if not read.finished:
            return
        if read.good:
            self.dead.pop(read.url, None)
            return
        self.dead[read.url] = read.error
        if self.dead.keys() >= self.urls:
            raise NoReadableShards(f"no sample could be read from any of {len(self.urls)} shards: {self.reasons()}")
        if not self.any_good and len(self.dead) >= self.first_tries:
            raise NoReadableShards(
                f"no sample could be read from the first {len(self.dead)} shards tried of {len(self.urls)}, "
                f"and none from any other yet: {self.reasons()}"
            )

    def reasons(self) -> str:
        return listing(sorted(f"{url} ({why})" for url, why in self.dead.items()))


def raw_samples(urls: Iterable[str], stats: StreamStats, health: ReadHealth | None = None) -> Iterator[dict]:
    """Raw samples of each shard in turn, each tagged with its ``ShardRead``; unreadable shards are counted."""
    for url in urls:
        read = ShardRead(url)
        count = 0
        try:
            for sample in read_shard(url):
                sample["__read__"] = read  # the shuffle buffer interleaves shards: each sample carries its shard's record
                count += 1
                yield sample
        except Exception as error:
            read.error = f"{type(error).__name__}: {error}"  # str(): an OSError's args[0] is its errno
            stats.add("shard_errors")
            stats.warn_once(url, "", f"cannot read shard {url} after {count} samples: {read.error}")
        read.total = count
        if health is not None:
            health.record(read)


def usable_samples(
    samples: Iterable[dict], stats: StreamStats, transform: SampleTransform | None, health: ReadHealth | None = None
) -> Iterator[dict]:
    """Decode raw samples and apply the transform. Samples that cannot be decoded, are refused (pickle) or
    that the transform cannot use (``SampleError``: a missing entry, a clip too short) are skipped, counted
    and logged once; any other failure of the transform is raised, naming the sample."""
    for sample in samples:
        read: ShardRead = sample.pop("__read__")
        try:
            usable = transformed(decode_sample(sample), transform)
        except SampleError as error:
            usable = None
            read.error = error.reason
            stats.add("samples_refused" if isinstance(error, RefusedSample) else "samples_skipped")
            stats.warn_once(sample["__url__"], sample["__key__"], f"skipped: {error}")
        read.done += 1
        read.good += usable is not None
        if health is not None:
            health.record(read)
        if usable is not None:
            stats.add("samples_read")
            yield usable


def shuffled(samples: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``buffer_size`` samples (0 or 1: no shuffling)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def mixed(
    sources: list[Iterator[dict]], weights: list[float], rng: random.Random, stats: StreamStats
) -> Iterator[dict]:
    """Draw each sample from source ``i`` with probability ``weights[i] / sum(weights)``; count draws per source."""
    indices = range(len(sources))
    while True:
        i = rng.choices(indices, weights)[0]
        sample = next(sources[i])
        stats.add(f"source_{i}_samples")
        yield sample


def transformed(sample: dict, transform: SampleTransform | None) -> dict:
    """Apply the user transform; a failure other than a ``SampleError`` names the sample it failed on. A video or
    audio the transform leaves as it was decoded (an ``EncodedVideo``, ``EncodedAudio``) is decoded whole, so
    that it batches."""
    if transform is None:
        return decoded_whole(sample)
    try:
        return decoded_whole(transform(sample))
    except SampleError:
        raise
    except Exception as error:
        # A transform written for the tensors the decoders gave before they decoded media when asked.
        hints = [f"; {key!r} is an {type(value).__name__}: {HOW_TO_DECODE[type(value)]}" for key, value in sample.items() if type(value) in HOW_TO_DECODE]
        raise RuntimeError(
            f"transform {transform!r} failed on sample {sample.get('__key__')!r} of {sample.get('__url__')!r}: "
            f"{type(error).__name__}: {error}{''.join(hints)}"
        ) from error


HOW_TO_DECODE = {
    EncodedVideo: "video[index] decodes frames (a list), video.frames() every frame",
    EncodedAudio: "audio.read(start, stop) decodes samples, audio.samples() every sample",
}


class Requires:
    """``transform``, whose output must hold ``entries`` (the label a probe or a classifier needs): a sample
    without one is skipped and counted (``UnusableSample``), where a batch would lose that entry for every
    sample in it (``collate``) or fail."""

    def __init__(self, transform: SampleTransform | None, entries: Iterable[str], who: str):
        self.transform, self.entries, self.who = transform, tuple(entries), who

    def __call__(self, sample: dict) -> dict:
        out = sample if self.transform is None else self.transform(sample)
        missing = [entry for entry in self.entries if entry not in out]
        if missing:
            raise UnusableSample(
                f"no {missing[0]!r}",
                f"{self.who} needs {missing[0]!r}, but sample {sample.get('__key__', '?')!r} from "
                f"{sample.get('__url__', '?')!r} has none (for 'label': a .cls member)",
            )
        return out

    def __repr__(self) -> str:
        return repr(self.transform)


def collate(samples: list[dict]) -> dict:
    """Batch samples with torch's default collate (tensors stacked, numbers to tensors, strings to lists).
    Entries that not every sample has are left out of the batch: an unlabelled source mixed into a labelled
    one gives batches without labels, which pretraining does not use; where they are needed, ``Requires``."""
    common = set.intersection(*(set(sample) for sample in samples))
    if any(len(sample) != len(common) for sample in samples):
        samples = [{key: value for key, value in sample.items() if key in common} for sample in samples]
    try:
        return default_collate(samples)
    except Exception as error:
        kinds = {key: type(value).__name__ for key, value in samples[0].items()}
        raise TypeError(
            f"cannot batch samples with entries {kinds}: {error}. Give a transform that turns every entry into a "
            "tensor, number or string, with tensors of the same shape across samples."
        ) from error


def batched(samples: Iterable[dict], batch_size: int, partial: bool) -> Iterator[dict]:
    """Collate consecutive samples into batches; ``partial`` keeps a short last batch."""
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


def _worker_slot() -> tuple[int, int]:
    worker = get_worker_info()
    return (worker.id, worker.num_workers) if worker else (0, 1)


class ShardStream(IterableDataset):
    """Batches from tar shards for one rank.

    ``resample=True`` (training): every worker draws shards at random with replacement from all the shards of
    each source, reads each whole through ``shuffle_buffer``, and mixes sources by ``weights``; the stream
    never ends. Seeds derive from (seed, rank, worker, start_step, iteration), which the loader sets before
    it starts the stream, so ranks and workers draw differently and a resumed run draws new samples.

    ``resample=False`` (validation): each shard of ``sources`` is read once, split across ranks then workers.
    A source with fewer shards than ranks is read whole by every rank, each keeping every ``world_size``-th
    sample, so that no rank is left without batches: under DDP every rank must join the first validation
    forward's buffer broadcast and the probes' gathers. With ``repeat``, the same shares are read round after
    round and only full batches are made (the loader stops the pass): FSDP needs the same number of
    validation batches on every rank, each forward gathering parameters from all of them.
    """

    def __init__(
        self,
        sources: list[list[str]],
        batch_size: int,
        resample: bool,
        weights: list[float] | None = None,
        transform: SampleTransform | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        repeat: bool = False,
    ):
        self.sources, self.batch_size, self.resample, self.repeat = sources, batch_size, resample, repeat
        self.weights = weights or [1.0] * len(sources)
        self.transform, self.shuffle_buffer, self.seed = transform, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.start_step, self.iteration = 0, 0
        per_source = [f"source_{i}_samples" for i in range(len(sources))] if resample else []
        self.stats = StreamStats([*COUNTERS, *per_source], num_workers)

    def rank_shards(self, source: int | None = None) -> list[str]:
        """The shards this rank reads, of one source or (``None``) of all."""
        if source is None:
            return [url for i in range(len(self.sources)) for url in self.rank_shards(i)]
        urls = self.sources[source]
        if len(urls) < self.world_size:
            return urls
        return urls[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_slot()
        if self.resample:
            rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_step}/{self.iteration}")
            if get_worker_info() is not None:  # the transforms' draws too: core.augment's from torch's generator,
                torch.manual_seed(rng.getrandbits(63))  # a transform of one's own perhaps from Python's or NumPy's
                random.seed(rng.getrandbits(64))
                np.random.seed(rng.getrandbits(32))
            sources = [self._resampled_source(i, rng) for i in range(len(self.sources))]
            samples = mixed(sources, self.weights, rng, self.stats)
        else:
            samples = self._read_rounds(worker, num_workers)
        yield from batched(samples, self.batch_size, partial=not (self.resample or self.repeat))

    def _read_rounds(self, worker: int, num_workers: int) -> Iterator[dict]:
        """This worker's share of the shards, once, or with ``repeat`` round after round while a round yields."""
        while True:
            raw = itertools.chain.from_iterable(self._read_once(i, worker, num_workers) for i in range(len(self.sources)))
            read = 0
            for sample in usable_samples(raw, self.stats, self.transform):
                read += 1
                yield sample
            if not (self.repeat and read):
                return

    def _read_once(self, source: int, worker: int, num_workers: int) -> Iterator[dict]:
        raw = raw_samples(self.rank_shards(source)[worker::num_workers], self.stats)
        if len(self.sources[source]) < self.world_size:  # every rank reads these shards: keep this rank's samples
            raw = itertools.islice(raw, self.rank, None, self.world_size)
        return raw

    def _resampled_source(self, source: int, rng: random.Random) -> Iterator[dict]:
        # Every shard of the source, on every rank (as webdataset's ResampledShards): drawn with replacement,
        # the ranks need no split, and a split would favour the shards of ranks that hold fewer (4 shards on
        # 3 ranks: 1/6, 1/3, 1/3, 1/6). Ranks differ by their seeds.
        urls = self.sources[source]
        health = ReadHealth(urls)
        shards = (rng.choice(urls) for _ in itertools.count())
        raw = shuffled(raw_samples(shards, self.stats, health), self.shuffle_buffer, rng)
        return usable_samples(raw, self.stats, self.transform, health)


class ShardLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` (batched in the workers).

    Each pass yields ``batches`` batches (``None``: until the stream ends). A stream is stamped with
    ``current_step()`` and a start counter, which seed the workers, when its workers start. A resampled
    (training) stream is started once and each pass takes its next ``batches`` batches, its workers living
    on between passes: restarted at every pass, a worker would read only the first (its share of an epoch +
    the shuffle buffer) samples of the shards it draws, and never the rest of a shard longer than that
    (webdataset's ``with_epoch`` continues its stream too, with persistent workers). Lightning shuts the
    workers down at the end of the fit (through ``_iterator``, as for its persistent workers;
    ``ShardDataModule.on_exception`` when a validation pass raises). A validation stream starts afresh at
    every pass. ``on_batch`` runs in the main process after each batch. A pass that yields nothing although
    this rank has shards raises ``NoReadableShards``.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        batches: int | None = None,
        current_step: Callable[[], int] = lambda: 0,
        on_batch: Callable[[], None] = lambda: None,
    ):
        # Its own generator for the workers' base seed, which the stream replaces: starting an iterator then
        # draws nothing from the global stream, which core.cli.RankSeed carries over a resume.
        super().__init__(stream, batch_size=None, num_workers=num_workers, generator=torch.Generator())
        self.stream, self.batches, self.current_step, self.on_batch = stream, batches, current_step, on_batch

    def __len__(self) -> int:
        return self.batches if self.batches is not None else super().__len__()

    def _start(self) -> Iterator[dict]:
        self.stream.start_step = self.current_step()
        self.stream.iteration += 1
        return super().__iter__()

    def __iter__(self) -> Iterator[dict]:
        if not self.stream.resample:
            batches = self._start()
        else:
            if self._iterator is None:
                self._iterator = self._start()
            batches = self._iterator
        count = 0
        for batch in itertools.islice(batches, self.batches):
            count += 1
            self.on_batch()
            yield batch
        urls = self.stream.rank_shards()
        if count == 0 and urls:
            counts = self.stream.stats.totals()
            why = "see the warnings above for each shard and sample"
            shared = any(len(source) < self.stream.world_size for source in self.stream.sources)
            if shared and not any(counts.values()):  # nothing failed: this rank's share was empty
                why = (f"the shards hold fewer samples than the {self.stream.world_size} ranks that share them, each "
                       f"keeping every {self.stream.world_size}th sample, so rank {self.stream.rank} gets none")  # fmt: skip
            raise NoReadableShards(f"no sample could be read from {listing(urls)} (counts: {counts}); {why}")


def read_batches(
    patterns: str | list[str], transform: SampleTransform | None = None, batch_size: int = 64, num_workers: int = 0
) -> ShardLoader:
    """Batches of every sample of the shards, each shard read once (outside a Trainer: probes, evaluation)."""
    stream = ShardStream([expand_urls(patterns)], batch_size, False, transform=transform, num_workers=num_workers)
    return ShardLoader(stream, num_workers)


class ShardDataModule(L.LightningDataModule):
    """Train and validation batches from WebDataset tar shards.

    Args:
        train: shard pattern(s) for training; a list gives several sources to mix (see ``train_weights``).
            Patterns are brace ranges (``data/train-{000000..000099}.tar``), globs, ``pipe:<command>``
            (``pipe:aws s3 cp s3://bucket/train-000000.tar -``) or URLs webdataset opens.
        val: shard pattern(s) for validation; each shard is read once per validation run.
        train_weights: sampling weight of each ``train`` source (e.g. ``[0.95, 0.05]``); by default
            proportional to each source's number of shards, as if they were one dataset.
        batch_size: training batch size per rank.
        val_batch_size: validation batch size per rank (default ``batch_size``).
        val_batches: validation batches per rank. ``None``: each val shard is read once and ranks may get
            different numbers of batches, which DDP allows. FSDP needs the same number on every rank: set it,
            and each rank reads its share of the val shards round after round until it has that many full
            batches (every sample is seen when it is at least the workers holding shards x ceil(the largest
            worker's share / val_batch_size): shares are whole shards, core/data/README.md).
        num_workers: DataLoader worker processes per rank.
        train_transform / val_transform: ``dict -> dict`` applied to each decoded sample (see
            ``core.data.decoders``) before batching; typically from ``core.augment``. A transform with an
            ``on_device(batch) -> batch`` method finishes its work there, on whole batches after they reach
            the training device (``core.augment.TwoViews(device_color=True)``).
        shuffle_buffer: samples held per worker and source to shuffle raw (undecoded) samples.
        samples_per_epoch: samples per epoch over all ranks; an epoch is
            ``ceil(samples_per_epoch / (batch_size * world_size))`` batches on every rank.
        seed: base seed; each rank and worker derives its own from it and the global step.
    """

    def __init__(
        self,
        train: str | list[str],
        val: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        val_batches: int | None = None,
        num_workers: int = 2,
        train_transform: SampleTransform | None = None,
        val_transform: SampleTransform | None = None,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int = 100_000,
        seed: int = 0,
    ):
        super().__init__()
        quiet_lightning_warnings()
        self.train = [train] if isinstance(train, str) else list(train)
        if not self.train:
            raise ValueError("data.train: no shard pattern given")
        self.val = [val] if isinstance(val, str) else val
        if train_weights is not None and (
            len(train_weights) != len(self.train) or min(train_weights) < 0 or sum(train_weights) <= 0
        ):
            raise ValueError(f"data.train_weights={train_weights}: need one weight >= 0 per train source {self.train}")
        val_batch_size = batch_size if val_batch_size is None else val_batch_size  # 0 is refused below, not the default
        sizes = {"batch_size": batch_size, "val_batch_size": val_batch_size, "samples_per_epoch": samples_per_epoch}
        if val_batches is not None:
            sizes["val_batches"] = val_batches
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"data.{name}={value}: must be at least 1")
        self.train_weights, self.batch_size, self.val_batch_size = train_weights, batch_size, val_batch_size
        self.val_batches = val_batches
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.train_transform, self.val_transform = train_transform, val_transform
        self._train_loader: ShardLoader | None = None
        self.val_stream: ShardStream | None = None
        self._logged_step = -1

    def _rank_and_world_size(self) -> tuple[int, int]:
        # From the Trainer: Lightning's launchers do not set RANK, which webdataset's split_by_node reads.
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def batches_per_epoch(self) -> int:
        """Training batches per epoch, the same on every rank."""
        return math.ceil(self.samples_per_epoch / (self.batch_size * self._rank_and_world_size()[1]))

    def train_dataloader(self) -> ShardLoader:
        rank, world_size = self._rank_and_world_size()
        self._logged_step = -1
        # One loader for the datamodule's ranks, also under `reload_dataloaders_every_n_epochs`: a new one would
        # start the stream (and its workers' reading of the shards from their heads) over.
        kept, batches = self._train_loader, self.batches_per_epoch()
        # Lightning's batch-size tuner sets `batch_size` and asks again: that needs a new loader.
        if kept is not None and (kept.stream.rank, kept.stream.world_size, kept.stream.batch_size, kept.batches) == (
            rank, world_size, self.batch_size, batches
        ):
            return kept
        sources = [expand_urls(pattern) for pattern in self.train]
        weights = self.train_weights or [float(len(urls)) for urls in sources]
        stream = ShardStream(
            sources, self.batch_size, resample=True, weights=weights, transform=self.train_transform,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank, world_size=world_size,
            num_workers=self.num_workers,
        )  # fmt: skip
        # The loader calls back weakly: a datamodule and loader referring to each other are freed by the cycle
        # collector, and on that path PyTorch's worker shutdown waits 5 s per worker for a stop never sent.
        step, log = weakref.WeakMethod(self._global_step), weakref.WeakMethod(self._log_train_stats)
        self._train_loader = ShardLoader(stream, self.num_workers, batches, lambda: step()(), lambda: log()())
        return self._train_loader

    def val_dataloader(self) -> ShardLoader | list:
        if not self.val:
            return []
        rank, world_size = self._rank_and_world_size()
        sharded = self.trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        if sharded and world_size > 1 and self.val_batches is None:
            raise ValueError(
                f"data.val_batches must be set under {type(self.trainer.strategy).__name__}: every validation forward "
                "gathers parameters from all ranks, so each rank must run as many batches; with equal val shards "
                f"split evenly over the {world_size} ranks and their workers, val samples / (val_batch_size x "
                f"{world_size}) sees every sample (core/data/README.md for uneven shares)"
            )
        transform = self.val_transform
        for callback in getattr(self.trainer, "callbacks", []):
            if getattr(callback, "needs_entries", ()):  # the online probe's labels
                transform = Requires(transform, callback.needs_entries, getattr(callback, "needs_why", type(callback).__name__))
        self.val_stream = ShardStream(
            [expand_urls(self.val)], self.val_batch_size, resample=False, transform=transform,
            rank=rank, world_size=world_size, num_workers=self.num_workers, repeat=self.val_batches is not None,
        )  # fmt: skip
        return ShardLoader(self.val_stream, self.num_workers, self.val_batches)

    def on_exception(self, exception: BaseException) -> None:
        # The training loader's workers live through the fit; Lightning shuts them down at its end, but not
        # when a validation pass raises (it tears the evaluation loop down then, not the fit's).
        if self._train_loader is not None:
            _shutdown_workers_and_reset_iterator(self._train_loader)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        transform = self.train_transform if self.trainer is not None and self.trainer.training else self.val_transform
        on_device = getattr(transform, "on_device", None)
        return on_device(batch) if on_device is not None else batch

    @property
    def train_stream(self) -> ShardStream | None:
        return self._train_loader.stream if self._train_loader else None

    @property
    def train_stats(self) -> dict[str, int]:
        """Training counters on this rank: samples read/skipped/refused, shard errors, draws per source."""
        return self.train_stream.stats.totals() if self.train_stream else {}

    @property
    def val_stats(self) -> dict[str, int]:
        """Validation counters on this rank, cumulative over validation runs."""
        return self.val_stream.stats.totals() if self.val_stream else {}

    def _global_step(self) -> int:
        # Called when the training stream starts. On resume, Lightning restores the checkpoint's global step
        # before it requests and iterates the train loader, so a resumed run draws new samples.
        return self.trainer.global_step if self.trainer is not None else 0

    def _log_train_stats(self) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.loggers or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        if trainer.global_step == self._logged_step:  # several batches of one step (gradient accumulation)
            return
        self._logged_step = trainer.global_step
        # The validation counters (cumulative) ride along: here every rank is at the same step, where the
        # end of a validation pass is not a safe place for a collective (ranks can end their passes unevenly).
        counts = {**self.train_stats, **{f"val_{name}": value for name, value in self.val_stats.items()}}
        # Loggers write from rank 0 only: the counters are summed over the ranks first.
        values = list(counts.values())
        if trainer.world_size > 1:
            summed = torch.tensor(values, dtype=torch.int64, device=trainer.strategy.root_device)
            values = trainer.strategy.reduce(summed, reduce_op="sum").tolist()
        metrics = {f"data/{name}": value for name, value in zip(counts, values)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
