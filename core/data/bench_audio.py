"""How fast do AudioMAE's clips come out of shards of long recordings? Clips per second from a shard to
fixed-length waveforms, two ways, measured in one run on the same shard:

- whole recording (the reference): every sample decoded, mixed down and resampled, then the clip cut, as the
  decoder did before ``EncodedAudio`` (and as the official AudioMAE loader does with its 10-second clips);
- clip window: ``EncodedAudio`` decodes the clip's window and the resampler's reach around it.

    python -m core.data.bench_audio --minutes 5 --format flac

The recordings are made here (44.1 kHz stereo noise, so that FLAC cannot shrink it to nothing) and written
to a temporary shard. Both ways run ``core.augment.AudioClip`` (AudioMAE's 10 s at 16 kHz, a random window)
in this process, so the rate is that of one data worker. Speed is timed with memory tracing off. Memory,
from the same windows read again under tracing: the transform's own peak, the numpy arrays
it holds at once above what it was handed (the decoded samples; not the shard's encoded bytes, nor torch's
resampling buffers, which ``tracemalloc`` does not see).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import tracemalloc

import numpy as np
import soundfile
import torch

from core.augment import AudioClip
from core.data.bench_video import measure, print_table
from core.data.write import write_shards


def synthetic_recording(seconds: float, sample_rate: int, audio_format: str, seed: int) -> bytes:
    """Stereo noise at -20 dBFS, 16 bit (or MP3/Vorbis), ``seconds`` long."""
    samples = np.random.default_rng(seed).standard_normal((round(seconds * sample_rate), 2)).astype(np.float32) * 0.1
    out, subtype = io.BytesIO(), {"mp3": "MPEG_LAYER_III", "ogg": "VORBIS"}.get(audio_format)
    with soundfile.SoundFile(out, "w", sample_rate, 2, format=audio_format.upper(), subtype=subtype) as f:
        for start in range(0, len(samples), 1 << 15):  # libsndfile's Vorbis encoder crashes on a minute in one write
            f.write(samples[start : start + (1 << 15)])
    return out.getvalue()


class Traced:
    """``transform``, noting the peak of what it allocates while it runs (``tracemalloc`` must be on)."""

    def __init__(self, transform):
        self.transform, self.peak = transform, 0

    def __call__(self, sample: dict) -> dict:
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = self.transform(sample)
        self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - held)
        return out


class WholeRecordingClip:
    """The reference: decode every sample, then mix down, resample and cut."""

    def __init__(self, clip: AudioClip):
        self.clip = clip

    def __call__(self, sample: dict) -> dict:
        return self.clip({**sample, "audio": sample["audio"].samples()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each recording")
    parser.add_argument("--sample-rate", type=int, default=44_100, help="the recordings' rate")
    parser.add_argument("--format", default="flac", choices=["flac", "wav", "ogg", "mp3"])
    parser.add_argument("--clip-rate", type=int, default=16_000, help="the clips' rate (AudioMAE: 16 kHz)")
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both ways; each keeps its best")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = AudioClip(args.clip_rate, args.clip_seconds, train=True)
    ways = {"whole recording (reference)": WholeRecordingClip(clip), "clip window": clip}
    best = {name: (0.0, 0.0) for name in ways}
    with tempfile.TemporaryDirectory() as folder:
        recordings = [synthetic_recording(args.minutes * 60, args.sample_rate, args.format, seed) for seed in range(args.recordings)]
        write_shards([{"__key__": f"{i:06d}", args.format: data, "cls": b"0"} for i, data in enumerate(recordings)], f"{folder}/a-%06d.tar")
        for seed in range(args.rounds):
            for name, transform in ways.items():
                torch.manual_seed(seed)  # every way cuts the same windows: OGG and MP3 decode up to the window's end
                # The peak within the transform's calls: the whole read's would count the shard's bytes too.
                result = measure(transform, f"{folder}/a-000000.tar", passes=2, key="audio", memory_of=Traced(transform))
                best[name] = max(best[name], result, key=lambda result: result[0])
    title = (
        f"{args.recordings} recordings of {args.minutes:g} min, {args.sample_rate} Hz stereo {args.format}; "
        f"clips of {args.clip_seconds:g} s at {args.clip_rate} Hz"
    )
    print_table(title, best, "peak memory of the decoded samples", digits=2)


if __name__ == "__main__":
    main()
