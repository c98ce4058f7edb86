"""Safe, explicit decoders for WebDataset samples.

A raw sample is what a tar shard holds for one key: ``{"__key__": "000042", "__url__": "train-000003.tar",
"jpg": b"...", "cls": b"3"}``. The decoder is chosen by the member's last extension (lowercased), so
``caption.txt`` decodes as ``txt``. Members whose format is pickle-based are refused, never unpickled;
members with an unknown extension are dropped.

Decoded keys:

==========================  =================================================================
extension                   decoded
==========================  =================================================================
jpg jpeg png webp bmp       ``image``: PIL image in RGB, upright (EXIF orientation applied)
flac wav ogg mp3            ``audio``: ``EncodedAudio``, samples decoded when asked for; ``sample_rate``: int
mp4 webm mkv avi mov        ``video``: ``EncodedVideo``, frames decoded when asked for; ``fps``: float
txt                         ``text``: str (utf-8)
cls                         ``label``: int
json                        ``json``: the parsed JSON value (a dict for this project's shards)
npy                         ``npy``: numpy array, loaded with ``allow_pickle=False``
==========================  =================================================================
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from typing import Any, Callable

import av
import numpy as np
import PIL.Image
import PIL.ImageOps
import soundfile
import torch

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
# What Pillow may read an image member as, whatever its extension says (a .jpg that is a PNG decodes). Not any
# format Pillow knows: an EPS member would be handed to Ghostscript, a program run on the shard's content.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
AUDIO_EXTENSIONS = frozenset({"flac", "wav", "ogg", "mp3"})
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mkv", "avi", "mov"})
# Formats whose loading runs pickle, i.e. arbitrary code chosen by whoever wrote the shard.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "joblib", "dill"})
EXIF_ORIENTATION = 0x0112
LABEL = re.compile(rb"[ \t\r\n]*(-?[0-9]+)[ \t\r\n]*")  # a .cls member: `echo 3 > x.cls` adds the line end


class SampleError(ValueError):
    """A sample that cannot be used. ``reason`` is a short category for counting (``"undecodable .png"``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class UndecodableSample(SampleError):
    """A member's bytes are not what its extension says (truncated image, garbage audio, ...)."""


class RefusedSample(SampleError):
    """A member is pickle-based: loading it would execute code from the shard, so the sample is refused."""


class UnusableSample(SampleError):
    """A decoded sample that the transform cannot use: an entry it needs is missing, a clip is too short.
    Transforms raise it (``core.augment``); the stream skips and counts the sample like an undecodable one."""


def check_pixel_limit(width: int, height: int, what: str) -> None:
    """Refuse an image or video frame past Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89M), from
    its header's size, before it is decoded."""
    limit, pixels = PIL.Image.MAX_IMAGE_PIXELS, width * height
    if limit and pixels > limit:
        raise PIL.Image.DecompressionBombError(
            f"{what} size {width}x{height} ({pixels} pixels) exceeds the limit of {limit} pixels, could be decompression bomb DOS attack"
        )


def decode_image(data: bytes) -> PIL.Image.Image:
    """Decode image bytes to an RGB PIL image, 8 bits a channel, upright: a camera's JPEG stores its rotation
    in EXIF, applied here. 16-bit greyscale keeps its top 8 bits, where Pillow's conversion would clip every
    value above 255 to white. An image past Pillow's pixel limit (89M) is an error, where Pillow only warns
    up to twice it: a 140 KB PNG can hold 144M pixels, 690 MB decoded. (Checked here, not by turning the
    warning into an error: a `warnings.catch_warnings` per sample would reset which warnings were shown.)"""
    image = PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    with image:
        check_pixel_limit(image.width, image.height, "image")
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = PIL.ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
            return PIL.Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)).convert("RGB")
        return image.convert("RGB")


