"""CropMAE recipe: the local view masked to (at least one) visible patch, the decoder reading the global
view through cross-attention, the loss on hidden local patches only, a one-batch overfit, bad
configurations, and the demo config end to end through the CLI, export and load_encoder."""

import re

import pytest
import torch
from torch import nn

from core import load_encoder
from core.export import export_checkpoint
from core.losses import masked_patch_loss
from core.masking import patchify
from recipes.cropmae import bench
from recipes.cropmae.model import CropMAE, center_crop_resized, visible_count
from conftest import (
    assert_bench_builds_on_the_device, assert_same_optimizer_settings, bench_sides, bench_steps, mae_demo_run,
    patch_pixels, same_reconstruction_as_reference,
)
from test_mae import assert_bench_feeds_both_sides_the_same_inputs, bench_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 px in 4-px patches: a 4x4 grid of 16 patches.
TINY = dict(
    image_size=16, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=2,
    decoder_mlp_dim=64, decoder_dropout=0.0,
)


def images(batch=3, seed=0):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "num_patches, mask_ratio, visible",
    [(196, 0.985, 2), (64, 0.985, 1), (16, 0.985, 1), (64, 0.75, 16), (64, 0.9, 6)],  # 196 * 0.015 = 2.94 -> 2, as MAE
)
def test_visible_count_is_mae_rounding_but_never_zero(num_patches, mask_ratio, visible):
    assert visible_count(num_patches, mask_ratio) == visible


def test_local_view_keeps_exactly_the_visible_patches():
    torch.manual_seed(0)
    model = CropMAE(**{**TINY, "mask_ratio": 0.75})
    _, pred, mask = model.reconstruct(images(batch=4), images(batch=4, seed=1))
    assert pred.shape == (4, 16, 4 * 4 * 3)
    assert (~mask).sum(1).tolist() == [4] * 4
    model = CropMAE(**TINY)  # 98.5% of 16 patches: one stays visible
    _, _, mask = model.reconstruct(images(batch=4), images(batch=4, seed=1))
    assert (~mask).sum(1).tolist() == [1] * 4


def test_prediction_reads_the_global_view_and_only_the_visible_local_patches():
    torch.manual_seed(0)
    model = CropMAE(**{**TINY, "mask_ratio": 0.75}).eval()
    global_view, local_view = images(), images(seed=1)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731  the same mask every call
    _, base, mask = model.reconstruct(global_view, local_view, generator())
    hidden_changed = local_view + 5 * patch_pixels(mask)
    torch.testing.assert_close(model.reconstruct(global_view, hidden_changed, generator())[1], base)
    visible_changed = local_view + 5 * patch_pixels(~mask)
    assert not torch.allclose(model.reconstruct(global_view, visible_changed, generator())[1], base, atol=1e-4)
    assert not torch.allclose(model.reconstruct(global_view + 1, local_view, generator())[1], base, atol=1e-4)


def test_same_loss_and_gradients_as_the_cropmae_code_structure():
    """The recipe's CropMAE against the CropMAE code's model (recipes/cropmae/bench.py: the official MAE model
    with SiamMAE's decoder of nn.MultiheadAttention blocks), dropout off, from the same weights and noise: the
    benchmark compares one computation done two ways."""
    torch.manual_seed(0)
    model = CropMAE(**{**TINY, "mask_ratio": 0.75, "decoder_depth": 2})
    reference = bench.reference_for(model)
    bench.copy_weights(model, reference)
    same_reconstruction_as_reference(model, reference, images(), images(seed=1))
    parts = list(bench.cross_attention_parts(model, reference))
    packed = {id(mine) for mine, _, _ in parts}
    for mine, theirs, rows in parts:
        torch.testing.assert_close(mine.grad, theirs.grad[rows])
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if id(p) not in packed:
            torch.testing.assert_close(p.grad, ref_params[bench.reference_name(name)].grad, msg=name)
    # The benchmark runs both with the paper's dropout; at the demo's 64 patches 98.5% keeps one, as here.
    assert bench.reference_for(CropMAE(**{**TINY, "image_size": 32})).mask_ratio == 1 - 1 / 64
    bench_steps(bench, "--size tiny --depth 1 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --decoder-mlp-dim 64 --batch 2".split())


def test_loss_ignores_visible_local_patches():
    torch.manual_seed(0)
    model = CropMAE(**{**TINY, "mask_ratio": 0.5})
    loss, pred, mask = model.reconstruct(images(), images(seed=1))
    pred.retain_grad()
    loss.backward()
    grad = pred.grad.abs().sum(-1)  # (B, N)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask] > 0)


