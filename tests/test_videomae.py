"""VideoMAE recipe: tube masking, the loss on hidden tubelets only, per-tubelet targets, a one-batch overfit,
bad configurations, and the demo config end to end through the CLI, export and load_encoder."""


import pytest
import torch

from core import load_encoder
from core.export import export_checkpoint
from core.losses import masked_patch_loss
from core.masking import patchify, whole
from recipes.videomae import bench
from recipes.videomae.model import VideoMAE, tubelet_targets
from conftest import assert_bench_builds_on_the_device, assert_same_optimizer_settings, bench_sides, bench_steps, mae_demo_run
from test_mae import assert_bench_feeds_both_sides_the_same_inputs, bench_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 frames of 16 px in 2x4x4 tubelets: a (2, 4, 4) grid of 32 tokens, 16 places in space.
TINY = dict(
    num_frames=4, stride=1, image_size=16, patch_size=4, tubelet_size=2, size="tiny", encoder_depth=1,
    decoder_dim=32, decoder_depth=1, decoder_heads=2,
)


def clips(batch=3, seed=0):
    return torch.randn(batch, 3, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask_ratio, visible", [(0.5, 8), (0.75, 4), (0.9, 2)])  # of 16 places: int(16 * ratio) hidden
def test_tube_mask_hides_the_same_places_in_every_frame_in_exact_number(mask_ratio, visible):
    torch.manual_seed(0)
    model = VideoMAE(**{**TINY, "mask_ratio": mask_ratio})
    _, pred, mask, _ = model.reconstruct(clips(batch=4))
    t, h, w = model.encoder.grid
    per_time = mask.view(4, t, h * w)  # (B, T, places)
    assert torch.equal(per_time, per_time[:, :1].expand_as(per_time))  # one spatial mask for all time steps
    visible_places = (~per_time[:, 0]).sum(1)
    assert h * w == 16 and visible_places.tolist() == [visible] * 4
    assert pred.shape == (4, t * h * w, 2 * 4 * 4 * 3)
    assert len({tuple(m.tolist()) for m in per_time[:, 0]}) > 1  # samples get different masks


def test_random_masking_hides_tubelets_each_on_its_own_in_exact_number():
    torch.manual_seed(0)
    model = VideoMAE(**{**TINY, "masking": "random", "mask_ratio": 0.75})
    _, _, mask, _ = model.reconstruct(clips(batch=4))
    t, h, w = model.encoder.grid
    assert (~mask).sum(1).tolist() == [whole(t * h * w * 0.25)] * 4
    per_time = mask.view(4, t, h * w)
    assert not torch.equal(per_time, per_time[:, :1].expand_as(per_time))  # not one mask shared over time


def test_loss_ignores_visible_tubelets():
    torch.manual_seed(0)
    model = VideoMAE(**{**TINY, "mask_ratio": 0.75})
    loss, pred, mask, _ = model.reconstruct(clips())
    pred.retain_grad()
    loss.backward()
    grad = pred.grad.abs().sum(-1)  # (B, N)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask] > 0)


def test_targets_are_tubelets_normalised_per_channel_and_map_back_to_pixels():
    video = clips() * 3 + 1
    target, (mean, std) = tubelet_targets(video, (2, 4, 4), normalize=True)
    per_channel = target.view(*target.shape[:2], -1, 3)  # (B, N, 32 pixels, 3 channels)
    torch.testing.assert_close(per_channel.mean(2), torch.zeros(3, 32, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(2), torch.ones(3, 32, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close((per_channel * std + mean).flatten(2), patchify(video, (2, 4, 4)))
    raw, stats = tubelet_targets(video, (2, 4, 4), normalize=False)
    assert stats is None and torch.equal(raw, patchify(video, (2, 4, 4)))


def test_per_tubelet_targets_keep_the_colour_contrast_that_per_channel_targets_remove():
    # A flat tubelet of one colour plus faint noise: per channel, each channel's target is the noise
    # blown up to unit std; per tubelet (MAE-ST), the target is the colour contrast, and the noise stays faint.
    noise = 0.01 * torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    video = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1, 1) + noise
    per_channel, _ = tubelet_targets(video, (2, 4, 4), normalize=True)
    per_tubelet, (mean, std) = tubelet_targets(video, (2, 4, 4), normalize=True, per_channel=False)
    assert mean.shape == std.shape == (1, 1, 1, 1)
    torch.testing.assert_close(per_tubelet.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_tubelet.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    channel_means = per_tubelet.view(32, 3).mean(0)  # the colour, in units of the tubelet's std
    torch.testing.assert_close(channel_means, torch.tensor([1.22, -1.22, 0.0]), atol=0.02, rtol=0)
    assert per_tubelet.view(32, 3).std(0).max() < 0.05  # noise stays small
    torch.testing.assert_close(per_channel.view(32, 3).std(0), torch.ones(3), atol=1e-4, rtol=0)  # noise at unit std
    torch.testing.assert_close((per_tubelet.view(1, 1, 32, 3) * std + mean).flatten(2), patchify(video, (2, 4, 4)))


def test_embed_sees_every_tubelet_unmasked():
    torch.manual_seed(0)
    model = VideoMAE(**TINY).eval()
    video = clips()
    torch.testing.assert_close(model.embed({"video": video}), model.encoder.pool_tokens(model.encoder.tokens(video)))
    changed = video.clone()
    changed[:, :, :, :4, :4] += 3  # one place in every frame: seen whatever the mask would be
    assert not torch.allclose(model.embed({"video": changed}), model.embed({"video": video}), atol=1e-4)


def test_a_few_steps_on_one_batch_drive_the_loss_down():
    torch.manual_seed(0)
    model = VideoMAE(**TINY)
    # Each clip repeats one random tubelet everywhere: a hidden tubelet can be copied from a visible one,
    # which the model must learn; predicting zero (the per-tubelet mean) would cost about 1.
    video = torch.randn(4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0)).repeat(1, 1, 2, 4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _, mask, _ = model.reconstruct(video, torch.Generator().manual_seed(0))  # one fixed mask
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    target, _ = tubelet_targets(video, model.patch, normalize=True)
    predict_zero = masked_patch_loss(torch.zeros_like(target), target, mask, norm_pix=False).item()
    assert losses[-1] < 0.25 * losses[0] and losses[-1] < 0.25 * predict_zero, losses


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mask_ratio": 0.0}, "mask_ratio must be in"),
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"mask_ratio": 1.5}, "mask_ratio must be in"),
        ({"mask_ratio": 0.99, "masking": "random"}, "mask_ratio=0.99 leaves no visible patch of 32"),
        ({"image_size": 18}, "not divisible by patch size"),
        ({"num_frames": 5}, "not divisible by patch size"),
        ({"stride": 0}, "stride must be at least 1"),
        ({"masking": "frame"}, "masking='frame' must be one of"),
    ],
)
def test_bad_configuration_is_refused_at_construction(change, message):
    with pytest.raises(ValueError, match=message):
        VideoMAE(**{**TINY, **change})


