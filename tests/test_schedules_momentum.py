"""Learning-rate schedules at their key steps, the EMA target network, weight-decay groups and LARS."""

import copy
import io
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from core.momentum import cosine_momentum, momentum_copy, update_momentum
from core.optim import LARS, param_groups, scaled_lr
from core.schedules import Infinite, WarmupCosine, WarmupStableDecay, step_scheduler, warmup_and_total_steps

# ---------------------------------------------------------------- schedules


def test_warmup_cosine_key_steps():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(1 / 10)
    assert s(4) == pytest.approx(5 / 10)
    assert s(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx((1.0 + 0.1) / 2)  # half way down the cosine
    assert s(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # stays at the floor past the end
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "decay, at_quarter, at_half",
    [
        ("linear", 1 - 0.8 * 0.25, 1 - 0.8 * 0.5),
        ("1-sqrt", 1 - 0.8 * 0.5, 1 - 0.8 * math.sqrt(0.5)),
        ("cosine", 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, 0.2 + 0.8 / 2),
    ],
)
def test_warmup_stable_decay_key_steps(decay, at_quarter, at_half):
    s = WarmupStableDecay(warmup_steps=10, total_steps=100, decay_steps=20, min_ratio=0.2, decay=decay)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == s(50) == s(79) == pytest.approx(1.0)  # the stable phase
    assert s(80) == pytest.approx(1.0)  # the decay starts from the peak
    assert s(85) == pytest.approx(at_quarter)
    assert s(90) == pytest.approx(at_half)
    assert s(100) == pytest.approx(0.2)
    assert s(150) == pytest.approx(0.2)


def test_warmup_stable_decay_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay='exp'"):
        WarmupStableDecay(10, 100, 20, decay="exp")
    with pytest.raises(ValueError, match="total_steps=100"):
        WarmupStableDecay(90, 100, 20)
    WarmupStableDecay(10, 100, 90)  # warmup then decay, no stable phase: allowed
    with pytest.raises(ValueError, match="total_steps=100"):
        WarmupStableDecay(10, 100, 91)  # the decay would start inside the warmup


def test_infinite_without_anneal_stays_constant():
    s = Infinite(warmup_steps=10, cooldown_steps=40, constant_ratio=0.2)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(30) == pytest.approx((1.0 + 0.2) / 2)  # half way through the cooldown
    assert s(50) == pytest.approx(0.2)
    assert s(10_000) == pytest.approx(0.2)


def test_infinite_with_anneal():
    s = Infinite(warmup_steps=10, cooldown_steps=40, constant_ratio=0.2, anneal_at=200, anneal_steps=50, min_ratio=0.0)
    assert s(199) == pytest.approx(0.2)
    assert s(200) == pytest.approx(0.2)
    assert s(225) == pytest.approx(0.1)  # linear anneal, half way
    assert s(250) == pytest.approx(0.0)
    assert s(400) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda offset: WarmupCosine(10, 110, min_ratio=0.1, offset=offset),
        lambda offset: WarmupStableDecay(10, 100, 20, min_ratio=0.1, decay="1-sqrt", offset=offset),
        lambda offset: Infinite(10, 40, constant_ratio=0.2, offset=offset),
    ],
)
def test_offset_rewarms_from_zero(make):
    plain, rewarmed = make(0), make(1000)
    for step in [0, 5, 9, 10, 30, 60, 85, 90, 110, 300]:
        assert rewarmed(1000 + step) == pytest.approx(plain(step))
    assert rewarmed(1000) == pytest.approx(0.1)  # a fresh warmup, not the end of the old schedule
    # Before the re-warm point (e.g. when the scheduler is first built at step 0) the factor is never negative.
    assert all(rewarmed(step) >= 0 for step in range(0, 1000, 50))


def test_infinite_anneal_at_counts_global_steps_with_offset():
    s = Infinite(10, 40, constant_ratio=0.2, anneal_at=1200, anneal_steps=50, offset=1000)
    assert s(1100) == pytest.approx(0.2)
    assert s(1225) == pytest.approx(0.1)
    assert s(1250) == pytest.approx(0.0)


