"""The streaming data layer on real tar shards: decoding round trips for every modality, weighted mixing,
bad samples (corrupt, pickle), pipe: sources, clear errors, and the DataModule inside a real Trainer
(per-source logging, YAML transforms, resuming without replaying samples)."""

import csv
import fractions
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import pickle
import random
import tarfile
from types import SimpleNamespace

import av
import lightning as L
import numpy as np
import PIL.Image
import pytest
import soundfile
import torch
from conftest import tar_with
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from core.cli import RankSeed
from core.data import NoReadableShards, RefusedSample, ShardDataModule, UndecodableSample, decode_sample, read_batches
from core.data.shards import expand_urls, listing, read_shard
from core.data.stream import COUNTERS, ReadHealth, ShardLoader, ShardRead, ShardStream, StreamStats, raw_samples, shuffled
from core.data.write import write_shards

torch.set_num_threads(1)

DIM = 4  # length of the npy vectors that Trainer tests train on


# ---- media made in memory with the same libraries users have -------------------------------------------


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def audio_bytes(wave: np.ndarray, sample_rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """``wave`` is (samples, channels) float in [-1, 1], stored as 16-bit PCM (MP3 and Vorbis as such)."""
    out = io.BytesIO()
    soundfile.write(out, wave, sample_rate, format=fmt, subtype=subtype or {"MP3": "MPEG_LAYER_III", "OGG": "VORBIS"}.get(fmt, "PCM_16"))
    return out.getvalue()


def encoded_video(container_format: str, codec: str, options: dict, frames: np.ndarray, fps: int = 25) -> bytes:
    """``frames`` (T, H, W, 3) uint8 encoded with ``codec`` (``options``: its settings) in ``container_format``."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def video_bytes(frames: np.ndarray, fps: int, options: dict | None = None) -> bytes:
    """``frames`` is (T, H, W, 3) uint8, encoded with libx264 in mp4 (``options``: its settings)."""
    return encoded_video("mp4", "libx264", options or {}, frames, fps)


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def vector_samples(n: int, prefix: str = "", seed: int = 0) -> list[dict]:
    """Small labelled samples (an npy vector and a class) that decode and batch fast."""
    rng = np.random.default_rng(seed)
    return [
        {
            "__key__": f"{prefix}{i:06d}",
            "npy": npy_bytes(rng.standard_normal(DIM).astype(np.float32)),
            "cls": str(i % 3).encode(),
        }
        for i in range(n)
    ]


def to_tensors(sample: dict) -> dict:
    """Test transform: images to uint8 tensors, numpy to tensors; everything else as decoded."""
    out = dict(sample)
    if "image" in out:
        out["image"] = torch.from_numpy(np.array(out["image"]))
    if "npy" in out:
        out["npy"] = torch.from_numpy(out["npy"])
    return out


class VectorTransform:
    """A configurable transform (for the YAML test): the npy vector scaled, as ``x``."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, sample: dict) -> dict:
        x = torch.from_numpy(sample["npy"]) * self.scale
        return {"x": x, "label": sample["label"], "__key__": sample["__key__"], "__url__": sample["__url__"]}


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["__key__"]]


def write_vectors(tmp_path, name: str, n: int, per_shard: int, seed: int = 0) -> str:
    """Write ``n`` vector samples (keys prefixed by ``name``) and return the shards' brace pattern."""
    summary = write_shards(vector_samples(n, f"{name}_", seed), str(tmp_path / f"{name}-%06d.tar"), max_count=per_shard)
    return str(tmp_path / f"{name}-{{000000..{summary['shards'] - 1:06d}}}.tar")


# ---- decoding round trips ----------------------------------------------------------------------------


def test_round_trip_every_modality(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    smooth = np.broadcast_to(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], (16, 24, 3)).copy()
    wave = (0.5 * np.sin(np.linspace(0, 40, 800))[:, None] * np.array([[1.0, -0.5]])).astype(np.float32)  # (800, 2)
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    frames[:, :, :16] = 200  # left half bright: survives lossy coding as a clear pattern
    vector = rng.standard_normal((3, 2)).astype(np.float32)
    meta = {"caption": "a red circle", "size": [16, 24]}
    samples = [
        {"__key__": "a", "png": image_bytes(pixels[0], "png"), "flac": audio_bytes(wave, 16_000, "FLAC"),
         "mp4": video_bytes(frames, fps=10), "txt": "héllo wörld".encode(), "cls": b"7",
         "json": json.dumps(meta).encode(), "npy": npy_bytes(vector)},
        {"__key__": "b", "jpg": image_bytes(smooth, "jpeg"), "wav": audio_bytes(wave, 8_000, "WAV"), "cls": b"2",
         "txt": b"second"},
    ]  # fmt: skip
    summary = write_shards(samples, str(tmp_path / "rt-%06d.tar"), max_count=1)
    assert summary["shards"] == 2 and summary["samples"] == 2

    batches = list(read_batches(str(tmp_path / "rt-{000000..000001}.tar"), to_tensors, batch_size=1))
    a, b = (batch for batch in sorted(batches, key=lambda batch: batch["__key__"][0]))
    assert a["__url__"] == [str(tmp_path / "rt-000000.tar")]
    assert torch.equal(a["image"][0], torch.from_numpy(pixels[0]))  # png is lossless
    assert a["audio"].shape == (1, 2, 800) and a["audio"].dtype == torch.float32  # (B, channels, samples)
    assert torch.allclose(a["audio"][0], torch.from_numpy(wave.T), atol=1 / 2**15)  # 16-bit quantisation
    assert a["sample_rate"].tolist() == [16_000]
    video = a["video"][0]
    assert video.shape == (5, 32, 32, 3) and video.dtype == torch.uint8 and a["fps"].tolist() == [10.0]
    assert (video[:, :, 4:12].float().mean() - 200).abs() < 10 and video[:, :, 20:28].float().mean() < 10
    assert a["text"] == ["héllo wörld"] and a["label"].tolist() == [7]
    assert a["json"]["caption"] == [meta["caption"]]
    assert torch.equal(a["npy"][0], torch.from_numpy(vector))
    assert b["image"].shape == (1, 16, 24, 3)
    assert (b["image"][0].float() - torch.from_numpy(smooth).float()).abs().mean() < 3  # jpeg: close, not equal
    assert b["sample_rate"].tolist() == [8_000]
    assert torch.allclose(b["audio"][0], torch.from_numpy(wave.T), atol=1 / 2**15)
    assert b["text"] == ["second"] and b["label"].tolist() == [2]


def test_16_bit_images_keep_their_range():
    """Pillow's RGB conversion clips 16-bit greyscale at 255: a 0..65535 ramp would come out nearly all white."""
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    out = io.BytesIO()
    PIL.Image.fromarray(ramp).save(out, format="png")
    image = np.asarray(decode_sample({"__key__": "a", "png": out.getvalue()})["image"])
    assert image.shape == (16, 16, 3) and np.array_equal(image[..., 0], (ramp >> 8).astype(np.uint8))


def test_camera_images_come_out_upright():
    """A camera stores a portrait photo's pixels landscape with an EXIF orientation (6: turn 90 degrees
    clockwise to view); decoded without it, every such photo would train lying on its side."""
    pixels = np.zeros((10, 40, 3), np.uint8)
    pixels[:, :20] = 255  # the stored left half white: upright, the top half
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format="jpeg", exif=exif.tobytes())
    image = np.asarray(decode_sample({"__key__": "a", "jpg": out.getvalue()})["image"])
    assert image.shape == (40, 10, 3) and image[:15].mean() > 200 and image[25:].mean() < 50


def test_audio_without_samples_is_undecodable():
    with pytest.raises(UndecodableSample, match="no audio samples"):
        decode_sample({"__key__": "a", "__url__": "u", "wav": audio_bytes(np.zeros((0, 1)), 16000, "WAV")})


def test_decoders_choose_by_last_lowercase_extension_and_drop_unknown():
    decoded = decode_sample({"__key__": "k", "__url__": "u", "caption.TXT": b"hi", "cls": b" 3\n", "xyz": b"?"})
    assert decoded == {"__key__": "k", "__url__": "u", "text": "hi", "label": 3}


@pytest.mark.parametrize("label", [b"1_0", b"3\x1c", b"+3", b"", b"3.5", b"\xd9\xa3", b"- 3", b"9223372036854775808"])
def test_a_label_that_is_not_ascii_digits_fails_its_sample(label):
    """`int` would read the first two as 10 and 3 (digit separators, ASCII's separator controls stripped); the
    last, past int64, stopped the run where the batch was collated."""
    with pytest.raises(UndecodableSample, match="'cls'.*ASCII digits"):
        decode_sample({"__key__": "k", "__url__": "u", "cls": label})


def test_clashing_or_undecodable_members_raise_naming_the_sample():
    with pytest.raises(UndecodableSample, match=r"'k'.*'shard.tar'.*'jpg'"):
        decode_sample({"__key__": "k", "__url__": "shard.tar", "jpg": b"not an image"})
    with pytest.raises(UndecodableSample, match="both decode to 'text'"):
        decode_sample({"__key__": "k", "__url__": "u", "txt": b"a", "caption.txt": b"b"})
    with pytest.raises(UndecodableSample, match="no member with a known extension"):
        decode_sample({"__key__": "k", "__url__": "u", "tiff": b"..."})
    # -1 marks unlabelled samples (STL-10), -100 is cross-entropy's ignore_index: no label, the sample kept
    for label in (b"-1", b"-100"):
        assert "label" not in decode_sample({"__key__": "k", "__url__": "u", "cls": label, "npy": npy_bytes(np.zeros(2))})


def test_an_unlabelled_sample_leaves_training_batches_without_labels_and_is_skipped_where_labels_are_needed(tmp_path):
    """One sample without a .cls crashed the batching of a whole pretraining run (labels unused), and gave the
    online probe a batch without labels."""
    from core.data.stream import collate
    from core.probe import OnlineProbe

    batch = collate([{"npy": torch.zeros(2), "label": 1}, {"npy": torch.ones(2)}])
    assert sorted(batch) == ["npy"] and batch["npy"].shape == (2, 2)
    samples = vector_samples(6)
    del samples[2]["cls"]
    summary = write_shards(samples, str(tmp_path / "m-%06d.tar"))
    pattern = str(tmp_path / "m-000000.tar")
    assert summary["samples"] == 6
    dm = ShardDataModule(pattern, val=pattern, batch_size=3, val_batch_size=3, num_workers=0, samples_per_epoch=6,
                         train_transform=to_tensors, val_transform=to_tensors, shuffle_buffer=0)  # fmt: skip
    assert sum(len(b["npy"]) for b in dm.train_dataloader()) == 6  # pretraining keeps every sample
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=None, callbacks=[OnlineProbe()])
    labelled = [b["label"].tolist() for b in dm.val_dataloader()]
    assert sum(map(len, labelled)) == 5 and dm.val_stream.stats.totals()["samples_skipped"] == 1
    dm.trainer.callbacks = [OnlineProbe(max_samples=0)]  # the probe off: nothing needs a label
    assert sum(len(b["npy"]) for b in dm.val_dataloader()) == 6


def test_no_training_pattern_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="data.train: no shard pattern given"):
        ShardDataModule([])


# ---- bad samples and bad shards ------------------------------------------------------------------------


