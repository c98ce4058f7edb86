"""Sample transforms in core/augment.py, on synthetic images, videos and sine waves."""

import io
import math
import pickle
from typing import Callable

import jsonargparse
import numpy as np
import pytest
import torch
import torchaudio.functional as AF
import yaml
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from core import augment
from core.data.decoders import UnusableSample
from core.augment import (
    AudioClip,
    GlobalLocalCrop,
    ImageCrop,
    ImageEval,
    MultiCrop,
    TwoViews,
    VideoClip,
    blur_kernel_size,
    gaussian_blur,
    global_local_boxes,
    log_mel,
)

SIZE = 24


def image_sample(height=40, width=56, seed=0, label=3):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return {"image": Image.fromarray(pixels), "label": label, "__key__": f"img{seed}", "__url__": "shard-0.tar"}


def unnormalize(x, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD):
    return x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def run_seeded(transform, sample, seed):
    torch.manual_seed(seed)
    return transform(sample)


IMAGE_TRANSFORMS = {
    "ImageCrop": lambda: ImageCrop(SIZE),
    "TwoViews": lambda: TwoViews(SIZE),
    "MultiCrop": lambda: MultiCrop(SIZE, SIZE // 2, n_local=3),
    "GlobalLocalCrop": lambda: GlobalLocalCrop(SIZE),
}


def tensors_of(out):
    """Every tensor in a transform's output, in a fixed order, for comparisons."""
    found = []
    for key in sorted(out):
        value = out[key]
        found += value if isinstance(value, list) else [value] if torch.is_tensor(value) else []
    return found


def test_image_crop_shape_dtype_and_label():
    out = ImageCrop(SIZE)(image_sample())
    assert set(out) == {"image", "label"}
    assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.float32
    assert out["label"] == image_sample()["label"]


def test_image_eval_normalizes_exactly_and_ignores_seed():
    sample = image_sample(SIZE, SIZE)
    transform = ImageEval(SIZE, resize=SIZE)  # no resampling at all: output is the normalized input
    out = run_seeded(transform, sample, 0)["image"]
    pixels = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(unnormalize(out), pixels)
    torch.testing.assert_close(run_seeded(transform, sample, 1)["image"], out)


def test_image_eval_center_crop_of_resized_image():
    out = ImageEval(SIZE)(image_sample(height=80, width=60))["image"]
    assert out.shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="resize=8 must be at least size=24"):
        ImageEval(SIZE, resize=8)


@pytest.mark.parametrize("name", IMAGE_TRANSFORMS)
def test_image_transforms_deterministic_under_seed(name):
    transform, sample = IMAGE_TRANSFORMS[name](), image_sample()
    first, again, other = (tensors_of(run_seeded(transform, sample, seed)) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_two_views_shapes_differ_and_collate():
    out = TwoViews(SIZE)(image_sample())
    assert set(out) == {"views", "label"}
    v1, v2_ = out["views"]
    assert v1.shape == v2_.shape == (3, SIZE, SIZE) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2_)
    batch = default_collate([TwoViews(SIZE)(image_sample(seed=s, label=s)) for s in range(3)])
    assert [v.shape for v in batch["views"]] == [(3, 3, SIZE, SIZE)] * 2
    assert batch["label"].tolist() == [0, 1, 2]


def test_two_views_blur_kernel_scales_with_size_and_is_off_for_tiny_views():
    assert blur_kernel_size(224) == 23  # BYOL's kernel at 224 px
    for size, blurred in ((32, False), (64, True)):
        color = TwoViews(size).views[0].color
        assert (color.blur_prob > 0) == blurred and color.blur_kernel == blur_kernel_size(size)


def test_two_views_probabilities_reach_the_views():
    views = TwoViews(64, blur_prob=(0.3, 0.7), solarize_prob=(0.0, 0.4)).views
    assert [v.color.blur_prob for v in views] == [0.3, 0.7]
    assert [v.color.solarize_prob for v in views] == [0.0, 0.4]


PER_IMAGE_ADJUSTMENTS = {
    "brightness": (augment.adjust_brightness, v2.functional.adjust_brightness, [0.0, 0.6, 1.0, 1.4]),
    "contrast": (augment.adjust_contrast, v2.functional.adjust_contrast, [0.0, 0.6, 1.0, 1.4]),
    "saturation": (augment.adjust_saturation, v2.functional.adjust_saturation, [0.0, 0.6, 1.0, 1.8]),
    "hue": (augment.adjust_hue, v2.functional.adjust_hue, [-0.5, -0.2, 0.0, 0.45]),
}