def lrs_from_training(schedule, steps: int, peak_lr: float = 0.5):
    """Run a real optimizer with `step_scheduler` and record the learning rate used at every step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr)
    entry = step_scheduler(opt, schedule)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        before = model.weight.detach().clone()
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        torch.testing.assert_close(model.weight.detach(), before - lrs[-1] * model.weight.grad)
        entry["scheduler"].step()
    return entry, opt, model, lrs


def test_step_scheduler_drives_a_real_optimizer():
    schedule = WarmupCosine(warmup_steps=4, total_steps=12)
    entry, _, _, lrs = lrs_from_training(schedule, 14)
    assert entry["interval"] == "step"
    assert lrs == pytest.approx([0.5 * schedule(i) for i in range(14)])
    assert lrs[3] == pytest.approx(0.5) and lrs[12] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupCosine(4, 20, min_ratio=0.1, offset=2),
        WarmupStableDecay(4, 20, 8, decay="cosine"),
        Infinite(4, 8, constant_ratio=0.3),
        Infinite(4, 8, constant_ratio=0.3, anneal_at=10, anneal_steps=4),
    ],
)
def test_scheduler_state_round_trips_with_weights_only(schedule):
    entry, opt, model, _ = lrs_from_training(schedule, 7)
    buffer = io.BytesIO()
    torch.save({"scheduler": entry["scheduler"].state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    # A fresh scheduler built with other settings takes the saved step and keeps its own settings: a resumed
    # run follows the schedule of its config (a re-warm's offset, an anneal_at set for the run that ends).
    # Its peak learning rate too: this run's config may scale it for another batch.
    new_opt = torch.optim.SGD(model.parameters(), lr=0.5)
    new_opt.load_state_dict(state["optimizer"])
    resumed = type(schedule)(**{**vars(schedule), "offset": 7})
    fresh = step_scheduler(new_opt, resumed)
    fresh["scheduler"].load_state_dict({**state["scheduler"], "base_lrs": [0.25]})  # a checkpoint of a run at 0.25
    assert fresh["scheduler"].base_lrs == [0.5]
    assert fresh["scheduler"].last_epoch == 7
    assert fresh["scheduler"].lr_lambdas[0] is resumed and resumed.offset == 7
    lrs = []
    for step in range(8, 12):
        new_opt.step()
        fresh["scheduler"].step()
        lrs.append(new_opt.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(0.5 * resumed(step))
    assert lrs[0] == pytest.approx(0.5 * 2 / 4) != 0.5 * schedule(8)  # the second step of a new warmup


def test_the_first_resumed_step_takes_this_runs_rate():
    # Lightning builds the optimizer and scheduler from the config, then restores the optimizer's state (its
    # rates, the checkpoint run's) and then the scheduler's: the rate must be the config's from that step on.
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = step_scheduler(opt, WarmupCosine(0, 10))["scheduler"]
    for _ in range(5):
        opt.step()
        scheduler.step()
    new_opt = torch.optim.SGD(model.parameters(), lr=2.0)  # this run's config doubles the peak
    new_scheduler = step_scheduler(new_opt, WarmupCosine(0, 10))["scheduler"]
    new_opt.load_state_dict(opt.state_dict())
    new_scheduler.load_state_dict(scheduler.state_dict())
    assert new_opt.param_groups[0]["lr"] == pytest.approx(2.0 * WarmupCosine(0, 10)(5))
    assert new_scheduler.get_last_lr() == [new_opt.param_groups[0]["lr"]]


class Steps(L.LightningModule):
    """Records the warmup and total steps `warmup_and_total_steps` gives (one epoch of warmup by default)."""

    def __init__(self, warmup_epochs: float = 1):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.warmup_epochs = warmup_epochs

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        self.steps = warmup_and_total_steps(self.trainer, self.warmup_epochs)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def steps_of(warmup_epochs: float = 1, **limits) -> tuple[tuple[int, int], int]:
    """(warmup, total) steps as `warmup_and_total_steps` counts them, and the steps taken, for 5 batches an
    epoch accumulated by 2: 3 optimizer steps an epoch, as Lightning steps on the last, partial one."""
    model = Steps(warmup_epochs)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 2)), batch_size=1)
    trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **limits)  # fmt: skip
    trainer.fit(model, loader)
    return model.steps, trainer.global_step


@pytest.mark.parametrize(
    "limits, total",
    [({"max_epochs": 2}, 6), ({"max_epochs": -1, "max_steps": 6}, 6), ({"max_epochs": 2, "max_steps": 4}, 4)],  # the last: a config's epochs cut short on the command line
)
def test_warmup_counts_the_optimizer_steps_of_an_epoch_however_the_run_is_bounded(limits, total):
    assert steps_of(**limits) == ((3, total), total)


def test_a_fractional_warmup_rounds_to_the_nearest_step():
    assert steps_of(0.9, max_epochs=2) == ((3, 6), 6)  # 2.7 steps: 3, not 2


def test_a_run_without_a_length_is_told_to_set_one():
    model = Steps()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 2)), batch_size=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_time="00:00:01:00", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="max_epochs / trainer.max_steps: the schedules need the run's length"):
        trainer.fit(model, loader)


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield (torch.randn(2),)


@pytest.mark.parametrize("warmup_epochs", [1, 0])
def test_a_loader_without_a_length_needs_a_warmup_in_steps(warmup_epochs):
    """A max_steps run over an iterable without __len__ has no epoch to count a warmup in."""
    model = Steps(warmup_epochs)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    loader = torch.utils.data.DataLoader(Endless(), batch_size=2)
    if warmup_epochs:
        with pytest.raises(ValueError, match="a warmup of 1 epochs needs the epoch's length"):
            trainer.fit(model, loader)
    else:
        trainer.fit(model, loader)
        assert model.steps == (0, 4) and trainer.global_step == 4


# ---------------------------------------------------------------- momentum


def tiny_net():
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_update_momentum_exact_values_and_buffers():
    torch.manual_seed(0)
    model = tiny_net()
    target = momentum_copy(model)
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(torch.randn_like(p))
    old_target = {k: v.numpy().copy() for k, v in target.state_dict().items()}
    model.train()
    model(torch.randn(5, 3) * 4 + 1)  # moves the BatchNorm running statistics of the online model only
    update_momentum(model, target, m=0.9)

    online = dict(model.named_parameters())
    for name, p in target.named_parameters():
        o, t0 = online[name].detach().numpy(), old_target[name]
        expected = np.array([0.9 * t0.flat[i] + 0.1 * o.flat[i] for i in range(t0.size)]).reshape(t0.shape)
        np.testing.assert_allclose(p.numpy(), expected, rtol=1e-6, atol=1e-7)
    for name, buf in target.named_buffers():
        assert torch.equal(buf, dict(model.named_buffers())[name]), name
    assert int(target[1].num_batches_tracked) == 1
    assert not np.allclose(target[1].running_mean.numpy(), old_target["1.running_mean"])


def test_update_momentum_can_leave_the_targets_buffers_alone():
    torch.manual_seed(0)
    model = tiny_net()
    target = momentum_copy(model)
    model(torch.randn(5, 3) * 4 + 1)
    update_momentum(model, target, m=0.5, copy_buffers=False)
    assert torch.equal(target[1].running_mean, torch.zeros(2)) and int(target[1].num_batches_tracked) == 0


def test_update_momentum_m_one_keeps_target_and_m_zero_copies():
    torch.manual_seed(0)
    model, other = tiny_net(), tiny_net()
    target = momentum_copy(other)
    before = [p.clone() for p in target.parameters()]
    update_momentum(model, target, m=1.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), before))
    update_momentum(model, target, m=0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), model.parameters()))


def test_update_momentum_records_no_autograd_history_even_for_a_trainable_target():
    # A target that still requires grad (a plain deepcopy) must be updated in place outside autograd, not raise.
    torch.manual_seed(0)
    model, target = tiny_net(), tiny_net()
    update_momentum(model, target, m=0.5)
    assert all(p.is_leaf and p.grad_fn is None for p in target.parameters())


def test_momentum_copy_is_frozen_and_independent():
    model = tiny_net()
    target = momentum_copy(model)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in model.parameters())
    out = target(torch.randn(4, 3))
    assert not out.requires_grad
    assert all(p.grad is None for p in target.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight, target[0].weight)


def test_cosine_momentum_key_steps():
    assert cosine_momentum(0, 100, base=0.99, end=1.0) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, base=0.99, end=1.0) == pytest.approx(0.995)
    assert cosine_momentum(25, 100, base=0.99, end=1.0) == pytest.approx(1.0 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_momentum(100, 100, base=0.99, end=1.0) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, base=0.99, end=1.0) == pytest.approx(1.0)


def test_cosine_momentum_defaults_to_byols_base_and_takes_a_run_without_steps():
    # BYOL's tau_base is 0.996; a schedule of zero steps must not divide by zero.
    assert cosine_momentum(0, 100) == pytest.approx(0.996) and cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0, 0, base=0.99) == pytest.approx(0.99)


# ---------------------------------------------------------------- optimizer


def test_param_groups_split_one_dim_params_out():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(4), nn.Linear(4, 3), nn.BatchNorm1d(3))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    expected_no_decay = [model[0].bias, model[1].weight, model[1].bias, model[2].bias, model[3].weight, model[3].bias]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected_no_decay}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert no_decay["lars_exclude"] and not decay.get("lars_exclude", False)

    decay, no_decay = param_groups(model, weight_decay=0.05, skip={"2.weight"})  # a paper's no-decay list, by name
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert any(p is model[2].weight for p in no_decay["params"])
    with pytest.raises(ValueError, match=r"no parameters named \['2.wieght'\]"):
        param_groups(model, weight_decay=0.05, skip={"2.wieght"})


def lars_by_hand(w, b, grads, lr, momentum, wd, eta, clip=False):
    """Two LARS steps on a weight (adapted, decayed) and a bias (excluded), elementwise in numpy; with
    ``clip``, apex LARC's clip mode: adaptive_lr = min(adaptive_lr / lr, 1)."""
    w, b = w.copy(), b.copy()
    buf_w, buf_b = None, None
    for g_w, g_b in grads:
        update = g_w + wd * w
        trust = eta * math.sqrt((w**2).sum()) / math.sqrt((update**2).sum())
        if clip:
            trust = min(trust / lr, 1.0)
        update = update * trust
        buf_w = update if buf_w is None else momentum * buf_w + update
        buf_b = g_b if buf_b is None else momentum * buf_b + g_b
        w = w - lr * buf_w
        b = b - lr * buf_b
    return w, b


