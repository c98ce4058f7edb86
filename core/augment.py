"""Sample transforms: turn one decoded WebDataset sample (a dict) into model inputs.

The data layer decodes a sample into ``{"image": PIL RGB, "audio": EncodedAudio (``audio.read(start, stop)``:
float32 samples (C, stop - start), decoded when asked for), "sample_rate": int,
"video": EncodedVideo (``video[index]``: uint8 frames (len(index), H, W, 3), decoded when asked for), "fps": float,
"text": str, "label": int, "json": dict, "__key__", "__url__"}``. A transform of one's own decodes what it
needs (``sample["audio"].samples()``, ``sample["video"].frames()`` for the whole).
Each transform here is a small class with typed init arguments, so a config can name it with
``class_path: core.augment.TwoViews`` / ``init_args: {size: 224}``, and ``__call__(sample) -> dict``
returns only tensors (plus ``"label"`` when the sample has one, for probes), ready for the default collate.

Random choices draw from torch's global generator, so a fixed ``torch.manual_seed`` reproduces them. The
shard stream seeds each data worker's generators (torch's, Python's and NumPy's) from (seed, rank, worker,
step, pass), not torch's default worker seed, so that ranks and workers draw apart and a resumed run does not
repeat the draws of its first steps (core/data/stream.py).

Log-mel features are not computed here but on the model's device, by :func:`log_mel`.
"""

from __future__ import annotations

import math
from typing import Literal

import PIL.Image
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from torchvision import tv_tensors
from torchvision.transforms import v2

from core.data.decoders import EncodedAudio, EncodedVideo, FewerFrames, FewerSamples, UnusableSample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean and std of AudioSet's Kaldi log-mel features, as used by AST and AudioMAE.
AUDIOSET_FBANK_MEAN = -4.2677393
AUDIOSET_FBANK_STD = 4.5689974
# A 10%-of-size kernel under 5 px (views under 40 px, e.g. CIFAR's 32 px) is little more than a
# 3-tap smoothing of an already tiny image, so such views get no blur (SimCLR uses none on CIFAR-10).
MIN_BLUR_KERNEL = 5

Interpolation = Literal["nearest", "bilinear", "bicubic"]
Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


def _field(sample: dict, key: str):
    """sample[key]; a sample without it (an image shard's .gif, say, which no decoder reads) raises
    ``UnusableSample``, which the shard stream skips and counts."""
    try:
        return sample[key]
    except KeyError:
        raise UnusableSample(
            f"no {key!r}",
            f"transform needs {key!r}, but sample {sample.get('__key__', '?')!r} from "
            f"{sample.get('__url__', '?')!r} has only {sorted(sample)}",
        ) from None


def _labelled(sample: dict, out: dict) -> dict:
    if "label" in sample:
        out["label"] = sample["label"]
    return out


