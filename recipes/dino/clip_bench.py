"""How long does DINO's per-parameter gradient clipping take under FSDP?

DINO clips each parameter's gradient to its own norm. Under FSDP each rank holds a shard of every gradient
(a DTensor), so each norm needs the other ranks' shards. `clip_each_gradient` (model.py) takes all the
shards' squared norms in one fused kernel and sums them over the ranks in one all-reduce; asking each
sharded gradient for its `.norm()` costs a collective and a dozen DTensor dispatches per parameter. This
times both on a ViT's gradients sharded as core.fsdp shards them, over 2 gloo ranks on the CPU, and checks
that they clip alike.

    python -m recipes.dino.clip_bench --size small        # the paper's ViT-S/16: 149 gradients
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from core.vit import ViT
from recipes.dino.model import clip_each_gradient

WORLD = 2


@torch.no_grad()
def clip_by_dtensor_norms(parameters, max_norm: float) -> None:
    """The same clipping, each sharded gradient asked for its own norm (this recipe's first version)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


def rank(rank: int, rendezvous: str, args, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    timed = time_both(args)
    if rank == 0:
        results.update(timed)
    # The sharded model and gradients hold the process group: freed before it is destroyed, and both ranks
    # there together, not at interpreter exit (a rank aborted in gloo's teardown now and then under load).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def time_both(args) -> dict:
    """Both clippings of the same sharded gradients: their median times, the largest difference between
    them, and what clip_each_gradient did (how many gradients it scaled down, the largest norm it left)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    vit = ViT((224, 224), (16, 16), 3, size=args.size)
    for block in vit.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(vit, mesh=mesh)
    grads = [torch.randn(p.shape) for p in vit.parameters()]  # the same on both ranks (same seed)
    times, clipped = {}, {}
    for name, clip in [("DTensor norms", clip_by_dtensor_norms), ("clip_each_gradient", clip_each_gradient)]:
        times[name] = []
        for _ in range(args.repeats):
            for p, g in zip(vit.parameters(), grads):
                p.grad = distribute_tensor(g, mesh, p.placements)
            dist.barrier()
            start = time.perf_counter()
            clip(vit.parameters(), 1.0)
            dist.barrier()
            times[name].append(time.perf_counter() - start)
        clipped[name] = [p.grad.full_tensor() for p in vit.parameters()]
    error = max((a - b).abs().max().item() for a, b in zip(*clipped.values()))
    ours = clipped["clip_each_gradient"]
    return dict(
        gradients=len(grads),
        error=error,
        scaled_down=sum(not torch.equal(g, c) for g, c in zip(grads, ours)),
        largest_norm=max(c.norm().item() for c in ours),
        **{name: statistics.median(t) for name, t in times.items()},
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="ViT size (core.vit.VIT_SIZES)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    # A file rendezvous: a free port found here could be taken by another process before the ranks bind it.
    with tempfile.TemporaryDirectory() as folder, mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.spawn(rank, args=(f"{folder}/rendezvous", args, results), nprocs=WORLD)
        r = dict(results)
    print(f"ViT-{args.size}, {r['gradients']} gradients sharded over {WORLD} gloo ranks, median of {args.repeats}:")
    print(f"  DTensor norms {1000 * r['DTensor norms']:.1f} ms, clip_each_gradient {1000 * r['clip_each_gradient']:.1f} ms, "
          f"ratio {r['DTensor norms'] / r['clip_each_gradient']:.1f}x; largest difference in the clipped gradients {r['error']:.1e}")  # fmt: skip
    print(f"  {r['scaled_down']} of the {r['gradients']} gradients scaled down to norm 1; largest norm after clipping {r['largest_norm']:.4f}")
    return r


if __name__ == "__main__":
    main()