@pytest.mark.parametrize("name", PER_IMAGE_ADJUSTMENTS)
def test_batched_color_adjustments_match_torchvision_image_by_image(name):
    ours, theirs, factors = PER_IMAGE_ADJUSTMENTS[name]
    images = torch.rand(4, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([theirs(image, factor) for image, factor in zip(images, factors)])
    torch.testing.assert_close(ours(images, torch.tensor(factors)), expected, atol=1e-5, rtol=0)


def test_batched_gaussian_blur_matches_torchvision_image_by_image():
    images = torch.rand(3, 3, 30, 40, generator=torch.Generator().manual_seed(0))
    sigmas, kernel = [0.1, 0.8, 2.0], blur_kernel_size(224)
    expected = torch.stack([v2.functional.gaussian_blur(x, [kernel, kernel], [s, s]) for x, s in zip(images, sigmas)])
    torch.testing.assert_close(gaussian_blur(images, kernel, torch.tensor(sigmas)), expected)


def test_device_color_leaves_uint8_crops_and_finishes_them_on_the_batch():
    sample, plain = image_sample(), dict(jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=(0.0, 0.0))
    on_worker = run_seeded(TwoViews(SIZE, **plain), sample, 3)["views"]
    deferred = TwoViews(SIZE, device_color=True, **plain)
    crops = run_seeded(deferred, sample, 3)["views"]
    assert [(v.dtype, v.shape) for v in crops] == [(torch.uint8, (3, SIZE, SIZE))] * 2
    # Without random color steps, finishing on the batch gives exactly what the worker would have given.
    finished = deferred.on_device(default_collate([{"views": crops}]))["views"]
    for worker_view, batch_view in zip(on_worker, finished, strict=True):
        torch.testing.assert_close(batch_view[0], worker_view)
    # With them, every image of the batch gets its own draw.
    jittered = TwoViews(SIZE, jitter_prob=1.0, device_color=True)
    batch = default_collate([{"views": crops}] * 8)
    first = jittered.on_device(batch)["views"][0]
    assert first.dtype == torch.float32 and len({tuple(x.flatten()[:5].tolist()) for x in first}) == 8


def test_multi_crop_counts_shapes_and_collate():
    n_local, local_size = 3, SIZE // 2
    out = MultiCrop(SIZE, local_size, n_local)(image_sample())
    assert set(out) == {"global_views", "local_views", "label"}
    assert [v.shape for v in out["global_views"]] == [(3, SIZE, SIZE)] * 2
    assert [v.shape for v in out["local_views"]] == [(3, local_size, local_size)] * n_local
    assert MultiCrop(SIZE, local_size, 0)(image_sample())["local_views"] == []
    batch = default_collate([MultiCrop(SIZE, local_size, n_local)(image_sample(seed=s)) for s in range(2)])
    assert [v.shape for v in batch["local_views"]] == [(2, 3, local_size, local_size)] * n_local


@pytest.mark.parametrize("local_scale", [(0.3, 0.6), (0.001, 0.01)])  # CropMAE's, and slivers that probe rounding
@pytest.mark.parametrize("height,width,size", [(40, 56, 24), (7, 5, 32), (300, 200, 16)])
def test_global_local_local_box_inside_global_box_inside_image(height, width, size, local_scale):
    torch.manual_seed(0)
    for _ in range(200):
        boxes = global_local_boxes(height, width, size, (0.1, 1.0), local_scale, (3 / 4, 4 / 3))
        (gt, gl, gh, gw), (lt, ll, lh, lw) = boxes
        assert 0 <= gt and 0 <= gl and gt + gh <= height and gl + gw <= width
        assert gt <= lt and gl <= ll and lt + lh <= gt + gh and ll + lw <= gl + gw
        assert lh >= 1 and lw >= 1 and lh * lw <= gh * gw


def test_global_local_crop_cuts_views_at_the_boxes():
    sample = image_sample(64, 80)
    out = run_seeded(GlobalLocalCrop(SIZE, flip_prob=0.0), sample, 5)
    assert set(out) == {"global", "local", "label"}
    torch.manual_seed(5)
    boxes = global_local_boxes(64, 80, SIZE, (0.1, 1.0), (0.3, 0.6), (3 / 4, 4 / 3))
    image = v2.functional.to_image(sample["image"])
    for name, box in zip(("global", "local"), boxes):
        expected = v2.functional.resized_crop(image, *box, [SIZE, SIZE], interpolation=v2.InterpolationMode.BILINEAR)
        torch.testing.assert_close(unnormalize(out[name]), expected.float() / 255)


def numbered_video(frames, height=20, width=30):
    """Frame t is filled with the value t, so a clip's frame indices can be read back."""
    return torch.arange(frames, dtype=torch.uint8)[:, None, None, None].expand(frames, height, width, 3).clone()


def frame_indices(clip):
    return (unnormalize(clip.transpose(0, 1))[:, 0].mean((-1, -2)) * 255).round().long().tolist()


def test_video_clip_shape_and_center_frames_in_eval():
    num_frames, stride, frames = 4, 3, 30
    out = VideoClip(num_frames, stride, SIZE, train=False)({"video": numbered_video(frames), "label": 1})
    assert out["video"].shape == (3, num_frames, SIZE, SIZE) and out["video"].dtype == torch.float32
    start = (frames - ((num_frames - 1) * stride + 1)) // 2
    assert frame_indices(out["video"]) == [start + i * stride for i in range(num_frames)]
    assert out["label"] == 1


def test_video_clip_train_strided_frames_and_one_crop_for_all_frames():
    num_frames, stride, frames = 4, 2, 12
    transform = VideoClip(num_frames, stride, SIZE)
    torch.manual_seed(0)
    starts = set()
    for _ in range(20):
        idx = frame_indices(transform({"video": numbered_video(frames)})["video"])
        assert idx == [idx[0] + i * stride for i in range(num_frames)] and idx[-1] < frames
        starts.add(idx[0])
    assert len(starts) > 1
    still = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 20, 30, 3), dtype=np.uint8))
    still = still.expand(frames, -1, -1, -1)
    clip = transform({"video": still})["video"]  # (3, T, H, W)
    assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(num_frames))