def new_array(decode: Callable[[], torch.Tensor], dtype, copy, what: str) -> np.ndarray:
    """``np.asarray`` of a member decoded when asked for (``__array__``): always a new array."""
    if copy is False:
        raise ValueError(f"{what} is decoded into a new array: np.asarray({what}) cannot avoid a copy")
    array = decode().numpy()
    return array if dtype is None else array.astype(dtype, copy=False)


class FewerSamples(UndecodableSample):
    """An audio member decoded to fewer samples than its header counted; ``len(audio)`` now says how many.
    ``AudioClip`` picks its window again; anywhere else the sample is skipped and counted."""


class EncodedAudio:
    """An audio member, decoded when its samples are asked for: a 10-second clip of an hour's recording
    decodes those 10 seconds, where decoding the whole held the hour (1.3 GB of float32 at 44.1 kHz, stereo)
    and resampling it took seconds a sample (``core.data.bench_audio``).

    Opening reads the header only: ``len(audio)`` is the number of samples per channel, ``sample_rate`` and
    ``channels`` what they say. ``audio.read(start, stop)`` decodes samples ``start`` to ``stop`` to float32
    ``(channels, stop - start)``: WAV and FLAC seek there exactly; OGG, MP3 and WAV codecs that cannot seek
    (GSM 6.10, G.721, NMS ADPCM) are decoded from their start (``read_from_start``). ``audio.samples()`` or
    ``np.asarray(audio)`` gives every sample.

    Samples that cannot be decoded raise ``UndecodableSample`` (the shard stream skips and counts the
    sample); a stream that ends before its header's count where it decodes to its end (MP3) raises
    ``FewerSamples``, with ``len`` corrected. A WAV or FLAC cut short fails where a read seeks past the cut.
    A header's count can be an estimate (a constant-bitrate MP3 without a Xing frame): ``len`` then says so
    too, and a window is drawn over that length.
    """

    EXACT_SEEK = frozenset({"WAV", "WAVEX", "W64", "RF64", "FLAC"})

    def __init__(self, data: bytes):
        self.data = data
        self.source, self.reason = "audio", "undecodable audio"  # decode_sample names the sample and member
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            self.num_samples, self.sample_rate, self.channels, self.format = f.frames, int(f.samplerate), f.channels, f.format
        if self.num_samples <= 0:
            raise ValueError("no audio samples")

    def __len__(self) -> int:
        return self.num_samples

    @property
    def shape(self) -> tuple[int, int]:
        """(channels, samples), what ``samples()`` gives, known without decoding."""
        return (self.channels, self.num_samples)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``start`` to ``stop`` (0 <= start < stop <= len) -> float32 (channels, stop - start)."""
        if not 0 <= start < stop <= self.num_samples:
            raise IndexError(f"samples {start} to {stop} of audio of {self.num_samples}")
        try:
            with soundfile.SoundFile(io.BytesIO(self.data)) as f:
                # GSM 6.10 and ADPCM variants in WAV cannot seek at all.
                seeking = self.format in self.EXACT_SEEK and f.seekable()
                samples, held = (self.seek_and_read if seeking else self.read_from_start)(f, start, stop)
        except Exception as error:
            raise UndecodableSample(self.reason, f"{self.source}: cannot decode samples {start} to {stop}: {error}") from error
        if len(samples) < stop - start:
            if not held:
                raise UndecodableSample(self.reason, f"{self.source}: no audio samples decode")
            self.num_samples = held
            raise FewerSamples(self.reason, f"{self.source}: samples to {stop} asked for, but the stream holds {self.num_samples}")
        return torch.from_numpy(samples.T.copy())  # (channels, stop - start)

    @staticmethod
    def seek_and_read(f: soundfile.SoundFile, start: int, stop: int) -> tuple[np.ndarray, int]:
        """(samples (n, channels), the samples the stream holds up to them)."""
        f.seek(start)
        samples = f.read(stop - start, dtype="float32", always_2d=True)
        return samples, start + len(samples)

    def read_from_start(self, f: soundfile.SoundFile, start: int, stop: int) -> tuple[np.ndarray, int]:
        """As ``seek_and_read``, decoding from the start: OGG in blocks that are let go (libsndfile's Vorbis
        seek lands off the sample asked for), anything else (MP3) in one read: soundfile seeks to where it is
        after every read, and libsndfile's MP3 reader then loses its place, so a second read would not go on
        from the first."""
        if self.format != "OGG":
            samples = f.read(stop, dtype="float32", always_2d=True)
            return samples[start:], len(samples)
        block, reached = np.empty((min(start, 1 << 16), self.channels), np.float32), 0
        while reached < start and (got := len(f.read(out=block[: start - reached]))):
            reached += got
        samples = f.read(stop - start, dtype="float32", always_2d=True) if reached == start else block[:0]
        return samples, reached + len(samples)

    def samples(self) -> torch.Tensor:
        """Every sample: float32 (channels, samples)."""
        try:
            samples, _ = soundfile.read(io.BytesIO(self.data), dtype="float32", always_2d=True)  # (samples, channels)
        except Exception as error:
            raise UndecodableSample(self.reason, f"{self.source}: cannot decode: {error}") from error
        if not len(samples):
            raise UndecodableSample(self.reason, f"{self.source}: no audio samples")
        self.num_samples = len(samples)
        return torch.from_numpy(samples.T.copy())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return new_array(self.samples, dtype, copy, "audio")

    def __repr__(self) -> str:
        return f"EncodedAudio({self.num_samples} samples, {self.channels} channels, {self.sample_rate} Hz, {self.format}, {self.source})"


class FewerFrames(UndecodableSample):
    """A video's stream decoded to fewer frames than its container counted; ``len(video)`` now says how many.
    ``VideoClip`` picks its frames again; anywhere else the sample is skipped and counted."""


class SeekMissed(Exception):
    """A decoder started at a seek point did not give the frames the container promised there."""


class EncodedVideo:
    """A video member, decoded when its frames are asked for, as decord's ``VideoReader`` is: a clip of 16
    frames decodes from the last keyframe before its first frame (one that cuts the stream cleanly,
    ``clean_keyframes``) up to its last frame, and converts only its own 16 to RGB. Decoding every frame
    took about 2 times as long for 10-second videos and 11 times for 60-second ones (``core.data.bench_video``)
    and held every frame twice (PyAV's and the stacked copy: 150 MB for 300 frames of 340x256).

    Opening reads the container only, nothing is decoded: ``len(video)`` counts the frames the first video
    stream shows (its packets from the first keyframe on, where decoding starts, less those an edit list
    discards), ``fps`` is its
    rate, ``height``/``width`` its frame size, which must be within Pillow's pixel limit (89M), as images
    are. ``video[index]`` decodes the frames ``index`` (a list or 1-D tensor of ints, any order, negative from
    the end; or a slice) to a uint8 tensor ``(len(index), H, W, 3)``; ``video.frames()`` or
    ``np.asarray(video)`` gives every frame.

    A frame that cannot be decoded, or of another size than the stream's, raises ``UndecodableSample`` (the
    shard stream skips and counts the sample, as it does for an undecodable member). Should the stream
    decode to fewer frames than counted, ``len(video)`` is corrected and ``video[index]`` raises
    ``FewerFrames`` when it asked for one past them (``VideoClip`` then picks its frames again; elsewhere
    the sample is skipped); ``frames()`` gives those there are.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.source, self.reason = "video", "undecodable video"  # decode_sample names the sample and member
        with av.open(io.BytesIO(data)) as container:
            if container.format.name.endswith("_pipe") or container.format.name == "image2":  # FFmpeg reads images too
                raise ValueError(f"a still image ({container.format.name}), not a video")
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.height, self.width = stream.codec_context.height, stream.codec_context.width
            # Frames are decoded from the first keyframe on (a stream cut in the middle of a group of pictures
            # starts with packets no decoder can use), and an edit list's discarded frames are not shown (mp4
            # and mov cut without re-encoding); the flush packet is empty. A stream that flags no keyframe
            # (x264's intra refresh, cut) is decoded from its first packet.
            counts, keyframe_seen = [0, 0], False  # frames of every packet, frames from the first keyframe
            packets = []  # (position in the stream, pts, shown, keyframe) of each coded packet from the first keyframe
            for position, packet in enumerate(container.demux(stream)):
                keyframe_seen = keyframe_seen or packet.is_keyframe
                shown = bool(packet.size) and not packet.is_discard
                counts[0] += shown
                counts[1] += shown and keyframe_seen
                if packet.size and keyframe_seen:
                    packets.append((position, packet.pts, shown, packet.is_keyframe))
            self.num_frames = counts[1] if keyframe_seen else counts[0]
            # avi holds no presentation times (FFmpeg makes them from the decoding order) and may flag every
            # frame a keyframe: its videos are decoded from the first keyframe.
            seekable = bool(packets) and container.format.name != "avi"
            self.seek_points = clean_keyframes(packets) if seekable else [(0, packets[0][0] if packets else 0)]
            self.frame_pts = sorted(pts for _, pts, shown, _ in packets if shown) if len(self.seek_points) > 1 else []
        if not self.num_frames:
            raise ValueError("no frame")
        if rate is None:
            raise ValueError("no frame rate")
        self.fps = float(rate)
        if self.height and self.width:
            check_pixel_limit(self.width, self.height, "frame")

    def __len__(self) -> int:
        return self.num_frames

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, H, W, 3), what ``frames()`` gives, known without decoding."""
        return (self.num_frames, self.height, self.width, 3)

    def __getitem__(self, index) -> torch.Tensor:
        """Frames ``index`` -> uint8 (len(index), H, W, 3)."""
        if isinstance(index, slice):
            index = range(*index.indices(self.num_frames))
        elif isinstance(index, (int, np.integer)) or (isinstance(index, (torch.Tensor, np.ndarray)) and index.ndim == 0):
            raise TypeError(f"index a video with a list of frames (video[[{int(index)}]] for one), not {index!r}")
        index = index.tolist() if isinstance(index, (torch.Tensor, np.ndarray)) else list(index)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in index):
            raise TypeError(f"frame indices must be integers (a mask is not taken), got {index!r}")
        wanted = [int(i) + self.num_frames if i < 0 else int(i) for i in index]
        if not wanted or min(wanted) < 0 or max(wanted) >= self.num_frames:
            raise IndexError(f"frames {index} of a video of {self.num_frames}")
        frames, decoded = self.decode(wanted)
        if decoded <= max(wanted):
            self.num_frames = decoded
            raise FewerFrames(self.reason, f"{self.source}: frame {max(wanted)} asked for, but the stream shows {decoded} frames")
        return torch.from_numpy(frames)

    def frames(self) -> torch.Tensor:
        """Every frame: uint8 (T, H, W, 3)."""
        frames, self.num_frames = self.decode(None)
        return torch.from_numpy(frames)

    def decode(self, wanted: list[int] | None) -> tuple[np.ndarray, int]:
        """Decode up to the last frame ``wanted`` (every frame for None) and convert those: (frames (len(wanted),
        H, W, 3) uint8, the number of frames decoded). Decoding starts at the last clean keyframe before the
        first frame wanted, as decord's seek does, and falls back to the first keyframe should a decoder
        starting there not give the frames the container's timestamps promise: x264's intra refresh flags
        recovery points as keyframes, and FFmpeg drops the frame it starts at."""
        first = 0 if wanted is None else min(wanted)
        start = max(point for point in self.seek_points if point[0] <= first)
        if start != self.seek_points[0]:
            try:
                return self.decode_from(start, wanted, checked=True)
            except SeekMissed:
                self.seek_points = self.seek_points[:1]  # decoded from the first keyframe from now on
        return self.decode_from(self.seek_points[0], wanted, checked=False)

    def decode_from(self, start: tuple[int, int], wanted: list[int] | None, checked: bool) -> tuple[np.ndarray, int]:
        """``decode``, from ``start`` (a seek point). ``checked``: each frame must be a keyframe first and then
        show at the time its place promises, else ``SeekMissed``. Converted into one array, not stacked:
        PyAV's frames are let go one by one."""
        last = self.num_frames - 1 if wanted is None else max(wanted)
        slots: dict[int, list[int]] = {}  # frame -> where it goes in the output
        for slot, i in enumerate(range(self.num_frames) if wanted is None else wanted):
            slots.setdefault(i, []).append(slot)
        decoded, position = start
        out = None
        try:
            with av.open(io.BytesIO(self.data)) as container:
                packets = container.demux(container.streams.video[0])
                packets = (packet for i, packet in enumerate(packets) if i >= position)  # demuxed, not decoded
                for frame in (frame for packet in packets for frame in packet.decode()):  # in presentation order
                    if checked and not (decoded < len(self.frame_pts) and frame.pts == self.frame_pts[decoded]):
                        raise SeekMissed(f"frame {decoded} shows at {frame.pts}")
                    if checked and decoded == start[0] and not frame.key_frame:
                        raise SeekMissed(f"frame {decoded} is not a keyframe")
                    if out is None:
                        self.height, self.width = self.height or frame.height, self.width or frame.width
                        check_pixel_limit(self.width, self.height, "frame")
                        out = np.empty((len(slots) if wanted is None else len(wanted), self.height, self.width, 3), np.uint8)
                    if (frame.height, frame.width) != (self.height, self.width):
                        raise ValueError(f"frame {decoded} is {frame.width}x{frame.height}, the stream's {self.width}x{self.height}")
                    if decoded in slots:
                        # One thread: with swscale's default (a pool of threads per conversion, made and
                        # joined for every frame) a data worker hung for good in the pool's wait under CPU
                        # contention (FFmpeg 8, PyAV 18; seen in the test suite). The data workers are the
                        # parallelism, and one thread converts a frame faster than a fresh pool does.
                        out[slots[decoded]] = frame.to_ndarray(format="rgb24", threads=1)  # (H, W, 3)
                    decoded += 1
                    if decoded > last:
                        break
        except Exception as error:
            if checked:  # from the first keyframe, the same fault is found again, or none was there
                raise SeekMissed(str(error)) from error
            raise UndecodableSample(self.reason, f"{self.source}: cannot decode frames: {error}") from error
        if checked and decoded <= last:  # the decoder dropped frames (from the first keyframe, none or the same)
            raise SeekMissed(f"{decoded} frames")
        if out is None:
            raise UndecodableSample(self.reason, f"{self.source}: no frame decodes")
        return (out[:decoded] if wanted is None else out), decoded

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return new_array(self.frames, dtype, copy, "video")

    def __repr__(self) -> str:
        return f"EncodedVideo({self.num_frames} frames, {self.width}x{self.height}, {self.fps:g} fps, {self.source})"