def test_corrupt_member_is_skipped_counted_and_logged_once(tmp_path, caplog):
    samples = vector_samples(12)
    samples[5]["png"] = b"\x89PNG garbage, not an image"
    write_shards(samples, str(tmp_path / "bad-%06d.tar"), max_count=4)
    pattern = str(tmp_path / "bad-{000000..000002}.tar")
    with caplog.at_level(logging.WARNING, logger="core.data.stream"):
        loader = read_batches(pattern, to_tensors, batch_size=4)
        keys = keys_of(loader)
    assert sorted(keys) == sorted(s["__key__"] for i, s in enumerate(samples) if i != 5)
    assert loader.stream.stats.totals()["samples_skipped"] == 1
    assert loader.stream.stats.totals()["samples_read"] == len(samples) - 1
    warnings = [r.getMessage() for r in caplog.records if "000005" in r.getMessage()]
    assert len(warnings) == 1 and "bad-000001.tar" in warnings[0]

    # A resampled stream meets the same sample many times: counted each time, logged once.
    caplog.clear()
    dm = ShardDataModule(pattern, batch_size=4, num_workers=0, train_transform=to_tensors, samples_per_epoch=200,
                         shuffle_buffer=8)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="core.data.stream"):
        assert len(keys_of(dm.train_dataloader())) == 200
    assert dm.train_stats["samples_skipped"] > 1
    assert len([r for r in caplog.records if "000005" in r.getMessage()]) == 1


def test_a_repeated_member_loses_its_sample_only(tmp_path):
    """A member repeated in its sample (``.txt`` next to ``.TXT``) skips that sample, not the rest of the shard."""
    import tarfile

    samples = vector_samples(6)
    with tarfile.open(tmp_path / "dup-000000.tar", "w") as tar:
        for sample in samples:
            members = [(f"{sample['__key__']}.{ext}", sample[ext]) for ext in ("npy", "cls")]
            if sample["__key__"] == "000002":
                members.append(("000002.CLS", b"1"))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = read_batches(str(tmp_path / "dup-000000.tar"), to_tensors, batch_size=2)
    assert keys_of(loader) == ["000000", "000001", "000003", "000004", "000005"]
    totals = loader.stream.stats.totals()
    assert totals["samples_skipped"] == 1 and totals["shard_errors"] == 0


