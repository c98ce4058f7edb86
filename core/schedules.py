"""Learning-rate schedules as per-step multipliers of the peak learning rate.

Each schedule is a small dataclass: `schedule(step) -> factor`. Use one from any recipe with
`step_scheduler(optimizer, schedule)`. Fields are plain numbers so the scheduler's state stays loadable
with `torch.load(weights_only=True)`.

`offset` re-warms: the schedule runs on `step - offset`, so a run continued from a checkpoint at step
`offset` warms up again from zero (Gupta et al., "Continual Pre-Training of Large Language Models: How to
(re)warm your model?", 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _linear_warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """Half a cosine from `start` (progress 0) to `end` (progress 1 and after): the learning rate's decay, the
    EMA momentum of BYOL and DINO (`core.momentum.cosine_momentum`) and DINO's weight decay."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """Linear warmup to the peak, then half a cosine down to `min_ratio` at `total_steps`
    (Loshchilov & Hutter, "SGDR", 2017; the schedule of MAE, BYOL, DINO)."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0
    offset: int = 0

    def __call__(self, step: int) -> float:
        step = max(step - self.offset, 0)  # steps before a re-warm never give a negative rate
        if step < self.warmup_steps:
            return _linear_warmup(step, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return cosine_ramp(progress, 1.0, self.min_ratio)


@dataclass
class WarmupStableDecay:
    """Warmup, a long constant phase, then a short decay over the last `decay_steps` (Hu et al., "MiniCPM",
    2024; Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", 2024,
    who find the "1-sqrt" decay best). Checkpoints from the stable phase can be continued at no cost."""

    warmup_steps: int
    total_steps: int
    decay_steps: int
    min_ratio: float = 0.0
    decay: str = "1-sqrt"  # "linear", "1-sqrt" or "cosine"
    offset: int = 0

    def __post_init__(self):
        if self.decay not in ("linear", "1-sqrt", "cosine"):
            raise ValueError(f"decay={self.decay!r} must be 'linear', '1-sqrt' or 'cosine'")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"warmup_steps + decay_steps ({self.warmup_steps} + {self.decay_steps}) exceed total_steps={self.total_steps}")

    def __call__(self, step: int) -> float:
        step = max(step - self.offset, 0)
        decay_start = self.total_steps - self.decay_steps
        if step < self.warmup_steps:
            return _linear_warmup(step, self.warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(self.decay_steps, 1), 1.0)
        if self.decay == "cosine":
            return cosine_ramp(progress, 1.0, self.min_ratio)
        shape = progress if self.decay == "linear" else math.sqrt(progress)
        return 1.0 - (1.0 - self.min_ratio) * shape


@dataclass
class Infinite:
    """The infinite schedule (Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large
    Language Models", 2024): warmup, cosine cooldown to `constant_ratio`, then constant for as long as new
    data comes; an annealing phase to `min_ratio` over `anneal_steps` starts at `anneal_at` when you want a
    finished model (set it in the config of the run that should end, or leave None to keep going)."""

    warmup_steps: int
    cooldown_steps: int
    constant_ratio: float = 0.1
    anneal_at: int | None = None
    anneal_steps: int = 0
    min_ratio: float = 0.0
    offset: int = 0

    def __call__(self, step: int) -> float:
        step = max(step - self.offset, 0)
        if step < self.warmup_steps:
            return _linear_warmup(step, self.warmup_steps)
        if self.anneal_at is not None and step >= self.anneal_at - self.offset:
            progress = (step - (self.anneal_at - self.offset)) / max(self.anneal_steps, 1)
            return self.constant_ratio + (self.min_ratio - self.constant_ratio) * min(progress, 1.0)
        progress = (step - self.warmup_steps) / max(self.cooldown_steps, 1)
        return cosine_ramp(progress, 1.0, self.constant_ratio)


class ConfiguredLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """`LambdaLR` whose checkpoint restores the step count, not the schedule: a resumed run follows the
    schedule its own config builds. Plain `LambdaLR` copies a callable schedule's saved fields over the new
    one, so `offset` (a re-warm) or `anneal_at` set for the resumed run would be silently replaced by the
    checkpoint's, and its peak learning rates (`base_lrs`) over the ones this run's config scales. The
    optimizer's restored rates, the checkpoint's, are replaced too: its first resumed step takes this run's."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas), "base_lrs": self.base_lrs})
        rates = [base * schedule(self.last_epoch) for base, schedule in zip(self.base_lrs, self.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self._last_lr = rates


def step_scheduler(optimizer: torch.optim.Optimizer, schedule) -> dict:
    """The `lr_scheduler` entry of `configure_optimizers`: `schedule` applied after every optimizer step."""
    return {"scheduler": ConfiguredLambdaLR(optimizer, schedule), "interval": "step"}


def warmup_and_total_steps(trainer, warmup_epochs: float) -> tuple[int, int]:
    """Optimizer steps of the warmup and of the whole run, from the trainer's limits (max_epochs or
    max_steps) and the epoch length. Papers give warmup in epochs; schedules count steps."""
    if math.isinf(trainer.estimated_stepping_batches):
        raise ValueError("trainer.max_epochs / trainer.max_steps: the schedules need the run's length; set one of them")
    total = int(trainer.estimated_stepping_batches)
    if trainer.max_epochs and trainer.max_epochs > 0 and trainer.max_steps in (-1, None):
        per_epoch = total / trainer.max_epochs
    else:
        if math.isinf(trainer.num_training_batches):  # a max_steps-only run has not loaded its train loader yet
            trainer.fit_loop.setup_data()
        if math.isinf(trainer.num_training_batches):
            if not warmup_epochs:
                return 0, total
            raise ValueError(
                f"a warmup of {warmup_epochs} epochs needs the epoch's length, and the train loader has none: give it a "
                "__len__ (core.data.ShardDataModule's has one, from data.samples_per_epoch) or set the model's warmup_epochs to 0"
            )
        # Lightning also steps on an epoch's last, partial accumulation, as estimated_stepping_batches counts.
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    return int(round(warmup_epochs * per_epoch)), total