def clean_keyframes(packets: list[tuple[int, int | None, bool, bool]]) -> list[tuple[int, int]]:
    """Where decoding may start: (index of the first frame shown from there, position of the packet in the
    stream) for each keyframe that cuts the stream cleanly, the first keyframe always among them.

    ``packets`` are (position, pts, shown, keyframe), in decoding order, from the first keyframe. A keyframe
    cuts cleanly when every packet before it shows earlier than it and every packet after it later: then
    decoding from it gives the frames from the one it shows on, the same as decoding from the start (which
    ``EncodedVideo.decode`` checks, frame by frame, as it decodes). Not so for an open group
    of pictures (x264's ``open_gop``, HEVC's CRA frames): frames decoded after its keyframe show before it, and
    refer to frames before it. Only the first keyframe is taken for a stream without timestamps, and for one
    whose first keyframe has such frames (a stream cut at an open group's keyframe): a decoder may drop them
    (FFmpeg's HEVC does), and the frames after them would then be counted otherwise than decoded."""
    timestamps = [pts for _, pts, _, _ in packets]
    if None in timestamps or min(timestamps) < timestamps[0]:
        return [(0, packets[0][0])]
    # The earliest time shown by the packets after each one (strictly after: MPEG program streams can give a
    # keyframe the time of the B-frame decoded after it, which then shows before it).
    earliest_after = [*list(itertools.accumulate(reversed(timestamps), min))[::-1][1:], math.inf]
    points, shown_before, latest = [], 0, -math.inf
    for (position, pts, shown, keyframe), earliest in zip(packets, earliest_after):
        if keyframe and (not points or latest < pts < earliest):  # the first keyframe always
            points.append((shown_before, position))
        shown_before += shown
        latest = max(latest, pts)
    return points


