"""The data-loading benchmarks (core.data.bench, bench_video, bench_audio) without asserting any speed: the
reference and our ways do the same work (the same augmentation, clips and windows), what `samples_per_second`
and `measure` count and time (a fake clock) and read as memory, which round each way keeps, the tables'
rows, columns and ratios (ours over the reference), and the synthetic media being what was asked for."""

import contextlib
import io
import tracemalloc
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torchvision.transforms import v2

from core.augment import AudioClip, TwoViews, VideoClip
from core.data import bench, bench_audio, bench_video
from core.data.decoders import EncodedAudio, EncodedVideo
from core.data.write import write_shards

MB = 2**20


def table_rows(out: str) -> list[list[str]]:
    """The body rows of a printed markdown table, cells stripped."""
    lines = [line for line in out.splitlines() if line.startswith("| ")][1:]  # the header first
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]


def fake_clock(monkeypatch, module, *readings: float) -> list:
    """`module.time.perf_counter` reads `readings` in turn; returns the list its reads are noted in."""
    events, values = [], iter(readings)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or next(values)))
    return events


# core.data.bench: BYOL's two views, torchvision's way (the reference) against core.augment.TwoViews


def image_shard(tmp_path, count: int = 12) -> str:
    def samples():
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
            yield {"__key__": f"s{i}", "png": buf.getvalue(), "cls": i % 3}

    write_shards(samples(), str(tmp_path / "b-%06d.tar"))
    return str(tmp_path / "b-000000.tar")


def torchvision_steps(view: v2.Compose) -> dict:
    """What one of TorchvisionTwoViews' views does, in ColorAugment's terms; a step left out has p = 0."""
    steps = {"flip": 0.0, "jitter_prob": 0.0, "grayscale": 0.0, "blur": (0.0,), "solarize": 0.0}
    for t in view.transforms:
        if isinstance(t, v2.RandomResizedCrop):
            steps["crop"] = (t.size, tuple(t.scale), tuple(t.ratio), t.interpolation)
        elif isinstance(t, v2.RandomHorizontalFlip):
            steps["flip"] = t.p
        elif isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter):
            j = t.transforms[0]
            steps["jitter"] = tuple(round(s, 6) for s in (j.brightness[1] - 1, j.contrast[1] - 1, j.saturation[1] - 1, j.hue[1]))
            steps["jitter_prob"] = t.p
        elif isinstance(t, v2.RandomGrayscale):
            steps["grayscale"] = t.p
        elif isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur):
            b = t.transforms[0]
            steps["blur"] = (t.p, b.kernel_size[0], tuple(b.sigma)) if t.p else (0.0,)
        elif isinstance(t, v2.RandomSolarize):
            steps["solarize"] = t.p if t.threshold == 128 else ("threshold", t.threshold)
        elif isinstance(t, v2.ToDtype):
            steps["scaled"] = t.scale
        elif isinstance(t, v2.Normalize):
            steps["normalize"] = (tuple(t.mean), tuple(t.std))
    return steps


def twoviews_steps(view) -> dict:
    crop, flip = view.crop.transforms[0], view.crop.transforms[1:]
    c = view.color
    return {
        "crop": (crop.size, tuple(crop.scale), tuple(crop.ratio), crop.interpolation),
        "flip": flip[0].p if flip else 0.0,
        "jitter": tuple(round(s, 6) for s in c.jitter),
        "jitter_prob": c.jitter_prob,
        "grayscale": c.grayscale_prob,
        "blur": (c.blur_prob, c.blur_kernel, tuple(c.blur_sigma)) if c.blur_prob else (0.0,),
        "solarize": c.solarize_prob,
        "scaled": True,
        "normalize": (tuple(c.mean), tuple(c.std)),
    }


