"""Barlow Twins: the loss on the projector's outputs, the two learning rates of LARS, the cross-correlation
goes to the identity on a fixed batch, bad input fails clearly."""

import os

import lightning as L
import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS

from core.augment import ImageEval, TwoViews
from core.data import ShardDataModule
from core.losses import barlow_twins_loss
from core.optim import LARS
from core.resnet import ResNet
from recipes.barlowtwins import bench
from recipes.barlowtwins.model import BarlowTwins
from conftest import assert_same_as_reference, assert_same_siamese_bench_steps, bench_steps, noisy_views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


def tiny_barlow(**kw):
    torch.manual_seed(0)
    return BarlowTwins(ResNet(18, small_images=True, width=4), image_size=16, **{"projector_dims": [32, 16], **kw})


def views(n=16, seed=0):
    return noisy_views(n, seed=seed)


def embeddings(model, batch):
    return [model.projector(model.backbone(x)) for x in batch["views"]]


def cross_correlation(z1, z2):
    z1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    z2 = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    return z1.T @ z2 / z1.shape[0]


def test_loss_is_barlow_twins_on_the_projections_with_lambda():
    model, batch = tiny_barlow(lambd=0.02), views()
    z1, z2 = embeddings(model, batch)
    torch.testing.assert_close(model.training_step(batch, 0), barlow_twins_loss(z1, z2, lambd=0.02))
    assert z1.shape == (16, 16)


def test_cross_correlation_goes_to_the_identity_on_a_fixed_batch():
    model, batch = tiny_barlow(), views()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = (cross_correlation(*embeddings(model, batch)) - torch.eye(16)).pow(2).sum()
    for _ in range(40):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = (cross_correlation(*embeddings(model, batch)) - torch.eye(16)).pow(2).sum()
    assert end < 0.3 * start


@pytest.mark.timeout(60)
def test_weights_and_biases_get_their_own_scaled_learning_rates(monkeypatch):
    monkeypatch.chdir(ROOT)
    data = ShardDataModule(
        "data/demo/image/train-000000.tar", batch_size=8, num_workers=0, samples_per_epoch=16,
        train_transform=TwoViews(16, scale=(0.3, 1.0)), val_transform=ImageEval(16),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = tiny_barlow(lr_weights=0.2, lr_biases=0.0048, weight_decay=1.5e-6)
    trainer.fit(model, datamodule=data)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LARS)
    weights, biases = optimizer.param_groups
    assert weights["initial_lr"] == pytest.approx(0.2 * 8 / 256) and biases["initial_lr"] == pytest.approx(0.0048 * 8 / 256)
    assert weights["weight_decay"] == 1.5e-6 and not weights["lars_exclude"]
    assert biases["weight_decay"] == 0 and biases["lars_exclude"]
    assert all(p.ndim >= 2 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(model.parameters()))


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match=r"batch\['views'\], 2 views"):
        tiny_barlow().training_step({"views": [torch.randn(2, 3, 16, 16)]}, 0)
    with pytest.raises(ValueError, match="projector_dims"):
        BarlowTwins(ResNet(18, width=4), projector_dims=[])


def test_official_codes_gradient_over_w_equals_weight_decay_times_w_and_bias_rate_over_w():
    """The README's recipe for the official code's dynamics on W GPUs, where its gradient is the global one / W."""
    world, generator = 32, torch.Generator().manual_seed(0)
    start = [torch.randn(8, 4, generator=generator), torch.randn(8, generator=generator)]  # a weight, a bias
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]

    def run(grad_scale, weight_decay, lr_biases):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = LARS(
            [{"params": [params[0]]}, {"params": [params[1]], "lr": lr_biases, "weight_decay": 0.0, "lars_exclude": True}],
            lr=0.2, weight_decay=weight_decay,
        )  # fmt: skip
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g * grad_scale
            optimizer.step()
        return params

    official = run(1 / world, 1.5e-6, 0.0048)
    here = run(1.0, 1.5e-6 * world, 0.0048 / world)
    for a, b in zip(official, here):
        torch.testing.assert_close(a, b)


def test_same_loss_and_gradients_as_lightlys_barlow_twins(monkeypatch):
    """The recipe's Barlow Twins against lightly's example on the same backbone (recipes/barlowtwins/bench.py),
    from the same weights: the benchmark compares one method done two ways. lightly standardises with
    BatchNorm, eps 1e-5 on the variance, which on these tiny projections moves the gradients by a few percent;
    with that eps at 1e-12 the two agree to float rounding."""
    import lightly.loss.barlow_twins_loss as lightly_barlow

    monkeypatch.setattr(lightly_barlow, "_normalize", lambda z: torch.nn.functional.batch_norm(z, None, None, training=True, eps=1e-12))
    assert_same_as_reference(tiny_barlow(projector_dims=[32, 32, 16]), bench, views())
    with pytest.raises(ValueError, match="projector_dims"):
        bench.reference_for(tiny_barlow())  # [32, 16]: lightly's head has 3 layers
    bench_steps(bench, ["--width", "4", "--projector", "16", "--batch", "4"])


def test_bench_runs_the_same_barlow_twins_step_on_both_sides(monkeypatch):
    """recipes/barlowtwins/bench.py from one command line: the reference (lightly's Barlow Twins) is built to the
    sizes asked for and does the work ours does, from the same weights: the same loss and gradients on the
    same views (lightly's standardisation eps set near 0, as above), LARS (ours this recipe's, the reference
    lightly's) with the same settings (the biases' own rate included) on the same parameters, under the same
    precision and device; and `reference_for` carries the model's lambda."""
    import lightly.loss.barlow_twins_loss as lightly_barlow

    monkeypatch.setattr(lightly_barlow, "_normalize", lambda z: torch.nn.functional.batch_norm(z, None, None, training=True, eps=1e-12))
    argv = "--width 4 --image-size 16 --projector 24 --batch 8 --precision bf16-mixed"
    # Gradients of up to 100 here, a few rounded apart by 2e-5.
    model, _ = assert_same_siamese_bench_steps(monkeypatch, bench, argv.split(), "BarlowTwins", (LARS, LightlyLARS), rtol=1e-5, atol=1e-4)
    assert model.hparams.image_size == 16 and list(model.hparams.projector_dims) == [24] * 3
    assert bench.reference_for(tiny_barlow(projector_dims=[32, 32, 16], lambd=0.02)).criterion.lambda_param == 0.02
