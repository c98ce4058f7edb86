"""Collectives for losses that need the global batch.

Rule of the project: a function that behaves differently across ranks says so in its name and has a test
that compares one process on the concatenated batch with N processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank computed a loss on the same global batch, so the gradient that reaches this rank's
        # slice is the sum over ranks. DDP then averages parameter gradients; together this equals the
        # gradient of one process on the concatenated batch (the same reasoning as open_clip's loss).
        # A copy: autograd may hand the same gradient tensor to other branches, which must not see the sum.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, ...) tensors of all ranks into (world * B, ...), letting gradients flow back to
    each rank's slice. Every rank must pass the same batch size. Identity without a process group."""
    rank, size = world()
    if size == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"gather_with_grad needs equal batch sizes on every rank, got {[int(s) for s in sizes]}")
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average of `x` over ranks, no gradient (e.g. DINO's teacher center)."""
    _, size = world()
    if size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / size
