"""AudioMAE recipe: the log-mel front end and its frame count (also in the export), exact random and
time/frequency masking, the loss on hidden patches only, a one-batch overfit, bad configurations, and the
demo config end to end through the CLI, export and load_encoder."""

import os

import pytest
import torch

from core import load_encoder
from core.augment import log_mel
from core.export import export_checkpoint
from core.finetune import finetune
from core.mae_reference import copy_weights, reference_name
from core.masking import whole
from recipes.audiomae import bench
from recipes.audiomae.model import AudioMAE, roll_and_scale
from conftest import (
    ROOT, assert_bench_builds_on_the_device, assert_same_gradients, bench_sides, bench_steps, mae_demo_run,
    same_reconstruction_as_reference,
)
from test_mae import assert_bench_feeds_both_sides_the_same_inputs, assert_same_masked_autoencoder_bench_steps

# 0.25 s at 8 kHz: 23 Kaldi frames, cropped to 16; 32 mel bins; 8x8 patches: a (4, 2) grid.
TINY = dict(
    sample_rate=8000, seconds=0.25, n_mels=32, n_frames=16, patch_size=8, size="tiny", encoder_depth=1,
    decoder_dim=32, decoder_depth=1, decoder_heads=2,
)


def waves(batch=3, seconds=0.25, seed=0):
    return torch.randn(batch, round(8000 * seconds), generator=torch.Generator().manual_seed(seed))


def test_spectrogram_is_log_mel_cropped_or_zero_padded_to_n_frames():
    model = AudioMAE(**TINY)
    x = waves()
    full = log_mel(x, 8000, n_mels=32)  # (B, 1, 32, 23)
    assert full.shape[-1] == 23
    torch.testing.assert_close(model.spectrogram(x), full[..., :16])  # AudioMAE keeps the first frames
    padded = AudioMAE(**{**TINY, "n_frames": 32}).spectrogram(x)
    torch.testing.assert_close(padded[..., :23], full)
    silence = log_mel(x, 8000, n_mels=32, frames=32)[..., 23:]  # zero log-mel, then normalised
    assert torch.all(padded[..., 23:] == silence) and torch.all(silence == silence.flatten()[0])


def audiomae_wav2fbank(waveform: torch.Tensor, sr: int, melbins: int = 128, target_length: int = 1024) -> torch.Tensor:
    """AudioMAE's `dataset.py` `_wav2fbank` and `__getitem__` normalisation, written out as the official code
    has them (facebookresearch/AudioMAE), with its AudioSet statistics as literals: (frames, melbins)."""
    import torchaudio

    waveform = waveform - waveform.mean()
    fbank = torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
                                              window_type="hanning", num_mel_bins=melbins, dither=0.0, frame_shift=10)  # fmt: skip
    p = target_length - fbank.shape[0]
    fbank = torch.nn.ZeroPad2d((0, 0, 0, p))(fbank) if p > 0 else fbank[0:target_length, :]
    return (fbank - (-4.2677393)) / (4.5689974 * 2)


def test_log_mel_is_audiomae_s_filterbank():
    t = torch.arange(16000) / 16000
    wave = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    ours = log_mel(wave[None], 16000, frames=128)[0, 0].T  # (1, 1, mels, frames) -> (frames, mels)
    torch.testing.assert_close(ours, audiomae_wav2fbank(wave[None], 16000, target_length=128), atol=1e-4, rtol=0)
    assert ours.shape == (128, 128) and torch.all(ours[98:] == ours[98, 0])  # 98 frames in 1 s, then padding


def test_random_masking_hides_exactly_the_ratio_and_time_freq_masking_whole_rows_and_columns():
    torch.manual_seed(0)
    model = AudioMAE(**{**TINY, "seconds": 0.75, "n_mels": 64, "n_frames": 64})  # an (8, 8) grid
    spec = model.spectrogram(waves(batch=4, seconds=0.75))
    _, _, mask = model.reconstruct(spec)
    assert (~mask).sum(1).tolist() == [whole(64 * 0.2)] * 4

    model = AudioMAE(**{**TINY, "seconds": 0.75, "n_mels": 64, "n_frames": 64, "masking": "time_freq"})
    _, _, mask = model.reconstruct(spec)
    visible = ~mask.view(4, 8, 8)  # (B, freq rows, time columns)
    rows, cols = visible.any(2), visible.any(1)
    assert torch.equal(visible, rows.unsqueeze(2) & cols.unsqueeze(1))  # a visible patch: its row and column kept
    assert rows.sum(1).tolist() == [4] * 4 and cols.sum(1).tolist() == [3] * 4  # int(8 * 0.5), int(8 * 0.4)


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = AudioMAE(**{**TINY, "mask_ratio": 0.5})
    loss, pred, mask = model.reconstruct(model.spectrogram(waves()))
    pred.retain_grad()
    loss.backward()
    grad = pred.grad.abs().sum(-1)  # (B, N)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask] > 0)


def test_same_loss_and_gradients_as_the_official_audio_mae_structure():
    """The recipe's AudioMAE against the official code's model with its global decoder (core/mae_reference.py on
    one-channel spectrograms, recipes/audiomae/bench.py), from the same weights and the same noise: the benchmark
    compares one computation done two ways."""
    torch.manual_seed(0)
    model = AudioMAE(**{**TINY, "decoder_depth": 2})
    reference = bench.reference_for(model)
    copy_weights(model, reference)
    spec = model.spectrogram(waves())  # (3, 1, 32, 16): a (4, 2) grid, 80% of its 8 patches hidden: 7
    same_reconstruction_as_reference(model, reference, spec)
    assert_same_gradients(model, reference, reference_name)
    bench_steps(bench, "--size tiny --depth 1 --n-mels 32 --frames 16 --patch-size 8 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --batch 2".split())