def test_a_link_member_loses_its_sample_with_the_link_named_not_without_a_word(tmp_path):
    """``tar`` run on a folder of symbolic links stores the links, not the files: such a sample is skipped and
    counted with its link named, where the member was dropped and the sample went on without it."""
    from core.data.inspect import inspect_shards

    samples = vector_samples(4)
    with tarfile.open(tmp_path / "ln-000000.tar", "w") as tar:
        for sample in samples:
            for ext in ("npy", "cls"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                if sample["__key__"] == "000001" and ext == "npy":
                    info.type, info.linkname = tarfile.SYMTYPE, "/data/elsewhere/000001.npy"
                    tar.addfile(info)
                else:
                    info.size = len(sample[ext])
                    tar.addfile(info, io.BytesIO(sample[ext]))
    loader = read_batches(str(tmp_path / "ln-000000.tar"), to_tensors, batch_size=1)
    assert keys_of(loader) == ["000000", "000002", "000003"]
    assert loader.stream.stats.totals()["samples_skipped"] == 1
    report = inspect_shards(str(tmp_path / "ln-000000.tar"))
    assert dict(report.skipped) == {"link member": 1}
    assert "'000001.npy' is a symbolic link to '/data/elsewhere/000001.npy'" in report.examples["link member"][0]
    assert "tar --dereference" in report.examples["link member"][0]


def test_a_hard_link_names_its_own_tar_option_and_a_link_no_decoder_reads_is_dropped(tmp_path):
    from core.data.inspect import inspect_shards

    members = [
        ("a.npy", npy_bytes(np.zeros(DIM, np.float32))), ("a.cls", b"0"), ("a.README", (tarfile.SYMTYPE, "../README")),
        ("b.cls", b"1"), ("b.npy", (tarfile.LNKTYPE, "a.npy")), ("__index__", (tarfile.SYMTYPE, "/etc/index")),
    ]  # fmt: skip
    tar_with(tmp_path / "hl-000000.tar", members)
    report = inspect_shards(str(tmp_path / "hl-000000.tar"))
    assert report.samples_read == 1 and dict(report.skipped) == {"link member": 1}  # a kept, its README link dropped
    assert "'b.npy' is a hard link to 'a.npy'" in report.examples["link member"][0]
    assert "tar --hard-dereference" in report.examples["link member"][0]


def test_a_sample_the_transform_cannot_use_is_skipped_and_counted(tmp_path, caplog):
    """An image shard's .gif sample decodes to a label alone; ImageEval skips it (counted) rather than ending the run."""
    from core.augment import ImageEval

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    samples = [{"__key__": f"{i:06d}", "png": image_bytes(pixels, "PNG"), "cls": b"0"} for i in range(5)]
    samples[3] = {"__key__": "000003", "gif": image_bytes(pixels, "GIF"), "cls": b"0"}
    write_shards(samples, str(tmp_path / "img-%06d.tar"))
    with caplog.at_level(logging.WARNING, logger="core.data.stream"):
        loader = read_batches(str(tmp_path / "img-000000.tar"), ImageEval(8, resize=8), batch_size=2)
        assert sum(len(batch["image"]) for batch in loader) == 4
    assert loader.stream.stats.totals()["samples_skipped"] == 1
    assert any("needs 'image'" in r.getMessage() and "000003" in r.getMessage() for r in caplog.records)


class TouchFile:
    """A pickle payload whose unpickling creates a file: the visible side effect of running shard code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_members_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(TouchFile(str(marker)))
    samples = vector_samples(6)
    samples[1]["pyd"] = payload
    samples[3]["pth"] = payload
    write_shards(samples, str(tmp_path / "pk-%06d.tar"), max_count=10)

    with pytest.raises(RefusedSample, match="pickle"):
        decode_sample({"__key__": "k", "__url__": "u", "PKL": payload, "cls": b"1"})
    loader = read_batches(str(tmp_path / "pk-000000.tar"), to_tensors, batch_size=2)
    keys = keys_of(loader)
    assert sorted(keys) == [s["__key__"] for i, s in enumerate(samples) if i not in (1, 3)]
    assert loader.stream.stats.totals()["samples_refused"] == 2
    assert not marker.exists()
    pickle.loads(payload).close()  # the payload is live: unpickling it does create the file
    assert marker.exists()


def test_object_npy_members_are_skipped_and_never_unpickled(tmp_path):
    """An object array in a .npy member is a pickle inside numpy's format: allow_pickle=False is all that
    keeps it from running."""
    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    np.save(buffer, np.array([TouchFile(str(marker))], dtype=object), allow_pickle=True)
    samples = vector_samples(4)
    samples[2]["npy"] = buffer.getvalue()
    write_shards(samples, str(tmp_path / "obj-%06d.tar"), max_count=10)
    loader = read_batches(str(tmp_path / "obj-000000.tar"), to_tensors, batch_size=1)
    assert sorted(keys_of(loader)) == [s["__key__"] for i, s in enumerate(samples) if i != 2]
    assert loader.stream.stats.totals()["samples_skipped"] == 1
    assert not marker.exists()
    np.load(io.BytesIO(buffer.getvalue()), allow_pickle=True)  # the payload is live: unpickling it creates the file
    assert marker.exists()


def test_pipe_source_reads_like_the_local_file(tmp_path):
    pattern = write_vectors(tmp_path, "p", 10, per_shard=4)
    local = keys_of(read_batches(pattern, to_tensors, batch_size=3))
    piped = keys_of(read_batches(f"pipe:cat {pattern}", to_tensors, batch_size=3))
    assert piped == local and len(local) == 10
    url = read_batches(f"pipe:cat {pattern}", to_tensors, batch_size=10)
    assert next(iter(url))["__url__"][0] == f"pipe:cat {tmp_path}/p-000000.tar"


def test_pattern_matching_no_file_names_the_pattern(tmp_path):
    write_vectors(tmp_path, "t", 4, per_shard=2)
    with pytest.raises(FileNotFoundError, match=r"t-\{000000\.\.000005\}\.tar.*4 of 6 shards or globs name no file"):
        expand_urls(str(tmp_path / "t-{000000..000005}.tar"))
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar.* matches no file"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards or globs name no file: .*/u-\*\.tar$"):
        expand_urls(str(tmp_path / "{t,u}-*.tar"))  # one alternative of the braces finds nothing
    assert expand_urls(str(tmp_path / "t-*.tar")) == [str(tmp_path / f"t-{i:06d}.tar") for i in range(2)]


def junk_shards(tmp_path) -> str:
    """Shards that cannot be read: one not a tar at all, one a tar whose only samples are undecodable."""
    (tmp_path / "junk-000000.tar").write_bytes(os.urandom(3000))
    write_shards([{"__key__": f"{i}", "png": b"garbage"} for i in range(3)], str(tmp_path / "junk1-%06d.tar"))
    os.rename(tmp_path / "junk1-000000.tar", tmp_path / "junk-000001.tar")
    return str(tmp_path / "junk-{000000..000001}.tar")


@pytest.mark.timeout(60)
def test_nothing_readable_raises_naming_the_shards_instead_of_looping(tmp_path):
    pattern = junk_shards(tmp_path)
    dm = ShardDataModule(pattern, val=pattern, batch_size=2, num_workers=0, samples_per_epoch=10, shuffle_buffer=4)
    with pytest.raises(NoReadableShards, match=r"junk-000000\.tar.*junk-000001\.tar"):
        next(iter(dm.train_dataloader()))
    with pytest.raises(NoReadableShards, match=r"junk-000000\.tar"):
        list(dm.val_dataloader())
    with pytest.raises(NoReadableShards, match="missing.tar"):  # a failing pipe: command
        list(read_batches(f"pipe:cat {tmp_path}/missing.tar"))


@pytest.mark.timeout(60)
def test_a_source_that_never_gave_a_sample_stops_after_a_few_shards_not_after_trying_every_one(tmp_path):
    """Shards are drawn with replacement: a broken source of N shards (a mistyped bucket) would otherwise run
    about N ln N failing commands before its error, 5,800 for 1,000."""
    dm = ShardDataModule(f"pipe:cat {tmp_path}/nowhere-{{000000..000999}}.tar", batch_size=2, num_workers=0)
    with pytest.raises(NoReadableShards, match=r"first 16 shards tried of 1000.*OSError: command 'cat .*/nowhere-0\d+\.tar' exited with status 1"):
        next(iter(dm.train_dataloader()))
    assert 16 <= dm._train_loader.stream.stats.totals()["shard_errors"] < 100


@pytest.mark.timeout(60)
def test_the_early_stop_waits_for_a_shuffle_buffer_to_fill_before_judging_a_source(tmp_path):
    """Behind a shuffle buffer no sample is decoded until it fills, while shards that fail to open are dead at
    once: with half the shards gone, 16 dead ones came before the buffer's first sample."""
    write_vectors(tmp_path, "s", 80, per_shard=2)
    for i in range(0, 40, 2):
        os.remove(tmp_path / f"s-{i:06d}.tar")
    dm = ShardDataModule(f"pipe:cat {tmp_path}/s-{{000000..000039}}.tar", batch_size=4, num_workers=0,
                         samples_per_epoch=8, shuffle_buffer=1000, train_transform=to_tensors)  # fmt: skip
    assert sum(len(batch["npy"]) for batch in dm.train_dataloader()) == 8


def test_a_missing_shard_is_named_with_its_reason_not_an_errno(tmp_path, caplog):
    pattern = write_vectors(tmp_path, "gone", 4, per_shard=2)
    loader = ShardDataModule(pattern, val=pattern, num_workers=0, val_transform=to_tensors).val_dataloader()
    os.remove(tmp_path / "gone-000001.tar")
    with caplog.at_level(logging.WARNING, logger="core.data.stream"):
        assert sum(len(batch["npy"]) for batch in loader) == 2
    assert "FileNotFoundError: [Errno 2] No such file or directory" in caplog.text


def test_a_file_a_glob_finds_named_like_a_command_is_read_as_a_file_not_run(tmp_path, monkeypatch):
    """webdataset's gopen runs a name starting with `pipe:`: a downloaded folder holding a file so named ran it."""
    write_vectors(tmp_path, "v", 2, per_shard=2)
    (tmp_path / "pipe:touch PLANTED; cat v-000000.tar #.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert "./pipe:touch PLANTED; cat v-000000.tar #.tar" in expand_urls("*.tar")
    assert sum(len(batch["npy"]) for batch in read_batches("*.tar", to_tensors, batch_size=2)) == 2
    assert not (tmp_path / "PLANTED").exists()


def test_an_image_past_pillows_pixel_limit_is_undecodable_not_decoded():
    buffer = io.BytesIO()
    PIL.Image.new("L", (12000, 12000)).save(buffer, format="PNG")  # 140 KB, 144M pixels: 690 MB decoded
    with pytest.raises(UndecodableSample, match="could be decompression bomb"):
        decode_sample({"__key__": "k", "__url__": "u", "png": buffer.getvalue()})


def numbered_video(frames: int, size: int = 32) -> np.ndarray:
    """(frames, size, size, 3) uint8, frame i a flat grey of 10 * i: which frame came back survives H.264."""
    return np.repeat(np.arange(frames, dtype=np.uint8)[:, None, None, None] * 10, size * size * 3).reshape(frames, size, size, 3)


def drifting_video(frames: int, size: int = 32) -> np.ndarray:
    """(frames, size, size, 3) uint8: a noise texture moving 2 px a frame, which codes as real footage does
    (a flat frame can code as a keyframe of its own)."""
    texture = np.random.default_rng(0).integers(0, 256, (size, size + 2 * frames, 3), dtype=np.uint8)
    return np.stack([texture[:, 2 * t : 2 * t + size] for t in range(frames)])


def cut_tail(data: bytes, keep: int = 12) -> bytes:
    """An mp4 whose coded frames after the first ``keep`` (in decoding order) are zeroed: the container and its
    index intact, the first frames decodable, the last ones not."""
    with av.open(io.BytesIO(data)) as container:
        start = [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size][keep]
    end = data.index(b"moov") - 8  # PyAV writes the index after the frames
    assert start < end
    return data[:start] + bytes(end - start) + data[end:]


def test_a_video_decodes_the_frames_a_clip_asks_for_and_no_further(monkeypatch):
    from core.data.decoders import EncodedVideo

    data = video_bytes(numbered_video(20), fps=10)
    video = decode_sample({"__key__": "k", "__url__": "u", "mp4": data})["video"]
    assert isinstance(video, EncodedVideo) and (len(video), video.fps, video.shape) == (20, 10.0, (20, 32, 32, 3))
    assert repr(video) == "EncodedVideo(20 frames, 32x32, 10 fps, sample 'k' of 'u': member 'mp4')"
    whole = video.frames()
    assert whole.shape == (20, 32, 32, 3) and whole.dtype == torch.uint8
    assert torch.equal(torch.as_tensor(np.asarray(video)), whole)
    assert [round(float(f.float().mean()) / 10) for f in whole] == list(range(20))
    assert torch.equal(video[torch.tensor([7, 2, 2, 5])], whole[[7, 2, 2, 5]])  # any order, repeats

    read = []
    real_demux = av.container.InputContainer.demux

    def counting_demux(container, *args, **kwargs):
        for packet in real_demux(container, *args, **kwargs):
            read.append(packet)
            yield packet

    monkeypatch.setattr(av.container.InputContainer, "demux", counting_demux)
    video[[3, 5]]
    assert len(read) == 8  # of 20: frames 0-5, and 2 more the decoder holds back to reorder its B-frames
    monkeypatch.undo()

    # So a video whose last frames cannot be decoded still gives its first ones; asked for the last, or
    # decoded whole (a reader without a transform, inspect), it is an undecodable sample, counted.
    broken = decode_sample({"__key__": "k", "__url__": "u", "mp4": cut_tail(data)})["video"]
    assert torch.equal(broken[[0, 1, 2]], whole[:3])
    with pytest.raises(UndecodableSample, match="sample 'k' of 'u': member 'mp4': cannot decode frames") as error:
        broken[[19]]
    assert error.value.reason == "undecodable .mp4"


@pytest.mark.parametrize(
    "ext, container_format, codec, options",
    [
        ("mp4", "mp4", "libx264", {"bf": "3"}),  # B-frames: decoding order differs from presentation order
        ("mkv", "matroska", "libx264", {}),
        ("mov", "mov", "libx264", {}),
        ("avi", "avi", "mpeg4", {"bf": "2"}),
        ("webm", "webm", "libvpx", {"auto-alt-ref": "1", "lag-in-frames": "16"}),  # hidden alt-ref frames
        ("webm", "webm", "libvpx-vp9", {}),
    ],
)
def test_every_video_format_counts_its_frames_without_decoding_them(ext, container_format, codec, options):
    """``len(video)`` counts packets, one a frame: true of each format the decoder takes, B-frames and VP8's
    hidden frames included, checked against decoding every frame."""
    data = encoded_video(container_format, codec, options, drifting_video(40, size=64))
    video = decode_sample({"__key__": "k", ext: data})["video"]
    with av.open(io.BytesIO(data)) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    assert len(video) == len(every) == 40
    assert np.array_equal(video[[39, 0]].numpy(), np.stack([every[39], every[0]]))


def remuxed(data: bytes, drop_first: int = 0, shift: int = 0, container_format: str = "mp4") -> bytes:
    """``data``'s packets copied into a new mp4 without re-encoding: the first ``drop_first`` left out (a cut
    before the first keyframe), the timestamps moved ``shift`` frames back (an edit list then discards those
    frames, as FFmpeg writes for a stream whose first timestamp is negative)."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(out, mode="w", format=container_format) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        packets = [packet for packet in source.demux(source.streams.video[0]) if packet.size]
        for packet in packets[drop_first:]:
            packet.pts -= shift * packet.duration
            packet.dts -= shift * packet.duration
            packet.stream = stream
            target.mux(packet)
    return out.getvalue()


def test_a_video_counts_the_frames_it_shows_and_a_clip_picks_again_from_those_it_has():
    from core.augment import VideoClip

    gops = video_bytes(drifting_video(40), fps=10, options={"g": "10", "bf": "0"})  # a keyframe every 10 frames
    for data, shown in [(remuxed(gops, drop_first=3), 30), (remuxed(gops, shift=5), 35)]:
        with av.open(io.BytesIO(data)) as container:
            every = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])
        video = decode_sample({"__key__": "k", "mp4": data})["video"]
        assert len(every) == len(video) == shown
        assert np.array_equal(video.frames().numpy(), every)
        clip = VideoClip(16, 4, 32, train=False, short_clips="repeat_last")({"video": video})["video"]
        assert clip.shape == (3, 16, 32, 32)

    # Should a container still count more frames than its stream shows, a clip is picked again from those.
    video = decode_sample({"__key__": "k", "mp4": video_bytes(numbered_video(12), fps=10)})["video"]
    video.num_frames = 20
    clip = VideoClip(4, 2, 32, train=False, mean=(0, 0, 0), std=(1, 1, 1))({"video": video})["video"]
    # Centred in 20, frames 6-12 at stride 2 reach past the 12; centred in 12, frames 2-8.
    assert len(video) == 12 and [round(float(f.mean()) * 25.5) for f in clip.unbind(1)] == [2, 4, 6, 8]


def test_a_stream_cut_inside_a_group_of_pictures_decodes_from_its_first_keyframe():
    """VP9 refuses the packets before the first keyframe (FFmpeg's h264 skips them): they are not fed to it."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=10, options={"g": "10"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in drifting_video(40):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    video = decode_sample({"__key__": "k", "webm": remuxed(out.getvalue(), drop_first=3, container_format="webm")})["video"]
    assert len(video) == 30 and video.frames().shape == (30, 32, 32, 3)


@pytest.mark.parametrize(
    "ext, container_format, codec, options, seeks",
    [
        ("mp4", "mp4", "libx264", {"g": "10", "bf": "3"}, True),  # closed groups of pictures with B-frames
        ("mkv", "matroska", "libx264", {"g": "7", "bf": "2"}, True),
        ("webm", "webm", "libvpx", {"g": "10", "auto-alt-ref": "1", "lag-in-frames": "16"}, True),  # hidden frames
        ("webm", "webm", "libvpx-vp9", {"g": "10"}, True),
        # Open groups: B-frames decoded after a keyframe show before it and refer to the group before it.
        ("mp4", "mp4", "libx264", {"g": "10", "bf": "3", "x264-params": "open-gop=1"}, True),
        # Intra refresh flags its recovery points as keyframes, P-frames that FFmpeg drops when it starts there:
        # the decode from such a point misses its first frame and starts again from the first keyframe.
        ("mp4", "mp4", "libx264", {"bf": "0", "x264-params": "intra-refresh=1:keyint=20:scenecut=0"}, True),
        # avi holds no presentation times and may flag every frame a keyframe (h263p does): no seeking.
        ("avi", "avi", "mpeg4", {"g": "10", "bf": "2"}, False),
        ("avi", "avi", "h263p", {"g": "10"}, False),
    ],
)
def test_a_clip_decodes_from_the_last_clean_keyframe_before_it_the_frames_a_whole_decode_gives(
    ext, container_format, codec, options, seeks
):
    """Where a clip starts past a keyframe, decoding starts there (decord's seek), and only at a keyframe that
    cuts the stream cleanly: each frame of the 60 is asked for, as the first of a clip of 3, and compared."""
    data = encoded_video(container_format, codec, options, drifting_video(60, size=48))
    video = decode_sample({"__key__": "k", ext: data})["video"]
    with av.open(io.BytesIO(data)) as container:
        keyframes = sum(packet.is_keyframe for packet in container.demux(container.streams.video[0]))
    with av.open(io.BytesIO(data)) as container:
        every = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])
    assert len(video) == len(every) == 60
    assert (len(video.seek_points) > 1) == seeks
    if "open-gop=1" in options.get("x264-params", ""):
        assert 1 < len(video.seek_points) < keyframes  # keyframes with frames shown before them are passed over
    for first in range(60):
        clip = list(range(first, min(first + 3, 60)))
        assert np.array_equal(video[clip].numpy(), every[clip]), f"frames {clip}"


def test_a_keyframe_is_a_start_only_where_no_frame_crosses_it():
    """(position, pts, shown, keyframe) in decoding order -> (first frame shown, position) of each start."""
    from core.data.decoders import clean_keyframes

    def starts(*packets):
        return clean_keyframes([(position, *packet) for position, packet in enumerate(packets)])

    assert starts((0, 1, 1), (2, 1, 0), (1, 1, 0), (3, 1, 1), (5, 1, 0), (4, 1, 0)) == [(0, 0), (3, 3)]
    assert starts((0, 1, 1), (1, 1, 0), (3, 1, 1), (2, 1, 0)) == [(0, 0)]  # frame 2 decoded after keyframe 3
    assert starts((0, 1, 1), (3, 1, 0), (2, 1, 1), (4, 1, 0)) == [(0, 0)]  # frame 3 decoded before keyframe 2
    assert starts((5, 1, 1), (4, 1, 0), (6, 1, 0), (7, 1, 1)) == [(0, 0)]  # cut at an open group: frame 4 may drop
    assert starts((0, 1, 1), (1, 1, 0), (3, 1, 1), (3, 1, 0), (4, 1, 0)) == [(0, 0)]  # a B-frame given its keyframe's time
    assert starts((-2, 0, 1), (-1, 0, 0), (0, 1, 0), (1, 1, 1)) == [(0, 0), (1, 3)]  # an edit list's frames not counted
    assert starts((None, 1, 1), (None, 1, 0), (None, 1, 1)) == [(0, 0)]  # no timestamps


def test_a_seek_the_decoder_does_not_bear_out_decodes_from_the_first_keyframe():
    """Containers can flag keyframes and give times that a decoder starting there does not bear out: every
    frame of an h263 stream moved from avi (which flags every frame a keyframe) into mov is flagged, and
    decoded from a P-frame it would give garbage. Such a start, or one whose frames show at other times than
    the container's, is given up for the first keyframe, for this video from then on."""
    data = remuxed(encoded_video("avi", "h263p", {"g": "10"}, drifting_video(60, size=48)), container_format="mov")
    with av.open(io.BytesIO(data)) as container:
        every = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])
    flagged = decode_sample({"__key__": "k", "mov": data})["video"]
    assert len(flagged.seek_points) == 60  # every frame flagged
    assert np.array_equal(flagged[[30, 31]].numpy(), every[[30, 31]])  # frame 30 decoded first is no keyframe
    assert flagged.seek_points == [(0, 0)]

    data = video_bytes(drifting_video(40), fps=10, options={"g": "10", "bf": "0", "x264-params": "scenecut=0"})
    late = decode_sample({"__key__": "k", "mp4": data})["video"]
    whole = late.frames()
    late.frame_pts = [pts + 1 for pts in late.frame_pts]  # what the container would promise, were it off by a tick
    assert torch.equal(late[[25, 27]], whole[[25, 27]]) and late.seek_points == [(0, 0)]

    # x264's intra refresh flags its last frame, a P-frame, a keyframe: started there, FFmpeg gives no frame.
    data = encoded_video("mp4", "libx264", {"bf": "0", "x264-params": "intra-refresh=1:keyint=20:scenecut=0"}, drifting_video(41, size=48))
    with av.open(io.BytesIO(data)) as container:
        every = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])
    refreshed = decode_sample({"__key__": "k", "mp4": data})["video"]
    assert refreshed.seek_points[-1][0] == 40
    assert np.array_equal(refreshed[[40]].numpy(), every[[40]])