def test_multiscale_crop_boxes_are_videomaes():
    """VideoMAE's GroupMultiScaleCrop on a 320x240 frame: sides from {240, 210, 180, 158} (the short side
    times 1, .875, .75, .66), height and width at most one step apart, at quarter points of the free space."""
    torch.manual_seed(0)
    sides = [240, 210, 180, 158]
    boxes = {augment.multiscale_box(240, 320, 224) for _ in range(3000)}
    for top, left, h, w in boxes:
        assert h in sides and w in sides and abs(sides.index(h) - sides.index(w)) <= 1
        assert top in {q * ((240 - h) // 4) for q in range(5)} and left in {q * ((320 - w) // 4) for q in range(5)}
    assert {(h, w) for _, _, h, w in boxes} == {(a, b) for a in sides for b in sides if abs(sides.index(a) - sides.index(b)) <= 1}
    assert len({(t, l) for t, l, h, w in boxes if (h, w) == (180, 180)}) == 13
    assert augment.multiscale_box(226, 300, 224, scales=(1.0,))[2:] == (224, 224)  # 226 is within 3 of 224: snapped

    clip = VideoClip(4, 2, SIZE, crop="multiscale", flip=False)
    still = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 30, 40, 3), dtype=np.uint8)).expand(12, -1, -1, -1)
    out = clip({"video": still})["video"]
    assert out.shape == (3, 4, SIZE, SIZE) and all(torch.equal(out[:, 0], out[:, t]) for t in range(4))  # one box
    with pytest.raises(ValueError, match="crop='square' must be"):
        VideoClip(4, 2, SIZE, crop="square")


def test_image_transforms_take_pil_images_of_any_mode():
    rgb = image_sample()["image"]
    for mode in ("L", "RGBA", "P"):
        out = ImageEval(SIZE)({"image": rgb.convert(mode)})["image"]
        assert out.shape == (3, SIZE, SIZE)


def test_video_clip_too_short_raises_with_lengths():
    with pytest.raises(ValueError, match=r"has 6 frames, but num_frames=4 with stride=2 needs at least 7"):
        VideoClip(4, 2, SIZE)({"video": numbered_video(6), "__key__": "clip9", "__url__": "v.tar"})
    with pytest.raises(ValueError, match=r"must be \(T, H, W, 3\)"):
        VideoClip(4, 2, SIZE)({"video": torch.zeros(8, 3, 20, 30, dtype=torch.uint8)})
    with pytest.raises(UnusableSample, match="has 6 frames"):
        VideoClip(4, 2, SIZE, short_clips="skip")({"video": numbered_video(6)})
    with pytest.raises(ValueError, match="short_clips='pad' must be"):
        VideoClip(4, 2, SIZE, short_clips="pad")


@pytest.mark.parametrize("train", [True, False])
def test_video_clip_short_clip_repeats_its_last_frame_when_asked(train):
    transform = VideoClip(4, 2, SIZE, train=train, short_clips="repeat_last")
    assert frame_indices(transform({"video": numbered_video(6)})["video"]) == [0, 2, 4, 5]
    assert frame_indices(transform({"video": numbered_video(2)})["video"]) == [0, 1, 1, 1]


def sine(freq, rate, seconds):
    t = torch.arange(round(rate * seconds)) / rate
    return torch.sin(2 * math.pi * freq * t)