def decoded_whole(sample: dict) -> dict:
    """``sample`` with every ``EncodedVideo`` decoded to all its frames, a uint8 tensor (T, H, W, 3), and every
    ``EncodedAudio`` to all its samples, float32 (C, S): what a reader without a transform batches, and what
    ``core.data.inspect`` checks."""

    def whole(value):
        if isinstance(value, EncodedVideo):
            return value.frames()
        return value.samples() if isinstance(value, EncodedAudio) else value

    return {key: whole(value) for key, value in sample.items()}


def decode_label(data: bytes) -> int:
    """Decode a class index stored as ASCII digits (``3``, ``-1``), spaces and line ends around them allowed.

    Stricter than ``int``, which would also read ``1_0`` as 10 and strip ASCII's separator controls: a label
    member holding anything else is not a class index and fails its sample."""
    match = LABEL.fullmatch(data)
    if match is None or not -(2**63) <= int(match[1]) < 2**63:  # past int64 it could not be batched
        raise ValueError(f"a class label is ASCII digits with an optional '-', an int64, not {data[:40]!r}")
    return int(match[1])


def _label(data: bytes) -> dict:
    """A ``label``; a negative class index gives none (-1 marks unlabelled images, as in STL-10): the sample is
    kept for pretraining and skipped where a label is needed (``core.data.Requires``), where -100 would be
    cross-entropy's ignore_index and any other negative index a class head's from its end."""
    label = decode_label(data)
    return {"label": label} if label >= 0 else {}