def zeroed(data: bytes, start: int, stop: int) -> bytes:
    """An mp4 whose coded frames ``start`` to ``stop`` - 1 (in decoding order) are zeroed, the rest intact."""
    with av.open(io.BytesIO(data)) as container:
        positions = [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size]
    return data[: positions[start]] + bytes(positions[stop] - positions[start]) + data[positions[stop] :]


def test_a_clip_after_a_damaged_group_of_pictures_decodes_from_the_keyframe_past_it():
    """The frames before the clip's keyframe are not decoded at all: a clip past damaged ones still comes out."""
    data = video_bytes(drifting_video(40), fps=10, options={"g": "10", "bf": "0", "x264-params": "scenecut=0"})
    whole = decode_sample({"__key__": "k", "mp4": data})["video"].frames()
    damaged = decode_sample({"__key__": "k", "mp4": zeroed(data, 1, 8)})["video"]  # inside the first group
    assert [point[0] for point in damaged.seek_points] == [0, 10, 20, 30]
    assert torch.equal(damaged[[25, 27, 29]], whole[[25, 27, 29]])
    with pytest.raises(UndecodableSample, match="cannot decode frames"):
        damaged[[5]]


def test_a_video_showing_fewer_frames_than_counted_loses_its_sample_under_another_transform_not_the_run(tmp_path):
    """x264's intra refresh flags few keyframes; cut, this stream counts 44 frames and shows 39."""
    refreshed = video_bytes(drifting_video(80), fps=10, options={"x264-params": "intra-refresh=1:keyint=20"})
    cut = remuxed(refreshed, drop_first=25)
    video = decode_sample({"__key__": "k", "mp4": cut})["video"]
    counted = len(video)
    assert counted > len(video.frames()) == len(video)  # frames() gives those there are, and corrects the count

    def last_frame(sample: dict) -> dict:  # a transform of a user's, indexing by the count
        video = sample["video"]
        return {"frame": video[[len(video) - 1]][0], "label": sample["label"]}

    write_shards([{"__key__": "a", "mp4": cut, "cls": b"0"}, {"__key__": "b", "mp4": video_bytes(numbered_video(4), fps=10), "cls": b"1"}],
                 str(tmp_path / "few-%06d.tar"))  # fmt: skip
    loader = read_batches(str(tmp_path / "few-000000.tar"), last_frame, batch_size=1)
    assert [batch["label"].item() for batch in loader] == [1]
    assert loader.stream.stats.totals()["samples_skipped"] == 1


def test_video_frames_are_indexed_as_a_tensor_is_and_wrong_indices_say_so():
    video = decode_sample({"__key__": "k", "mp4": video_bytes(numbered_video(10), fps=10)})["video"]
    every = video.frames()
    assert torch.equal(video[-2:], every[8:]) and torch.equal(video[[-1, 0]], every[[9, 0]])
    assert torch.equal(video[np.array([3, 3])], every[[3, 3]])
    wrongs = [3, np.int64(3), torch.tensor(3), [1.5], torch.tensor([True] + [False] * 9), [10], []]
    for wrong, error in zip(wrongs, [TypeError] * 5 + [IndexError] * 2):
        with pytest.raises(error):
            video[wrong]
    with pytest.raises(ValueError, match="cannot avoid a copy"):
        np.asarray(video, copy=False)
    assert np.asarray(video, dtype=np.float32).dtype == np.float32
    with pytest.raises(UndecodableSample, match=r"a still image \(png_pipe\), not a video"):
        decode_sample({"__key__": "k", "mp4": image_bytes(numbered_video(1)[0], "PNG")})


def test_a_video_whose_frame_size_changes_is_undecodable_and_skipped_not_a_crash(tmp_path):
    """As when every frame was decoded and stacked: a sample, skipped and counted, not an error of the run."""
    from core.augment import VideoClip

    def jpeg(side: int) -> bytes:
        return image_bytes(np.full((side, side, 3), 128, np.uint8), "JPEG")

    out = io.BytesIO()
    with av.open(out, mode="w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.time_base = 32, 32, "yuvj420p", fractions.Fraction(1, 10)
        for t, side in enumerate([32] * 3 + [48] * 3):
            packet = av.Packet(jpeg(side))
            packet.pts = packet.dts = t
            packet.stream, packet.time_base = stream, stream.time_base
            container.mux(packet)
    good = video_bytes(numbered_video(6), fps=10)
    write_shards([{"__key__": "a", "mkv": out.getvalue(), "cls": b"0"}, {"__key__": "b", "mp4": good, "cls": b"1"}],
                 str(tmp_path / "rs-%06d.tar"))  # fmt: skip
    loader = read_batches(str(tmp_path / "rs-000000.tar"), VideoClip(4, 1, 16, train=False), batch_size=1)
    assert [batch["label"].item() for batch in loader] == [1]
    assert loader.stream.stats.totals()["samples_skipped"] == 1


def test_a_video_whose_frames_cannot_be_decoded_is_skipped_and_counted_where_a_clip_needs_them(tmp_path):
    from core.augment import VideoClip
    from core.data.inspect import inspect_shards

    good = video_bytes(numbered_video(20), fps=10)
    samples = [{"__key__": f"{i:06d}", "mp4": good, "cls": str(i).encode()} for i in range(4)]
    samples[2]["mp4"] = cut_tail(good)
    write_shards(samples, str(tmp_path / "v-%06d.tar"))
    pattern = str(tmp_path / "v-000000.tar")
    last_frames = VideoClip(4, 1, 32, train=False)  # a centred clip of 20 frames: frames 8-11, past the cut
    loader = read_batches(pattern, last_frames, batch_size=2)
    assert [label for batch in loader for label in batch["label"].tolist()] == [0, 1, 3]
    assert loader.stream.stats.totals()["samples_skipped"] == 1
    whole = read_batches(pattern, batch_size=1)  # no transform: whole videos
    assert keys_of(whole) == ["000000", "000001", "000003"] and whole.stream.stats.totals()["samples_skipped"] == 1
    assert dict(inspect_shards(pattern).skipped) == {"undecodable .mp4": 1}


def test_video_clip_benchmark_times_every_way_on_real_videos(capsys):
    from core.data import bench_video

    bench_video.main(["--videos", "2", "--frames", "24", "--width", "96", "--height", "64", "--clip-frames", "4",
                      "--stride", "2", "--size", "16", "--rounds", "1"])  # fmt: skip
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "clips/s" not in line]
    assert [r[0].strip() for r in rows] == ["whole video (reference)", "clip frames from the first keyframe", "clip frames"]
    assert rows[0][2].strip() == "1.00x" and all(float(r[1]) > 0 for r in rows)
    whole_mb, *clip_mb = (float(r[3].split()[0]) for r in rows)
    assert max(clip_mb) < whole_mb  # 4 frames held, not 24


def test_a_video_past_pillows_pixel_limit_is_undecodable_not_decoded(monkeypatch):
    data = video_bytes(numbered_video(2), fps=10)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    with pytest.raises(UndecodableSample, match="frame size 32x32 .1024 pixels. exceeds the limit") as error:
        decode_sample({"__key__": "k", "__url__": "u", "mp4": data})
    assert error.value.reason == "undecodable .mp4"


def test_file_urls_are_checked_and_globbed_as_local_paths(tmp_path):
    write_vectors(tmp_path, "f", 4, per_shard=2)
    assert expand_urls(f"file://{tmp_path}/f-*.tar") == [str(tmp_path / f"f-{i:06d}.tar") for i in range(2)]
    with pytest.raises(FileNotFoundError, match="1 of 3 shards or globs name no file"):
        expand_urls(f"file://{tmp_path}/f-{{000000..000002}}.tar")


def test_a_new_batch_size_gets_a_new_training_loader(tmp_path):
    """Lightning's batch-size tuner sets `datamodule.batch_size` and asks for the loader again."""
    dm = ShardDataModule(write_vectors(tmp_path, "b", 8, per_shard=4), batch_size=2, num_workers=0, samples_per_epoch=8)
    first = dm.train_dataloader()
    assert dm.train_dataloader() is first
    dm.batch_size = 4
    second = dm.train_dataloader()
    assert second is not first and len(second) == 2 and len(next(iter(second))["__key__"]) == 4