@pytest.mark.parametrize("size", [16, 50])
def test_torchvision_reference_draws_the_same_two_views_as_twoviews(size):
    """The reference does the work ours does: each view's crop, flip, jitter, grayscale, blur (50 px: the
    smallest kernel that blurs, 5; 16 px: none), solarize and normalization, with BYOL's parameters."""
    scale = (0.3, 1.0)
    reference, ours = bench.TorchvisionTwoViews(size, scale), TwoViews(size, scale=scale)
    assert [torchvision_steps(v) for v in reference.views] == [twoviews_steps(v) for v in ours.views]
    assert [torchvision_steps(v)["blur"][0] for v in reference.views] == ([1.0, 0.1] if size == 50 else [0.0, 0.0])
    assert [torchvision_steps(v)["solarize"] for v in reference.views] == [0.0, 0.2]


def test_samples_per_second_times_the_batches_after_the_first_and_finishes_them_as_a_trainer_would(tmp_path, monkeypatch):
    """The first batch (worker start-up) is neither timed nor counted; the next `batches` are, their
    samples counted (not their views), each finished by `on_device` inside the timed span."""
    pattern = image_shard(tmp_path)
    events = fake_clock(monkeypatch, bench, 10.0, 12.0)

    class Spy:
        def __init__(self):
            self.views = TwoViews(16, device_color=True)

        def __call__(self, sample):
            events.append("sample")
            return self.views(sample)

        def on_device(self, batch):
            events.append(f"on_device {len(batch['views'][0])}")
            return self.views.on_device(batch)

    assert bench.samples_per_second(Spy(), pattern, batch_size=4, batches=2, workers=0) == 8 / 2.0
    assert events == [*["sample"] * 4, "clock", *(["sample"] * 4 + ["on_device 4"]) * 2, "clock"]


def test_data_path_table_gives_each_way_against_the_torchvision_reference(tmp_path, monkeypatch, capsys, one_thread):
    """Each way is timed with the asked threads and workers, on one crop scale; the device way is the one
    whose color steps run on the batch; the ratios are each way's rate over the reference's."""
    rates = {"reference": 200.0, "worker": 300.0, "device": 500.0}
    seen = []

    def samples_per_second(transform, pattern, batch_size, batches, workers):
        if isinstance(transform, bench.TorchvisionTwoViews):
            way, crop = "reference", torchvision_steps(transform.views[0])["crop"]
        else:
            way = "device" if transform.views[0].device_color else "worker"
            crop = twoviews_steps(transform.views[0])["crop"]
        seen.append((way, pattern, batch_size, batches, workers, torch.get_num_threads(), crop))
        return rates[way]

    monkeypatch.setattr(bench, "samples_per_second", samples_per_second)
    bench.main(["--train", "x.tar", "--size", "16", "--batch-size", "4", "--batches", "2", "--workers", "3", "--threads", "2"])
    assert [s[:6] for s in seen] == [(way, "x.tar", 4, 2, 3, 2) for way in ("reference", "worker", "device")]
    assert [s[6] for s in seen] == [seen[0][6]] * 3 and seen[0][6][1] == (0.3, 1.0)
    out = capsys.readouterr().out
    assert "| two views of 16 px, 3 worker(s), 2 threads | samples/s | vs reference |" in out
    assert table_rows(out) == [
        ["torchvision (reference)", "200", "1.00x"],
        ["worker", "300", "1.50x"],
        ["device", "500", "2.50x"],
    ]


# core.data.bench_video: whole videos (the reference), from the first keyframe, and EncodedVideo's seek


def test_synthetic_video_has_the_asked_frames_size_rate_and_keyframe_interval():
    data = bench_video.synthetic_video(24, 48, 32, 10, seed=0, keyint=8)
    video = EncodedVideo(data)
    assert video.shape == (24, 32, 48, 3) and video.fps == 10.0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        keyframes = [i for i, packet in enumerate(p for p in container.demux(stream) if p.size) if packet.is_keyframe]
    assert keyframes == [0, 8, 16]
    assert len(video.frames()) == 24  # every frame decodes, the encoder's delayed ones flushed too


