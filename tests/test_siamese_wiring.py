"""The siamese recipes' wiring that their loss and reference tests cannot see: the optimizers and schedules
they configure (groups, decay, LARS adaptation, lr scaling, warmup, floor), DINO's schedules inside
optimizer_step / on_before_optimizer_step, and the tensor the collapse monitor reads. Each builds the module
on a stand-in trainer that holds only what configure_optimizers / the step hooks read. Each test was written
against mutants that the rest of the suite let through."""

from types import SimpleNamespace

import pytest
import torch

from core.optim import LARS
from core.resnet import ResNet
from core.schedules import cosine_ramp
from recipes.barlowtwins.model import BarlowTwins
from recipes.byol.model import BYOL
from recipes.simsiam.model import SimSiam
from recipes.vicreg.model import VICReg
import test_dino
from conftest import noisy_views

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


def attach(model, **kw):
    """A stand-in trainer: batch 64 on 2 ranks with 4 accumulated batches (an effective 512, twice the reference 256), 10 epochs of 10 steps."""
    fields = dict(datamodule=SimpleNamespace(batch_size=64), world_size=2, accumulate_grad_batches=4, estimated_stepping_batches=100,
                  max_epochs=10, max_steps=-1, num_training_batches=10, current_epoch=0, global_step=0)  # fmt: skip
    model._trainer = SimpleNamespace(**{**fields, **kw})
    return model


def resnet():
    torch.manual_seed(0)
    return ResNet(18, small_images=True, width=4)


LARS_RECIPES = {  # name: (model, trainable modules, peak lr of the weights / of the biases, final lr ratio)
    "byol": (lambda: BYOL(resnet(), image_size=16, projector_hidden=32, projection_dim=16, predictor_hidden=32, base_lr=0.2,
                          weight_decay=1.5e-6, lars_trust=0.02, lars_clip=True, warmup_epochs=1), ["backbone", "projector", "predictor"], 0.4, 0.4, 0.0),
    "barlowtwins": (lambda: BarlowTwins(resnet(), image_size=16, projector_dims=[32, 16], lr_weights=0.2, lr_biases=0.0048,
                                        weight_decay=1.5e-6, lars_trust=0.02, lars_clip=True, warmup_epochs=1), ["backbone", "projector"], 0.4, 0.0096, 1e-3),
    "vicreg": (lambda: VICReg(resnet(), image_size=16, projector_dims=[32, 16], base_lr=0.2, weight_decay=1.5e-6, lars_trust=0.02,
                              lars_clip=True, warmup_epochs=1), ["backbone", "projector"], 0.4, 0.4, 1e-3),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LARS_RECIPES))
def test_lars_recipes_configure_their_groups_rates_and_schedule(name):
    build, trainable, lr_w, lr_b, floor = LARS_RECIPES[name]
    model = attach(build())  # effective batch 64 * 2 * 4 = 512: twice the reference 256
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, LARS)
    weights, biases = opt.param_groups
    assert weights["weight_decay"] == 1.5e-6 and not weights["lars_exclude"] and all(p.ndim >= 2 for p in weights["params"])
    assert biases["weight_decay"] == 0 and biases["lars_exclude"] and all(p.ndim == 1 for p in biases["params"])
    assert weights["momentum"] == biases["momentum"] == 0.9 and weights["trust_coefficient"] == 0.02 and weights["clip"]
    online = {id(p) for m in trainable for p in getattr(model, m).parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == online
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([lr_w, lr_b])  # base lr * 512 / 256
    assert sched.lr_lambdas[0](0) == pytest.approx(0.1) and sched.lr_lambdas[0](10) == 1  # one epoch (10 steps) of warmup
    assert sched.lr_lambdas[0](100) == pytest.approx(floor)


def test_simsiam_optimizes_backbone_and_projector_with_a_cosine_and_the_predictor_at_a_fixed_rate():
    model = attach(SimSiam(resnet(), image_size=16, projection_dim=32, predictor_hidden=8, base_lr=0.05, weight_decay=1e-4, warmup_epochs=1))
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    encoder, predictor = opt.param_groups
    assert {id(p) for p in encoder["params"]} == {id(p) for m in (model.backbone, model.projector) for p in m.parameters()}
    assert {id(p) for p in predictor["params"]} == {id(p) for p in model.predictor.parameters()}
    # Weight decay on every parameter, predictor included (the paper's SGD); momentum 0.9; lr 0.05 * 512 / 256.
    assert encoder["weight_decay"] == predictor["weight_decay"] == 1e-4 and encoder["momentum"] == predictor["momentum"] == 0.9
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1])
    assert sched.lr_lambdas[0](0) == pytest.approx(0.1) and sched.lr_lambdas[0](10) == 1 and sched.lr_lambdas[1](0) == 1  # warmup_epochs read