def test_unreadable_shards_next_to_good_ones_are_counted_and_skipped(tmp_path):
    good = write_vectors(tmp_path, "good", 8, per_shard=4)
    junk = junk_shards(tmp_path)
    dm = ShardDataModule(good, val=[good, junk], batch_size=4, num_workers=0, samples_per_epoch=40,
                         train_transform=to_tensors, val_transform=to_tensors)  # fmt: skip
    assert len(keys_of(dm.train_dataloader())) == 40
    assert sorted(keys_of(dm.val_dataloader())) == [f"good_{i:06d}" for i in range(8)]
    assert dm.val_stats["shard_errors"] == 1 and dm.val_stats["samples_skipped"] == 3


@pytest.mark.parametrize("damage", ["cut", "corrupt header"])
def test_a_cut_or_corrupt_tar_is_a_shard_error_not_a_short_shard(tmp_path, damage):
    """Python's tarfile takes a cut-off or corrupt header after the first member for the end of the archive.
    The samples before it are kept, and the shard is counted as an error instead of passing for a short one."""
    whole = tmp_path / "whole-000000.tar"
    write_shards(vector_samples(10, "s"), str(tmp_path / "whole-%06d.tar"))
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        header = tar.getmembers()[10].offset  # the first member of the sixth sample
    damaged = data[:header] if damage == "cut" else data[:header] + b"\xff" * 512 + data[header + 512 :]
    (tmp_path / "damaged.tar").write_bytes(damaged)
    for url in [str(whole), str(tmp_path / "damaged.tar"), f"pipe:cat {tmp_path}/damaged.tar"]:
        loader = read_batches(url, to_tensors, batch_size=100)
        keys = keys_of(loader)
        counts = loader.stream.stats.totals()
        if url == str(whole):
            assert len(keys) == 10 and counts["shard_errors"] == 0
        else:
            # The sample being read when the read failed may have lost members: skipped and counted.
            assert keys == [f"s{i:06d}" for i in range(4)] and counts["shard_errors"] == 1, url
            assert counts["samples_skipped"] == 1, url
    with pytest.raises(tarfile.ReadError, match=r"stops at byte \d+, after 10 members, without its end-of-archive"):
        list(read_shard(str(tmp_path / "damaged.tar")))


# ---- the training stream: epochs, mixing, seeding, splitting ----------------------------------------------


def test_mixing_follows_the_weights(tmp_path):
    big = write_vectors(tmp_path, "big", 40, per_shard=10)
    small = write_vectors(tmp_path, "small", 20, per_shard=10, seed=1)
    dm = ShardDataModule([big, small], train_weights=[0.8, 0.2], batch_size=50, num_workers=0, samples_per_epoch=2000,
                         train_transform=to_tensors, shuffle_buffer=20)  # fmt: skip
    keys = keys_of(dm.train_dataloader())
    assert len(keys) == 2000
    drawn_small = sum(key.startswith("small_") for key in keys)
    assert abs(drawn_small / len(keys) - 0.2) < 3 * math.sqrt(0.2 * 0.8 / len(keys))
    assert dm.train_stats["source_1_samples"] == drawn_small  # in-process: drawn == delivered
    assert dm.train_stats["source_0_samples"] == len(keys) - drawn_small


def test_default_weights_follow_shard_counts(tmp_path):
    a = write_vectors(tmp_path, "a", 30, per_shard=10)
    b = write_vectors(tmp_path, "b", 10, per_shard=10)
    dm = ShardDataModule([a, b], batch_size=40, num_workers=0, samples_per_epoch=1200, train_transform=to_tensors)
    keys = keys_of(dm.train_dataloader())
    assert abs(sum(k.startswith("b_") for k in keys) / len(keys) - 0.25) < 3 * math.sqrt(0.25 * 0.75 / len(keys))


def test_epoch_length_and_fresh_samples_each_pass(tmp_path):
    pattern = write_vectors(tmp_path, "e", 60, per_shard=10)
    make = lambda seed: ShardDataModule(pattern, batch_size=7, num_workers=2, samples_per_epoch=100, seed=seed,
                                        train_transform=to_tensors, shuffle_buffer=10)  # fmt: skip
    dm = make(0)
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(100 / 7)
    first, second = keys_of(loader), keys_of(loader)
    assert len(first) == len(second) == len(loader) * 7
    assert first != second  # a new pass (epoch) draws new samples
    assert keys_of(make(0).train_dataloader()) == first  # ... deterministically from the seed
    assert keys_of(make(1).train_dataloader()) != first
    assert set(first) <= {f"e_{i:06d}" for i in range(60)}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_reads_whole_shards_over_short_epochs(tmp_path, num_workers):
    # Epochs far shorter than a shard: restarted at every pass, the stream read only the first ~40 + 20
    # samples of each shard it drew (the shuffle buffer's worth past the epoch), never the shards' tails.
    pattern = write_vectors(tmp_path, "h", 200, per_shard=100)
    dm = ShardDataModule(pattern, batch_size=10, num_workers=num_workers, samples_per_epoch=40, shuffle_buffer=20,
                         train_transform=to_tensors)  # fmt: skip
    loader = dm.train_dataloader()
    positions = [int(key.split("_")[1]) % 100 for _ in range(15) for key in keys_of(loader)]  # 600 draws
    assert len(positions) == 600
    assert len(set(positions)) == 100  # every position of a shard is drawn, the last ones too
    assert sum(p >= 50 for p in positions) > 200  # the second halves as often as the first, about
    assert dm.train_dataloader() is loader  # asked again (reload_dataloaders_every_n_epochs): the same stream
    loader._iterator = None  # as Lightning resets at the end of a fit: a new stream, seeded as a new start
    restarted = keys_of(loader)
    assert restarted != keys_of(ShardDataModule(pattern, batch_size=10, num_workers=num_workers, samples_per_epoch=40,
                                                shuffle_buffer=20, train_transform=to_tensors).train_dataloader())  # fmt: skip


def test_val_split_across_workers_reads_each_sample_once(tmp_path):
    pattern = write_vectors(tmp_path, "v", 50, per_shard=8)  # 7 shards, uneven
    dm = ShardDataModule(pattern, val=pattern, batch_size=4, val_batch_size=5, num_workers=3, val_transform=to_tensors)
    keys = keys_of(dm.val_dataloader())
    assert sorted(keys) == [f"v_{i:06d}" for i in range(50)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_val_with_fewer_shards_than_ranks_splits_samples_and_leaves_no_rank_empty(tmp_path, num_workers):
    # 2 shards over 3 ranks: a rank without batches would miss DDP's first validation forward (a buffer
    # broadcast) and the probes' gathers, and hang the others.
    pattern = write_vectors(tmp_path, "s", 13, per_shard=7)
    per_rank = []
    for rank in range(3):
        stream = ShardStream([expand_urls(pattern)], 2, False, transform=to_tensors, rank=rank, world_size=3, num_workers=num_workers)
        per_rank.append(keys_of(ShardLoader(stream, num_workers)))
    assert all(per_rank)
    assert sorted(k for keys in per_rank for k in keys) == [f"s_{i:06d}" for i in range(13)]  # each once
    # Fewer samples than ranks: a rank gets none, and is told why (not that the shards are unreadable).
    few = write_vectors(tmp_path, "few", 2, per_shard=2)
    stream = ShardStream([expand_urls(few)], 2, False, transform=to_tensors, rank=2, world_size=3, num_workers=num_workers)
    with pytest.raises(NoReadableShards, match="fewer samples than the 3 ranks that share them.*rank 2 gets none"):
        list(ShardLoader(stream, num_workers))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_val_batches_gives_every_rank_that_many_full_batches_of_its_share(tmp_path, num_workers):
    # 3 shards of 7 over 2 ranks: read once, rank 0 would make 3 batches of 5 and rank 1 two, and under FSDP
    # rank 0's third validation forward would wait for rank 1 for ever.
    pattern = write_vectors(tmp_path, "e", 21, per_shard=7)
    dm = ShardDataModule(pattern, val=pattern, val_batch_size=5, val_batches=4, num_workers=num_workers, val_transform=to_tensors)
    shares = [[f"e_{i:06d}" for i in range(0, 7)] + [f"e_{i:06d}" for i in range(14, 21)], [f"e_{i:06d}" for i in range(7, 14)]]
    for rank, share in enumerate(shares):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=None)
        batches = list(dm.val_dataloader())
        assert [len(batch["__key__"]) for batch in batches] == [5, 5, 5, 5]
        assert {key for batch in batches for key in batch["__key__"]} == set(share)  # all of it, round after round


def test_a_sharded_run_without_val_batches_is_refused_naming_the_key(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    pattern = write_vectors(tmp_path, "f", 21, per_shard=7)
    dm = ShardDataModule(pattern, val=pattern, val_batch_size=5, num_workers=0, val_transform=to_tensors)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match="data.val_batches must be set under ModelParallelStrategy"):
        dm.val_dataloader()
    dm.val_batches = 2
    assert len(list(dm.val_dataloader())) == 2


@pytest.mark.timeout(60)
def test_val_batches_over_unreadable_shards_raise_instead_of_looping(tmp_path):
    pattern = junk_shards(tmp_path)
    dm = ShardDataModule(pattern, val=pattern, batch_size=2, val_batches=3, num_workers=0)
    with pytest.raises(NoReadableShards, match=r"junk-000000\.tar"):
        list(dm.val_dataloader())


