"""The image MAE recipe: its demo config through the real CLI, export, overfitting, bad input."""

import json
from types import SimpleNamespace

import pytest
import torch

from core import load_encoder
from core.export import export_checkpoint
from core.visualize import pictures_due
from core.mae_reference import copy_weights, reference_name
from recipes.mae import bench
from recipes.mae.bench import main as bench_main
from recipes.mae.bench import reference_for
from recipes.mae.model import MAE
from conftest import (
    assert_bench_builds_on_the_device, assert_same_gradients, assert_same_optimizer_settings, bench_sides,
    mae_demo_run, patch_pixels, same_reconstruction_as_reference,
)


def small_mae(**kw):
    args = dict(image_size=16, patch_size=4, size="tiny", encoder_depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    return MAE(**{**args, **kw})


def test_demo_config_trains_a_few_steps_and_exports(tmp_path):
    cli = mae_demo_run(MAE, "mae", tmp_path, "--model.encoder_depth=2")

    (folder,) = export_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    enc = load_encoder(folder)
    assert enc.input["modality"] == "image" and enc.input["size"] == [32, 32]
    assert (enc.input["resize"], enc.input["interpolation"]) == (32, "bicubic")  # the demo config's val_transform
    module = cli.model.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(images), module.embed({"image": images}))
    # Lightning's own loading too, which builds the model with no trainer (configure_model had needed one).
    loaded = MAE.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert all(value.equal(module.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = small_mae(mask_ratio=0.5)
    images = torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss, _, _ = model.reconstruct(images, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_encoder_sees_only_visible_patches_during_training():
    torch.manual_seed(0)
    model = small_mae().eval()
    images = torch.randn(2, 3, 16, 16)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731  the same mask every call
    _, pred, mask = model.reconstruct(images, generator())
    assert pred.shape == (2, 16, 48)
    assert mask.sum(1).tolist() == [12, 12]  # 75% of 16 patches
    # The prediction depends on the visible patches only: hidden pixels never reach the encoder.
    torch.testing.assert_close(model.reconstruct(images + 5 * patch_pixels(mask), generator())[1], pred)
    assert not torch.allclose(model.reconstruct(images + 5 * patch_pixels(~mask), generator())[1], pred, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_ratio": 1.2}, "mask_ratio must be in"),
        ({"mask_ratio": 0.0}, "mask_ratio must be in"),
        ({"mask_ratio": 0.95}, "mask_ratio=0.95 leaves no visible patch of 16"),
        ({"image_size": 18}, "not divisible"),
    ],
)
def test_bad_config_fails_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_mae(**kwargs)


def test_pictures_are_saved_once_per_picture_step_under_gradient_accumulation():
    def due(global_step, batch_idx, rank=0, every=2):
        trainer = SimpleNamespace(global_step=global_step, accumulate_grad_batches=3, is_global_zero=rank == 0)
        return pictures_due(trainer, batch_idx, every)

    # Micro-batches 0-2 make optimizer step 4, 3-5 step 5, 6-8 step 6: one picture for step 4, one for step 6.
    steps = {4: range(0, 3), 5: range(3, 6), 6: range(6, 9)}
    saved = [(step, i) for step, batches in steps.items() for i in batches if due(step, i)]
    assert saved == [(4, 0), (6, 6)]
    assert not due(4, 0, rank=1) and not due(4, 0, every=0)


@pytest.mark.parametrize("mask_ratio, norm_pix_loss", [(0.75, True), (0.5, False)])
def test_same_loss_and_gradients_as_the_official_mae_structure(mask_ratio, norm_pix_loss):
    """The recipe's MAE against the official code's model on timm's blocks (core/mae_reference.py), from the
    same weights and the same noise: the benchmark compares one computation done two ways, with the
    paper's settings and others (so that a setting the recipe ignored would show)."""
    torch.manual_seed(0)
    model = small_mae(image_size=32, patch_size=8, decoder_depth=2, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
    reference = reference_for(model)
    copy_weights(model, reference)
    images = torch.randn(3, 3, 32, 32)
    same_reconstruction_as_reference(model, reference, images)
    assert_same_gradients(model, reference, reference_name)
    assert model.reconstruct(images)[2].sum(1).tolist() == [16 * mask_ratio] * 3  # 16 patches of 8 px


def test_bench_times_both_models_in_their_own_processes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    tiny = "--size tiny --depth 1 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2"
    bench_main([*tiny.split(), "--batch", "4", "--steps", "1", "--warmup", "0", "--rounds", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    for name in ("reference", "ours"):
        assert report[name]["seconds_per_step"] > 0 and report[name]["peak_memory_bytes"] > 0
        assert len(report[name]["rounds_seconds_per_step"]) == 1
    # FlopCounterMode counts what each model ran: the same products, except that the reference also predicts
    # pixels for the class token and then drops them (forward and backward of its last linear on 1 + N tokens).
    flops = {name: report[name]["flops_per_step"] for name in ("reference", "ours")}
    p, d = 4 * 4 * 3, 32  # values per patch, decoder width
    assert flops["reference"] - flops["ours"] == 3 * 2 * 4 * p * d  # (forward + 2 backward) x batch 4 x one token
    assert 0.99 < report["ours_over_reference"]["flops"] < 1
    assert "ours / reference: time" in capsys.readouterr().out


def bench_inputs(monkeypatch, sides, model, reference) -> dict:
    """What each side's benchmark step feeds its model, one step of each run: {"ours": the arguments of
    `model.reconstruct`, "reference": those of `reference`'s forward}."""
    seen, reconstruct = {}, model.reconstruct

    def recording(*inputs):
        seen["ours"] = inputs
        return reconstruct(*inputs)

    monkeypatch.setattr(model, "reconstruct", recording)
    hook = reference.register_forward_pre_hook(lambda module, inputs: seen.update(reference=inputs))
    sides["ours"].loss()
    sides["reference"].loss()
    hook.remove()
    return seen


def assert_same_masked_autoencoder_bench_steps(monkeypatch, sides, model, reference) -> None:
    """Both steps of a masked autoencoder's benchmark on core.mae_reference: inputs of the same shapes; on ours'
    inputs, from the same weights and the noise drawn from the same seed (both draw torch.rand of (B, N)), the
    same loss and gradients; AdamW with the same settings on the same parameters, under the same precision
    (`bench_sides` checks it)."""
    inputs = bench_inputs(monkeypatch, sides, model, reference)
    assert [x.shape for x in inputs["reference"]] == [x.shape for x in inputs["ours"]]
    torch.manual_seed(1)
    loss = sides["ours"].loss()
    torch.manual_seed(1)
    ref_loss = reference(*inputs["ours"])[0]
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert_same_gradients(model, reference, reference_name)
    assert_same_optimizer_settings(sides["ours"], model, sides["reference"], reference, reference_name)


def assert_bench_feeds_both_sides_the_same_inputs(monkeypatch, bench, argv: str, model_class: str) -> None:
    """Each side of a masked autoencoder's benchmark, built from the command line `argv`, feeds its model the
    same random tensors (the reference's mask, which ours draws in its step, aside)."""
    sides = bench_sides(monkeypatch, bench, argv.split(), (model_class, "reference_for"))
    model, reference = sides["ours"].models[model_class], sides["reference"].models["reference_for"]
    inputs = bench_inputs(monkeypatch, sides, model, reference)
    for mine, theirs in zip(inputs["ours"], inputs["reference"]):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


def test_bench_runs_the_same_mae_step_on_both_sides(monkeypatch):
    """recipes/mae/bench.py from one command line (a ViT-S encoder: 6 heads, where the tiny one has 3): the
    reference (the official MAE structure) is built to the sizes asked for and does the work ours does: images
    of one shape; on the same images and noise, from the same weights, the same loss and gradients; AdamW with
    the same settings on the same parameters, under the same precision and device."""
    argv = "--size small --depth 1 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 2 --decoder-heads 4 --batch 3"
    argv += " --precision bf16-mixed"
    sides = bench_sides(monkeypatch, bench, argv.split(), ("MAE", "reference_for"))
    model, reference = sides["ours"].models["MAE"], sides["reference"].models["reference_for"]
    h = model.hparams
    sizes = (h.size, h.encoder_depth, h.image_size, h.patch_size, h.decoder_dim, h.decoder_depth, h.decoder_heads)
    assert sizes == ("small", 1, 16, 4, 32, 2, 4)
    assert_same_masked_autoencoder_bench_steps(monkeypatch, sides, model, reference)
    assert_bench_builds_on_the_device(monkeypatch, bench, argv.split())


def test_bench_feeds_both_sides_the_same_images(monkeypatch):
    """The two sides of recipes/mae/bench.py train on the same random images."""
    argv = "--size tiny --depth 1 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --batch 2"
    assert_bench_feeds_both_sides_the_same_inputs(monkeypatch, bench, argv, "MAE")