def test_roll_and_scale_rolls_each_waveform_and_scales_it_between_half_and_one_and_a_half():
    torch.manual_seed(0)
    x = torch.arange(1.0, 9.0).repeat(64, 1)  # (64, 8)
    y = roll_and_scale(x)
    scale = y.abs().max(1).values / 8  # rolling keeps the maximum, 8
    assert torch.all((scale > 0.5) & (scale < 1.5))
    shift = (y / scale[:, None]).argmax(1) - 7  # where the last sample landed, mod 8
    torch.testing.assert_close(y, torch.stack([x[i].roll(int(s)) * scale[i] for i, s in enumerate(shift)]))
    assert len(set((shift % 8).tolist())) > 1  # every waveform draws its own shift


def test_a_few_steps_on_one_batch_drive_the_loss_down():
    torch.manual_seed(0)
    model = AudioMAE(**TINY)
    spec = model.spectrogram(waves(batch=4))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss, *_ = model.reconstruct(spec, torch.Generator().manual_seed(0))  # one fixed mask
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mask_ratio": 0.0}, "mask_ratio must be in"),
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"time_mask_ratio": 1.2}, "time_mask_ratio must be in"),
        ({"mask_ratio": 0.9}, "mask_ratio=0.9 leaves no visible patch of 8"),
        ({"masking": "time_freq", "freq_mask_ratio": 0.8, "time_mask_ratio": 0.4}, "freq_mask_ratio=0.8 leaves no visible frequency row of 4"),
        ({"masking": "time_freq", "freq_mask_ratio": 0.2}, "time_mask_ratio=0.6 leaves no visible time column of 2"),
        ({"n_frames": 20}, "not divisible by patch size"),
        ({"n_mels": 36}, "not divisible by patch size"),
        ({"masking": "blocks"}, "masking='blocks' must be one of"),
    ],
)
def test_bad_configuration_is_refused_at_construction(change, message):
    with pytest.raises(ValueError, match=message):
        AudioMAE(**{**TINY, **change})


def test_waveforms_of_the_wrong_length_are_named():
    with pytest.raises(ValueError, match=r"sample_rate \* seconds\) = \(B, 2000\).*\(3, 1000\)"):
        AudioMAE(**TINY).spectrogram(waves(seconds=0.125))


def test_demo_config_trains_logs_pictures_and_exports_an_encoder_that_takes_waveforms(tmp_path):
    model = mae_demo_run(AudioMAE, "audiomae", tmp_path).model

    (folder,) = export_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    encoder = load_encoder(folder)
    hp = model.hparams
    assert encoder.input["modality"] == "audio" and encoder.input["frames"] == hp.n_frames
    x = torch.randn(2, round(hp.sample_rate * hp.seconds))
    assert encoder.preprocess(x).shape == (2, 1, hp.n_mels, hp.n_frames)  # what the encoder was trained on
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.embed({"audio": x}), rtol=0, atol=0)
    # core.finetune trains waveform encoders too: the audio training view, log-mel inside the encoder
    shards = os.path.join(ROOT, "data", "demo", "audio", "{}-000000.tar")
    scores = finetune(folder, shards.format("train"), shards.format("val"), num_classes=10, steps=2, batch_size=4, lr=1e-3)
    assert set(scores) == {"pretrained", "random init"} and all(0 <= s["val_acc"] <= 1 for s in scores.values())


def test_bench_runs_the_same_audiomae_step_on_both_sides(monkeypatch):
    """recipes/audiomae/bench.py from one command line (a ViT-S encoder, 6 heads): the reference (the official
    structure with its global decoder) is built to the spectrogram and sizes asked for and does the work ours
    does: spectrograms of one shape; on the same spectrograms and noise, from the same weights, the same loss
    and gradients; AdamW with the same settings on the same parameters, under the same precision and device;
    `reference_for` keeps the model's mask ratio."""
    argv = (
        "--size small --depth 1 --n-mels 32 --frames 16 --patch-size 8 --decoder-dim 32 --decoder-depth 3 --decoder-heads 4 "
        "--batch 2 --precision bf16-mixed"
    )
    sides = bench_sides(monkeypatch, bench, argv.split(), ("AudioMAE", "reference_for"))
    model, reference = sides["ours"].models["AudioMAE"], sides["reference"].models["reference_for"]
    h = model.hparams
    sizes = (h.size, h.encoder_depth, h.n_mels, h.n_frames, h.patch_size, h.decoder_dim, h.decoder_depth, h.decoder_heads)
    assert sizes == ("small", 1, 32, 16, 8, 32, 3, 4)
    assert_same_masked_autoencoder_bench_steps(monkeypatch, sides, model, reference)
    assert_bench_builds_on_the_device(monkeypatch, bench, argv.split())
    assert bench.reference_for(AudioMAE(**{**TINY, "mask_ratio": 0.5})).mask_ratio == 0.5


def test_bench_feeds_both_sides_the_same_spectrograms(monkeypatch):
    """The two sides of recipes/audiomae/bench.py train on the same random spectrograms."""
    argv = "--size tiny --depth 1 --n-mels 32 --frames 16 --patch-size 8 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --batch 2"
    assert_bench_feeds_both_sides_the_same_inputs(monkeypatch, bench, argv, "AudioMAE")