def test_rank_comes_from_the_trainer_not_the_environment(tmp_path, monkeypatch):
    pattern = write_vectors(tmp_path, "r", 12, per_shard=4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what webdataset's split_by_node would read
    dm = ShardDataModule(pattern, val=pattern, batch_size=4, num_workers=0, val_transform=to_tensors)
    assert sorted(keys_of(dm.val_dataloader())) == [f"r_{i:06d}" for i in range(12)]
    assert dm.batches_per_epoch() == math.ceil(dm.samples_per_epoch / dm.batch_size)


# ---- inside a Trainer -----------------------------------------------------------------------------


class VectorModel(L.LightningModule):
    """Regresses the label from the vector; records the keys of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(DIM, 1)
        self.seen: list[str] = []
        self.start_steps: list[int] = []

    def on_train_epoch_start(self):
        self.start_steps.append(self.trainer.global_step)

    def training_step(self, batch, batch_idx):
        self.seen += batch["__key__"]
        return torch.nn.functional.mse_loss(self.layer(batch["x"]).squeeze(1), batch["label"].float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(default_root_dir=tmp_path, **{**options, **kwargs})


def test_per_source_counts_are_logged_during_training(tmp_path):
    a = write_vectors(tmp_path, "a", 20, per_shard=10)
    b = write_vectors(tmp_path, "b", 20, per_shard=10, seed=1)
    dm = ShardDataModule([a, b], train_weights=[0.75, 0.25], batch_size=8, num_workers=1, samples_per_epoch=160,
                         train_transform=VectorTransform())  # fmt: skip
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=5).fit(VectorModel(), dm)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row.get("data/source_0_samples")]
    steps = [int(row["step"]) for row in rows]
    assert steps == list(range(0, dm.batches_per_epoch(), 5))
    last = rows[-1]
    drawn = [int(float(last["data/source_0_samples"])), int(float(last["data/source_1_samples"]))]
    assert sum(drawn) >= steps[-1] * dm.batch_size  # counted in the worker, which runs ahead of training
    assert int(float(last["data/samples_read"])) >= sum(drawn)


def test_transform_is_configured_from_yaml_by_class_path(tmp_path):
    pattern = write_vectors(tmp_path, "y", 8, per_shard=4)
    config = {
        "data": {"train": pattern, "batch_size": 4, "num_workers": 0, "samples_per_epoch": 8,
                 "train_transform": {"class_path": "test_data_stream.VectorTransform", "init_args": {"scale": 2.5}}},
        "trainer": {"max_epochs": 1, "logger": False, "enable_checkpointing": False, "accelerator": "cpu",
                    "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    (tmp_path / "data.yaml").write_text(json.dumps(config))  # JSON is YAML
    cli = LightningCLI(VectorModel, ShardDataModule, run=False, args=["--config", str(tmp_path / "data.yaml")])
    transform = cli.datamodule.train_transform
    assert isinstance(transform, VectorTransform) and transform.scale == 2.5
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(cli.model.seen) == 8


def test_resumed_run_does_not_replay_samples(tmp_path):
    pattern = write_vectors(tmp_path, "s", 200, per_shard=20)
    make_dm = lambda: ShardDataModule(pattern, batch_size=8, num_workers=1, samples_per_epoch=80, shuffle_buffer=20,
                                      train_transform=VectorTransform())  # fmt: skip
    first = VectorModel()
    run = trainer(tmp_path, max_epochs=1)
    run.fit(first, make_dm())
    checkpoint = str(tmp_path / "epoch0.ckpt")
    run.save_checkpoint(checkpoint)

    resumed = VectorModel()
    dm = make_dm()
    trainer(tmp_path, max_epochs=2).fit(resumed, dm, ckpt_path=checkpoint)
    # Lightning restores the global step before it builds and iterates the train loader ...
    assert resumed.start_steps == [dm.batches_per_epoch()] and dm.train_stream.start_step == dm.batches_per_epoch()
    # ... so the resumed epoch is not the first epoch over again (with a step-free seed it would be).
    assert len(resumed.seen) == len(first.seen) == dm.batches_per_epoch() * dm.batch_size
    assert resumed.seen != first.seen
    overlap = len(set(resumed.seen) & set(first.seen)) / len(set(first.seen))
    assert overlap < 0.9
    # A fresh run with the same seed replays the first epoch exactly: the difference above is the resume.
    fresh = VectorModel()
    trainer(tmp_path, max_epochs=1).fit(fresh, make_dm())
    assert fresh.seen == first.seen


class DeviceFinished(VectorTransform):
    """Leaves a step for the training device and records which split's batches it finished there."""

    def __init__(self, split: str):
        super().__init__()
        self.split, self.finished = split, 0

    def on_device(self, batch):
        self.finished += 1
        batch["split"] = self.split
        return batch


class SplitModel(VectorModel):
    def training_step(self, batch, batch_idx):
        assert batch["split"] == "train"
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        assert batch["split"] == "val"


def test_transforms_finish_their_own_split_on_the_device(tmp_path):
    pattern = write_vectors(tmp_path, "d", 16, per_shard=8)
    train, val = DeviceFinished("train"), DeviceFinished("val")
    dm = ShardDataModule(pattern, val=pattern, batch_size=4, num_workers=0, samples_per_epoch=16,
                         train_transform=train, val_transform=val)  # fmt: skip
    trainer(tmp_path, max_epochs=1).fit(SplitModel(), dm)
    assert train.finished == 4 and val.finished == 4


class Drawing(VectorTransform):
    """Draws from torch's global generator in the data worker (as a crop does) and on the device (as
    core.augment's colour steps do), and from Python's and NumPy's in the worker (as a transform of one's
    own may, timm's RandAugment say)."""

    def __call__(self, sample: dict) -> dict:
        return {**super().__call__(sample), "crop": torch.rand(()), "host": torch.tensor([random.random(), np.random.rand()])}

    def on_device(self, batch):
        return {**batch, "jitter": torch.rand(len(batch["x"]))}


class DrawsModel(VectorModel):
    def __init__(self):
        super().__init__()
        self.draws, self.host_draws = {}, {}

    def training_step(self, batch, batch_idx):
        self.draws[self.global_step] = (batch["crop"].tolist(), batch["jitter"].tolist(), torch.rand(2).tolist())
        self.host_draws[self.global_step] = batch["host"].T.tolist()  # [Python's draws, NumPy's]
        return super().training_step(batch, batch_idx)


def test_a_resume_with_other_samples_per_step_is_refused_and_another_split_of_them_resumes(tmp_path):
    """The schedules count steps of the checkpoint's size (core.cli.SameStepOnResume)."""
    from core.cli import SameStepOnResume

    pattern = write_vectors(tmp_path, "q", 32, per_shard=16)

    def fit(batch_size, accumulate=1, ckpt_path=None):
        dm = ShardDataModule(pattern, batch_size=batch_size, num_workers=0, samples_per_epoch=12, train_transform=VectorTransform())
        saving = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        fitting = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[SameStepOnResume(), saving],
                          enable_checkpointing=True)  # fmt: skip
        fitting.fit(VectorModel(), dm, ckpt_path=ckpt_path)
        return fitting

    assert fit(4).global_step == 6  # 3 steps of 4 samples an epoch
    with pytest.raises(ValueError, match="samples per step 4 where this run takes 8, samples per batch 4 where this run takes 8"):
        fit(8, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    # The same samples per step in batches of 2: Lightning would take the 3 batches done as 3 of the epoch's
    # 6, not as the whole epoch, and the run would end at step 5 of 6: refused.
    with pytest.raises(ValueError, match="samples per batch 4 where this run takes 2"):
        fit(2, accumulate=2, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert fit(4, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt").global_step == 6
    # A checkpoint of a run without a batch size to compare (saved as None) resumes.
    callback = SameStepOnResume()
    callback.samples = {"samples_per_step": 8, "samples_per_batch": 8}
    callback.load_state_dict({"samples_per_step": None})
    callback.on_train_start(None, None)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_resumed_run_draws_on_the_device_and_in_the_workers_as_the_unbroken_run_would(tmp_path, num_workers):
    """core.cli.RankSeed restores the main process's stream before the first batch is read and reaches the
    device, and a worker's stream is keyed like its samples (seed, rank, worker, step): a run resumed
    mid-epoch makes the unbroken run's device and training draws, and does not repeat the crops of the run's
    first steps (without workers the crops draw from the main stream: the unbroken run's crops)."""
    pattern = write_vectors(tmp_path, "r", 64, per_shard=16)

    def fit(ckpt_path=None):
        L.seed_everything(0)
        model = DrawsModel()
        dm = ShardDataModule(pattern, batch_size=4, num_workers=num_workers, samples_per_epoch=32, shuffle_buffer=8,
                             train_transform=Drawing())  # fmt: skip
        saving = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
        trainer(tmp_path, max_steps=6, callbacks=[RankSeed(), saving], enable_checkpointing=True).fit(model, dm, ckpt_path=ckpt_path)
        return model.draws, model.host_draws

    unbroken, unbroken_host = fit()
    resumed, resumed_host = fit(tmp_path / "ckpt" / "step=3.ckpt")
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert resumed[step][1:] == unbroken[step][1:], step  # the device's and the model's draws
    crops = lambda draws: {tuple(crop) for crop, _, _ in draws.values()}
    host = lambda draws, which: {value for step in draws.values() for value in step[which]}
    if num_workers:  # Python's and NumPy's too: they had been seeded alike in every run, and a resume replayed them
        assert not crops(resumed) & crops(unbroken)
        assert not host(resumed_host, 0) & host(unbroken_host, 0) and not host(resumed_host, 1) & host(unbroken_host, 1)
    else:
        assert all(resumed[step] == unbroken[step] for step in resumed)


def test_a_failing_pipe_says_its_exit_status_and_unknown_schemes_are_refused(tmp_path, monkeypatch):
    stats = StreamStats(list(COUNTERS), 0)
    assert list(raw_samples(["pipe:printf 'not found'; exit 22"], stats)) == []
    assert stats.totals()["shard_errors"] == 1
    with pytest.raises(OSError, match="exit 22"):
        list(read_shard("pipe:printf 'not found'; exit 22"))
    with pytest.raises(ValueError, match=r"webdataset opens no s3:// URLs.*'pipe:aws s3 cp s3://b/t-\{0..1\}.tar -'"):
        expand_urls("s3://b/t-{0..1}.tar")
    assert expand_urls("https://host/t-{0..1}.tar") == ["https://host/t-0.tar", "https://host/t-1.tar"]
    monkeypatch.setenv("GOPEN_REWRITE", "s3://b/=pipe:aws s3 cp s3://b/")  # webdataset's own rewrite to a command
    assert expand_urls("s3://b/t-{0..1}.tar") == ["s3://b/t-0.tar", "s3://b/t-1.tar"]


def test_npy_decoding_retries_cpython_s_spurious_ast_error(monkeypatch):
    # CPython 3.11's ast state, which numpy's header parsing uses, can fail once in a worker (cpython#106905).
    import core.data.decoders as decoders

    real, calls = np.load, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=207, after=227)")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoders.np, "load", flaky)
    array = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(decoders.decode_npy(npy_bytes(array)), array)
    monkeypatch.setattr(decoders.np, "load", lambda *a, **k: (_ for _ in ()).throw(SystemError("other")))
    with pytest.raises(SystemError, match="other"):
        decoders.decode_npy(npy_bytes(array))


def tones(seconds: float, sample_rate: int, channels: int = 2) -> np.ndarray:
    """(samples, channels) of two tones, louder on the first channel. Tones, not noise: encoded as MP3, they
    are what libsndfile's MP3 reader loses its place in when soundfile seeks between reads."""
    t = np.arange(round(seconds * sample_rate))[:, None]
    return (0.3 * np.sin(t / 9.0) + 0.1 * np.sin(t / 31.0)) * np.linspace(1, 0.7, channels)


@pytest.mark.parametrize("fmt, subtype", [("WAV", None), ("FLAC", None), ("OGG", None), ("MP3", None), ("WAV", "GSM610")])
@pytest.mark.parametrize("sample_rate", [16_000, 44_100, 8_000])
def test_an_audio_clip_decodes_its_window_and_equals_the_whole_recordings_cut(fmt, subtype, sample_rate):
    """Resampled from 44.1 kHz (or up from 8 kHz) the window takes the resampler's reach on both sides: cut
    without it, the clip's edges would differ from the whole recording's. GSM 6.10 in WAV cannot seek."""
    from core.augment import AudioClip
    from core.data.decoders import EncodedAudio

    for seconds in (3.3, 0.7):  # longer than the 1-s clip, and shorter (padded)
        data = audio_bytes(tones(seconds, sample_rate, channels=1 if subtype else 2), sample_rate, fmt, subtype)
        for train in (True, False):
            clip = AudioClip(16_000, 1.0, train=train)
            for seed in range(3):
                torch.manual_seed(seed)
                window = clip({"audio": EncodedAudio(data), "sample_rate": sample_rate, "label": 1})
                torch.manual_seed(seed)
                whole = clip({"audio": EncodedAudio(data).samples(), "sample_rate": sample_rate, "label": 1})
                assert window["audio"].shape == (16_000,) and window["label"] == 1
                torch.testing.assert_close(window["audio"], whole["audio"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt, decoded", [("WAV", "window"), ("FLAC", "window"), ("OGG", "to the window's end"), ("MP3", "to the window's end")])
def test_an_audio_clip_of_a_long_recording_decodes_no_further_than_its_window(monkeypatch, fmt, decoded):
    from core.augment import AudioClip
    from core.data.decoders import EncodedAudio

    audio = EncodedAudio(audio_bytes(tones(60, 16_000, channels=1), 16_000, fmt))
    assert len(audio) == audio.shape[1] == 60 * 16_000 and audio.sample_rate == 16_000 and audio.channels == 1
    read, real = [], soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda f, *a, **k: read.append(len(out := real(f, *a, **k))) or out)
    torch.manual_seed(0)
    start = int(torch.randint(60 * 16_000 - 16_000 + 1, ()))
    torch.manual_seed(0)
    AudioClip(16_000, 1.0, train=True)(({"audio": audio, "sample_rate": 16_000}))
    assert sum(read) == (16_000 if decoded == "window" else start + 16_000)


def test_an_audio_stream_shorter_than_its_header_gives_a_clip_of_what_it_holds_or_loses_its_sample(tmp_path):
    """An MP3 cut in half still says, in its header, how long it was."""
    from core.augment import AudioClip
    from core.data.decoders import EncodedAudio, FewerSamples

    data = audio_bytes(tones(4, 16_000), 16_000, "MP3")
    cut = data[: len(data) // 2]
    audio, held = EncodedAudio(cut), EncodedAudio(cut).samples().shape[1]
    assert len(audio) == 4 * 16_000 > held
    centred = AudioClip(16_000, 1.0, train=False)({"audio": audio, "sample_rate": 16_000})["audio"]  # past the cut
    assert len(audio) == held
    torch.testing.assert_close(centred, AudioClip(16_000, 1.0, train=False).clip(EncodedAudio(cut).samples(), 16_000))
    with pytest.raises(FewerSamples, match=f"the stream holds {held}"):
        EncodedAudio(cut).read(held, 4 * 16_000)

    class LastSecond:  # a transform of a user's, which reads the header's last second
        def __call__(self, sample):
            return {"audio": sample["audio"].read(len(sample["audio"]) - 16_000, len(sample["audio"])).mean(0)}

    write_shards([{"__key__": "a", "mp3": cut}, {"__key__": "b", "mp3": data}], str(tmp_path / "a-%06d.tar"))
    loader = read_batches(str(tmp_path / "a-000000.tar"), LastSecond(), batch_size=1)
    assert [tuple(batch["audio"].shape) for batch in loader] == [(1, 16_000)]
    assert loader.stream.stats.totals()["samples_skipped"] == 1


def test_an_audio_member_that_cannot_be_decoded_where_a_clip_needs_it_is_skipped_and_counted(tmp_path):
    from core.augment import AudioClip
    from core.data.inspect import inspect_shards

    good = audio_bytes(tones(3, 16_000), 16_000, "FLAC")
    samples = [{"__key__": f"{i:06d}", "flac": good, "cls": str(i).encode()} for i in range(3)]
    samples[1]["flac"] = good[: len(good) // 3]  # the header counts 3 s
    write_shards(samples, str(tmp_path / "a-%06d.tar"))
    pattern = str(tmp_path / "a-000000.tar")
    loader = read_batches(pattern, AudioClip(16_000, 1.0, train=False), batch_size=1)  # the middle second
    assert [batch["label"].item() for batch in loader] == [0, 2]
    assert loader.stream.stats.totals()["samples_skipped"] == 1
    whole = read_batches(pattern, batch_size=1)  # no transform: every sample decoded whole, as before
    assert [tuple(batch["audio"].shape) for batch in whole] == [(1, 2, 48_000)] * 2 and whole.stream.stats.totals()["samples_skipped"] == 1
    assert dict(inspect_shards(pattern).skipped) == {"undecodable .flac": 1}


def test_encoded_audio_reads_a_span_and_refuses_one_outside_it():
    from core.data.decoders import EncodedAudio

    wave = tones(1, 8_000)
    audio = EncodedAudio(audio_bytes(wave, 8_000, "WAV"))
    expected = torch.from_numpy(soundfile.read(io.BytesIO(audio_bytes(wave, 8_000, "WAV")), dtype="float32")[0].T.copy())
    torch.testing.assert_close(audio.read(100, 300), expected[:, 100:300], rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(np.asarray(audio)), expected, rtol=0, atol=0)
    for start, stop in [(-1, 10), (10, 10), (0, 8_001)]:
        with pytest.raises(IndexError, match=f"samples {start} to {stop} of audio of 8000"):
            audio.read(start, stop)
    assert "8000 samples, 2 channels, 8000 Hz, WAV" in repr(audio)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_audio_clip_benchmark_times_both_ways_on_real_recordings(capsys, fmt):
    """OGG: libsndfile's Vorbis encoder crashed the process on a minute written at once."""
    from core.data import bench_audio

    bench_audio.main(["--recordings", "2", "--minutes", "0.2" if fmt == "flac" else "1.1", "--clip-seconds", "1", "--rounds", "1", "--format", fmt])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "clips/s" not in line]
    assert [r[0].strip() for r in rows] == ["whole recording (reference)", "clip window"]
    assert rows[0][2].strip() == "1.00x" and all(float(r[1]) > 0 for r in rows)
    whole_mb, window_mb = (float(r[3].split()[0]) for r in rows)
    assert window_mb < whole_mb


def test_a_transform_written_for_decoded_tensors_is_told_how_to_decode(tmp_path):
    write_shards([{"__key__": "a", "wav": audio_bytes(tones(0.5, 8_000), 8_000, "WAV")}], str(tmp_path / "a-%06d.tar"))

    def as_before(sample):
        return {"audio": torch.as_tensor(sample["audio"]).mean(0)}

    with pytest.raises(RuntimeError, match=r"'audio' is an EncodedAudio: audio.read\(start, stop\) decodes samples, audio.samples\(\) every sample"):
        list(read_batches(str(tmp_path / "a-000000.tar"), as_before, batch_size=1))


def test_an_audio_stream_that_decodes_nothing_is_undecodable_not_a_window_of_nothing(monkeypatch):
    """A header that counts samples, a stream that gives none: AudioClip's second draw would ask for
    samples 0 to 0, an IndexError that stops the run, where the sample should be skipped."""
    from core.augment import AudioClip
    from core.data.decoders import EncodedAudio

    audio = EncodedAudio(audio_bytes(tones(2, 8_000), 8_000, "MP3"))
    monkeypatch.setattr(EncodedAudio, "read_from_start", lambda self, f, start, stop: (np.empty((0, 2), np.float32), 0))
    with pytest.raises(UndecodableSample, match="no audio samples decode"):
        AudioClip(8_000, 1.0, train=False)({"audio": audio, "sample_rate": 8_000})


def test_a_window_at_the_clips_rate_is_drawn_over_the_exact_length_past_float32s_integers():
    """2^24 + 1 samples, no resampling: the whole path crops over the exact length; torchaudio's float32
    length (2^24) would move a centred window of an odd length by one sample."""
    from core.augment import AudioClip
    from core.data.decoders import EncodedAudio

    data = audio_bytes(tones(1, 2**24 + 1, channels=1), 16_000, "WAV")  # 2^24 + 1 samples at 16 kHz
    clip = AudioClip(16_000, 16_001 / 16_000, train=False)
    window = clip({"audio": EncodedAudio(data), "sample_rate": 16_000})["audio"]
    torch.testing.assert_close(window, clip({"audio": EncodedAudio(data).samples(), "sample_rate": 16_000})["audio"], rtol=0, atol=0)


# ---- behaviour pinned by mutation testing of core/data/stream.py and core/data/shards.py --------------------


def test_a_source_that_reads_nothing_says_why_each_of_its_shards_failed(tmp_path):
    # The error is all a user sees of a dead source: each shard's own reason, not a generic "no samples".
    dm = ShardDataModule(junk_shards(tmp_path), batch_size=2, num_workers=0, samples_per_epoch=10, shuffle_buffer=0)
    with pytest.raises(NoReadableShards, match=r"junk-000000\.tar \(ReadError: .+\), .*junk-000001\.tar \(undecodable \.png\)"):
        next(iter(dm.train_dataloader()))


def test_a_shard_that_reads_again_after_a_failed_pass_keeps_its_source_alive():
    # A shard that failed once (a network hiccup) must not count as dead once a later pass over it reads.
    health = ReadHealth(["a", "b"])
    health.record(ShardRead("a", total=1, done=1, good=0))
    health.record(ShardRead("a", total=1, done=1, good=1))
    health.record(ShardRead("b", total=1, done=1, good=0))
    with pytest.raises(NoReadableShards, match=r"any of 2 shards: a \(no samples\), b \(no samples\)"):
        health.record(ShardRead("a", total=0))  # now the latest pass over every shard gave nothing


def test_every_bad_sample_of_a_shard_is_logged_not_only_the_first(tmp_path, caplog):
    # Logged once per sample, not per shard: the second bad sample of a shard is a different problem to fix.
    samples = vector_samples(6)
    for i in (1, 4):
        samples[i]["png"] = b"\x89PNG garbage, not an image"
    write_shards(samples, str(tmp_path / "two-%06d.tar"))
    with caplog.at_level(logging.WARNING, logger="core.data.stream"):
        assert len(keys_of(read_batches(str(tmp_path / "two-000000.tar"), to_tensors, batch_size=6))) == 4
    logged = [key for key in ("000001", "000004") if any(f"sample '{key}'" in r.getMessage() for r in caplog.records)]
    assert logged == ["000001", "000004"]


def test_a_shuffle_buffer_lets_every_sample_out_soon():
    # A training stream never ends, so never flushes its buffer: a slot the draws skip would hold a sample for good.
    out = list(shuffled(iter(range(1000)), 10, random.Random(0)))
    assert sorted(out) == list(range(1000))
    assert max(position - item for position, item in enumerate(out)) < 200  # about 70 for a buffer of 10


def test_dataloader_workers_draw_samples_of_their_own(tmp_path):
    # Workers seeded alike would give each batch num_workers times over.
    pattern = write_vectors(tmp_path, "d", 40, per_shard=10)
    stream = ShardStream([expand_urls(pattern)], 5, True, transform=to_tensors, shuffle_buffer=5, num_workers=2)
    first, second = (batch["__key__"] for batch in ShardLoader(stream, 2, batches=2))  # one from each worker
    assert first != second


def test_val_with_as_many_shards_as_ranks_gives_each_rank_its_own_shard(tmp_path):
    # The boundary of the shared-shards rule: read by every rank and thinned, each rank would lose half its shard.
    pattern = write_vectors(tmp_path, "o", 10, per_shard=5)
    per_rank = []
    for rank in range(2):
        stream = ShardStream([expand_urls(pattern)], 5, False, transform=to_tensors, rank=rank, world_size=2)
        per_rank.append(keys_of(ShardLoader(stream, 0)))
    assert per_rank == [[f"o_{i:06d}" for i in range(0, 5)], [f"o_{i:06d}" for i in range(5, 10)]]


def test_a_rank_left_without_samples_blames_the_split_only_when_the_split_did_it(tmp_path):
    # Told that the split left it empty, a user would look for more shards, not for the broken or empty ones.
    unreadable = ShardStream([expand_urls(junk_shards(tmp_path))], 2, False, rank=2, world_size=3)
    write_shards(vector_samples(2), str(tmp_path / "own-%06d.tar"))
    tar_with(tmp_path / "own-000001.tar", [])  # a shard of its own for each rank, this one empty
    empty = ShardStream([expand_urls(str(tmp_path / "own-{000000..000001}.tar"))], 2, False, rank=1, world_size=2)
    for stream in (unreadable, empty):
        with pytest.raises(NoReadableShards, match="see the warnings above") as error:
            list(ShardLoader(stream, 0))
        assert "ranks that share them" not in str(error.value)


def test_validation_counts_no_draws_per_source(tmp_path):
    # Validation mixes no sources: a per-source counter would be logged as a val_ metric that is always 0.
    pattern = write_vectors(tmp_path, "n", 4, per_shard=2)
    dm = ShardDataModule([pattern, pattern], val=pattern, num_workers=0, val_transform=to_tensors)
    assert sum(len(batch["npy"]) for batch in dm.val_dataloader()) == 4
    assert list(dm.val_stats) == list(COUNTERS)


def test_train_weights_and_sizes_are_checked_when_the_datamodule_is_made():
    # Refused at once naming the key, not at the first batch (or never, for a batch of 0) deep in a worker.
    two = ["a-{0..1}.tar", "b-{0..1}.tar"]
    ShardDataModule(two, train_weights=[1, 0])  # a source switched off
    for weights in ([1], [1, -1], [0, 0]):
        with pytest.raises(ValueError, match=r"data.train_weights=\[.*\]: need one weight >= 0 per train source"):
            ShardDataModule(two, train_weights=weights)
    for key in ("batch_size", "val_batch_size", "val_batches", "samples_per_epoch"):
        with pytest.raises(ValueError, match=f"data.{key}=0: must be at least 1"):
            ShardDataModule(two, **{key: 0})


def test_a_training_loader_asked_for_before_the_trainer_is_made_again_for_the_trainers_rank(tmp_path):
    # A loader looked at before the fit (rank 0 of 1) and kept would give every DDP rank rank 0's stream.
    dm = ShardDataModule(write_vectors(tmp_path, "k", 8, per_shard=4), batch_size=4, num_workers=0, samples_per_epoch=8,
                         train_transform=to_tensors)  # fmt: skip
    alone = dm.train_dataloader()
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, global_step=0, loggers=[])
    ranked = dm.train_dataloader()
    assert ranked is not alone and (ranked.stream.rank, ranked.stream.world_size, len(ranked)) == (1, 2, 1)
    assert keys_of(ranked) != keys_of(alone)[:4]


def test_a_sharded_strategy_on_one_device_needs_no_val_batches(tmp_path):
    # val_batches is needed only where ranks must agree on a count: one device has nothing to agree with.
    from lightning.pytorch.strategies import ModelParallelStrategy

    pattern = write_vectors(tmp_path, "one", 7, per_shard=7)
    dm = ShardDataModule(pattern, val=pattern, val_batch_size=5, num_workers=0, val_transform=to_tensors)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=ModelParallelStrategy())
    assert [len(batch["__key__"]) for batch in dm.val_dataloader()] == [5, 2]


def test_a_validation_error_shuts_the_training_workers_down(tmp_path):
    # Lightning ends the training loader's persistent workers only at the end of a fit; a failed one leaked them.
    dm = ShardDataModule(write_vectors(tmp_path, "w", 8, per_shard=4), val=junk_shards(tmp_path), batch_size=4,
                         num_workers=1, samples_per_epoch=8, train_transform=DeviceFinished("train"),
                         val_transform=DeviceFinished("val"))  # fmt: skip
    before = set(multiprocessing.active_children())
    with pytest.raises(NoReadableShards):
        trainer(tmp_path, max_epochs=1).fit(SplitModel(), dm)
    assert not set(multiprocessing.active_children()) - before


def test_data_counters_are_logged_once_a_step_under_gradient_accumulation(tmp_path):
    # Several batches make one step: logged at each, every counter would be written twice for the same step.
    dm = ShardDataModule(write_vectors(tmp_path, "l", 16, per_shard=8), batch_size=2, num_workers=0, samples_per_epoch=16,
                         train_transform=VectorTransform())  # fmt: skip
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2).fit(VectorModel(), dm)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("data/samples_read")]
    assert steps == [0, 1, 2, 3]