@pytest.mark.parametrize(
    "clip, grad_scale, lr",
    [(False, 1.0, 0.5), (True, 1.0, 0.5), (True, 1e-3, 0.05)],
    ids=["no clip", "clip, large grad (scaled rate)", "clip, small grad (capped at lr)"],
)
def test_lars_two_steps_against_hand_computation(clip, grad_scale, lr):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    w0, b0 = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    opt = LARS(param_groups(layer, weight_decay=0.1), lr=lr, momentum=0.9, trust_coefficient=0.02, clip=clip)
    grads = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        layer.weight.grad = grad_scale * torch.randn(2, 3, generator=g, dtype=torch.float64)
        layer.bias.grad = torch.randn(2, generator=g, dtype=torch.float64)
        grads.append((layer.weight.grad.numpy().copy(), layer.bias.grad.numpy().copy()))
        opt.step()
    first_trust = 0.02 * np.linalg.norm(w0) / np.linalg.norm(grads[0][0] + 0.1 * w0)
    assert (first_trust > lr) == (grad_scale < 1)  # each case is in the regime its id names
    w, b = lars_by_hand(w0, b0, grads, lr=lr, momentum=0.9, wd=0.1, eta=0.02, clip=clip)
    np.testing.assert_allclose(layer.weight.detach().numpy(), w, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.detach().numpy(), b, rtol=1e-12)