def test_audio_clip_mixdown_resample_and_pad():
    in_rate, out_rate, freq, seconds = 8000, 16000, 440.0, 0.5
    wave = sine(freq, in_rate, seconds)
    stereo = torch.stack([wave, 3 * wave])  # mixdown is the mean: 2 * wave
    out = AudioClip(out_rate, 2 * seconds, train=False)({"audio": stereo, "sample_rate": in_rate, "label": 0})
    filled = round(out_rate * seconds)
    assert out["audio"].shape == (round(out_rate * 2 * seconds),) and out["label"] == 0
    assert torch.all(out["audio"][filled:] == 0)
    # Away from the edges, the resampled tone matches the tone synthesized at the new rate.
    middle = slice(filled // 4, 3 * filled // 4)
    torch.testing.assert_close(out["audio"][middle], 2 * sine(freq, out_rate, seconds)[middle], atol=1e-2, rtol=0)


def test_audio_clip_crops_center_in_eval_and_randomly_in_train():
    rate, samples, length = 100, 250, 100
    ramp = torch.arange(samples, dtype=torch.float32)[None]  # (1, S)
    sample = {"audio": ramp, "sample_rate": rate}
    center = AudioClip(rate, length / rate, train=False)(sample)["audio"]
    torch.testing.assert_close(center, ramp[0, (samples - length) // 2 :][:length])
    torch.manual_seed(0)
    starts = {int(AudioClip(rate, length / rate)(sample)["audio"][0]) for _ in range(20)}
    assert len(starts) > 1 and all(0 <= s <= samples - length for s in starts)


def test_audio_clip_resampling_matches_torchaudio_length():
    in_rate, out_rate = 44100, 16000
    wave = sine(1000.0, in_rate, 1.0)[None]
    expected = AF.resample(wave, in_rate, out_rate).shape[-1]
    out = AudioClip(out_rate, 2.0, train=False)({"audio": wave, "sample_rate": in_rate})["audio"]
    assert out[:expected].abs().max() > 0 and torch.all(out[expected:] == 0)


def test_log_mel_shape_batching_and_pitch():
    rate, hop_ms, win_ms, n_mels = 16000, 10.0, 25.0, 128
    waves = torch.stack([sine(500.0, rate, 1.0), sine(4000.0, rate, 1.0), torch.zeros(rate)])
    feats = log_mel(waves, rate, n_mels=n_mels, hop_ms=hop_ms, win_ms=win_ms)
    hop, win = round(rate * hop_ms / 1000), round(rate * win_ms / 1000)
    assert feats.shape == (3, 1, n_mels, 1 + (rate - win) // hop) and feats.dtype == torch.float32
    singles = torch.cat([log_mel(w[None], rate, n_mels=n_mels) for w in waves])
    torch.testing.assert_close(feats, singles)
    low, high = feats[:2, 0].mean(-1).argmax(-1).tolist()  # loudest mel bin of each tone
    assert low < high
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert log_mel(waves, rate).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B, samples\), got shape \(16000,\)"):
        log_mel(waves[0], rate)


@pytest.mark.parametrize(
    "config,sample",
    [
        ({"class_path": "core.augment.TwoViews", "init_args": {"size": 32}}, image_sample()),
        ({"class_path": "core.augment.ImageCrop", "init_args": {"size": 32, "scale": [0.5, 1.0]}}, image_sample()),
        ({"class_path": "core.augment.ImageEval", "init_args": {"size": 32, "resize": 40}}, image_sample()),
        (
            {"class_path": "core.augment.MultiCrop", "init_args": {"global_size": 32, "local_size": 16, "n_local": 2}},
            image_sample(),
        ),
        ({"class_path": "core.augment.GlobalLocalCrop", "init_args": {"size": 32}}, image_sample()),
        (
            {"class_path": "core.augment.VideoClip", "init_args": {"num_frames": 2, "stride": 2, "size": 16}},
            {"video": numbered_video(5)},
        ),
        (
            {"class_path": "core.augment.AudioClip", "init_args": {"sample_rate": 8000, "seconds": 0.5}},
            {"audio": torch.zeros(1, 100), "sample_rate": 8000},
        ),
    ],
)
def test_built_from_yaml_by_jsonargparse_and_picklable(config, sample):
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--transform", type=Callable[[dict], dict])
    cfg = parser.parse_string(yaml.safe_dump({"transform": config}))
    transform = parser.instantiate(cfg).transform
    assert type(transform).__name__ == config["class_path"].rsplit(".", 1)[1]
    copy = pickle.loads(pickle.dumps(transform))  # DataLoader workers may receive it pickled
    first, again = run_seeded(transform, sample, 0), run_seeded(copy, sample, 0)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(first), tensors_of(again), strict=True))


def test_yaml_rejects_unknown_interpolation():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--transform", type=Callable[[dict], dict])
    config = {"class_path": "core.augment.ImageCrop", "init_args": {"size": 32, "interpolation": "lanczos"}}
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_object({"transform": config})


def test_missing_or_bad_fields_name_the_sample():
    with pytest.raises(UnusableSample, match=r"needs 'image'.*'img7'.*'shard-3.tar'"):
        ImageCrop(SIZE)({"audio": torch.zeros(1, 10), "__key__": "img7", "__url__": "shard-3.tar"})
    gray = {"image": torch.zeros(1, 30, 30, dtype=torch.uint8), "__key__": "g1", "__url__": "s.tar"}  # a PIL image is converted
    with pytest.raises(ValueError, match=r"'image' of sample 'g1' from 's.tar' must be RGB"):
        TwoViews(SIZE)(gray)
    with pytest.raises(ValueError, match=r"'audio' .* got shape \(1, 2, 3\)"):
        AudioClip(8000, 1.0)({"audio": torch.zeros(1, 2, 3), "sample_rate": 8000})


def test_batch_views_refuses_views_whose_color_steps_never_ran():
    crops = default_collate([TwoViews(SIZE, device_color=True)(image_sample())])
    with pytest.raises(ValueError, match="device_color.*on_device"):
        augment.batch_views(crops, "views", SIZE, count=2)
    augment.batch_views(TwoViews(SIZE, device_color=True).on_device(crops), "views", SIZE, count=2)


def test_data_path_benchmark_reports_every_way_against_the_reference(tmp_path, capsys):
    from core.data import bench
    from core.data.write import write_shards

    def samples():
        for i in range(12):
            pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            yield {"__key__": f"s{i}", "png": buf.getvalue(), "cls": i % 3}

    write_shards(samples(), str(tmp_path / "b-%06d.tar"))
    bench.main(["--train", str(tmp_path / "b-000000.tar"), "--size", "16", "--batch-size", "4", "--batches", "2", "--workers", "0", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "samples/s" not in line]
    assert [r[0].strip() for r in rows] == ["torchvision (reference)", "worker", "device"]
    assert rows[0][2].strip() == "1.00x" and all(float(r[1]) > 0 for r in rows)


def test_color_jitter_shifts_hue_both_ways_and_draws_factors_in_torchvisions_ranges():
    """As torchvision's ColorJitter: hue shifts uniform in [-h, h] (pure red turns to orange and to violet
    alike), brightness factors uniform in [max(0, 1 - b), 1 + b], with no lump at a clamp."""
    import colorsys

    torch.manual_seed(0)
    red = torch.zeros(2000, 3, 4, 4)
    red[:, 0] = 0.8
    shifted = augment.ColorAugment(jitter=(0, 0, 0, 0.5), jitter_prob=1.0, mean=(0, 0, 0), std=(1, 1, 1))(red)
    hues = torch.tensor([colorsys.rgb_to_hsv(*rgb)[0] for rgb in shifted.mean((2, 3)).tolist()])
    hues = torch.where(hues > 0.5, hues - 1, hues)  # signed shift from red, in [-0.5, 0.5]
    assert (hues < -0.05).float().mean() == pytest.approx(0.45, abs=0.05)
    assert (hues > 0.05).float().mean() == pytest.approx(0.45, abs=0.05)
    assert (hues.abs() < 1e-3).float().mean() < 0.01  # no lump of unshifted images

    gray = torch.full((2000, 3, 4, 4), 0.25)
    bright = augment.ColorAugment(jitter=(1.5, 0, 0, 0), jitter_prob=1.0, mean=(0, 0, 0), std=(1, 1, 1))(gray)
    factor = bright.mean((1, 2, 3)) / 0.25  # (B,), brightness factors drawn in [0, 2.5]
    assert (factor < 1e-3).float().mean() < 0.01 and factor.max() > 2.3


def test_the_views_defaults_are_byol_s_and_dino_s():
    # Every paper config relies on these: BYOL's Table 6 (blur 1.0 / 0.1, solarize 0 / 0.2, jitter 0.4, 0.4,
    # 0.2, 0.1 at p 0.8, grayscale 0.2) and DINO's multi-crop (local views blurred at 0.5, never solarized).
    first, second = (view.color for view in TwoViews(224).views)
    assert (first.blur_prob, second.blur_prob, first.solarize_prob, second.solarize_prob) == (1.0, 0.1, 0.0, 0.2)
    assert (first.jitter, first.jitter_prob, first.grayscale_prob) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2)
    assert first.blur_sigma == (0.1, 2.0) and first.blur_kernel == 23
    crops = MultiCrop(224, 96, n_local=2)
    g1, g2, local = (view.color for view in [*crops.global_views, crops.local_view])
    assert (g1.blur_prob, g2.blur_prob, local.blur_prob) == (1.0, 0.1, 0.5)
    assert (g1.solarize_prob, g2.solarize_prob, local.solarize_prob) == (0.0, 0.2, 0.0)
    assert (g1.jitter, g1.jitter_prob, g1.grayscale_prob) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2)