def test_a_few_steps_on_one_batch_drive_the_loss_down():
    torch.manual_seed(0)
    model = CropMAE(**TINY)
    # Each image repeats one random patch everywhere (and the local view is the global one): a hidden patch
    # can be copied from the views, which the model must learn; predicting zero (each patch's mean) costs about 1.
    views = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)).repeat(1, 1, 4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _, mask = model.reconstruct(views, views, torch.Generator().manual_seed(0))  # one fixed mask
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    target = patchify(views, model.patch)
    predict_zero = masked_patch_loss(torch.zeros_like(target), target, mask).item()
    assert losses[-1] < 0.25 * losses[0] and losses[-1] < 0.25 * predict_zero, losses


def test_validation_local_view_is_the_resized_center():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    crop = center_crop_resized(x, 0.5)  # the central 2x2 (5, 6, 9, 10) brought back to 4x4
    assert crop.shape == x.shape
    torch.testing.assert_close(crop[..., [0, 0, -1, -1], [0, -1, 0, -1]], x[..., [1, 1, 2, 2], [1, 2, 1, 2]])
    torch.testing.assert_close(center_crop_resized(x, 1.0), x)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mask_ratio": 0.0}, "mask_ratio must be in"),
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"mask_ratio": -0.5}, "mask_ratio must be in"),
        ({"image_size": 18}, "not divisible by patch size"),
        ({"decoder_dim": 30, "decoder_heads": 4}, "not divisible by 4 heads"),
    ],
)
def test_bad_configuration_is_refused_at_construction(change, message):
    with pytest.raises(ValueError, match=message):
        CropMAE(**{**TINY, **change})


def test_demo_config_trains_logs_pictures_and_exports_an_unmasked_encoder(tmp_path):
    model = mae_demo_run(CropMAE, "cropmae", tmp_path).model

    (folder,) = export_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    encoder = load_encoder(folder)
    size = model.hparams.image_size
    assert encoder.input["modality"] == "image" and encoder.input["size"] == [size, size]
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.embed({"image": x}), rtol=0, atol=0)


def packed_name(name: str) -> str:
    """A parameter's name in the reference, the cross-attention's q and kv named as the in_proj they are packed in."""
    cross = re.fullmatch(r"decoder\.blocks\.(\d+)\.cross\.(?:q|kv)\.(weight|bias)", name)
    return f"decoder_blocks.{cross[1]}.multihead_attn.in_proj_{cross[2]}" if cross else bench.reference_name(name)


def test_bench_runs_the_same_cropmae_step_on_both_sides(monkeypatch):
    """recipes/cropmae/bench.py from one command line (a ViT-S encoder, 6 heads): the reference (the CropMAE
    code's structure) is built to the sizes, mask ratio and decoder dropout asked for, and applies every one of
    its dropouts in training; it takes views of the shape ours takes, and with dropout off (eval mode) does the
    work ours does: the same loss and gradients from the same weights, views and noise; AdamW with the same
    settings on the same parameters, under the same precision and device."""
    argv = (
        "--size small --depth 1 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 2 --decoder-heads 4 "
        "--decoder-mlp-dim 48 --mask-ratio 0.75 --dropout 0.25 --batch 2 --precision bf16-mixed"
    ).split()
    sides = bench_sides(monkeypatch, bench, argv, ("CropMAE", "reference_for"))
    ours, ref = sides["ours"], sides["reference"]
    model, reference = ours.models["CropMAE"], ref.models["reference_for"]
    h = model.hparams
    sizes = (h.size, h.encoder_depth, h.image_size, h.patch_size, h.decoder_dim, h.decoder_depth, h.decoder_heads, h.decoder_mlp_dim)
    assert sizes == ("small", 1, 16, 4, 32, 2, 4, 48) and (h.mask_ratio, h.decoder_dropout) == (0.75, 0.25)
    assert model.num_visible == 4 and reference.mask_ratio == 0.75  # of 16 patches
    dropouts = [m for m in reference.decoder_blocks.modules() if isinstance(m, nn.Dropout)]
    attention = [a.dropout for b in reference.decoder_blocks for a in (b.self_attn, b.multihead_attn)]
    assert len(dropouts) == 8 and {m.p for m in dropouts} == {0.25} and attention == [0.25] * 4
    calls = []
    for m in dropouts:
        m.register_forward_hook(lambda module, inputs, output: calls.append(module))
    inputs = bench_inputs(monkeypatch, sides, model, reference)  # one step of each, in training mode
    assert len(calls) == len(dropouts) and set(map(id, calls)) == set(map(id, dropouts))  # each once a step
    assert [x.shape for x in inputs["reference"]] == [x.shape for x in inputs["ours"]] == [(2, 3, 16, 16)] * 2
    assert not torch.equal(*inputs["ours"]) and not torch.equal(*inputs["reference"])  # a global and a local view
    model.eval()
    reference.eval()
    torch.manual_seed(1)
    loss = ours.loss()
    torch.manual_seed(1)
    ref_loss = reference(*inputs["ours"])[0]  # on ours' views (the bench's own differ: see below)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    packed = {}
    for mine, theirs, rows in bench.cross_attention_parts(model, reference):
        packed[id(mine)] = theirs.grad[rows]
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, packed[id(p)] if id(p) in packed else ref_params[bench.reference_name(name)].grad, msg=name)
    assert_same_optimizer_settings(ours, model, ref, reference, packed_name)
    assert_bench_builds_on_the_device(monkeypatch, bench, argv)


def test_bench_feeds_both_sides_the_same_views(monkeypatch):
    """The two sides of recipes/cropmae/bench.py train on the same random pair of views."""
    argv = "--size tiny --depth 1 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --decoder-mlp-dim 64 --batch 2"
    assert_bench_feeds_both_sides_the_same_inputs(monkeypatch, bench, argv, "CropMAE")
