"""BYOL: the target moves by EMA once per optimizer step (gradient accumulation included), the loss goes
down on a fixed batch, collapse is reported, bad input fails clearly."""

import os

import lightning as L
import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS

from core.augment import ImageEval, TwoViews
from core.bench import copy_renamed
from core.data import ShardDataModule
from core.momentum import cosine_momentum
from core.optim import LARS
from core.resnet import ResNet
from recipes.byol import bench
from recipes.byol.model import BYOL
from conftest import assert_same_gradients, assert_same_siamese_bench_steps, bench_steps, flat, noisy_views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


def tiny_byol(**kw):
    torch.manual_seed(0)
    backbone = ResNet(18, small_images=True, width=4)
    return BYOL(backbone, image_size=16, projector_hidden=32, projection_dim=16, predictor_hidden=32, **kw)


def views(n=8, seed=0):
    return noisy_views(n, seed=seed)


class Snapshots(L.Callback):
    """After every batch: the global step and the online and target parameters."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        online = torch.cat([flat(pl_module.backbone), flat(pl_module.projector)])
        target = torch.cat([flat(pl_module.target_backbone), flat(pl_module.target_projector)])
        self.rows.append((trainer.global_step, online, target))


@pytest.mark.timeout(60)
def test_target_moves_once_per_optimizer_step_under_gradient_accumulation(monkeypatch):
    monkeypatch.chdir(ROOT)
    # A fast target and large LARS steps, so that every EMA step is far above the float tolerance.
    model = tiny_byol(base_momentum=0.9, warmup_epochs=0, lars_trust=0.1)
    data = ShardDataModule(
        "data/demo/image/train-000000.tar", batch_size=8, num_workers=0, samples_per_epoch=48,
        train_transform=TwoViews(16, scale=(0.3, 1.0)), val_transform=ImageEval(16),
    )  # fmt: skip
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
    )  # fmt: skip
    before = torch.cat([flat(model.target_backbone), flat(model.target_projector)])
    trainer.fit(model, datamodule=data)

    steps = [step for step, _, _ in snapshots.rows]
    assert steps == [0, 1, 1, 2, 2, 3]  # an optimizer step every second batch
    previous_step, previous_target = 0, before
    for step, online, target in snapshots.rows:
        if step == previous_step:  # an accumulating batch: the target stays put
            assert torch.equal(target, previous_target)
        else:  # the EMA of the freshly stepped online weights, with the cosine momentum of the step (0-based) just taken
            m = cosine_momentum(step - 1, trainer.estimated_stepping_batches, 0.9)
            ema_step = (1 - m) * (online - previous_target)
            assert ema_step.abs().max() > 1e-4  # 100 times the tolerance
            torch.testing.assert_close(target - previous_target, ema_step, rtol=1e-3, atol=1e-6)
        previous_step, previous_target = step, target


def test_loss_goes_down_on_a_fixed_batch():
    model = tiny_byol(base_momentum=0.99)
    batch = views()
    online = [*model.backbone.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    opt = torch.optim.Adam(online, lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(0.99)
        losses.append(loss.item())
    assert 0 < losses[-1] < 0.5 * losses[0]


def test_target_gets_no_gradient_and_the_loss_is_symmetric():
    model = tiny_byol()
    batch = views()
    loss = model.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert all(p.grad is None for p in model.target_projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    swapped = {"views": batch["views"][::-1]}
    torch.testing.assert_close(model.training_step(swapped, 0), loss)
    # Each direction is 2 - 2 cos, so the sum of two lies in [0, 8].
    assert 0 <= loss.item() <= 8


def test_each_view_predicts_the_targets_projection_of_the_other():
    # From a fresh model the target equals the online network, so a loss that took the online projections
    # as targets would pass every other test: move the target away first.
    model = tiny_byol()
    with torch.no_grad():
        for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()]:
            p.add_(0.5 * torch.randn_like(p))
    x1, x2 = views()["views"]
    model.eval()  # BatchNorm from its running statistics: the same forward here and in the step
    with torch.no_grad():
        online = lambda x: model.predictor(model.projector(model.backbone(x)))
        target = lambda x: model.target_projector(model.target_backbone(x))
        cos = torch.nn.functional.cosine_similarity
        expected = (2 - 2 * cos(online(x1), target(x2)).mean()) + (2 - 2 * cos(online(x2), target(x1)).mean())
        torch.testing.assert_close(model.training_step({"views": [x1, x2]}, 0), expected)


def test_same_loss_gradients_and_target_step_as_lightlys_byol():
    """The recipe's BYOL against lightly's example on the same backbone (recipes/byol/bench.py), from the same
    weights: the benchmark compares one method done two ways."""
    model = tiny_byol()
    reference = bench.reference_for(model)
    copy_renamed(model, reference, bench.reference_name)
    batch = views()
    x1, x2 = batch["views"]
    torch.testing.assert_close(reference(x1), model.predictor(model.projector(model.backbone(x1))))
    torch.testing.assert_close(reference.forward_momentum(x2), model.target_projector(model.target_backbone(x2)))
    loss, ref_loss = model.training_step(batch, 0), reference.loss(x1, x2)
    torch.testing.assert_close(loss, 4 + 4 * ref_loss)  # the sum of 2 - 2 cos against the mean of -cos
    loss.backward()
    ref_loss.backward()
    assert_same_gradients(model, reference, bench.reference_name, scale=4)
    with torch.no_grad():  # move the online weights, then both targets take one EMA step
        for p in [*model.parameters(), *reference.parameters()]:
            if p.grad is not None:
                p.sub_(0.1 * p.grad.sign())
    model.update_target(0.9)
    reference.update_target(0.9)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[bench.reference_name(name)], msg=name)
    assert not torch.equal(flat(model.target_projector), flat(tiny_byol().target_projector))
    bench_steps(bench, ["--width", "4", "--projector-hidden", "16", "--projection-dim", "8", "--predictor-hidden", "16", "--batch", "4"])


def test_collapsed_embeddings_are_reported():
    model = tiny_byol()
    last = model.projector[-1]
    torch.nn.init.zeros_(last.weight)  # every input now projects to the bias: a collapsed embedding
    with pytest.warns(UserWarning, match="embeddings have collapsed"):
        model.training_step(views(), 0)


def test_healthy_embeddings_are_not_reported(recwarn):
    tiny_byol().training_step(views(), 0)
    assert not [w for w in recwarn if "collapsed" in str(w.message)]


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"image": torch.randn(2, 3, 16, 16)}, r"batch\[.views.\], 2 views"),
        ({"views": [torch.randn(2, 3, 32, 32)] * 2}, "set up for 16x16"),
    ],
)
def test_bad_batches_fail_clearly(batch, message):
    with pytest.raises(ValueError, match=message):
        tiny_byol().training_step(batch, 0)


def test_bad_config_fails_before_training():
    with pytest.raises(ValueError, match="base_momentum"):
        tiny_byol(base_momentum=1.5)
    with pytest.raises(ValueError, match="embed_dim"):
        BYOL(torch.nn.Linear(3, 4))


def test_bench_runs_the_same_byol_step_on_both_sides(monkeypatch):
    """recipes/byol/bench.py from one command line: the reference (lightly's BYOL) is built to the sizes asked
    for and does the work ours does, from the same weights: the same loss (ours the sum of 2 - 2 cos, 4 + 4x
    lightly's mean of -cos) and gradients, LARS (ours this recipe's, the reference lightly's) with the same
    settings on the same parameters, the same EMA step, under the same precision and device; a ratio of their
    times compares one method done two ways."""
    argv = "--width 4 --image-size 16 --projector-hidden 24 --projection-dim 8 --predictor-hidden 20 --batch 6 --precision bf16-mixed"
    optimizers = (LARS, LightlyLARS)  # this recipe's, and lightly's
    model, _ = assert_same_siamese_bench_steps(monkeypatch, bench, argv.split(), "BYOL", optimizers, lambda ref: 4 + 4 * ref, scale=4)
    h = model.hparams
    assert (h.image_size, h.projector_hidden, h.projection_dim, h.predictor_hidden) == (16, 24, 8, 20)
    assert model.backbone.embed_dim == 32  # ResNet-18 of width 4