def test_long_shard_lists_name_eight_and_count_the_rest():
    # Errors over 10,000 shards stay readable, and a list of exactly eight does not claim more.
    urls = [f"s-{i}.tar" for i in range(9)]
    assert listing(urls[:8]) == ", ".join(urls[:8])
    assert listing(urls) == ", ".join(urls[:8]) + ", ... (9 in all)"


def test_glob_matches_come_in_name_order(tmp_path):
    # Ranks and workers split shards by position: a listing order that differs between machines loses samples.
    names = [f"g-{i:06d}.tar" for i in range(30)]
    for name in random.Random(0).sample(names, len(names)):  # created out of order
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(str(tmp_path / "g-*.tar")) == [str(tmp_path / name) for name in names]


def test_a_file_url_with_one_slash_is_a_local_path_and_no_pattern_is_refused(tmp_path):
    # file:/abs/path is as valid a file URL as file:///abs/path; an empty list of patterns would read nothing.
    write_vectors(tmp_path, "f", 4, per_shard=2)
    assert expand_urls(f"file:{tmp_path}/f-*.tar") == [str(tmp_path / f"f-{i:06d}.tar") for i in range(2)]
    with pytest.raises(ValueError, match="no shard pattern given"):
        read_batches([])


def test_a_shard_whose_path_holds_glob_characters_is_found(tmp_path):
    """`run[1]/...` was taken for a glob only: it matches `run1/...`, and the file itself was reported missing."""
    (tmp_path / "run[1]").mkdir()
    write_shards(vector_samples(2), str(tmp_path / "run[1]" / "f-%06d.tar"))
    assert expand_urls(f"{tmp_path}/run[1]/f-000000.tar") == [f"{tmp_path}/run[1]/f-000000.tar"]
    assert keys_of(read_batches(f"{tmp_path}/run[1]/f-000000.tar", to_tensors, batch_size=2)) == ["000000", "000001"]


