"""Optimizer pieces shared by recipes: weight-decay parameter groups and LARS."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from core.fsdp import local_tensors, whole_norms


def decayed(p: torch.Tensor) -> bool:
    """Weight decay applies to weights of 2+ dims, not to biases and norm parameters (1 dim), as in MAE,
    BYOL and most of the field."""
    return p.ndim >= 2


def param_groups(module: nn.Module, weight_decay: float, skip: Collection[str] = ()) -> list[dict]:
    """Two groups: the `decayed` parameters and the rest, which also takes the parameters named in `skip`
    (a paper's no-weight-decay list, e.g. VideoMAE's mask token). The no-decay group is also excluded from
    LARS adaptation."""
    unknown = set(skip) - {name for name, _ in module.named_parameters()}
    if unknown:
        raise ValueError(f"param_groups: no parameters named {sorted(unknown)}")
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if decayed(p) and name not in skip else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., "Large Batch Training of
    Convolutional Networks", 2017), as BYOL, Barlow Twins and VICReg use it: each parameter's update is
    scaled by trust * ||w|| / ||grad + wd * w||; groups with `lars_exclude` (biases, norms) skip both the
    scaling and weight decay.

    clip: LARC's clip mode (NVIDIA apex; solo-learn's ``clip_lr``, on in its CIFAR configs): the scaled
    rate is capped at the global one, lr * min(trust * ||w|| / ||u|| / lr, 1), so a layer takes plain
    SGD steps (lr * u) until they would exceed trust * ||w||. Without it every adapted layer moves by
    lr * trust * ||w|| per step whatever its gradient's size."""

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001, clip: bool = False
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, clip=clip, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # A group's parameters in a handful of fused (foreach) kernels, not a dozen small ones each.
            updates = [p.grad for p in params]
            if not group["lars_exclude"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])  # new tensors
                w_norm, u_norm = whole_norms(params), whole_norms(updates)  # (P,), of whole tensors under FSDP too
                trust = group["trust_coefficient"] * w_norm / u_norm
                if group["clip"]:
                    trust = (trust / group["lr"]).clamp(max=1.0)
                trust = torch.where((w_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust))
                torch._foreach_mul_(local_tensors(updates), list(trust.unbind()))
            for p in params:
                if "momentum_buffer" not in self.state[p]:  # zero: after its first step it holds the first update
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def scaled_lr(base_lr: float, trainer, reference_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD", 2017) that MAE, BYOL and DINO
    state their learning rates in: lr = base_lr * effective_batch / 256, where the effective batch counts
    every rank and gradient accumulation. Reads the batch size from the trainer's datamodule."""
    batch = trainer.datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    return base_lr * batch / reference_batch
