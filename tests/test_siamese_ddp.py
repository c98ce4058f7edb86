"""The Siamese recipes under DistributedDataParallel in a real 2-process run (gloo, CPU): the parameter
gradients of each recipe's training step equal those of one process on the concatenated batch.

Batch statistics are synchronised, as the papers do (SyncBatchNorm): torch's SyncBatchNorm refuses CPU
tensors, so on these CPU ranks every BatchNorm is replaced by `GatheredBatchNorm`, which normalises with
the statistics of every rank's samples exactly as SyncBatchNorm does. The ranks are started once for
the module; each writes its gradients with torch.save and the tests compare them with a single-process
reference computed here.
"""

import warnings
from datetime import timedelta

import pytest
import torch
import torch._dynamo  # noqa: F401  DDP imports it lazily (seconds); imported here, forked ranks inherit it
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.distributed import gather_with_grad
from core.resnet import ResNet
from core.vit import ViT
from recipes.barlowtwins.model import BarlowTwins
from recipes.byol.model import BYOL
from recipes.dino.model import DINO
from recipes.simsiam.model import SimSiam
from recipes.vicreg.model import VICReg

WORLD, BATCH, SIZE, LOCAL = 2, 4, 8, 4  # per-rank batch of SIZE-pixel images; the reference sees WORLD * BATCH


def tiny_resnet():
    return ResNet(18, small_images=True, width=4)


# The ResNet recipes have BatchNorm in the encoder and the heads; DINO runs a ViT on global and local crops.
RECIPES = {
    "byol": lambda: BYOL(tiny_resnet(), image_size=SIZE, projector_hidden=16, projection_dim=8, predictor_hidden=16),
    "simsiam": lambda: SimSiam(tiny_resnet(), image_size=SIZE, projection_dim=16, predictor_hidden=8),
    "barlowtwins": lambda: BarlowTwins(tiny_resnet(), image_size=SIZE, projector_dims=[16, 16], lambd=0.1),
    "vicreg": lambda: VICReg(tiny_resnet(), image_size=SIZE, projector_dims=[16, 16]),
    "dino": lambda: DINO(
        ViT((SIZE, SIZE), (2, 2), dim=16, depth=1, heads=2), global_size=SIZE, local_size=LOCAL,
        out_dim=32, hidden_dim=16, bottleneck_dim=8,
    ),
}


class GatheredBatchNorm(nn.Module):
    """Training-mode BatchNorm over the samples of every rank (what SyncBatchNorm computes), on CPU."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps  # the same parameters, the same names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        everyone = gather_with_grad(x)  # (WORLD * B, C, ...)
        dims = [0, *range(2, x.ndim)]
        mean = everyone.mean(dims, keepdim=True)
        var = everyone.var(dims, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is None:
            return x
        shape = [1, -1] + [1] * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


def synchronise_batch_norm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, GatheredBatchNorm(child))
        else:
            synchronise_batch_norm(child)
    return module


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return RECIPES[name]().double().train()


def global_batch(name: str) -> dict:
    g = torch.Generator().manual_seed(sorted(RECIPES).index(name))
    x = torch.randn(WORLD * BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    views = [x, x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)]
    if name != "dino":
        return {"views": views}
    local = [torch.randn(WORLD * BATCH, 3, LOCAL, LOCAL, generator=g, dtype=torch.float64) for _ in range(2)]
    return {"global_views": views, "local_views": local}


def local_batch(batch: dict, rank: int) -> dict:
    return {key: [v[rank * BATCH : (rank + 1) * BATCH] for v in views] for key, views in batch.items()}


class TrainingStep(nn.Module):
    """Runs the recipe's `training_step` as `forward`, so DDP sees it (Lightning wraps modules the same way)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.training_step(batch, 0)


def prime_and_step(step: nn.Module, model: nn.Module, batch: dict) -> torch.Tensor:
    """Two training steps on the batch: the first, without gradients, only moves the recipe's running state
    (DINO's center, which the second step's loss then uses); the second is differentiated."""
    with torch.no_grad():
        model.training_step(batch, 0)
    getattr(model, "move_center", lambda: None)()  # DINO moves its center after the optimizer step
    loss = step(batch)
    loss.backward()
    return loss.detach()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # self.log() outside a Trainer
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name in RECIPES:
            model = synchronise_batch_norm(make_model(name))
            step = DistributedDataParallel(TrainingStep(model))
            prime_and_step(step, model, local_batch(global_batch(name), rank))
            results.update({f"{name}/grad/{k}": v for k, v in gradients(model).items()})
            results.update({f"{name}/buffer/{k}": v for k, v in model.named_buffers() if k == "center"})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("siamese_ddp")
    # Forked ranks inherit the imported torch and recipes instead of importing them again; like DataLoader
    # workers they use one intra-op thread, which keeps fork safe with OpenMP.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(worker, args=(str(out_dir),), nprocs=WORLD, join=True, start_method=method)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_ddp_gradients_equal_single_process_on_global_batch(ranks, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model(name)
        prime_and_step(TrainingStep(model), model, global_batch(name))
    ref = gradients(model)
    assert ref, f"{name} has no trainable parameter"
    for r, res in enumerate(ranks):
        for param, grad in ref.items():
            torch.testing.assert_close(res[f"{name}/grad/{param}"], grad, rtol=1e-7, atol=1e-9, msg=f"{name} rank {r} {param}")
    assert any(g.abs().max() > 1e-6 for g in ref.values()), f"{name}: every reference gradient is zero, the check would be vacuous"


@pytest.mark.timeout(60)
def test_dino_center_averages_the_teacher_over_every_rank(ranks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model("dino")
        prime_and_step(TrainingStep(model), model, global_batch("dino"))
    assert model.center.abs().max() > 0
    for res in ranks:
        torch.testing.assert_close(res["dino/buffer/center"], model.center, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_reports_collapsed_embeddings(name, recwarn):
    """Every sample the same image: one embedding for all, which the log must call collapse; real images not."""
    model = make_model(name)
    batch = global_batch(name)
    model.training_step(batch, 0)
    assert not [w for w in recwarn if "collapsed" in str(w.message)]
    same = {key: [v[:1].expand_as(v).clone() for v in views] for key, views in batch.items()}
    with pytest.warns(UserWarning, match="embeddings have collapsed"):
        model.training_step(same, 0)