def test_webdataset_meta_members_and_names_without_an_extension_are_not_samples(tmp_path):
    # Neither is sample data; read as samples they would be skipped as bad ones or end the shard as an error.
    samples = vector_samples(2)
    members = [("README", b"notes"), ("__meta__/info.json", b"{}"), ("__index__", b"0")]
    members += [(f"{s['__key__']}.{ext}", s[ext]) for s in samples for ext in ("npy", "cls")]
    tar_with(tmp_path / "meta-000000.tar", members)
    loader = read_batches(str(tmp_path / "meta-000000.tar"), to_tensors, batch_size=4)
    assert keys_of(loader) == ["000000", "000001"]
    assert loader.stream.stats.totals() == {"samples_read": 2, "samples_skipped": 0, "samples_refused": 0, "shard_errors": 0}


def test_a_member_named_as_a_samples_own_entry_is_dropped_not_read_as_it(tmp_path):
    """`b.__links__` was taken for the sample's list of links and stopped the run; `b.__key__` renamed it."""
    members = [("a.txt", b"one"), ("b.txt", b"two"), ("b.__links__", b"xyz"), ("b.__KEY__", b"c"), ("c.txt", b"three")]
    tar_with(tmp_path / "own-000000.tar", members)
    loader = read_batches(str(tmp_path / "own-000000.tar"), None, batch_size=1)
    assert keys_of(loader) == ["a", "b", "c"]
    assert loader.stream.stats.totals()["samples_skipped"] == 0


def test_raw_samples_name_their_members_by_lowercase_extension(tmp_path):
    # read_shard's callers (core.text, the inspect tool) look members up by lowercase extension.
    tar_with(tmp_path / "case-000000.tar", [("a.TXT", b"hello"), ("a.Cls", b"1")])
    raws = list(read_shard(str(tmp_path / "case-000000.tar")))
    assert [sorted(key for key in raw if not key.startswith("__")) for raw in raws] == [["cls", "txt"]]


def test_a_corrupt_header_is_found_past_a_long_zero_padding(tmp_path):
    # Tars written with a large blocking factor end in megabytes of zeros: the check must look past the first MiB.
    write_shards(vector_samples(10, "s"), str(tmp_path / "whole-%06d.tar"))
    data = (tmp_path / "whole-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "whole-000000.tar") as tar:
        header = tar.getmembers()[10].offset
    (tmp_path / "padded.tar").write_bytes(data[:header] + b"\xff" * 512 + data[header + 512 :] + bytes(2 << 20))
    with pytest.raises(tarfile.ReadError, match="without its end-of-archive marker"):
        list(read_shard(str(tmp_path / "padded.tar")))
    (tmp_path / "long.tar").write_bytes(data + bytes(2 << 20))
    assert len(list(read_shard(str(tmp_path / "long.tar")))) == 10


def test_a_command_failing_after_its_tar_is_a_shard_error(tmp_path):
    # A download command can write a whole tar and then fail (a checksum check): its exit status is checked.
    shard = expand_urls(write_vectors(tmp_path, "c", 3, per_shard=3))[0]
    url = f"pipe:cat {shard}; exec >&-; sleep 0.3; exit 3"  # the tar ends (end of file) before the command does
    samples = read_shard(url)
    assert [raw["__key__"] for raw in itertools.islice(samples, 3)] == ["c_000000", "c_000001", "c_000002"]
    with pytest.raises(OSError, match=r"^command 'cat .*; exit 3' exited with status 3$"):  # named, not Popen's repr
        next(samples)
    stats = StreamStats(list(COUNTERS), 0)
    assert len(list(raw_samples([url], stats))) == 3 and stats.totals()["shard_errors"] == 1


def test_a_command_stopped_early_is_closed_without_an_error(tmp_path):
    # A reader that stops early (val_batches, core.text) cuts the command off: curl then exits 23, which means nothing.
    write_shards([{"__key__": f"{i:06d}", "bin": os.urandom(200_000)} for i in range(8)], str(tmp_path / "big-%06d.tar"))
    shard = read_shard(f"pipe:cat {tmp_path}/big-000000.tar || exit 23")  # 1.6 MB: more than a pipe holds
    assert next(shard)["__key__"] == "000000"
    shard.close()


def test_a_datamodule_and_its_training_loader_are_freed_without_the_cycle_collector(tmp_path):
    # Freed by the cycle collector instead, the loader's workers were each waited on for 5 s (PyTorch's
    # shutdown on that path never tells them to stop): tests stalled 10-20 s at random.
    import gc
    import weakref

    dm = ShardDataModule(write_vectors(tmp_path, "f", 8, per_shard=4), batch_size=4, num_workers=0, samples_per_epoch=8,
                         train_transform=to_tensors)  # fmt: skip
    assert len(list(dm.train_dataloader())) == 2
    freed = weakref.ref(dm)
    gc.disable()
    try:
        del dm
        assert freed() is None
    finally:
        gc.enable()
