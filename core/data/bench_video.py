"""How fast do VideoMAE's clips come out of video shards? Clips per second from a shard to normalised clips,
three ways, measured in one run on the same shard:

- whole video (the reference): every frame decoded and converted to RGB, then the clip's frames picked, as
  the decoder did before ``EncodedVideo`` (and as any loader without random access must);
- clip frames, decoded from the first keyframe: ``EncodedVideo`` without its seek, as it was before it
  seeked: every frame up to the clip's last is decoded, only the clip's frames converted;
- clip frames: ``EncodedVideo`` decodes from the last clean keyframe before the clip's first frame to its
  last, and converts only the clip's frames.

    python -m core.data.bench_video --frames 300 --width 340 --height 256      # 10 s, Kinetics-like
    python -m core.data.bench_video --frames 1800                              # 60 s

The videos are made here (H.264 by PyAV's libx264, a keyframe every ``--keyint`` frames, x264's default 250;
a moving noise texture, so every frame costs what a real frame does to decode) and written to a temporary
shard. Every way runs ``core.augment.VideoClip`` (VideoMAE's 16 frames at stride 4, random start and crop)
in this process, so the rate is that of one data worker. Speed is timed with memory tracing off. Memory:
the peak of what ``tracemalloc`` sees over the same passes read again: the decoded frames held at once (the
numpy arrays they are converted into) and the encoded sample being read (about 0.5 MB of the clip frames'
4.5 MB at the defaults); PyAV's buffer of the frame being converted, one at a time, is not seen.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import tracemalloc

import av
import numpy as np
import torch

from core.augment import VideoClip
from core.data import read_batches
from core.data.write import write_shards


def synthetic_video(frames: int, width: int, height: int, fps: int, seed: int, keyint: int = 250) -> bytes:
    """A noise texture drifting 2 px a frame, H.264 (yuv420p) in mp4, a keyframe every ``keyint`` frames."""
    texture = np.random.default_rng(seed).integers(0, 256, (height, width + 2 * frames, 3), dtype=np.uint8)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": str(keyint)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            frame = np.ascontiguousarray(texture[:, 2 * t : 2 * t + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


class WholeVideoClip:
    """The reference: decode every frame, then cut the clip from them."""

    def __init__(self, clip: VideoClip):
        self.clip = clip

    def __call__(self, sample: dict) -> dict:
        return self.clip({**sample, "video": sample["video"].frames()})


class FromFirstKeyframe:
    """Clip frames decoded from the first keyframe, as ``EncodedVideo`` did before it seeked."""

    def __init__(self, clip: VideoClip):
        self.clip = clip

    def __call__(self, sample: dict) -> dict:
        sample["video"].seek_points = sample["video"].seek_points[:1]
        return self.clip(sample)


def measure(transform, pattern: str, passes: int, key: str = "video", memory_of=None) -> tuple[float, float]:
    """(clips per second, peak MB of numpy memory) over ``passes`` passes of the shard, one clip a batch.

    The passes are timed with memory tracing off (it slows each way by its own amount, which moved the ratios
    by 10-15%), then read again from the same random state, the same clips, under ``tracemalloc``: the peak
    is that of the whole read, or with ``memory_of`` (``transform`` wrapped in ``Traced``) that within the
    transform's calls."""
    state = torch.get_rng_state()

    def read(way) -> int:
        clips = 0
        for _ in range(passes):
            for batch in read_batches(pattern, way, batch_size=1):
                clips += len(batch[key])
        return clips

    start = time.perf_counter()
    clips = read(transform)
    seconds = time.perf_counter() - start
    torch.set_rng_state(state)
    tracemalloc.start()
    read(memory_of or transform)
    peak = (memory_of.peak if memory_of is not None else tracemalloc.get_traced_memory()[1]) / 2**20
    tracemalloc.stop()
    return clips / seconds, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=300, help="frames a video (300: 10 s at 30 fps)")
    parser.add_argument("--width", type=int, default=340)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--keyint", type=int, default=250, help="frames from one keyframe to the next (x264's default)")
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both ways; each keeps its best")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = VideoClip(args.clip_frames, args.stride, args.size, flip=False)
    ways = {"whole video (reference)": WholeVideoClip(clip), "clip frames from the first keyframe": FromFirstKeyframe(clip), "clip frames": clip}
    best = {name: (0.0, 0.0) for name in ways}
    with tempfile.TemporaryDirectory() as folder:
        samples = [
            {"__key__": f"{i:06d}", "mp4": synthetic_video(args.frames, args.width, args.height, 30, i, args.keyint), "cls": b"0"}
            for i in range(args.videos)
        ]
        write_shards(samples, f"{folder}/v-%06d.tar")
        pattern = f"{folder}/v-000000.tar"
        for seed in range(args.rounds):
            for name, transform in ways.items():
                torch.manual_seed(seed)  # every way cuts the same clips: where a clip starts sets what it costs
                rate, peak = measure(transform, pattern, passes=2)
                best[name] = max(best[name], (rate, peak), key=lambda result: result[0])
    title = (f"{args.videos} videos of {args.frames} frames, {args.width}x{args.height}, a keyframe every {args.keyint}; "
             f"clips of {args.clip_frames} at stride {args.stride}, {args.size} px")  # fmt: skip
    print_table(title, best, "peak frame memory", digits=1)


def print_table(title: str, best: dict[str, tuple[float, float]], memory: str, digits: int) -> None:
    """The markdown table of {way: (clips/s, peak MB)}, each against the first way, the reference."""
    reference = next(iter(best.values()))
    print(f"\n| {title} | clips/s | vs reference | {memory} |")
    print("|---|---|---|---|")
    for name, (rate, peak) in best.items():
        print(f"| {name} | {rate:.{digits}f} | {rate / reference[0]:.2f}x | {peak:.1f} MB ({peak / reference[1]:.2f}x) |")


if __name__ == "__main__":
    main()