def test_synthetic_video_is_a_texture_drifting_two_pixels_a_frame_and_differs_by_seed():
    """Every frame is new (a real frame's decoding cost), each the last one moved 2 px left."""
    frames = EncodedVideo(bench_video.synthetic_video(6, 48, 32, 10, seed=0)).frames().numpy().astype(int)
    for t in range(5):
        assert np.abs(frames[t + 1] - frames[t]).mean() > 20
        assert np.abs(frames[t + 1][:, :-2] - frames[t][:, 2:]).mean() < 5
    other = EncodedVideo(bench_video.synthetic_video(6, 48, 32, 10, seed=1)).frames().numpy().astype(int)
    assert np.abs(other - frames).mean() > 20


def test_video_ways_cut_the_same_clips_and_decode_from_where_they_say(monkeypatch):
    """The same seed, the same clip from every way; the reference decodes and converts every frame, the
    first-keyframe way decodes from frame 0, and EncodedVideo from the last keyframe before the clip."""
    data = bench_video.synthetic_video(40, 48, 32, 10, seed=0, keyint=8)
    starts = []
    decode_from = EncodedVideo.decode_from

    def recording(self, start, wanted, checked):
        starts.append((start[0], None if wanted is None else min(wanted)))
        return decode_from(self, start, wanted, checked)

    monkeypatch.setattr(EncodedVideo, "decode_from", recording)
    clip = VideoClip(4, 2, 16)
    ways = [bench_video.WholeVideoClip(clip), bench_video.FromFirstKeyframe(clip), clip]
    seeked = 0
    for seed in range(4):
        clips = []
        for way in ways:
            starts.clear()
            torch.manual_seed(seed)
            clips.append(way({"__key__": "v", "video": EncodedVideo(data)})["video"])
            [(start, first)] = starts
            if way is ways[0]:
                assert (start, first) == (0, None)  # every frame
            elif way is ways[1]:
                assert start == 0
            else:
                assert start == first // 8 * 8
                seeked += start > 0
        assert clips[0].shape == (3, 4, 16, 16)
        assert all(torch.equal(clips[0], c) for c in clips[1:]), seed
    assert seeked  # some clip started past the first keyframe


def marker_shard(tmp_path, count: int = 3) -> str:
    write_shards([{"__key__": f"{i:06d}", "cls": b"0"} for i in range(count)], str(tmp_path / "m-%06d.tar"))
    return str(tmp_path / "m-000000.tar")


def test_measure_counts_every_pass_clips_over_seconds_and_the_peak_of_numpy_memory(tmp_path, monkeypatch):
    """3 samples, 2 passes: 6 clips in the 3 s between the clock's reads, timed with tracing off (it had been
    on, slowing each way by its own amount). The peak, from the same clips read again under tracing, is that
    of the 4 MiB array each call holds for a moment (in MB), and tracing is off after, for the next way's own."""
    pattern = marker_shard(tmp_path)
    fake_clock(monkeypatch, bench_video, 5.0, 8.0)
    calls = []

    def transform(sample):
        held = np.ones(MB, np.float32)  # 4 MiB, let go on return
        calls.append((tracemalloc.is_tracing(), torch.rand(()).item()))  # a draw as a clip's start is
        return {"video": torch.zeros(1), "cls": held[:1].copy()}

    torch.manual_seed(0)
    rate, peak = bench_video.measure(transform, pattern, passes=2)
    assert rate == 6 / 3.0
    assert 4 <= peak < 4.5, peak
    assert not tracemalloc.is_tracing()
    assert [tracing for tracing, _ in calls] == [False] * 6 + [True] * 6
    assert [draw for _, draw in calls[:6]] == [draw for _, draw in calls[6:]]  # the traced read cuts the same clips


