"""DINO: the schedules (teacher temperature per epoch, weight decay and teacher momentum per optimizer step),
the frozen prototypes of the first epoch, the centre, multi-crop through a ViT, the loss goes down on a
fixed batch, bad input fails clearly."""

import math
import os

import lightning as L
import pytest
import torch
from torch import nn

from core.augment import ImageEval, MultiCrop
from core.data import ShardDataModule
from core.momentum import cosine_momentum, update_momentum
from core.resnet import ResNet
from core.vit import ViT
from recipes.dino import bench, clip_bench
from recipes.dino.model import DINO, DINOHead, clip_each_gradient, encode
from conftest import (
    assert_bench_builds_on_the_device, assert_same_gradients, assert_same_optimizer_settings, bench_sides,
    bench_steps, flat, nudge_trainable,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


def tiny_vit(size=16):
    return ViT((size, size), (4, 4), dim=16, depth=1, heads=2)


def tiny_dino(**kw):
    torch.manual_seed(0)
    args = dict(global_size=16, local_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    return DINO(tiny_vit(), **{**args, **kw})


def crops(n=8, seed=0, n_local=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return {
        "global_views": [x, x + 0.3 * torch.randn(n, 3, 16, 16, generator=g)],
        "local_views": [torch.randn(n, 3, 8, 8, generator=g) for _ in range(n_local)],
    }


class Snapshots(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(
            dict(
                epoch=trainer.current_epoch,
                step=trainer.global_step,
                temp=float(trainer.callback_metrics["train/teacher_temp"]),
                **{k: float(trainer.callback_metrics[f"train/{k}"]) for k in ("loss", "teacher_entropy", "kl")},
                weight_decay=trainer.optimizers[0].param_groups[0]["weight_decay"],
                prototypes=pl_module.head.prototypes.detach().clone(),
                student=torch.cat([flat(pl_module.backbone), flat(pl_module.head)]),
                teacher=torch.cat([flat(pl_module.teacher_backbone), flat(pl_module.teacher_head)]),
                center=pl_module.center.clone(),
            )
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("optimizer, optimizer_class", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_schedules_frozen_prototypes_and_teacher_steps_in_a_real_run(monkeypatch, optimizer, optimizer_class):
    monkeypatch.chdir(ROOT)
    model = tiny_dino(
        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, base_momentum=0.9,
        weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer_epochs=1, warmup_epochs=0, optimizer=optimizer,
        base_lr=0.5,  # large steps, so that every EMA step is far above the float tolerance
    )  # fmt: skip
    data = ShardDataModule(
        "data/demo/image/train-000000.tar", batch_size=8, num_workers=0, samples_per_epoch=16,
        train_transform=MultiCrop(16, 8, n_local=2), val_transform=ImageEval(16),
    )  # fmt: skip
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
    )  # fmt: skip
    teacher_before = torch.cat([flat(model.teacher_backbone), flat(model.teacher_head)])
    prototypes_before = model.head.prototypes.detach().clone()
    trainer.fit(model, datamodule=data)
    rows, total = snapshots.rows, trainer.estimated_stepping_batches
    assert type(trainer.optimizers[0]) is optimizer_class
    assert optimizer == "adamw" or trainer.optimizers[0].defaults["momentum"] == 0.9

    # 2 batches per epoch, one optimizer step per 2 batches.
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]
    # The teacher temperature warms up linearly, epoch by epoch, from 0.04 to 0.07.
    assert [r["temp"] for r in rows] == pytest.approx([0.04, 0.04, 0.055, 0.055, 0.07, 0.07])
    # The logged collapse watch splits each step's loss into the teacher's entropy (at most ln K) and the KL.
    for r in rows:
        assert 0 < r["teacher_entropy"] <= math.log(32) + 1e-6 and r["kl"] >= -1e-6
        assert r["loss"] == pytest.approx(r["teacher_entropy"] + r["kl"], rel=1e-5)
    # The prototypes stay put during the first epoch, and learn afterwards.
    assert torch.equal(rows[1]["prototypes"], prototypes_before)
    assert not torch.equal(rows[3]["prototypes"], prototypes_before)
    previous_step, previous_teacher, previous_center = 0, teacher_before, torch.zeros(1, 32)
    for r in rows:
        if r["step"] == previous_step:  # an accumulating batch: no EMA step, the center stays
            assert torch.equal(r["teacher"], previous_teacher) and torch.equal(r["center"], previous_center)
        else:
            assert not torch.equal(r["center"], previous_center)
            m = cosine_momentum(r["step"] - 1, total, 0.9)
            ema_step = (1 - m) * (r["student"] - previous_teacher)
            assert ema_step.abs().max() > 1e-4  # 100 times the tolerance
            torch.testing.assert_close(r["teacher"] - previous_teacher, ema_step, rtol=1e-3, atol=1e-6)
            # The weight decay of the step just taken follows a cosine from 0.04 to 0.4.
            assert r["weight_decay"] == pytest.approx(cosine_momentum(r["step"] - 1, total, 0.04, 0.4))
        previous_step, previous_teacher, previous_center = r["step"], r["teacher"], r["center"]


def test_resnet_teacher_keeps_the_batchnorm_statistics_of_its_own_global_crops(monkeypatch):
    """The student's statistics follow the local crops too; DINO's teacher averages parameters only."""
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    model = DINO(ResNet(18, small_images=True, width=4), global_size=16, local_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    data = ShardDataModule(
        "data/demo/image/train-000000.tar", batch_size=8, num_workers=0, samples_per_epoch=16,
        train_transform=MultiCrop(16, 8, n_local=2), val_transform=ImageEval(16),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    student, teacher = model.backbone.stem[1], model.teacher_backbone.stem[1]  # the first BatchNorm
    assert int(teacher.num_batches_tracked) == 2 and int(student.num_batches_tracked) == 4  # globals; + locals
    assert not torch.allclose(teacher.running_var, student.running_var)


def test_head_gives_float32_cosines_under_bf16_autocast():
    model = tiny_dino()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.head(x)
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= 1 + 1e-6


def test_prototypes_start_as_dinos_last_layer():
    """DINO leaves its weight-normalised last layer at nn.Linear's default init (the truncated normal covers
    the MLP): row norms of about 0.58 for a 256-d bottleneck, where std 0.02 gives 0.32 and rows that turn
    1.8x faster under Adam."""
    torch.manual_seed(0)
    reference = nn.Linear(256, 4096, bias=False).weight
    prototypes = DINOHead(32, out_dim=4096, hidden_dim=64, bottleneck_dim=256).prototypes
    bound = 1 / math.sqrt(256)
    assert prototypes.abs().max() <= bound
    torch.testing.assert_close(prototypes.norm(dim=1).mean(), reference.norm(dim=1).mean(), rtol=0.02, atol=0)


def test_center_is_the_ema_of_the_teachers_mean_output():
    """The teacher's, not the student's: the student is moved off its copy first, or both would read alike."""
    model, batch = tiny_dino(center_momentum=0.9), crops()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.5 * torch.randn_like(p))
        teacher = model.teacher_head(model.teacher_backbone(torch.cat(batch["global_views"])))  # (2B, K)
        student = model.head(model.backbone(torch.cat(batch["global_views"])))
    assert not torch.allclose(teacher.mean(0), student.mean(0), atol=1e-3)
    model.training_step(batch, 0)
    model.move_center()
    torch.testing.assert_close(model.center, 0.1 * teacher.mean(0, keepdim=True))
    first, batch = model.center.clone(), crops(seed=1)  # the second move takes this step's teacher only
    with torch.no_grad():
        teacher = model.teacher_head(model.teacher_backbone(torch.cat(batch["global_views"])))
    model.training_step(batch, 0)
    model.move_center()
    torch.testing.assert_close(model.center, 0.9 * first + 0.1 * teacher.mean(0, keepdim=True))


def test_under_gradient_accumulation_the_center_moves_once_as_for_the_whole_batch():
    batch = crops(n=8)
    start = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))  # a center that is not zero
    whole, halves = tiny_dino(center_momentum=0.9), tiny_dino(center_momentum=0.9)  # the same weights
    for model in (whole, halves):
        model.center.copy_(start)
    whole.training_step(batch, 0)
    for part in (slice(0, 4), slice(4, 8)):  # two micro-batches of one optimizer step
        halves.training_step({key: [v[part] for v in views] for key, views in batch.items()}, 0)
        assert torch.equal(halves.center, start)  # the second micro-batch is centred as the first
    whole.move_center()
    halves.move_center()
    torch.testing.assert_close(halves.center, whole.center, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(whole.center, start)


def test_teacher_gets_no_gradient_and_local_crops_reach_the_student():
    model, batch = tiny_dino(), crops()
    model.training_step(batch, 0).backward()
    assert all(p.grad is None for p in [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()])
    with_locals = [p.grad.clone() for p in model.backbone.parameters()]
    model.zero_grad()
    model.training_step({"global_views": batch["global_views"]}, 0).backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(with_locals, model.backbone.parameters()))


def test_encode_runs_a_vit_on_smaller_crops_and_a_resnet_on_any():
    vit = tiny_vit()
    assert encode(vit, torch.randn(2, 3, 8, 8)).shape == (2, 16)
    torch.testing.assert_close(encode(vit, torch.ones(2, 3, 16, 16)), vit(torch.ones(2, 3, 16, 16)))
    resnet = ResNet(18, small_images=True, width=4)
    assert encode(resnet, torch.randn(2, 3, 8, 8)).shape == (2, resnet.embed_dim)
    with pytest.raises(ValueError, match=r"\(10, 10\).*patch size"):
        encode(vit, torch.randn(2, 3, 10, 10))


def test_loss_goes_down_on_a_fixed_batch():
    model, batch = tiny_dino(freeze_last_layer_epochs=0), crops()
    opt = torch.optim.AdamW([*model.backbone.parameters(), *model.head.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_momentum(model.backbone, model.teacher_backbone, 0.9)
        update_momentum(model.head, model.teacher_head, 0.9)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("network", ["vit", "resnet"])
def test_same_loss_clipped_gradients_teacher_and_center_as_dinos_code(network):
    """The recipe's DINO against the official code's training step (recipes/dino/bench.py) on the same
    backbone, from the same weights and crops: the benchmark compares one method done two ways."""
    if network == "vit":
        backbone = ViT((16, 16), (4, 4), dim=16, depth=2, heads=2, drop_path=0.0, pos_embed="learned", init="trunc_normal")
    else:  # the demo's kind; BatchNorm in training mode in both students and teachers
        backbone = ResNet(depth=18, width=4)
    torch.manual_seed(0)
    model = DINO(backbone, global_size=16, local_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8, clip_grad=0.05, teacher_temp=0.07)
    torch.nn.init.normal_(model.center, std=0.1)  # a center that has moved, as after a few steps
    reference = bench.reference_for(model, n_local=2)
    bench.copy_weights(model, reference)
    reference.dino_loss.center.copy_(model.center)
    batch = crops()
    images = batch["global_views"] + batch["local_views"]
    loss, ref_loss = model.training_step(batch, 0), reference.loss(images)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    model.on_before_optimizer_step(None)
    bench.clip_gradients(reference.student, 0.05)
    bench.cancel_gradients_last_layer(0, reference.student, 1)
    assert_same_gradients(model, reference, bench.reference_name)  # none for the teacher, nor the prototypes in epoch 0
    assert model.head.prototypes.grad is None
    clipped = [name for name, p in model.named_parameters() if p.grad is not None and torch.isclose(p.grad.norm(), torch.tensor(0.05))]
    assert len(clipped) > 3  # the clip acted on several parameters
    with torch.no_grad():  # move the student, then both teachers and centers take their EMA step
        for p in [*model.parameters(), *reference.parameters()]:
            if p.grad is not None:
                p.sub_(p.grad)
    model.update_teacher(0.9)
    reference.update_teacher(0.9)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[bench.reference_name(name)], msg=name)
    torch.testing.assert_close(model.center, reference.dino_loss.center)
    sizes = ["--global-size", "16", "--local-size", "8", "--local-crops", "2", "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "16", "--batch", "4"]
    backbone_args = ["--size", "tiny", "--patch-size", "8"] if network == "vit" else ["--backbone", "resnet", "--width", "4"]
    bench_steps(bench, sizes + backbone_args)


SIZES = "--global-size 16 --local-size 8 --out-dim 64 --hidden-dim 32 --bottleneck-dim 16"


def test_bench_runs_the_same_dino_step_on_both_sides(monkeypatch):
    """recipes/dino/bench.py from one command line (the demo's ResNet, 3 local crops): the reference (DINO's
    code) is built to the sizes asked for and does the work ours does, from the same weights and crops: the
    same loss over every crop, gradients clipped alike (the loss scaled up so that the clip at 3 acts) and none
    for the prototypes frozen in epoch 0, AdamW with the same settings on the same parameters, the same teacher
    and center EMA step, under the same precision and device."""
    argv = f"--backbone resnet --width 4 {SIZES} --local-crops 3 --batch 4 --precision bf16-mixed".split()
    sides = bench_sides(monkeypatch, bench, argv, ("DINO", "reference_for"))
    ours, ref = sides["ours"], sides["reference"]
    model, reference = ours.models["DINO"], ref.models["reference_for"]
    h = model.hparams
    assert (h.global_size, h.local_size, h.out_dim, h.hidden_dim, h.bottleneck_dim) == (16, 8, 64, 32, 16)
    loss, ref_loss = ours.loss(), ref.loss()
    torch.testing.assert_close(loss, ref_loss)
    assert None not in (ours.before_step, ref.before_step, ours.after, ref.after)  # clipping; EMA steps
    (1e4 * loss).backward()
    (1e4 * ref_loss).backward()
    ours.before_step()
    ref.before_step()
    assert model.head.prototypes.grad is None
    assert_same_gradients(model, reference, bench.reference_name)
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert sum(bool(torch.isclose(n, torch.tensor(3.0))) for n in norms) > 3  # the clip acted on several
    # DINO's clip_gradients reads each gradient's norm back to the host, as the reference's step does.
    assert sorted(bench.clip_gradients(reference.student, 1e9)) == pytest.approx(sorted(n.item() for n in norms), rel=1e-5)
    assert_same_optimizer_settings(ours, model, ref, reference, bench.reference_name)
    nudge_trainable(model, reference, bench.reference_name)
    ours.after()
    ref.after()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[bench.reference_name(name)], msg=name)
    torch.testing.assert_close(model.center, reference.dino_loss.center)
    assert model.center.abs().max() > 0


def test_bench_builds_the_vit_student_and_teacher_alike_on_both_sides(monkeypatch):
    """recipes/dino/bench.py with a ViT: the students drop paths at the same rates, the teachers at none
    (DINO's teacher is built without stochastic depth), the same parameters are trained with the same
    settings, on the device asked for; and `reference_for` carries every setting of the loss."""
    argv = f"--size tiny --patch-size 8 {SIZES} --local-crops 2 --batch 2".split()
    sides = bench_sides(monkeypatch, bench, argv, ("DINO", "reference_for"))
    model, reference = sides["ours"].models["DINO"], sides["reference"].models["reference_for"]
    rates = lambda backbone: [block.drop_path_rate for block in backbone.blocks]  # noqa: E731
    assert rates(reference.student.backbone) == rates(model.backbone) and max(rates(model.backbone)) > 0
    assert rates(reference.teacher.backbone) == rates(model.teacher_backbone) == [0.0] * 12
    assert_same_optimizer_settings(sides["ours"], model, sides["reference"], reference, bench.reference_name)
    assert_bench_builds_on_the_device(monkeypatch, bench, argv)
    loss = bench.reference_for(tiny_dino(teacher_temp=0.05, student_temp=0.2, center_momentum=0.8), n_local=3).dino_loss
    assert (loss.teacher_temp, loss.student_temp, loss.center_momentum, loss.ncrops) == (0.05, 0.2, 0.8, 5)


def test_clip_bench_baseline_clips_each_gradient_on_its_own_as_clip_each_gradient_does():
    """clip_bench's baseline, `clip_by_dtensor_norms` (here on plain tensors), clips as this recipe's
    `clip_each_gradient`: a gradient above the norm is scaled down to it, one below it is left as it is."""
    grads = [torch.full((4,), 2.0), torch.full((4,), 0.1)]  # norms 4 and 0.2
    clipped = {}
    for clip in (clip_bench.clip_by_dtensor_norms, clip_each_gradient):
        params = [nn.Parameter(torch.zeros(4)) for _ in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        clip(params, 1.0)
        clipped[clip] = [p.grad for p in params]
    for baseline, ours in zip(*clipped.values()):
        torch.testing.assert_close(baseline, ours)
    assert clipped[clip_each_gradient][0].norm().item() == pytest.approx(1.0) and torch.equal(clipped[clip_each_gradient][1], grads[1])


@pytest.mark.timeout(120)
def test_clip_bench_times_both_clippings_on_two_ranks_and_they_agree(capsys):
    result = clip_bench.main(["--size", "tiny", "--repeats", "1"])
    assert result["gradients"] == 149 and result["clip_each_gradient"] > 0 and result["DTensor norms"] > 0
    assert result["error"] < 1e-6
    # The gradients are torch.randn of each parameter's shape: those of more than one element have norms above
    # 1 (the clipping's max_norm) and are scaled down to it; the ViT's 1-element ones, if any, may not be.
    torch.manual_seed(0)
    norms = [torch.randn(p.shape).norm().item() for p in ViT((224, 224), (16, 16), 3, size="tiny").parameters()]
    assert result["scaled_down"] == sum(n > 1.0 for n in norms) > 100
    assert result["largest_norm"] == pytest.approx(1.0, abs=1e-5)
    # The printed ratio is the DTensor norms' time over clip_each_gradient's: how many times faster this recipe's is.
    assert f"ratio {result['DTensor norms'] / result['clip_each_gradient']:.1f}x" in capsys.readouterr().out


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="global crop size 32"):
        DINO(tiny_vit(16), global_size=32)
    with pytest.raises(ValueError, match="center_momentum"):
        tiny_dino(center_momentum=2.0)
    with pytest.raises(ValueError, match="optimizer='lars' must be 'adamw' or 'sgd'"):
        tiny_dino(optimizer="lars")
    with pytest.raises(ValueError, match=r"batch\['global_views'\], 2 views"):
        tiny_dino().training_step({"views": [torch.randn(2, 3, 16, 16)] * 2}, 0)
    with pytest.raises(ValueError, match=r"batch\['local_views'\] holds \(16, 16\)"):
        tiny_dino().training_step({"global_views": [torch.randn(2, 3, 16, 16)] * 2, "local_views": [torch.randn(2, 3, 16, 16)]}, 0)


def test_clip_grad_clips_each_parameters_gradient_on_its_own():
    """DINO's clip_gradients: every gradient above the norm is scaled down to it, the others are left alone
    (a global-norm clip would shrink the small ones too)."""
    model = tiny_dino(clip_grad=3.0, freeze_last_layer_epochs=0)
    params = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 1.0 if i % 2 else 1e-3)  # large and small gradients
    before = [p.grad.norm().item() for p in params]
    model.on_before_optimizer_step(optimizer=None)
    for b, p in zip(before, params):
        assert p.grad.norm().item() == pytest.approx(min(b, 3.0), rel=1e-5)
    assert max(before) > 3.0 and min(before) < 3.0


def test_a_vit_student_drops_paths_and_its_teacher_never_does():
    torch.manual_seed(0)
    model = DINO(ViT((16, 16), (4, 4), dim=16, depth=3, heads=2, drop_path=0.2), global_size=16, local_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    assert [b.drop_path_rate for b in model.backbone.blocks][-1] == pytest.approx(0.2)
    assert [b.drop_path_rate for b in model.teacher_backbone.blocks] == [0.0, 0.0, 0.0]
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)  # the exported teacher is rebuilt without the student's rate
    assert checkpoint["encoders"]["image"]["backbone"]["args"]["drop_path"] == 0.0
    model.train()  # as Lightning trains: the teacher too is in training mode
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.teacher_backbone(x), model.teacher_backbone(x))
        assert not torch.allclose(model.backbone(x), model.backbone(x))
