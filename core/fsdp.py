"""FSDP for the recipes: torch's FSDP2 (`fully_shard`) under Lightning's ModelParallelStrategy.

With `--trainer.strategy=ModelParallelStrategy`, Lightning starts the processes and calls the recipe's
`configure_model`, which hands the model to `shard_blocks`. Each rank then holds 1/world of every parameter,
gradient and optimizer state, and gathers a block's full parameters just before the block runs. Gradients
are averaged over ranks as under DDP, so a run trains as it would under DDP (tests/test_recipes_distributed.py
compares the two step by step). Lightning's FSDPStrategy (FSDP1, CUDA only) is not needed for this.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

# Methods that run a part's parameters outside its forward: FSDP2 gathers parameters only around forward
# and the methods registered here.
FORWARD_METHODS = ("tokens",)


def shard_blocks(model: L.LightningModule) -> None:
    """Shard `model` over every rank for FSDP2 when the strategy gave it a device mesh (nothing happens
    otherwise: one process, DDP). Every entry of an `nn.ModuleList` (the transformer blocks of an encoder or a
    decoder) becomes a unit of its own, then each child of the model with parameters (the encoder, the
    decoder; DINO's student, teacher and heads) holds the rest: patch embedding, class and mask tokens, final
    norms, heads. Calling it again does nothing.

    Weights are gathered and gradients reduced in float32 also under `bf16-mixed` (autocast casts the weights
    at each matmul). A bf16 `MixedPrecisionPolicy` for the blocks would halve that traffic, but on the CPU
    LayerNorm refuses bf16 weights with float32 inputs, and it is not yet measured on GPUs."""
    if model._trainer is None:  # `Recipe.load_from_checkpoint` builds the model with no trainer: nothing to shard
        return
    if isinstance(model.trainer.strategy, FSDPStrategy):
        # FSDP1 wraps the whole module in one unit whose parameters exist whole only inside its forward; the
        # online probe calls `embed` from a callback, outside it.
        raise ValueError(
            "trainer.strategy: Lightning's FSDPStrategy (FSDP1) is not supported by this recipe; shard it with "
            "--trainer.strategy=ModelParallelStrategy --trainer.strategy.save_distributed_checkpoint=false (FSDP2)"
        )
    strategy = model.trainer.strategy
    if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_layer_sync", None) is not None:
        # Lightning converts BatchNorm to SyncBatchNorm under DDP and FSDP1 only: here it would stay per rank.
        raise ValueError(
            "trainer.sync_batchnorm: ModelParallelStrategy does not synchronise BatchNorm; train with "
            "--trainer.strategy=ddp, or set --trainer.sync_batchnorm=false to keep per-rank statistics"
        )
    if isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint:
        # Its default: a folder of shards whose metadata is a pickle, which neither resume nor core.export loads.
        raise ValueError(
            "trainer.strategy.save_distributed_checkpoint: the sharded checkpoint folder it writes keeps its metadata "
            "in a pickle, which this project does not load; set --trainer.strategy.save_distributed_checkpoint=false "
            "(rank 0 writes the full weights in one file)"
        )
    if model.device_mesh is None:
        return
    loose = [name for name, _ in model.named_parameters(recurse=False)]
    if loose:  # outside every unit they would be neither sharded nor averaged: each rank's would drift apart
        raise ValueError(f"shard_blocks: {type(model).__name__} holds parameters of its own ({', '.join(loose)}); put them in a submodule")
    parts = [p for p in model.children() if not isinstance(p, FSDPModule) and next(p.parameters(), None) is not None]
    if not parts:  # sharded already, or nothing to shard
        return
    # Every rank is a data-parallel rank here: the data module gives each its own samples, and the recipes have
    # no tensor parallelism. ModelParallelStrategy's own mesh would put the ranks of one node in a tensor-
    # parallel group (its default), and sharding over its data-parallel part would then sync nothing.
    mesh = init_device_mesh(model.device_mesh.device_type, (dist.get_world_size(),), mesh_dim_names=("shard",))
    for part in parts:
        for blocks in (m for m in part.modules() if isinstance(m, nn.ModuleList)):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        # FSDP leaves a root unit's parameters gathered after its forward, for the backward that follows (but for
        # a part whose forward calls its registered `tokens`, as ViT.forward does: torch 2.11 reshards it after
        # and gathers its few root parameters again for the backward); a part that is never trained (DINO's
        # teacher) has no backward and would stay gathered, whole, on every rank.
        frozen = not any(p.requires_grad for p in part.parameters())
        fully_shard(part, mesh=mesh, reshard_after_forward=True if frozen else None)
        for method in FORWARD_METHODS:
            if hasattr(part, method):
                register_fsdp_forward_method(part, method)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    rank_zero_info(f"FSDP: {units} units of {type(model).__name__} sharded over {mesh.size()} ranks")


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's shard of tensors FSDP has sharded (DTensors), the tensors themselves otherwise: what
    in-place foreach kernels with per-tensor factors can take (a DTensor does not mix with plain tensors)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def whole_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, (P,), in one fused kernel. Of tensors sharded by `shard_blocks` (each
    rank a disjoint shard of each): the whole tensors' norms, by one all-reduce of the shards' squared
    norms, where each DTensor's own `.norm()` costs a collective and a dozen dispatches (for DINO's clipping
    of a ViT-S's gradients on 2 CPU ranks, 309 ms a step against 16 ms: recipes/dino/clip_bench.py)."""
    sharded = [isinstance(t, DTensor) for t in tensors]
    if not any(sharded):
        return torch.stack(torch._foreach_norm(tensors))
    mesh = tensors[0].device_mesh if all(sharded) else None
    if mesh is None or any(t.device_mesh != mesh or not all(p.is_shard() for p in t.placements) for t in tensors):
        raise ValueError("whole_norms: tensors must be all plain or all sharded on one mesh, as shard_blocks shards them")
    squares = torch.stack(torch._foreach_norm(local_tensors(tensors))) ** 2
    dist.all_reduce(squares, group=mesh.get_group())  # the shards' squares add up to the whole tensor's
    return squares.sqrt()
