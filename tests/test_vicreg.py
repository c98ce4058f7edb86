"""VICReg: the loss and its coefficients on the projector's outputs, the variance term that forbids
collapse, the loss goes down on a fixed batch, bad input fails clearly."""

import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS

from core.losses import vicreg_loss
from core.optim import LARS
from core.resnet import ResNet
from recipes.vicreg import bench
from recipes.vicreg.model import VICReg
from conftest import assert_same_as_reference, assert_same_siamese_bench_steps, bench_steps, noisy_views

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


def tiny_vicreg(**kw):
    torch.manual_seed(0)
    return VICReg(ResNet(18, small_images=True, width=4), image_size=16, **{"projector_dims": [32, 16], **kw})


def views(n=16, seed=0):
    return noisy_views(n, seed=seed)


def test_loss_is_vicreg_on_the_projections_with_the_configured_coefficients():
    model, batch = tiny_vicreg(sim_weight=3.0, var_weight=5.0, cov_weight=7.0), views()
    z1, z2 = [model.projector(model.backbone(x)) for x in batch["views"]]
    torch.testing.assert_close(model.training_step(batch, 0), vicreg_loss(z1, z2, 3.0, 5.0, 7.0))


def test_collapsed_embeddings_pay_the_full_variance_hinge_and_are_reported():
    model = tiny_vicreg(sim_weight=0.0, var_weight=1.0, cov_weight=0.0)
    torch.nn.init.zeros_(model.projector[-1].weight)  # every input projects to the bias
    with pytest.warns(UserWarning, match="embeddings have collapsed"):
        loss = model.training_step(views(), 0)
    # std = sqrt(0 + 1e-4) = 0.01 in every dimension, for both views: relu(1 - 0.01) / 2 twice.
    assert loss.item() == pytest.approx(0.99)


def test_loss_goes_down_on_a_fixed_batch():
    model, batch = tiny_vicreg(), views()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match=r"batch\['views'\], 2 views"):
        tiny_vicreg().training_step({"image": torch.randn(2, 3, 16, 16)}, 0)
    with pytest.raises(ValueError, match="set up for 16x16"):
        tiny_vicreg().training_step({"views": [torch.randn(2, 3, 8, 8)] * 2}, 0)
    with pytest.raises(ValueError, match="embed_dim"):
        VICReg(torch.nn.Linear(3, 4))


def test_same_loss_and_gradients_as_lightlys_vicreg():
    """The recipe's VICReg against lightly's example on the same backbone (recipes/vicreg/bench.py), from the
    same weights: the benchmark compares one method done two ways."""
    assert_same_as_reference(tiny_vicreg(projector_dims=[32, 32, 32]), bench, views())
    with pytest.raises(ValueError, match="projector_dims"):
        bench.reference_for(tiny_vicreg())  # [32, 16]: lightly's head has one width
    bench_steps(bench, ["--width", "4", "--expander", "16", "--batch", "4"])


def test_bench_runs_the_same_vicreg_step_on_both_sides(monkeypatch):
    """recipes/vicreg/bench.py from one command line: the reference (lightly's VICReg) is built to the expander
    asked for and does the work ours does, from the same weights: the same loss and gradients on the same
    views, LARS (ours this recipe's, the reference lightly's) with the same settings on the same parameters,
    under the same precision and device."""
    argv = "--width 4 --image-size 16 --expander 24 --batch 8 --precision bf16-mixed"
    model, _ = assert_same_siamese_bench_steps(monkeypatch, bench, argv.split(), "VICReg", (LARS, LightlyLARS))
    assert model.hparams.image_size == 16 and list(model.hparams.projector_dims) == [24] * 3