# --- What the transforms promise beyond shapes: the crop geometry, flips, colour steps, their rates and
# order, and the constants a pretrained checkpoint expects (each test checked against a mutant of
# core/augment.py that the tests above let through).

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # unnormalized views: pixels / 255
NO_COLOR = dict(jitter_prob=0.0, grayscale_prob=0.0)


def coordinate_image(height=30, width=40):
    """Red holds each pixel's row and green its column, so a view's box and flip can be read back from it."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def read_box(view):
    """(top, left, height, width, flipped) of an unnormalized (PLAIN) view of coordinate_image resized with
    "nearest" to at least the image's size, so that every row and column of the box shows in the view."""
    pixels = (view * 255).round().long()
    rows, cols = pixels[0], pixels[1]
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1, bool(cols[0, 0] > cols[0, -1])


def coordinate_views(make, pick, draws, seed=0):
    """The boxes of the views that ``pick`` takes from ``draws`` outputs of ``make()`` on coordinate_image."""
    transform, pixels = make(), coordinate_image()
    sample = {"image": Image.fromarray(pixels), "video": torch.from_numpy(pixels)[None]}
    torch.manual_seed(seed)
    return [read_box(view) for _ in range(draws) for view in pick(transform(sample))]


NEAREST = dict(interpolation="nearest", **PLAIN)
SIAMESE_PLAIN = dict(blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0), **NO_COLOR, **NEAREST)
MULTICROP_PLAIN = dict(global_blur_prob=(0.0, 0.0), local_blur_prob=0.0, global_solarize_prob=(0.0, 0.0), **NO_COLOR, **NEAREST)
CROP_AREAS = {  # the papers' area fractions: MAE (He et al.), BYOL (Grill et al.), DINO (Caron et al.)
    "ImageCrop": (lambda: ImageCrop(48, **NEAREST), lambda out: [out["image"]], (0.2, 1.0)),
    "TwoViews": (lambda: TwoViews(48, **SIAMESE_PLAIN), lambda out: out["views"], (0.08, 1.0)),
    "MultiCrop global": (lambda: MultiCrop(48, 48, 1, **MULTICROP_PLAIN), lambda out: out["global_views"], (0.4, 1.0)),
    "MultiCrop local": (lambda: MultiCrop(48, 48, 2, **MULTICROP_PLAIN), lambda out: out["local_views"], (0.05, 0.4)),
    "VideoClip scale": (lambda: VideoClip(1, 1, 48, scale=(0.5, 0.6), **NEAREST), lambda out: [out["video"][:, 0]], (0.5, 0.6)),
}