def test_clip_of_the_wrong_length_is_named():
    model = VideoMAE(**TINY)
    with pytest.raises(ValueError, match=r"num_frames.* = \(B, 3, 4, 16, 16\), got \(3, 3, 2, 16, 16\)"):
        model.reconstruct(torch.randn(3, 3, 2, 16, 16))


def test_same_loss_and_gradients_as_the_official_videomae_structure():
    """The recipe's VideoMAE against the official code's model on timm's blocks (recipes/videomae/bench.py),
    given a class token as this recipe has, from the same weights and mask: the benchmark compares one
    method done two ways."""
    torch.manual_seed(0)
    model = VideoMAE(**TINY)
    reference = bench.reference_for(model, class_token=True)
    bench.copy_weights(model, reference)
    videos = clips()
    loss, pred, mask, _ = model.reconstruct(videos, torch.Generator().manual_seed(1))
    ref_loss, ref_pred = reference(videos, mask)
    torch.testing.assert_close(ref_pred, pred[mask].view(3, -1, pred.shape[-1]))  # the hidden tubelets, in order
    torch.testing.assert_close(ref_loss, loss)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    assert model.decoder.embed.bias.grad.abs().max() > 0  # trained here; the reference has no such bias
    for name, p in model.named_parameters():
        if name != "decoder.embed.bias":
            torch.testing.assert_close(ref_params[bench.reference_name(name)].grad, p.grad, msg=name)
    # A reference that differed where it counts would show: another mask gives another loss.
    other = model.mask(3, "cpu", torch.Generator().manual_seed(2))[1]
    assert not torch.isclose(reference(videos, other)[0], loss)
    # The benchmark runs the reference as VideoMAE builds it, without a class token; both steps train.
    tiny = "--size tiny --depth 1 --frames 4 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --batch 2"
    bench_steps(bench, tiny.split())
    with pytest.raises(ValueError, match="decoder.embed.bias"):
        torch.nn.init.ones_(model.decoder.embed.bias)
        bench.copy_weights(model, bench.reference_for(model))