def _image(sample: dict) -> torch.Tensor:
    """The sample's ``"image"`` as a (3, H, W) uint8 tensor image (a PIL image of another mode converted to RGB)."""
    image = _field(sample, "image")
    if isinstance(image, PIL.Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    image = v2.functional.to_image(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"'image' of sample {sample.get('__key__', '?')!r} from {sample.get('__url__', '?')!r} "
            f"must be RGB, got shape {tuple(image.shape)} (channels first)"
        )
    return image


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def blur_kernel_size(size: int) -> int:
    """Gaussian blur kernel for ``size``-pixel views: 10% of the size, made odd (23 px at 224), as in SimCLR/BYOL."""
    return int(0.1 * size) | 1


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of (B, 3, H, W) RGB -> (B, 1, H, W), the weights of torchvision's rgb_to_grayscale."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), to broadcast over (B, C, H, W)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness with one factor per image: x (B, 3, H, W) in [0, 1], factor (B,)."""
    return (x * _per_sample(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_contrast per image: blend with the image's mean gray level."""
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (_per_sample(factor) * x + (1 - _per_sample(factor)) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_saturation per image: blend with the image's grayscale."""
    return (_per_sample(factor) * x + (1 - _per_sample(factor)) * _gray(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue per image: rotate the HSV hue by ``shift`` (B,) turns, in [-0.5, 0.5]."""
    value, _ = x.max(dim=1)  # (B, H, W)
    low, _ = x.min(dim=1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    # HSV -> RGB as f(n) = V - V S max(0, min(k, 4 - k, 1)), k = (n + 6 H) mod 6, for n = 5, 3, 1.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * hue.unsqueeze(1)) % 6  # (B, 3, H, W)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1)))


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one ``sigma`` (B,) per image of x (B, C, H, W), reflect padding, as torchvision's
    gaussian_blur, computed as two 1-D passes (five times cheaper than one 2-D convolution at 23 px)."""
    if kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur kernel_size must be odd, got {kernel_size}")
    b, c, h, w = x.shape
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.softmax(-0.5 * (taps / sigma.view(-1, 1)) ** 2, dim=1)  # normalized Gaussians, (B, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # one per (image, channel): (B * C, K)
    # Every (image, channel) plane is its own group, so each image gets its own kernel.
    y = F.pad(x.reshape(1, b * c, h, w), [half] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)  # along W
    y = F.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)  # along H
    return y.view(b, c, h, w)


class ColorAugment:
    """The photometric half of a SimCLR/BYOL view, with its own random draw per image, on a whole batch.

    Color jitter (``jitter`` = brightness, contrast, saturation, hue strengths, as torchvision's
    ColorJitter) with probability ``jitter_prob``, grayscale, Gaussian blur (kernel ``blur_kernel``, sigma
    uniform in ``blur_sigma``; none when ``blur_kernel`` is under ``MIN_BLUR_KERNEL``), solarize (pixels at
    or above 128 of 255 inverted), then normalize. The four jitter steps run in a random order drawn once
    per call, so a batch shares it (torchvision draws it per image); everything else is drawn per image.

    ``(3, H, W)`` or ``(B, 3, H, W)`` uint8 or [0, 1] float -> the same shape, normalized float32. Running
    on a batch is what lets the work move from the data workers to the training device (see
    ``device_color`` of :class:`TwoViews`): on a CPU worker, the per-pixel jitter of two small views costs
    more than decoding the image.
    """

    def __init__(
        self,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.0,
        grayscale_prob: float = 0.0,
        blur_prob: float = 0.0,
        blur_kernel: int = 23,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        if min(jitter) < 0 or jitter[3] > 0.5:  # torchvision's limits: hue shifts beyond half a turn wrap around
            raise ValueError(f"jitter={jitter}: strengths must be >= 0 and the hue strength at most 0.5")
        if blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel={blur_kernel} must be odd (see blur_kernel_size)")
        self.jitter, self.jitter_prob, self.grayscale_prob = jitter, jitter_prob, grayscale_prob
        self.blur_prob = blur_prob if blur_kernel >= MIN_BLUR_KERNEL else 0.0
        self.blur_kernel, self.blur_sigma, self.solarize_prob = blur_kernel, blur_sigma, solarize_prob
        self.mean, self.std = mean, std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images if images.ndim == 4 else images.unsqueeze(0)  # (B, 3, H, W)
        x = x.float() / 255 if not x.is_floating_point() else x.float()
        b, device = x.shape[0], x.device

        def draw(p: float) -> torch.Tensor:  # which images get a step: (B,) bool
            return torch.rand(b, device=device) < p

        def factors(strength: float, on: torch.Tensor, center: float = 1.0) -> torch.Tensor:
            # torchvision's ColorJitter ranges: factors in [max(0, 1 - s), 1 + s]; hue shifts (center 0) in
            # [-s, s], both ways round the colour circle.
            low = max(0.0, center - strength) if center else -strength
            value = torch.empty(b, device=device).uniform_(low, center + strength)
            return torch.where(on, value, torch.full_like(value, center))

        if self.jitter_prob > 0:
            on = draw(self.jitter_prob)
            brightness, contrast, saturation, hue = self.jitter
            steps = [
                (adjust_brightness, factors(brightness, on)),
                (adjust_contrast, factors(contrast, on)),
                (adjust_saturation, factors(saturation, on)),
                (adjust_hue, factors(hue, on, center=0.0)),
            ]
            for i in torch.randperm(4).tolist():
                x = steps[i][0](x, steps[i][1])
        if self.grayscale_prob > 0:
            x = torch.where(_per_sample(draw(self.grayscale_prob)), _gray(x).expand_as(x), x)
        if self.blur_prob > 0:
            sigma = torch.empty(b, device=device).uniform_(*self.blur_sigma)
            x = torch.where(_per_sample(draw(self.blur_prob)), gaussian_blur(x, self.blur_kernel, sigma), x)
        if self.solarize_prob > 0:
            x = torch.where(_per_sample(draw(self.solarize_prob)) & (x >= 128 / 255), 1 - x, x)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x if images.ndim == 4 else x[0]


def crop_transform(
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: Interpolation = "bicubic",
    flip_prob: float = 0.5,
) -> v2.Compose:
    """The geometric half of a view: random resized crop and horizontal flip of a (3, H, W) uint8 image ->
    (3, size, size) uint8."""
    steps = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=v2.InterpolationMode(interpolation))]
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    return v2.Compose(steps)


class View:
    """One random view of an image in the SimCLR/BYOL order: ``crop`` (:func:`crop_transform`, on the data
    worker), then ``color`` (:class:`ColorAugment`, on the worker or, with ``device_color``, left for the
    training device to run on the whole batch)."""

    def __init__(self, crop: v2.Compose, color: ColorAugment, device_color: bool = False):
        self.crop, self.color, self.device_color = crop, color, device_color

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        view = self.crop(image)  # (3, size, size) uint8
        return view if self.device_color else self.color(view)

    def on_device(self, views: torch.Tensor) -> torch.Tensor:
        """The collated (B, 3, size, size) views on the training device -> their colored, normalized form."""
        return self.color(views) if self.device_color else views


class ImageCrop:
    """MAE's pretraining augmentation (He et al. 2022): random resized crop (bicubic), flip, normalize.

    ``{"image": PIL} -> {"image": (3, size, size), "label"}``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        flip: bool = True,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Interpolation = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        # Checked against the model's at fit start (core.cli.InputsMatchModel):
        self.mean, self.std, self.size = tuple(mean), tuple(std), size
        self.view = v2.Compose([crop_transform(size, scale, ratio, interpolation, 0.5 if flip else 0.0), *_normalize(mean, std)])

    def __call__(self, sample: dict) -> dict:
        return _labelled(sample, {"image": self.view(_image(sample))})


class ImageEval:
    """Deterministic evaluation view: resize the short side to ``resize``, center-crop ``size``, normalize.

    ``resize`` defaults to ``size / 0.875`` (256 for 224), the crop ratio of MAE's linear probe and most
    ImageNet evaluations. ``{"image": PIL} -> {"image": (3, size, size), "label"}``.
    """

    def __init__(
        self,
        size: int,
        resize: int | None = None,
        interpolation: Interpolation = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        # Checked against the model's at fit start (core.cli.InputsMatchModel):
        self.mean, self.std, self.size = tuple(mean), tuple(std), size
        resize = resize if resize is not None else round(size / 0.875)
        if resize < size:
            raise ValueError(f"ImageEval resize={resize} must be at least size={size}")
        self.resize, self.interpolation = resize, interpolation  # recorded in exports: core.export.validation_view
        self.view = v2.Compose(
            [v2.Resize(resize, interpolation=v2.InterpolationMode(interpolation)), v2.CenterCrop(size)]
            + _normalize(mean, std)
        )

    def __call__(self, sample: dict) -> dict:
        return _labelled(sample, {"image": self.view(_image(sample))})


class TwoViews:
    """Two asymmetric augmented views of one image, BYOL's augmentation (Grill et al. 2020, Table 6).

    Defaults are BYOL's: crop scale 0.08-1, flip, color jitter (0.4, 0.4, 0.2, 0.1) with p=0.8,
    grayscale p=0.2, blur p=1.0 / 0.1, solarize p=0 / 0.2 (view 1 / view 2). Barlow Twins and VICReg
    use the same. SimSiam (ImageNet): ``scale: [0.2, 1]``, ``jitter: [0.4, 0.4, 0.4, 0.1]``,
    ``blur_prob: [0.5, 0.5]``, ``solarize_prob: [0, 0]``, ``interpolation: bilinear``.
    Views under 40 px get no blur (see ``MIN_BLUR_KERNEL``).

    ``{"image": PIL} -> {"views": [(3, size, size), (3, size, size)], "label"}``; collated, ``views`` is a
    list of two (B, 3, size, size) tensors.

    device_color: the data workers only crop and flip and hand over uint8 views; the color steps run on
    the collated batch on the training device (``ShardDataModule`` calls :meth:`on_device` after moving
    the batch). The same draws per image, but for the order of the four jitter steps, which a batch
    shares (:class:`ColorAugment`); the per-pixel work runs batched, on the accelerator when there is
    one: use it when the workers cannot keep up (small images, few CPU cores per GPU).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Interpolation = "bicubic",
        flip_prob: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: tuple[float, float] = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_prob: tuple[float, float] = (0.0, 0.2),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        device_color: bool = False,
    ):
        # Checked against the model's at fit start (core.cli.InputsMatchModel):
        self.mean, self.std, self.size = tuple(mean), tuple(std), size
        self.views = [
            View(
                crop_transform(size, scale, ratio, interpolation, flip_prob),
                ColorAugment(jitter, jitter_prob, grayscale_prob, blur, blur_kernel_size(size), blur_sigma, solarize, mean, std),
                device_color,
            )
            for blur, solarize in zip(blur_prob, solarize_prob, strict=True)
        ]

    def __call__(self, sample: dict) -> dict:
        image = _image(sample)
        return _labelled(sample, {"views": [view(image) for view in self.views]})

    def on_device(self, batch: dict) -> dict:
        """The collated batch on the training device -> the same batch with finished views."""
        batch["views"] = [view.on_device(v) for view, v in zip(self.views, batch["views"], strict=True)]
        return batch


class MultiCrop:
    """DINO's multi-crop (Caron et al. 2021): two global views and ``n_local`` small local views.

    Per DINO: every view gets flip, color jitter (0.4, 0.4, 0.2, 0.1) p=0.8 and grayscale p=0.2;
    global view 1 blur p=1.0, global view 2 blur p=0.1 and solarize p=0.2, local views blur p=0.5.
    DINO blurs with PIL (radius = sigma); here the kernel is 10% of the view size (:func:`blur_kernel_size`).

    ``{"image": PIL} -> {"global_views": [2 x (3, global_size, global_size)],
    "local_views": [n_local x (3, local_size, local_size)], "label"}``. ``device_color``: as in
    :class:`TwoViews`.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Interpolation = "bicubic",
        flip_prob: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        global_blur_prob: tuple[float, float] = (1.0, 0.1),
        local_blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        global_solarize_prob: tuple[float, float] = (0.0, 0.2),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        device_color: bool = False,
    ):
        # Checked against the model's at fit start (core.cli.InputsMatchModel):
        self.mean, self.std, self.global_size, self.local_size = tuple(mean), tuple(std), global_size, local_size
        def view(size, scale, blur, solarize):
            color = ColorAugment(jitter, jitter_prob, grayscale_prob, blur, blur_kernel_size(size), blur_sigma, solarize, mean, std)
            return View(crop_transform(size, scale, ratio, interpolation, flip_prob), color, device_color)

        self.global_views = [
            view(global_size, global_scale, blur, solarize)
            for blur, solarize in zip(global_blur_prob, global_solarize_prob, strict=True)
        ]
        self.local_view = view(local_size, local_scale, local_blur_prob, 0.0)
        self.n_local = n_local

    def __call__(self, sample: dict) -> dict:
        image = _image(sample)
        return _labelled(
            sample,
            {
                "global_views": [view(image) for view in self.global_views],
                "local_views": [self.local_view(image) for _ in range(self.n_local)],
            },
        )

    def on_device(self, batch: dict) -> dict:
        """The collated batch on the training device -> the same batch with finished views."""
        batch["global_views"] = [view.on_device(v) for view, v in zip(self.global_views, batch["global_views"], strict=True)]
        batch["local_views"] = [self.local_view.on_device(v) for v in batch["local_views"]]
        return batch


def batch_views(batch: dict, key: str, size: int, count: int | None = None) -> list[torch.Tensor]:
    """The collated views under ``batch[key]`` (``"views"`` of :class:`TwoViews`, ``"global_views"`` and
    ``"local_views"`` of :class:`MultiCrop`): a list of (B, 3, size, size) tensors, checked against what the
    model was built for, so that a mismatched data transform fails with a message naming the setting."""
    views = batch.get(key) if isinstance(batch, dict) else None
    if not isinstance(views, (list, tuple)) or not views or (count is not None and len(views) != count):
        expected = f"{count} views" if count is not None else "a list of views"
        raise ValueError(
            f"the model trains on batch[{key!r}], {expected} made by the train transform (core.augment.TwoViews "
            f"or MultiCrop); got {f'keys {sorted(batch)}' if isinstance(batch, dict) else type(batch).__name__}"
            + (f" with {len(views)} views" if isinstance(views, (list, tuple)) else "")
        )
    for view in views:
        if not view.is_floating_point():
            raise ValueError(
                f"batch[{key!r}] holds {view.dtype} views: a transform with device_color leaves its color steps to "
                "ShardDataModule, which runs them once the batch is on the device; with another data module, call "
                "the transform's on_device(batch)"
            )
        if tuple(view.shape[-2:]) != (size, size):
            raise ValueError(f"batch[{key!r}] holds {tuple(view.shape[-2:])}-pixel views, but the model is set up for {size}x{size}")
    return list(views)


def random_resized_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
    """A box drawn as torchvision's RandomResizedCrop draws it: area fraction in ``scale``, aspect log-uniform in
    ``ratio``."""
    # make_params only reads the input's size: a zero-stride stand-in avoids allocating an image.
    stand_in = torch.empty(1, 1, 1).expand(1, height, width)
    box = v2.RandomResizedCrop(1, scale=scale, ratio=ratio).make_params([stand_in])
    return box["top"], box["left"], box["height"], box["width"]


def global_local_boxes(
    height: int,
    width: int,
    size: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[Box, Box]:
    """CropMAE's global-to-local crop geometry on a ``height`` x ``width`` image, as two boxes in image pixels.

    The global box is a random resized crop of the image. The local box is a random resized crop of the
    global view *after* it is resized to ``size`` x ``size`` (so ``local_scale`` and ``ratio`` are relative to
    that view, as in the CropMAE code), mapped back to image pixels; it always lies inside the global box.
    """
    g_top, g_left, g_h, g_w = random_resized_box(height, width, global_scale, ratio)
    l_top, l_left, l_h, l_w = random_resized_box(size, size, local_scale, ratio)  # in the resized global view
    # Flooring the offsets keeps floor(offset) + round(extent) <= the global extent, so the box stays inside.
    top = g_top + int(l_top * g_h / size)
    left = g_left + int(l_left * g_w / size)
    h = max(1, round(l_h * g_h / size))
    w = max(1, round(l_w * g_w / size))
    return (g_top, g_left, g_h, g_w), (top, left, h, w)


class GlobalLocalCrop:
    """The view pair of Siamese Cropped MAE, CropMAE (Eymaël et al., ECCV 2024): a global view and a local
    crop of it; the model reconstructs the (heavily masked) local view from the global one.

    Geometry by :func:`global_local_boxes`. Both views are then resized to ``size`` and flipped
    *independently* with ``flip_prob``, as in the CropMAE code; no color augmentation. Defaults are those
    of the official ImageNet training script: global scale 0.1-1, local scale 0.3-0.6 of the global view,
    aspect 3/4-4/3, bilinear. Unlike the CropMAE code, which crops the local view out of the already resized global
    view, both views are cut from the original image (same content, one resampling instead of two).

    ``{"image": PIL} -> {"global": (3, size, size), "local": (3, size, size), "label"}``.
    """

    def __init__(
        self,
        size: int,
        global_scale: tuple[float, float] = (0.1, 1.0),
        local_scale: tuple[float, float] = (0.3, 0.6),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        interpolation: Interpolation = "bilinear",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        self.mean, self.std = tuple(mean), tuple(std)  # checked against the model's at fit start (core.cli.InputsMatchModel)
        self.size, self.global_scale, self.local_scale, self.ratio = size, global_scale, local_scale, ratio
        self.interpolation = v2.InterpolationMode(interpolation)
        self.finish = v2.Compose([v2.RandomHorizontalFlip(flip_prob)] + _normalize(mean, std))

    def __call__(self, sample: dict) -> dict:
        image = _image(sample)
        boxes = global_local_boxes(
            image.shape[-2], image.shape[-1], self.size, self.global_scale, self.local_scale, self.ratio
        )
        global_view, local_view = (
            self.finish(
                v2.functional.resized_crop(image, *box, size=[self.size, self.size], interpolation=self.interpolation)
            )
            for box in boxes
        )
        return _labelled(sample, {"global": global_view, "local": local_view})


def multiscale_box(height: int, width: int, size: int, scales=(1, 0.875, 0.75, 0.66), max_distort: int = 1) -> tuple[int, int, int, int]:
    """A crop box of VideoMAE's multi-scale crop (``GroupMultiScaleCrop``, from TSN): height and width each
    a fraction in ``scales`` of the frame's short side (a side within 3 pixels of ``size`` snaps to it),
    at most ``max_distort`` places apart in ``scales``, at one of 13 fixed positions (corners, centre, edge
    centres, quarter points). Returns (top, left, height, width)."""
    base = min(height, width)
    sides = [size if abs(int(base * s) - size) < 3 else int(base * s) for s in scales]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    h, w = pairs[int(torch.randint(len(pairs), ()))]
    h, w = min(h, height), min(w, width)  # a side snapped up to size can pass a frame just smaller than it
    h_step, w_step = (height - h) // 4, (width - w) // 4
    positions = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
    row, column = positions[int(torch.randint(len(positions), ()))]  # in quarters of the free space
    return row * h_step, column * w_step, h, w


class MultiScaleCrop:
    """VideoMAE's training crop (``multiscale_box``), one box for every frame, resized to ``size``."""

    def __init__(self, size: int, scales=(1, 0.875, 0.75, 0.66), interpolation=v2.InterpolationMode.BILINEAR):
        self.size, self.scales, self.interpolation = size, tuple(scales), interpolation

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:  # (T, 3, H, W) -> (T, 3, size, size)
        box = multiscale_box(clip.shape[-2], clip.shape[-1], self.size, self.scales)
        return v2.functional.resized_crop(clip, *box, size=[self.size, self.size], interpolation=self.interpolation)


class VideoClip:
    """A clip of ``num_frames`` frames, ``stride`` frames apart, for video MAEs (VideoMAE, Tong et al. 2022).

    Train: random start, one crop and one flip shared by all frames: a random resized crop of ``scale`` of
    the frame's area (``crop="random_resized"``, MAE's image augmentation applied to the whole clip) or
    VideoMAE's own multi-scale crop (``crop="multiscale"``: sides from {1, .875, .75, .66} of the short side
    at fixed positions, :func:`multiscale_box`). Eval: centered start, short side resized to ``size`` and
    center crop.
    A clip shorter than ``(num_frames - 1) * stride + 1`` frames raises ``ValueError`` (``short_clips="error"``:
    the clips are not what the config expects), is skipped and counted by the shard stream
    (``"skip"``), or is read from its first frame with its last frame repeated to fill (``"repeat_last"``),
    as VideoMAE's loader does for its short videos.

    ``{"video": EncodedVideo or (T, H, W, 3) uint8} -> {"video": (3, num_frames, size, size), "label"}``.
    """

    def __init__(
        self,
        num_frames: int,
        stride: int,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        train: bool = True,
        interpolation: Interpolation = "bilinear",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        short_clips: str = "error",
        crop: str = "random_resized",
    ):
        # Checked against the model's at fit start (core.cli.InputsMatchModel):
        self.mean, self.std, self.size = tuple(mean), tuple(std), size
        if short_clips not in ("error", "skip", "repeat_last"):
            raise ValueError(f"short_clips={short_clips!r} must be 'error', 'skip' or 'repeat_last'")
        if crop not in ("random_resized", "multiscale"):
            raise ValueError(f"crop={crop!r} must be 'random_resized' or 'multiscale'")
        self.num_frames, self.stride, self.train, self.short_clips = num_frames, stride, train, short_clips
        self.span = (num_frames - 1) * stride + 1
        self.interpolation = interpolation  # exported with the validation view (core.export.validation_view)
        mode = v2.InterpolationMode(interpolation)
        if train and crop == "multiscale":
            spatial = [MultiScaleCrop(size, interpolation=mode)]
            spatial += [v2.RandomHorizontalFlip(0.5)] if flip else []
        elif train:
            spatial = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=mode)]
            spatial += [v2.RandomHorizontalFlip(0.5)] if flip else []
        else:
            spatial = [v2.Resize(size, interpolation=mode), v2.CenterCrop(size)]
        self.spatial = v2.Compose(spatial + _normalize(mean, std))

    def __call__(self, sample: dict) -> dict:
        video = _field(sample, "video")
        where = f"sample {sample.get('__key__', '?')!r} from {sample.get('__url__', '?')!r}"
        if not isinstance(video, EncodedVideo):  # frames given as they are
            video = torch.as_tensor(video)
            if video.ndim != 4 or video.shape[-1] != 3:
                raise ValueError(f"'video' of {where} must be (T, H, W, 3), got shape {tuple(video.shape)}")
        try:
            clip = video[self.frame_index(len(video), where)]  # an EncodedVideo decodes these frames only
        except FewerFrames:  # the video shows fewer frames than its container counted: pick from those it has
            clip = video[self.frame_index(len(video), where)]
        clip = clip.permute(0, 3, 1, 2)  # (num_frames, 3, H, W)
        clip = self.spatial(tv_tensors.Video(clip))  # (num_frames, 3, size, size)
        clip = clip.as_subclass(torch.Tensor).transpose(0, 1)  # (3, num_frames, size, size)
        return _labelled(sample, {"video": clip})

    def frame_index(self, frames: int, where: str) -> torch.Tensor:
        """The clip's frames of a video of ``frames``: (num_frames,) indices."""
        if frames < self.span and self.short_clips != "repeat_last":
            message = (
                f"'video' of {where} has {frames} frames, but num_frames={self.num_frames} with "
                f"stride={self.stride} needs at least {self.span}"
            )
            if self.short_clips == "skip":
                raise UnusableSample("clip too short", message)
            raise ValueError(message + " (or set short_clips='skip' or 'repeat_last')")
        if frames < self.span:
            start = 0
        elif self.train:
            start = int(torch.randint(frames - self.span + 1, ()))
        else:
            start = (frames - self.span) // 2
        return (start + torch.arange(self.num_frames) * self.stride).clamp(max=frames - 1)


def window_start(total: int, length: int, random: bool) -> int:
    """Where a window of ``length`` samples starts in ``total >= length``: anywhere (random) or centered."""
    return int(torch.randint(total - length + 1, ())) if random else (total - length) // 2


def crop_or_pad(waveform: torch.Tensor, length: int, random: bool) -> torch.Tensor:
    """Cut ``waveform`` (..., S) to ``length`` samples (random or centered window) or zero-pad it at the end."""
    if waveform.shape[-1] < length:
        return torch.nn.functional.pad(waveform, (0, length - waveform.shape[-1]))
    start = window_start(waveform.shape[-1], length, random)
    return waveform[..., start : start + length]


SINC_ZEROS, SINC_ROLLOFF = 6, 0.99  # torchaudio's resampler: zero crossings of its windowed sinc, cutoff


class AudioClip:
    """A fixed-length mono waveform at ``sample_rate``: mixdown, resample, then crop (random in train,
    centered in eval) or zero-pad to ``seconds``. Log-mel features come later, on device (:func:`log_mel`).

    An ``EncodedAudio`` (what the shard decoder gives) is decoded over the clip's window only, plus the
    resampler's reach around it: the same samples as resampling the whole recording and cutting, drawn alike
    (past 2^24 output samples, 17 minutes at 16 kHz, torchaudio's float32 length can be one sample longer than
    the exact count the window is drawn over).

    ``{"audio": EncodedAudio or (C, S) or (S,) float, "sample_rate": int} -> {"audio": (round(sample_rate * seconds),), "label"}``.
    """

    def __init__(self, sample_rate: int, seconds: float, train: bool = True):
        self.sample_rate, self.seconds, self.train = sample_rate, seconds, train
        self.length = round(sample_rate * seconds)

    def __call__(self, sample: dict) -> dict:
        audio, rate = _field(sample, "audio"), int(_field(sample, "sample_rate"))
        if isinstance(audio, EncodedAudio):
            try:
                return _labelled(sample, {"audio": self.window(audio, rate)})
            except FewerSamples:  # the stream ended before its header's count: len(audio) now says where
                return _labelled(sample, {"audio": self.window(audio, rate)})
        audio = torch.as_tensor(audio, dtype=torch.float32)
        if audio.ndim not in (1, 2):
            raise ValueError(
                f"'audio' of sample {sample.get('__key__', '?')!r} from {sample.get('__url__', '?')!r} "
                f"must be (channels, samples) or (samples,), got shape {tuple(audio.shape)}"
            )
        return _labelled(sample, {"audio": self.clip(audio, rate)})

    def clip(self, audio: torch.Tensor, rate: int) -> torch.Tensor:
        """(C, S) or (S,) at ``rate`` Hz -> (length,): mixdown, resample, crop or pad."""
        audio = audio.mean(0) if audio.ndim == 2 else audio  # (S,)
        if rate != self.sample_rate:
            audio = AF.resample(audio, rate, self.sample_rate, lowpass_filter_width=SINC_ZEROS, rolloff=SINC_ROLLOFF)
        return crop_or_pad(audio, self.length, random=self.train)

    def window(self, audio: EncodedAudio, rate: int) -> torch.Tensor:
        """The clip of ``audio`` at ``rate`` Hz, decoding the samples it needs."""
        divisor = math.gcd(rate, self.sample_rate)
        old, new = rate // divisor, self.sample_rate // divisor  # the resampler works in blocks: `old` samples in, `new` out
        if rate == self.sample_rate:
            if len(audio) <= self.length:
                return self.clip(audio.read(0, len(audio)), rate)
            start = window_start(len(audio), self.length, self.train)
            return audio.read(start, start + self.length).mean(0)
        # torchaudio's output length, in float32, where it is short of the exact count (else the window could
        # reach past the samples the last block gives)
        resampled = min(int(torch.ceil(torch.as_tensor(new * len(audio) / old))), -(-len(audio) * new // old))
        if resampled <= self.length:
            return self.clip(audio.read(0, len(audio)), rate)
        start = window_start(resampled, self.length, self.train)  # in output samples
        # Output block i reads input samples [i*old - reach, (i + 1)*old + reach) (torchaudio's windowed sinc):
        # decode whole blocks around the window, `margin` each side.
        reach = math.ceil(SINC_ZEROS * old / (min(old, new) * SINC_ROLLOFF))
        margin = -(-reach // old)
        first, last = max(start // new - margin, 0), -(-(start + self.length) // new) + margin
        segment = audio.read(first * old, min(last * old, len(audio))).mean(0)  # (samples,)
        offset = start - first * new
        return AF.resample(segment, rate, self.sample_rate, lowpass_filter_width=SINC_ZEROS, rolloff=SINC_ROLLOFF)[offset : offset + self.length]


def log_mel(
    waveform: torch.Tensor,
    sample_rate: int,
    n_mels: int = 128,
    hop_ms: float = 10.0,
    win_ms: float = 25.0,
    mean: float = AUDIOSET_FBANK_MEAN,
    std: float = AUDIOSET_FBANK_STD,
    frames: int | None = None,
) -> torch.Tensor:
    """Normalized Kaldi log-mel filterbanks of a batch of waveforms, AudioMAE's input (Huang et al. 2022).

    (B, S) -> (B, 1, n_mels, frames), frames = 1 + (S - win) // hop (Kaldi drops partial frames: 98 for
    1 s at 16 kHz). Same features as AudioMAE/AST: ``torchaudio.compliance.kaldi.fbank`` with a Hanning
    window, HTK mel scale, no energy, no dither, then ``(fbank - mean) / (2 * std)`` with AudioSet's
    statistics by default (``mean=0, std=0.5`` leaves them unnormalized). Runs in float32 even under autocast.
    ``frames``: keep the first ``frames`` frames, or zero-pad the log-mel (before normalizing) at the end, as
    AudioMAE does to reach its fixed 1024 frames (998 for 10 s); None keeps every frame.
    Note AudioMAE lays the spectrogram out as (time, mel); transpose if a model wants that.
    """

    def fbank(one: torch.Tensor) -> torch.Tensor:  # (S,) -> (frames, n_mels)
        return kaldi.fbank(
            one[None], sample_frequency=sample_rate, num_mel_bins=n_mels, frame_shift=hop_ms,
            frame_length=win_ms, htk_compat=True, use_energy=False, window_type="hanning", dither=0.0,
        )

    if waveform.ndim != 2:
        raise ValueError(f"log_mel takes a batch of waveforms (B, samples), got shape {tuple(waveform.shape)}")
    with torch.autocast(waveform.device.type, enabled=False):
        # kaldi.fbank takes one waveform; vmap batches it without a Python loop over the batch.
        features = torch.func.vmap(fbank)(waveform.float())  # (B, frames, n_mels)
    if frames is not None:
        features = torch.nn.functional.pad(features[:, :frames], (0, 0, 0, max(frames - features.shape[1], 0)))
    return ((features - mean) / (2 * std)).transpose(1, 2).unsqueeze(1)  # (B, 1, n_mels, frames)