def decode_npy(data: bytes) -> np.ndarray:
    """Load a .npy array; object arrays (which would need pickle) are rejected by ``allow_pickle=False``.

    numpy reads the header with ``ast.literal_eval``, whose state CPython 3.11 shares between concurrent and
    nested uses (python/cpython#106905): in a DataLoader worker it can fail once with a SystemError, "AST
    constructor recursion depth mismatch", on a sound sample (seen in the test suite: 1 sample of 50 skipped).
    That error is retried once instead of skipping the sample."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except SystemError as error:
        if "AST constructor recursion depth mismatch" not in str(error):
            raise
        return np.load(io.BytesIO(data), allow_pickle=False)


def _single(key: str, decode: Callable[[bytes], Any]) -> Callable[[bytes], dict]:
    return lambda data: {key: decode(data)}


def _audio(data: bytes) -> dict:
    audio = EncodedAudio(data)
    return {"audio": audio, "sample_rate": audio.sample_rate}


def _video(data: bytes) -> dict:
    video = EncodedVideo(data)
    return {"video": video, "fps": video.fps}


# extension -> function from member bytes to the decoded entries it contributes
DECODERS: dict[str, Callable[[bytes], dict]] = {
    **{ext: _single("image", decode_image) for ext in IMAGE_EXTENSIONS},
    **{ext: _audio for ext in AUDIO_EXTENSIONS},
    **{ext: _video for ext in VIDEO_EXTENSIONS},
    "txt": _single("text", lambda data: data.decode("utf-8")),
    "cls": _label,
    "json": _single("json", json.loads),
    "npy": _single("npy", decode_npy),
}


def member_extension(member: str) -> str:
    """The extension that picks a decoder: the last one, lowercased (``"Caption.TXT"`` -> ``"txt"``)."""
    return member.rsplit(".", 1)[-1].lower()


def broken_sample(raw: dict[str, Any]) -> UndecodableSample | None:
    """Why the stream skips a raw sample whatever its members hold, None if it need not: a member repeated
    (``__duplicate__``), a link where a member's file should be (``__links__``), a read cut short
    (``__partial__``); marked so by ``core.data.shards``."""
    where = f"sample {raw.get('__key__')!r} of {raw.get('__url__')!r}"
    if "__duplicate__" in raw:
        message = f"{where}: member {raw['__duplicate__']!r} repeats an extension the sample already has"
        return UndecodableSample("repeated member", message)
    for name, target, kind in raw.get("__links__", []):  # links of unknown extensions are dropped, as such files are
        if member_extension(name) in DECODERS or member_extension(name) in PICKLE_EXTENSIONS:
            option = "--hard-dereference" if kind == "hard" else "--dereference"
            return UndecodableSample(
                "link member",
                f"{where}: member {name!r} is a {kind} link to {target!r}, not a file; write the shard with the files "
                f"themselves (tar {option}, or python -m core.data.write)",
            )
    if "__partial__" in raw:
        return UndecodableSample("cut short", f"{where}: the shard's read failed while this sample was being read")
    return None


def decode_sample(raw: dict[str, Any]) -> dict:
    """Decode a raw WebDataset sample with the decoders above.

    Keeps ``__key__`` and ``__url__``, drops members with unknown extensions and other ``__meta__`` entries.
    Raises ``RefusedSample`` if any member is pickle-based (nothing is unpickled), ``UndecodableSample``
    if a member's bytes cannot be decoded, two members decode to the same key, or no member is decodable.
    """
    where = f"sample {raw.get('__key__')!r} of {raw.get('__url__')!r}"
    if (error := broken_sample(raw)) is not None:
        raise error
    members = {name: data for name, data in raw.items() if not name.startswith("__")}
    refused = sorted(name for name in members if member_extension(name) in PICKLE_EXTENSIONS)
    if refused:
        ext = member_extension(refused[0])
        raise RefusedSample(f"refused .{ext} (pickle)", f"{where}: member {refused[0]!r} is pickle-based; refused")
    decoded = {name: raw[name] for name in ("__key__", "__url__") if name in raw}
    sources: dict[str, str] = {}  # decoded key -> member it came from, to report clashes
    for name, data in members.items():
        ext = member_extension(name)
        if ext not in DECODERS:
            continue
        try:
            entries = DECODERS[ext](data)
        except Exception as error:
            message = f"{where}: cannot decode member {name!r}: {error}"
            raise UndecodableSample(f"undecodable .{ext}", message) from error
        for key in entries:
            if key in sources:
                raise UndecodableSample(
                    "clashing members", f"{where}: members {sources[key]!r} and {name!r} both decode to {key!r}"
                )
            sources[key] = name
            if isinstance(entries[key], (EncodedVideo, EncodedAudio)):  # decoded later, by the transform
                entries[key].source, entries[key].reason = f"{where}: member {name!r}", f"undecodable .{ext}"
        decoded.update(entries)
    if not sources:
        raise UndecodableSample(
            "no decodable member", f"{where}: no member with a known extension (members: {sorted(members)})"
        )
    return decoded