@pytest.mark.parametrize("clip", [False, True])
def test_lars_steps_each_parameter_of_a_group_as_it_would_alone(clip):
    """The step runs a group's parameters together (foreach kernels): each must still get its own trust
    ratio and momentum, as in a group of its own; a parameter without a gradient is left alone."""
    torch.manual_seed(0)
    together = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 2)).double()
    alone = copy.deepcopy(together)
    options = dict(lr=0.3, momentum=0.9, trust_coefficient=0.02, clip=clip)
    opt_together = LARS(param_groups(together, weight_decay=0.1), **options)
    opt_alone = LARS([{**group, "params": [p]} for group in param_groups(alone, weight_decay=0.1) for p in group["params"]], **options)
    unstepped = together[3].bias.detach().clone()
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(together.parameters(), alone.parameters()):
            a.grad = (10.0 ** torch.randint(-3, 2, (), generator=g)) * torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        together[3].bias.grad = alone[3].bias.grad = None
        opt_together.step()
        opt_alone.step()
    for (name, a), b in zip(together.named_parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=name)
    assert torch.equal(together[3].bias, unstepped)  # never a gradient: no buffer, no move
    assert together[3].bias not in opt_together.state


def test_lars_leaves_a_weight_alone_whose_gradient_and_decay_are_zero():
    """A dead layer or unused branch without weight decay: its update's norm is 0, and a trust ratio of
    ||w|| / 0 would turn the weight, and the momentum buffer after it, into NaN."""
    w = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.zeros(2, 2)
    opt = LARS([w], lr=0.1, weight_decay=0.0, trust_coefficient=0.001)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2))
    w.grad = torch.ones(2, 2)
    opt.step()
    assert w.isfinite().all()


def test_the_scaled_learning_rate_counts_every_rank_and_accumulated_batch():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=64), world_size=8, accumulate_grad_batches=2)
    assert scaled_lr(1.5e-4, trainer) == pytest.approx(1.5e-4 * 64 * 8 * 2 / 256)  # an effective batch of 1,024
    trainer.accumulate_grad_batches = 1
    assert scaled_lr(1.5e-4, trainer) == pytest.approx(1.5e-4 * 64 * 8 / 256)
    trainer.world_size = 1
    assert scaled_lr(1.5e-4, trainer, reference_batch=64) == pytest.approx(1.5e-4)


def test_lars_zero_weight_uses_unit_trust():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.1, trust_coefficient=0.001).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))
