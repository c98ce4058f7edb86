"""FSDP for the transformer recipes: torch's FSDP2 (`fully_shard`) under Lightning's ModelParallelStrategy.

With `--trainer.strategy=ModelParallelStrategy`, Lightning builds a device mesh and calls the recipe's
`configure_model`, which hands the model to `shard_blocks`. Each rank then holds 1/world of every parameter,
gradient and optimizer state, and gathers a block's full parameters just before the block runs. Gradients
are averaged over ranks as under DDP, so a run trains as it would under DDP (tests/test_fsdp.py compares
the two). Lightning's FSDPStrategy (FSDP1, CUDA only) is not needed for this.
"""

from __future__ import annotations

import lightning as L
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

# Methods that run a part's parameters outside its forward: FSDP2 gathers parameters only around forward
# and the methods registered here.
FORWARD_METHODS = ("tokens",)


def shard_blocks(model: L.LightningModule) -> None:
    """Shard `model` for FSDP2 if the strategy gave it a device mesh (nothing happens otherwise: one process,
    DDP). Every entry of an `nn.ModuleList` (the transformer blocks of an encoder or a decoder) becomes a unit
    of its own, then each child of the model with parameters (the encoder, the decoder) holds the rest:
    patch embedding, class and mask tokens, final norms, heads. Calling it again does nothing."""
    if model.device_mesh is None:
        return
    mesh = model.device_mesh["data_parallel"]
    for part in model.children():
        if isinstance(part, FSDPModule) or next(part.parameters(), None) is None:
            continue
        for blocks in (m for m in part.modules() if isinstance(m, nn.ModuleList)):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(part, mesh=mesh)
        for method in FORWARD_METHODS:
            if hasattr(part, method):
                register_fsdp_forward_method(part, method)
