"""Momentum (EMA) target networks: BYOL (Grill et al. 2020), DINO (Caron et al. 2021)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.schedules import cosine_ramp


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` to be updated only by `update_momentum`."""
    target = copy.deepcopy(model)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def update_momentum(model: nn.Module, target: nn.Module, m: float, copy_buffers: bool = True) -> None:
    """target = m * target + (1 - m) * model, for parameters; buffers (BatchNorm statistics) are copied
    unless ``copy_buffers=False``, which leaves the target the statistics of its own forward passes (DINO's
    teacher: the student's are moved by the local crops too, which the teacher never sees)."""
    t_params = list(target.parameters())
    o_params = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, o_params, alpha=1 - m)
    if copy_buffers:
        for t_buf, o_buf in zip(target.buffers(), model.buffers()):
            t_buf.copy_(o_buf)


def cosine_momentum(step: int, max_steps: int, base: float = 0.996, end: float = 1.0) -> float:
    """BYOL's schedule: m = end - (end - base) * (cos(pi * step / max_steps) + 1) / 2."""
    return cosine_ramp(min(step, max_steps) / max(max_steps, 1), base, end)