@pytest.mark.parametrize("name", CROP_AREAS)
def test_crops_cover_the_area_fractions_of_each_recipe(name):
    # The crop scale is the strongest knob of these methods: a view drawn from another range trains another model.
    make, pick, (low, high) = CROP_AREAS[name]
    draws = 40 if name == "VideoClip scale" else 150  # enough draws to come near the lower end of the range
    areas = [h * w / (30 * 40) for _, _, h, w, _ in coordinate_views(make, pick, draws=draws)]
    assert low * 0.85 < min(areas) < low * 1.25 and max(areas) < high * 1.1


FLIPS = {  # (transform, views of its output, the share of views mirrored)
    "ImageCrop flip": (lambda: ImageCrop(48, **NEAREST), lambda out: [out["image"]], 0.5),
    "ImageCrop no flip": (lambda: ImageCrop(48, flip=False, **NEAREST), lambda out: [out["image"]], 0.0),
    "TwoViews flip": (lambda: TwoViews(48, **SIAMESE_PLAIN), lambda out: out["views"], 0.5),
    "TwoViews no flip": (lambda: TwoViews(48, flip_prob=0.0, **SIAMESE_PLAIN), lambda out: out["views"], 0.0),
    "VideoClip flip": (lambda: VideoClip(1, 1, 48, **NEAREST), lambda out: [out["video"][:, 0]], 0.5),
    "VideoClip no flip": (lambda: VideoClip(1, 1, 48, flip=False, **NEAREST), lambda out: [out["video"][:, 0]], 0.0),
    "multiscale no flip": (
        lambda: VideoClip(1, 1, 48, flip=False, crop="multiscale", **NEAREST), lambda out: [out["video"][:, 0]], 0.0
    ),
}


@pytest.mark.parametrize("name", FLIPS)
def test_views_are_mirrored_as_often_as_asked(name):
    # flip=False matters for data where left and right differ (text, some video actions); flip=True is every paper's.
    make, pick, share = FLIPS[name]
    flipped = [box[4] for box in coordinate_views(make, pick, draws=100 if share else 30)]
    assert sum(flipped) / len(flipped) == pytest.approx(share, abs=0.12)


def test_image_crop_resamples_bicubic_at_the_asked_aspect_ratio():
    # MAE's crop is bicubic; a ratio the crop ignored would cut a 4:3 box out of this 7:5 image instead.
    sample = image_sample()  # 40 x 56: aspect 1.4
    image = v2.functional.to_image(sample["image"])
    expected = v2.functional.resize(image, [SIZE, SIZE], interpolation=v2.InterpolationMode.BICUBIC).float() / 255
    for seed in range(5):
        out = run_seeded(ImageCrop(SIZE, scale=(1.0, 1.0), ratio=(1.4, 1.4), flip=False), sample, seed)["image"]
        torch.testing.assert_close(unnormalize(out), expected)


def test_image_eval_resizes_bicubic_to_size_over_0_875_then_center_crops():
    # The evaluation view every linear probe is compared on: 32 px views come from a 37 px short side.
    assert ImageEval(224).resize == 256 and ImageEval(32).resize == 37
    sample = image_sample(height=80, width=60)
    out = ImageEval(32)(sample)["image"]
    resized = v2.functional.resize(v2.functional.to_image(sample["image"]), 37, interpolation=v2.InterpolationMode.BICUBIC)
    torch.testing.assert_close(unnormalize(out), v2.functional.center_crop(resized, 32).float() / 255)


def test_normalization_constants_are_imagenet_s_and_audioset_s():
    # Pretrained checkpoints and their exports expect exactly these statistics of their inputs.
    assert augment.IMAGENET_MEAN == (0.485, 0.456, 0.406) and augment.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert (augment.AUDIOSET_FBANK_MEAN, augment.AUDIOSET_FBANK_STD) == (-4.2677393, 4.5689974)


@pytest.mark.parametrize("device_color", [False, True])
def test_two_views_without_color_steps_are_the_normalized_crop(device_color):
    # The colour steps take uint8 crops (scaled by 1/255) and end in the ImageNet normalization.
    sample = image_sample(SIZE, SIZE)
    transform = TwoViews(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, blur_prob=(0.0, 0.0),
                         solarize_prob=(0.0, 0.0), device_color=device_color, **NO_COLOR)  # fmt: skip
    views = transform.on_device(default_collate([transform(sample)]))["views"]
    pixels = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for view in views:
        torch.testing.assert_close(view[0], (pixels - mean) / std)


def test_on_device_finishes_each_view_with_its_own_color_steps():
    # BYOL's views are asymmetric (only the second solarized) and DINO's local views never solarized:
    # finishing a batch must not hand one view's steps to another.
    sample = image_sample()
    only_second = TwoViews(SIZE, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 1.0), device_color=True, **NO_COLOR, **PLAIN)
    crops = default_collate([only_second(sample)])["views"]
    finished = only_second.on_device({"views": list(crops)})["views"]
    as_float = [c.float() / 255 for c in crops]
    torch.testing.assert_close(finished[0], as_float[0])
    torch.testing.assert_close(finished[1], torch.where(as_float[1] >= 128 / 255, 1 - as_float[1], as_float[1]))

    crops = MultiCrop(SIZE, SIZE // 2, 2, global_blur_prob=(0.0, 0.0), local_blur_prob=0.0,
                      global_solarize_prob=(1.0, 1.0), device_color=True, **NO_COLOR, **PLAIN)  # fmt: skip
    batch = default_collate([crops(sample)])
    raw = list(batch["local_views"])
    for local, crop in zip(crops.on_device(batch)["local_views"], raw, strict=True):
        torch.testing.assert_close(local, crop.float() / 255)


