"""SimSiam: the stop-gradient on both branches, the predictor's fixed learning rate, the loss goes down on a
fixed batch, bad input fails clearly."""

import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from core.augment import ImageEval, TwoViews
from core.data import ShardDataModule
from core.resnet import ResNet
from recipes.simsiam import bench
from recipes.simsiam.model import SimSiam
from conftest import assert_same_as_reference, assert_same_siamese_bench_steps, bench_steps, noisy_views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


def tiny_simsiam(**kw):
    torch.manual_seed(0)
    return SimSiam(ResNet(18, small_images=True, width=4), image_size=16, projection_dim=32, predictor_hidden=8, **kw)


def views(n=8, seed=0):
    return noisy_views(n, seed=seed)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def symmetric_loss(model, batch, stop_gradient: bool):
    x1, x2 = batch["views"]
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2


def test_loss_is_the_symmetric_negative_cosine_with_stop_gradient():
    model, batch = tiny_simsiam(), views()
    got = grads_of(model, model.training_step(batch, 0))
    # BatchNorm statistics are the same in every forward pass here, so the three losses see the same features.
    expected = grads_of(model, symmetric_loss(model, batch, stop_gradient=True))
    without = grads_of(model, symmetric_loss(model, batch, stop_gradient=False))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert any(not torch.allclose(g, w) for g, w in zip(got, without)), "the stop-gradient would change nothing"


class LearningRates(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append([group["lr"] for group in trainer.optimizers[0].param_groups])


@pytest.mark.timeout(60)
def test_predictor_keeps_its_learning_rate_while_the_encoder_follows_a_cosine(monkeypatch):
    monkeypatch.chdir(ROOT)
    data = ShardDataModule(
        "data/demo/image/train-000000.tar", batch_size=8, num_workers=0, samples_per_epoch=32,
        train_transform=TwoViews(16, scale=(0.3, 1.0)), val_transform=ImageEval(16),
    )  # fmt: skip
    lrs = LearningRates()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[lrs],
    )  # fmt: skip
    trainer.fit(tiny_simsiam(base_lr=0.05), datamodule=data)
    peak = 0.05 * 8 / 256  # the linear scaling rule
    encoder, predictor = zip(*lrs.rows)
    assert predictor == (pytest.approx(peak),) * 4
    assert encoder[0] < peak and all(a > b for a, b in zip(encoder, encoder[1:]))  # cosine decay, step by step
    assert trainer.optimizers[0].defaults["weight_decay"] == 1e-4


def test_loss_goes_down_on_a_fixed_batch():
    model, batch = tiny_simsiam(), views()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert -1 <= min(losses) and losses[-1] < losses[0] - 0.3


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match=r"batch\['views'\], 2 views"):
        tiny_simsiam().training_step({"image": torch.randn(2, 3, 16, 16)}, 0)
    with pytest.raises(ValueError, match="set up for 16x16"):
        tiny_simsiam().training_step({"views": [torch.randn(2, 3, 32, 32)] * 2}, 0)
    with pytest.raises(ValueError, match="embed_dim"):
        SimSiam(torch.nn.Linear(3, 4))


def test_same_loss_and_gradients_as_lightlys_simsiam():
    """The recipe's SimSiam against lightly's example on the same backbone (recipes/simsiam/bench.py), from the
    same weights: the benchmark compares one method done two ways."""
    assert_same_as_reference(tiny_simsiam(), bench, views())
    bench_steps(bench, ["--width", "4", "--projection-dim", "16", "--predictor-hidden", "8", "--batch", "4"])


def test_bench_runs_the_same_simsiam_step_on_both_sides(monkeypatch):
    """recipes/simsiam/bench.py from one command line: the reference (lightly's SimSiam) is built to the sizes
    asked for and does the work ours does, from the same weights: the same loss and gradients on the same
    views, SGD with the same settings on the same parameters, under the same precision and device."""
    argv = "--width 4 --image-size 16 --projection-dim 24 --predictor-hidden 6 --batch 6 --precision bf16-mixed"
    model, _ = assert_same_siamese_bench_steps(monkeypatch, bench, argv.split(), "SimSiam", (torch.optim.SGD, torch.optim.SGD))
    assert (model.hparams.image_size, model.hparams.projection_dim, model.hparams.predictor_hidden) == (16, 24, 6)