def test_video_table_puts_each_way_over_the_first_the_reference():
    best = {"whole (reference)": (10.0, 8.0), "seek": (25.0, 2.0), "slow": (5.0, 16.0)}
    for digits, rates in ((1, ("10.0", "25.0", "5.0")), (2, ("10.00", "25.00", "5.00"))):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            bench_video.print_table("T", best, "mem", digits=digits)
        out = captured.getvalue()
        assert "| T | clips/s | vs reference | mem |" in out
        assert table_rows(out) == [
            ["whole (reference)", rates[0], "1.00x", "8.0 MB (1.00x)"],
            ["seek", rates[1], "2.50x", "2.0 MB (0.25x)"],
            ["slow", rates[2], "0.50x", "16.0 MB (2.00x)"],
        ]


def clip_recorder(monkeypatch, module, clip_class, measure_name: str = "measure"):
    """`module`'s clip class and measure wrapped: one list per measure call (a way in a round), of what
    each clip cut; the clip instances made."""
    calls, made = [], []

    class Recording(clip_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def __call__(self, sample):
            out = super().__call__(sample)
            calls[-1].append(next(v for k, v in out.items() if k in ("video", "audio")))
            return out

    measure = getattr(module, measure_name)

    def recording_measure(transform, *args, **kwargs):
        calls.append([])
        return measure(transform, *args, **kwargs)

    monkeypatch.setattr(module, clip_class.__name__, Recording)
    monkeypatch.setattr(module, measure_name, recording_measure)
    return calls, made


def test_video_benchmark_makes_the_asked_videos_and_every_way_cuts_the_same_clips(monkeypatch, capsys, one_thread):
    """Each round reseeds every way alike (the same clips, so the same decoding cost) and rounds differ;
    the shard holds the asked videos (frames, size, keyframe interval), each its own."""
    calls, made = clip_recorder(monkeypatch, bench_video, VideoClip)
    shards = []
    write = bench_video.write_shards
    monkeypatch.setattr(bench_video, "write_shards", lambda samples, pattern: shards.append(samples) or write(samples, pattern))
    bench_video.main(["--videos", "2", "--frames", "24", "--width", "48", "--height", "32", "--keyint", "8", "--clip-frames", "4",
                      "--stride", "2", "--size", "16", "--rounds", "2", "--threads", "1"])  # fmt: skip
    [samples] = shards
    videos = [EncodedVideo(s["mp4"]) for s in samples]
    assert [v.shape for v in videos] == [(24, 32, 48, 3)] * 2 and [v.seek_points[1][0] for v in videos] == [8, 8]
    assert samples[0]["mp4"] != samples[1]["mp4"]
    assert len(made) == 1 and len(calls) == 6 and all(len(c) == 8 for c in calls)  # 2 videos, 2 passes, timed then traced
    assert all(torch.equal(a, b) for c in calls for a, b in zip(c[:4], c[4:]))  # the traced read cuts the timed read's clips
    assert all(clip.shape == (3, 4, 16, 16) for c in calls for clip in c)
    for round_calls in (calls[:3], calls[3:]):
        for other in round_calls[1:]:
            assert all(torch.equal(a, b) for a, b in zip(round_calls[0], other))
    assert not all(torch.equal(a, b) for a, b in zip(calls[0], calls[3]))
    out = capsys.readouterr().out
    assert "| 2 videos of 24 frames, 48x32, a keyframe every 8; clips of 4 at stride 2, 16 px | clips/s |" in out
    assert [r[0] for r in table_rows(out)] == ["whole video (reference)", "clip frames from the first keyframe", "clip frames"]


def test_video_benchmark_keeps_each_ways_fastest_round_with_that_rounds_memory(monkeypatch, capsys, one_thread):
    """Not the round of the most (or least) memory: each fastest round here held less than another."""
    results = {  # way -> (clips/s, MB) by round
        bench_video.WholeVideoClip: [(10.0, 8.0), (20.0, 3.0), (15.0, 9.0)],
        bench_video.FromFirstKeyframe: [(40.0, 1.0), (30.0, 4.0), (35.0, 2.0)],
        VideoClip: [(60.0, 2.0), (80.0, 0.5), (70.0, 3.0)],
    }
    served = []

    def measure(transform, pattern, passes):
        way = next(w for w in results if isinstance(transform, w))
        served.append(way)
        return results[way][served.count(way) - 1]

    monkeypatch.setattr(bench_video, "measure", measure)
    bench_video.main(["--videos", "1", "--frames", "8", "--width", "32", "--height", "32", "--clip-frames", "2", "--rounds", "3"])
    assert table_rows(capsys.readouterr().out) == [
        ["whole video (reference)", "20.0", "1.00x", "3.0 MB (1.00x)"],
        ["clip frames from the first keyframe", "40.0", "2.00x", "1.0 MB (0.33x)"],
        ["clip frames", "80.0", "4.00x", "0.5 MB (0.17x)"],
    ]


# core.data.bench_audio: whole recordings (the reference) against EncodedAudio's window


@pytest.mark.parametrize("fmt, subtype", [("flac", "PCM_16"), ("wav", "PCM_16"), ("ogg", "VORBIS")])
def test_synthetic_recording_is_stereo_noise_of_the_asked_length_rate_and_format(fmt, subtype):
    data = bench_audio.synthetic_recording(1.5, 22_050, fmt, seed=0)
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt.upper(), subtype, 22_050, 2)
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    assert samples.shape == (33_075, 2)  # the length read, not only the header's count
    assert samples.std() == pytest.approx(0.1, rel=0.2)  # -20 dBFS (Vorbis: lossy)
    assert not np.array_equal(samples, soundfile.read(io.BytesIO(bench_audio.synthetic_recording(1.5, 22_050, fmt, seed=1)), dtype="float32")[0])