def test_on_device_leaves_views_finished_on_the_workers_alone():
    # Without device_color the data module's call to on_device must not colour and normalize a second time.
    transform = TwoViews(SIZE)
    views = default_collate([transform(image_sample())])["views"]
    finished = transform.on_device({"views": list(views)})["views"]
    assert all(torch.equal(a, b) for a, b in zip(finished, views, strict=True))


def test_solarize_inverts_the_pixels_from_128_of_255_up():
    # BYOL's solarization threshold, read on uint8 pixels: 128 is inverted, 127 is not.
    pixels = torch.tensor([0, 127, 128, 129, 255], dtype=torch.uint8).view(1, 1, 5).expand(3, 1, 5)
    out = augment.ColorAugment(solarize_prob=1.0, **PLAIN)(pixels)
    assert (out[0, 0] * 255).round().long().tolist() == [0, 127, 127, 126, 0]


COLOR_STEPS = {  # ColorAugment's settings with one step at p=0.3, and how to tell an image it changed
    "jitter": (dict(jitter_prob=0.3), lambda x, y: (y - x).abs().amax((1, 2, 3)) > 1e-3),
    "grayscale": (dict(grayscale_prob=0.3), lambda x, y: (y[:, 0] == y[:, 1]).all(-1).all(-1) & (y[:, 1] == y[:, 2]).all(-1).all(-1)),
    "blur": (dict(blur_prob=0.3, blur_kernel=5, blur_sigma=(1.0, 2.0)), lambda x, y: (y - x).abs().amax((1, 2, 3)) > 1e-3),
    "solarize": (dict(solarize_prob=0.3), lambda x, y: (y - x).abs().amax((1, 2, 3)) > 1e-3),
}


@pytest.mark.parametrize("name", COLOR_STEPS)
def test_each_color_step_reaches_its_share_of_the_images_drawn_image_by_image(name):
    # The probabilities are the papers' (jitter 0.8, grayscale 0.2, blur 1.0 / 0.1, solarize 0.2); drawn
    # once per batch instead, a whole batch would be gray or not.
    settings, changed = COLOR_STEPS[name]
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8).expand(2000, -1, -1, -1)
    hits = changed(x, augment.ColorAugment(**settings, **PLAIN)(x)).float()
    assert hits.mean() == pytest.approx(0.3, abs=0.04)
    assert hits[:50].min() == 0 and hits[:50].max() == 1


def test_blur_sigma_is_drawn_image_by_image_from_blur_sigma():
    # SimCLR/BYOL draw sigma uniformly in [0.1, 2]: a fixed sigma would blur every view alike.
    torch.manual_seed(0)
    x = torch.rand(1, 3, 30, 30).expand(200, -1, -1, -1)
    kernel = blur_kernel_size(224)
    fixed = augment.ColorAugment(blur_prob=1.0, blur_kernel=kernel, blur_sigma=(1.3, 1.3), **PLAIN)(x)
    torch.testing.assert_close(fixed, gaussian_blur(x, kernel, torch.full((200,), 1.3)))
    spread = augment.ColorAugment(blur_prob=1.0, blur_kernel=kernel, blur_sigma=(0.5, 2.0), **PLAIN)(x).std((1, 2, 3))
    sharpest, softest = (gaussian_blur(x[:1], kernel, torch.tensor([s])).std() for s in (0.5, 2.0))
    assert softest - 1e-4 <= spread.min() < softest + 0.1 * (sharpest - softest)
    assert sharpest - 0.1 * (sharpest - softest) < spread.max() <= sharpest + 1e-4


def test_jitter_steps_run_in_an_order_drawn_once_per_call():
    """Saturation and hue do not commute: on an image of one colour x, hue then saturation blends the
    rotated colour h with gray(h), saturation then hue blends it with gray(x). The blended gray level,
    read back from each output, says which ran first."""
    x = torch.tensor([0.6, 0.2, 0.2]).view(1, 3, 1, 1).expand(64, 3, 2, 2)  # value 0.6, chroma 0.4
    gray = lambda rgb: 0.2989 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    jitter = augment.ColorAugment(jitter=(0.0, 0.0, 0.5, 0.5), jitter_prob=1.0, **PLAIN)
    saturation_first = []
    for seed in range(12):
        torch.manual_seed(seed)
        y = jitter(x)[:, :, 0, 0]  # (64, 3) = s * h + (1 - s) * level
        s = (y.max(1).values - y.min(1).values) / 0.4
        level = (y.min(1).values - 0.2 * s) / (1 - s)
        h = (y - ((1 - s) * level)[:, None]) / s[:, None]
        telling = ((1 - s).abs() > 0.1) & ((gray(h) - gray(x[:, :, 0, 0])).abs() > 0.05)
        assert telling.sum() > 5
        first = (level - gray(x[:, :, 0, 0])).abs()[telling] < 1e-3
        assert first.all() or ((level - gray(h)).abs()[telling] < 1e-3).all()  # one order for the whole batch
        saturation_first.append(bool(first.all()))
    assert 0 < sum(saturation_first) < len(saturation_first)