def tiny_dino(**kw):
    return test_dino.tiny_dino(**{"warmup_epochs": 1, "base_lr": 5e-4, "min_lr": 1e-6, **kw})


def test_dino_optimizer_covers_the_prototypes_scales_the_lr_and_ends_at_min_lr():
    model = attach(tiny_dino())
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decayed, plain = opt.param_groups
    assert any(p is model.head.prototypes for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert decayed["initial_lr"] == pytest.approx(1e-3)  # 5e-4 * 512 / 256
    assert sched.lr_lambdas[0](0) == pytest.approx(0.1) and sched.lr_lambdas[0](10) == 1
    assert decayed["initial_lr"] * sched.lr_lambdas[0](100) == pytest.approx(1e-6)  # min_lr is a rate, not a ratio


def test_dino_teacher_temperature_stops_at_teacher_temp_after_the_warmup():
    model = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    temps = [attach(model, current_epoch=e).teacher_temperature() for e in range(6)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])


def test_dino_freezes_the_prototypes_for_whole_epochs_not_steps():
    model = tiny_dino(freeze_last_layer_epochs=1)
    for epoch, step, frozen in [(0, 0, True), (0, 7, True), (1, 1, False)]:
        model.head.prototypes.grad = torch.ones_like(model.head.prototypes)
        attach(model, current_epoch=epoch, global_step=step).on_before_optimizer_step(None)
        assert (model.head.prototypes.grad is None) == frozen, (epoch, step)


def test_dino_optimizer_step_takes_the_weight_decay_of_this_step():
    """The decay the optimizer uses in step k is cosine(k / total), set before the step, not after it."""
    model = attach(tiny_dino(weight_decay=0.04, weight_decay_end=0.4), global_step=50, estimated_stepping_batches=100)
    model.log = lambda *a, **k: None
    opt = model.configure_optimizers()["optimizer"]
    used = []
    opt.step = lambda closure=None: used.append(opt.param_groups[0]["weight_decay"])
    model.teacher_means = [torch.zeros(1, 32)]
    model.optimizer_step(0, 0, opt, None)
    assert used == [pytest.approx(cosine_ramp(0.5, 0.04, 0.4))] and opt.param_groups[1]["weight_decay"] == 0


@pytest.mark.parametrize("name", ["byol", "simsiam", "barlowtwins", "vicreg"])
def test_collapse_monitor_reads_the_projection_of_the_first_view(name, monkeypatch):
    """Monitoring only: the std logged (and warned on) is the online projector's output z1, not the predictor's."""
    import importlib

    module = importlib.import_module(f"recipes.{name}.model")
    seen = []
    monkeypatch.setattr(module, "log_embedding_std", lambda m, z, *a, **k: seen.append(z.detach()))
    model = {"byol": lambda: BYOL(resnet(), image_size=16, projector_hidden=32, projection_dim=16, predictor_hidden=32),
             "simsiam": lambda: SimSiam(resnet(), image_size=16, projection_dim=32, predictor_hidden=8),
             "barlowtwins": lambda: BarlowTwins(resnet(), image_size=16, projector_dims=[32, 16]),
             "vicreg": lambda: VICReg(resnet(), image_size=16, projector_dims=[32, 16])}[name]()  # fmt: skip
    batch = noisy_views(8)
    model.training_step(batch, 0)
    with torch.no_grad():
        torch.testing.assert_close(seen[0], model.projector(model.backbone(batch["views"][0])))


def test_collapse_warning_threshold_is_a_tenth_of_one_over_sqrt_of_the_width():
    """Monitoring only. B=8 rows of width D=64: the threshold is 0.1 / sqrt(64) = 0.0125 (not 0.1 / sqrt(B),
    not 0.01 / sqrt(D)), on the std of the L2-normalised rows."""
    import warnings

    from core.probe import log_embedding_std

    module, g = SimpleNamespace(log=lambda *a, **k: None, _trainer=None), torch.Generator().manual_seed(0)
    nearly = 1 + 0.05 * torch.randn(8, 64, generator=g)  # normalised std ~0.006: collapsed
    spread = 1 + 0.2 * torch.randn(8, 64, generator=g)  # ~0.025: above 0.0125, below 0.1 / sqrt(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert 0.00125 < log_embedding_std(module, nearly).item() < 0.0125
        assert len([w for w in caught if "embeddings have collapsed" in str(w.message)]) == 1
        assert 0.0125 < log_embedding_std(module, spread).item() < 0.035
        assert len([w for w in caught if "embeddings have collapsed" in str(w.message)]) == 1
