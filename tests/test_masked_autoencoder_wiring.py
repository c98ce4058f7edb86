"""The four masked-autoencoder recipes' wiring that their reference comparisons cannot see: what `embed` (the
online probe, the export) encodes, targets and augmentations reaching the loss as configured, validation's
fixed views, and the reconstruction pictures in the input's units. Each test was written against a mutant
that the rest of the suite let through."""
from types import SimpleNamespace

import pytest
import torch

import recipes.audiomae.model as audiomae_model
import recipes.cropmae.model as cropmae_model
import recipes.mae.model as mae_model
import recipes.videomae.model as videomae_model
from core.losses import masked_patch_loss
from core.augment import log_mel
from core.masking import patchify, unpatchify
from recipes.audiomae.model import AudioMAE
from recipes.cropmae.model import CropMAE
from recipes.mae.model import MAE
from recipes.videomae.model import VideoMAE, tubelet_targets

pytestmark = pytest.mark.usefixtures("one_thread")

MAE_TINY = dict(image_size=16, patch_size=4, size="tiny", encoder_depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4)
CROP_TINY = dict(image_size=16, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, decoder_dropout=0.0)
VID_TINY = dict(num_frames=4, stride=1, image_size=16, patch_size=4, tubelet_size=2, size="tiny", encoder_depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=2)
AUD_TINY = dict(sample_rate=8000, seconds=0.25, n_mels=32, n_frames=16, patch_size=8, size="tiny", encoder_depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=2)


@pytest.mark.parametrize("make, key, x", [
    (lambda: MAE(**MAE_TINY), "image", lambda: torch.randn(2, 3, 16, 16)),
    (lambda: CropMAE(**CROP_TINY), "image", lambda: torch.randn(2, 3, 16, 16)),
    (lambda: VideoMAE(**VID_TINY), "video", lambda: torch.randn(2, 3, 4, 16, 16)),
    (lambda: AudioMAE(**AUD_TINY), "audio", lambda: torch.randn(2, 2000)),
])
def test_embed_is_the_whole_input_through_the_unmasked_encoder(make, key, x):
    torch.manual_seed(0)
    model, inputs = make().eval(), x()
    encoder_input = model.spectrogram(inputs) if key == "audio" else inputs
    expected = model.encoder.pool_tokens(model.encoder.tokens(encoder_input))  # every patch, no mask
    torch.testing.assert_close(model.embed({key: inputs}), expected)
    torch.testing.assert_close(model.embed({key: inputs}), expected)  # and again: no random mask or augmentation


def test_videomae_per_tubelet_targets_reach_the_loss():
    """norm_per_channel=False, the demo config's: the reference comparison runs per channel only."""
    torch.manual_seed(0)
    model = VideoMAE(**{**VID_TINY, "norm_per_channel": False})
    video = torch.randn(3, 3, 4, 16, 16) * torch.tensor([3.0, 1.0, 0.2]).view(1, 3, 1, 1, 1)
    loss, pred, mask, (mean, std) = model.reconstruct(video, torch.Generator().manual_seed(0))
    assert mean.shape == std.shape == (3, 32, 1, 1)  # one mean and std per tubelet
    target, _ = tubelet_targets(video, model.patch, normalize=True, per_channel=False)
    torch.testing.assert_close(loss, masked_patch_loss(pred, target, mask, norm_pix=False))


def test_audiomae_rolls_and_scales_in_training_only(monkeypatch):
    calls = []
    monkeypatch.setattr(audiomae_model, "roll_and_scale", lambda w: calls.append(w) or w)
    model = AudioMAE(**{**AUD_TINY, "pictures_every_n_steps": 0})
    model._trainer = SimpleNamespace(is_global_zero=False, sanity_checking=False, global_step=0, accumulate_grad_batches=1)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    model.validation_step({"audio": torch.randn(2, 2000)}, 0)
    assert not calls
    model.training_step({"audio": torch.randn(2, 2000)}, 0)
    assert len(calls) == 1
    model.hparams.roll_mag_aug = False
    model.training_step({"audio": torch.randn(2, 2000)}, 0)
    assert len(calls) == 1


def capture_pictures(monkeypatch, module):
    saved = {}
    monkeypatch.setattr(module, "pictures_path", lambda trainer, split: "unused.png")
    monkeypatch.setattr(module, "save_reconstructions", lambda path, rows, mean=None, std=None: saved.update(rows=rows, mean=mean, std=std))
    return saved


def norm_patches(p):
    return (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6) ** 0.5


def test_mae_pictures_of_a_perfect_prediction_are_the_image(monkeypatch):
    saved = capture_pictures(monkeypatch, mae_model)
    model = MAE(**MAE_TINY)
    model._trainer = SimpleNamespace()
    images = torch.randn(2, 3, 16, 16) * 2 + 1
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.75
    perfect = norm_patches(patchify(images, model.patch))
    pred = torch.where(mask[..., None], perfect, perfect + 100)  # right where hidden, wrong where visible
    model.save_pictures(images, pred, mask, "val")
    original, masked, prediction, pasted = saved["rows"]
    hidden = patchify(images, model.patch) * 0 + mask[..., None]  # (B, N, P) of 0/1
    to_px = lambda p: unpatchify(p, model.patch, (4, 4), 3)  # noqa: E731
    torch.testing.assert_close(prediction * to_px(hidden), images * to_px(hidden), atol=1e-4, rtol=0)
    torch.testing.assert_close(masked, images * (1 - to_px(hidden)))
    torch.testing.assert_close(pasted, images, atol=1e-4, rtol=0)  # visible from the input, hidden from the prediction
    assert (tuple(saved["mean"]), tuple(saved["std"])) == (tuple(model.hparams.mean), tuple(model.hparams.std))