def test_color_settings_out_of_range_are_refused_when_built():
    # A config with an even kernel or an out-of-range jitter should fail at start, not in a data worker.
    with pytest.raises(ValueError, match="blur_kernel=4 must be odd"):
        augment.ColorAugment(blur_kernel=4)
    with pytest.raises(ValueError, match="kernel_size must be odd, got 4"):
        gaussian_blur(torch.rand(1, 3, 8, 8), 4, torch.tensor([1.0]))
    for jitter in [(0.4, -0.1, 0.2, 0.1), (0.4, 0.4, 0.2, 0.6)]:
        with pytest.raises(ValueError, match="strengths must be >= 0 and the hue strength at most 0.5"):
            augment.ColorAugment(jitter=jitter)


def test_blur_kernel_is_a_tenth_of_the_view_made_odd_and_starts_at_40_px():
    # 23 px at 224 as in SimCLR/BYOL; views under 40 px (CIFAR's 32) get no blur, 40 px ones do.
    assert [blur_kernel_size(s) for s in (32, 39, 40, 96, 224, 236, 240)] == [3, 3, 5, 9, 23, 23, 25]
    assert TwoViews(40).views[0].color.blur_prob == 1.0 and TwoViews(39).views[0].color.blur_prob == 0.0


def test_image_must_have_three_channels():
    # A 4-channel tensor (RGBA) would otherwise be normalized with three channels' statistics, or fail far away.
    rgba = {"image": torch.zeros(4, 30, 30, dtype=torch.uint8), "__key__": "a1", "__url__": "s.tar"}
    with pytest.raises(ValueError, match=r"must be RGB, got shape \(4, 30, 30\)"):
        ImageCrop(SIZE)(rgba)


def test_batch_views_names_a_wrong_count_or_size():
    # A transform that does not match the model (two views for DINO's four, 24 px for 32) fails with the setting.
    batch = default_collate([TwoViews(SIZE)(image_sample())])
    with pytest.raises(ValueError, match=r"batch\['views'\], 3 views .* with 2 views"):
        augment.batch_views(batch, "views", SIZE, count=3)
    with pytest.raises(ValueError, match=r"\(24, 24\)-pixel views, but the model is set up for 32x32"):
        augment.batch_views(batch, "views", 32, count=2)


def test_global_local_local_box_is_the_view_crop_scaled_back_to_the_nearest_pixel():
    # CropMAE's local crop is drawn on the resized global view: its box in image pixels is that crop scaled back.
    ratio = (3 / 4, 4 / 3)
    for seed in range(100):
        torch.manual_seed(seed)
        boxes = global_local_boxes(90, 70, SIZE, (0.1, 1.0), (0.3, 0.6), ratio)
        torch.manual_seed(seed)
        g_top, g_left, g_h, g_w = augment.random_resized_box(90, 70, (0.1, 1.0), ratio)
        l_top, l_left, l_h, l_w = augment.random_resized_box(SIZE, SIZE, (0.3, 0.6), ratio)
        assert boxes[0] == (g_top, g_left, g_h, g_w)
        top, left, h, w = boxes[1]
        assert abs(h - l_h * g_h / SIZE) <= 0.5 and abs(w - l_w * g_w / SIZE) <= 0.5
        assert top == g_top + math.floor(l_top * g_h / SIZE) and left == g_left + math.floor(l_left * g_w / SIZE)


def test_multiscale_sides_snap_to_size_only_within_3_px_and_never_pass_the_frame():
    # VideoMAE's GroupMultiScaleCrop snaps |side - size| < 3; a snapped side cannot cut past a smaller frame.
    torch.manual_seed(0)
    assert augment.multiscale_box(227, 300, 224, scales=(1.0,))[2:] == (227, 227)
    assert augment.multiscale_box(222, 300, 224, scales=(1.0,))[2:] == (222, 224)
    clip = torch.from_numpy(coordinate_image()).permute(2, 0, 1)[None]  # (1, 3, 30, 40)
    crop = augment.MultiScaleCrop(48, scales=(0.5,), interpolation=v2.InterpolationMode.NEAREST)
    assert read_box(crop(clip)[0].float() / 255)[2:4] == (15, 15)  # half the short side


def test_train_clip_and_window_starts_reach_every_position():
    # The last start must be drawable too, or the end of every video and recording is never trained on.
    torch.manual_seed(0)
    starts = {frame_indices(VideoClip(4, 2, SIZE)({"video": numbered_video(9)})["video"])[0] for _ in range(40)}
    assert starts == {0, 1, 2}
    ramp = {"audio": torch.arange(103, dtype=torch.float32)[None], "sample_rate": 100}
    starts = {int(AudioClip(100, 1.0)(ramp)["audio"][0]) for _ in range(60)}
    assert starts == {0, 1, 2, 3}


def test_audio_clip_length_is_the_rounded_sample_count():
    # 1.001 s at 16 kHz is 16015.99... samples: the model's patch grid is sized from the rounded 16016.
    out = AudioClip(16000, 1.001, train=False)({"audio": torch.zeros(1, 100), "sample_rate": 16000})["audio"]
    assert out.shape == (16016,)