def test_synthetic_recording_writes_a_long_recording_whole():
    """Written in blocks of 2^15 samples: every block, the last partial one too."""
    data = bench_audio.synthetic_recording(3.0, 44_100, "wav", seed=0)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 44_100 and samples.shape == (132_300, 2) and np.abs(samples[-1000:]).max() > 0


def test_traced_notes_the_peak_of_what_the_transform_allocates_above_what_it_was_handed():
    """Not what was held before (the handed sample), nor an earlier peak; the largest call's peak, though
    each call lets its arrays go."""

    def allocating(mib):
        def transform(sample):
            held = np.ones(mib * MB // 4, np.float32)
            return {"audio": held[:1].copy()}

        return transform

    tracemalloc.start()
    try:
        handed = np.ones(8 * MB // 4, np.float32)  # 8 MiB already held
        spike = np.ones(16 * MB // 4, np.float32)  # an earlier peak, let go
        del spike
        traced = bench_audio.Traced(allocating(2))
        traced({"audio": handed})
        assert 2 * MB <= traced.peak < 2.25 * MB, traced.peak / MB
        traced.transform = allocating(1)
        traced({"audio": handed})
        assert 2 * MB <= traced.peak < 2.25 * MB, traced.peak / MB
    finally:
        tracemalloc.stop()


def test_audio_ways_cut_the_same_window_and_the_reference_decodes_every_sample():
    recording = bench_audio.synthetic_recording(3.0, 44_100, "flac", seed=0)
    handed = []

    class Spy(AudioClip):
        def __call__(self, sample):
            handed.append(sample["audio"])
            return super().__call__(sample)

    clip = Spy(16_000, 0.5)
    for seed in range(3):
        handed.clear()
        outs = []
        for way in (bench_audio.WholeRecordingClip(clip), clip):
            torch.manual_seed(seed)
            outs.append(way({"__key__": "a", "audio": EncodedAudio(recording), "sample_rate": 44_100})["audio"])
        assert outs[0].shape == (8_000,) and torch.equal(outs[0], outs[1]), seed
        whole, encoded = handed
        assert isinstance(encoded, EncodedAudio) and torch.is_tensor(whole) and whole.shape == (2, 132_300)


def test_audio_benchmark_makes_the_asked_recordings_and_both_ways_cut_the_same_random_windows(monkeypatch, capsys, one_thread):
    """Each round reseeds both ways alike (the same windows: OGG and MP3 decode up to the window's end) and
    rounds differ (random windows); the memory column is the reference's decoded samples in MB (float32
    stereo, a copy or two), the window's less."""
    calls, made = clip_recorder(monkeypatch, bench_audio, AudioClip)
    shards = []
    write = bench_audio.write_shards
    monkeypatch.setattr(bench_audio, "write_shards", lambda samples, pattern: shards.append(samples) or write(samples, pattern))
    bench_audio.main(["--recordings", "2", "--minutes", "0.05", "--sample-rate", "22050", "--format", "flac", "--clip-rate", "8000",
                      "--clip-seconds", "1", "--rounds", "2", "--threads", "1"])  # fmt: skip
    [samples] = shards
    assert [sorted(s) for s in samples] == [["__key__", "cls", "flac"]] * 2 and samples[0]["flac"] != samples[1]["flac"]
    infos = [soundfile.info(io.BytesIO(s["flac"])) for s in samples]
    assert [(i.frames, i.samplerate, i.channels) for i in infos] == [(66_150, 22_050, 2)] * 2
    assert [(c.sample_rate, c.length, c.train) for c in made] == [(8_000, 8_000, True)]
    assert len(calls) == 4 and all(len(c) == 8 for c in calls)  # 2 recordings, 2 passes, timed then traced
    assert all(torch.equal(a, b) for c in calls for a, b in zip(c[:4], c[4:]))
    for reference, window in (calls[:2], calls[2:]):
        assert all(torch.equal(a, b) for a, b in zip(reference, window))
    assert not any(torch.equal(a, b) for a, b in zip(calls[0], calls[2]))
    out = capsys.readouterr().out
    assert "| 2 recordings of 0.05 min, 22050 Hz stereo flac; clips of 1 s at 8000 Hz | clips/s |" in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["whole recording (reference)", "clip window"]
    whole_mb, window_mb = (float(r[3].split()[0]) for r in rows)
    decoded_mb = 66_150 * 2 * 4 / MB
    assert decoded_mb <= whole_mb < 3 * decoded_mb and window_mb < whole_mb


def test_audio_benchmark_keeps_each_ways_fastest_round_with_that_rounds_memory(monkeypatch, capsys, one_thread):
    results = {  # way -> (clips/s, bytes) by round
        bench_audio.WholeRecordingClip: [(10.0, 8 * MB), (20.0, 2 * MB), (15.0, 4 * MB)],
        AudioClip: [(50.0, MB // 2), (40.0, MB), (45.0, MB // 4)],
    }
    served = []

    def measure(transform, pattern, passes, key, memory_of):
        assert memory_of.transform is transform  # the peak within the transform's calls, not the shard's bytes
        way = next(w for w in results if isinstance(transform, w))
        served.append(way)
        rate, peak = results[way][served.count(way) - 1]
        return rate, peak / MB

    monkeypatch.setattr(bench_audio, "measure", measure)
    shards = []
    write = bench_audio.write_shards
    monkeypatch.setattr(bench_audio, "write_shards", lambda samples, pattern: shards.append(samples) or write(samples, pattern))
    bench_audio.main(["--recordings", "1", "--minutes", "0.01", "--format", "wav", "--clip-seconds", "0.1", "--rounds", "3"])
    assert [sorted(s) for s in shards[0]] == [["__key__", "cls", "wav"]]  # the member named by its format
    assert table_rows(capsys.readouterr().out) == [
        ["whole recording (reference)", "20.00", "1.00x", "2.0 MB (1.00x)"],
        ["clip window", "50.00", "2.50x", "0.5 MB (0.25x)"],
    ]