def test_demo_config_trains_logs_pictures_and_exports_an_unmasked_encoder(tmp_path):
    model = mae_demo_run(VideoMAE, "videomae", tmp_path).model
    # VideoMAE's no_weight_decay list: the tokens are not decayed.
    undecayed = {id(p) for group in model.trainer.optimizers[0].param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert {id(model.decoder.mask_token), id(model.encoder.cls_token)} <= undecayed

    (folder,) = export_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    encoder = load_encoder(folder)
    assert encoder.input == {
        "modality": "video", "frames": 8, "stride": 2, "size": [32, 32],
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "short_clips": "error", "interpolation": "bilinear",
    }  # fmt: skip
    video = torch.randn(2, 3, 8, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(video), model.embed({"video": video}), rtol=0, atol=0)


def test_clip_shorter_than_the_configured_frames_fails_before_the_first_step(tmp_path):
    too_long = [f"--data.{split}_transform.init_args.num_frames=20" for split in ("train", "val")]
    with pytest.raises(RuntimeError, match="has 16 frames, but num_frames=20 with stride=2 needs at least 39"):
        mae_demo_run(VideoMAE, "videomae", tmp_path, "--model.num_frames=20", *too_long)
    logged = [path.read_text() for path in tmp_path.rglob("metrics.csv")]  # every step is logged in these runs
    assert not any("train/loss" in text for text in logged), "trained before failing"


def test_a_model_stride_other_than_the_clips_fails_before_the_first_step(tmp_path):
    # The export would record stride 1 for clips sampled every 2nd frame: core.evaluate would read others.
    with pytest.raises(ValueError, match="data.train_transform's stride is 2 and model.stride is 1"):
        mae_demo_run(VideoMAE, "videomae", tmp_path, "--model.stride=1")


def test_bench_gives_the_reference_the_sizes_clips_and_mask_that_ours_takes(monkeypatch):
    """recipes/videomae/bench.py from one command line (a ViT-S encoder, 6 heads; tubelets 4 frames deep): the
    reference is VideoMAE's structure as VideoMAE builds it (no class token) to the sizes asked for, heads
    included, takes clips of the shape ours takes with a tube mask that hides as many tubelets as ours hides,
    and is trained by AdamW with the same settings on the same parameters (but ours' class token and decoder
    bias), under the same precision and device. (With a class token the two compute the same: see above.)"""
    argv = (
        "--size small --depth 1 --frames 4 --image-size 16 --patch-size 4 --tubelet-size 4 --decoder-dim 32 --decoder-depth 2 "
        "--decoder-heads 4 --batch 2 --precision bf16-mixed"
    )
    sides = bench_sides(monkeypatch, bench, argv.split(), ("VideoMAE", "reference_for"))
    ours, ref = sides["ours"], sides["reference"]
    model, reference = ours.models["VideoMAE"], ref.models["reference_for"]
    h = model.hparams
    sizes = (h.size, h.encoder_depth, h.num_frames, h.image_size, h.patch_size, h.tubelet_size, h.decoder_dim, h.decoder_depth, h.decoder_heads)
    assert sizes == ("small", 1, 4, 16, 4, 4, 32, 2, 4)
    assert reference.cls_token is None
    assert [b.attn.num_heads for b in reference.blocks] == [6] and [b.attn.num_heads for b in reference.decoder_blocks] == [4, 4]
    inputs = bench_inputs(monkeypatch, sides, model, reference)
    (video,), (videos, mask) = inputs["ours"], inputs["reference"]
    assert videos.shape == video.shape == (2, 3, 4, 16, 16)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == model.mask(2, "cpu")[1].sum(1).tolist() == [14, 14]  # int(16 * 0.9)
    assert_same_optimizer_settings(ours, model, ref, reference, bench.reference_name, skip={"encoder.cls_token", "decoder.embed.bias"})
    assert_bench_builds_on_the_device(monkeypatch, bench, argv.split())


def test_bench_feeds_both_sides_the_same_clips(monkeypatch):
    """The two sides of recipes/videomae/bench.py train on the same random clips."""
    argv = "--size tiny --depth 1 --frames 4 --image-size 16 --patch-size 4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --batch 2"
    assert_bench_feeds_both_sides_the_same_inputs(monkeypatch, bench, argv, "VideoMAE")