def test_videomae_pictures_of_a_perfect_prediction_are_the_clip(monkeypatch):
    saved = capture_pictures(monkeypatch, videomae_model)
    for per_channel in (True, False):
        model = VideoMAE(**{**VID_TINY, "norm_per_channel": per_channel})
        model._trainer = SimpleNamespace()
        video = torch.randn(2, 3, 4, 16, 16) * 2 + 1
        target, stats = tubelet_targets(video, model.patch, True, per_channel)
        model.save_pictures(video, target, torch.rand(2, 32) < 0.75, stats, "val")
        torch.testing.assert_close(saved["rows"][2], video, atol=1e-4, rtol=0)


def test_cropmae_pictures_of_a_perfect_prediction_are_the_local_view(monkeypatch):
    saved = capture_pictures(monkeypatch, cropmae_model)
    model = CropMAE(**CROP_TINY)
    model._trainer = SimpleNamespace()
    global_view, local_view = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16) * 2 + 1
    model.save_pictures(global_view, local_view, norm_patches(patchify(local_view, model.patch)), torch.rand(2, 16) < 0.9, "val")
    g, l, masked, prediction, pasted = saved["rows"]
    assert g is global_view and l is local_view
    torch.testing.assert_close(prediction, local_view, atol=1e-4, rtol=0)
    assert (tuple(saved["mean"]), tuple(saved["std"])) == (tuple(model.hparams.mean), tuple(model.hparams.std))


def test_audiomae_pictures_of_a_perfect_prediction_are_the_spectrogram(monkeypatch):
    saved = capture_pictures(monkeypatch, audiomae_model)
    model = AudioMAE(**AUD_TINY)
    model._trainer = SimpleNamespace()
    spec = model.spectrogram(torch.randn(2, 2000))
    model.save_pictures(spec, norm_patches(patchify(spec, model.patch)), torch.rand(2, 8) < 0.8, "val")
    torch.testing.assert_close(saved["rows"][2], spec, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", [lambda **k: MAE(**MAE_TINY, **k), lambda **k: CropMAE(**CROP_TINY, **k)])
def test_pool_setting_reaches_the_encoder(make):
    torch.manual_seed(0)
    model, images = make(pool="mean").eval(), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.embed({"image": images}), model.encoder.tokens(images)[:, 1:].mean(1))


def test_mae_validation_loss_uses_a_fixed_mask_per_batch_index(monkeypatch):
    torch.manual_seed(0)
    model = MAE(**MAE_TINY).eval()
    model._trainer = SimpleNamespace(is_global_zero=False, sanity_checking=False)
    logged = []
    monkeypatch.setattr(model, "log", lambda name, value, **k: logged.append(value.item()))
    batch = {"image": torch.randn(4, 3, 16, 16)}
    for _ in range(3):
        model.validation_step(batch, 1)
    assert logged[0] == logged[1] == logged[2]


def test_tube_mask_is_one_spatial_mask_on_a_grid_of_three_time_steps():
    """Three time steps: on two, a mask drawn on the grid reversed, (4, 4, 2), repeats as a tube would."""
    torch.manual_seed(0)
    model = VideoMAE(**{**VID_TINY, "num_frames": 6, "mask_ratio": 0.75})  # a (3, 4, 4) grid
    _, _, mask, _ = model.reconstruct(torch.randn(2, 3, 6, 16, 16), torch.Generator().manual_seed(0))
    per_time = mask.view(2, 3, 16)
    assert torch.equal(per_time, per_time[:, :1].expand_as(per_time))
    assert (~per_time[:, 0]).sum(1).tolist() == [4, 4]


def test_audiomae_spectrogram_uses_the_configured_filterbank_statistics():
    model = AudioMAE(**{**AUD_TINY, "fbank_mean": -1.0, "fbank_std": 3.0})
    x = torch.randn(2, 2000)
    torch.testing.assert_close(model.spectrogram(x), log_mel(x, 8000, n_mels=32, mean=-1.0, std=3.0, frames=16))


def test_cropmae_validation_reconstructs_the_central_crop_from_the_whole_image(monkeypatch):
    model = CropMAE(**CROP_TINY)
    model._trainer = SimpleNamespace(is_global_zero=False, sanity_checking=False)
    seen = []
    monkeypatch.setattr(model, "reconstruct", lambda g, l, gen: seen.append((g, l)) or (torch.tensor(0.0), None, None))
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    images = torch.randn(2, 3, 16, 16)
    model.validation_step({"image": images}, 0)
    (global_view, local_view), = seen
    assert global_view is images
    torch.testing.assert_close(local_view, cropmae_model.center_crop_resized(images, cropmae_model.VAL_LOCAL_SIDE))
