"""Global-batch losses in a real 2-process run (gloo, CPU): every gradient that DistributedDataParallel
produces with `gather=True` must equal the gradient of one process on the concatenated batch.

The two ranks are started once for the module; each writes its results with torch.save and the tests
compare them with a single-process reference computed here.
"""

import gc
import math
import time
from datetime import timedelta

import pytest
import torch
import torch._dynamo  # noqa: F401  DDP imports it lazily (seconds); imported here, forked ranks inherit it
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from core.distributed import all_reduce_mean, gather_with_grad, world
from core.losses import barlow_twins_loss, clip_loss, dino_center, siglip_loss, vicreg_loss
from recipes.dino.model import clip_each_gradient

WORLD, BATCH, IN, DIM = 2, 4, 5, 3  # per-rank batch; the reference sees WORLD * BATCH samples


class Siamese(nn.Module):
    """One linear encoder shared by both views (Barlow Twins, VICReg)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, DIM, bias=False)  # standardising the views cancels any bias

    def forward(self, x1, x2):
        return self.proj(x1), self.proj(x2)


class DualEncoder(nn.Module):
    """Two linear towers with a learnable temperature, and a bias for SigLIP (CLIP, SigLIP)."""

    def __init__(self, with_bias: bool):
        super().__init__()
        self.image, self.text = nn.Linear(IN, DIM), nn.Linear(IN, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if with_bias else None

    def forward(self, x1, x2):
        return F.normalize(self.image(x1), dim=-1), F.normalize(self.text(x2), dim=-1)


# name: (model factory, loss of (model, z1, z2, gather))
CASES = {
    "barlow_twins": (Siamese, lambda m, z1, z2, gather: barlow_twins_loss(z1, z2, lambd=0.1, gather=gather)),
    "vicreg": (Siamese, lambda m, z1, z2, gather: vicreg_loss(z1, z2, gather=gather)),
    "clip": (lambda: DualEncoder(False), lambda m, z1, z2, gather: clip_loss(z1, z2, m.logit_scale, gather=gather)),
    "siglip": (lambda: DualEncoder(True), lambda m, z1, z2, gather: siglip_loss(z1, z2, m.logit_scale, m.logit_bias, gather=gather)),
}


CLIP = 1.0


def clip_grads() -> list[torch.Tensor]:
    """Gradients of norms above and below CLIP; the (1,)-shaped one leaves the second rank an empty shard."""
    g = torch.Generator().manual_seed(7)
    return [scale * torch.randn(*shape, generator=g, dtype=torch.float64) for shape, scale in [((3, 5), 1.0), ((1,), 0.1), ((4,), 2.0), ((5, 2), 0.05)]]


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name][0]().double()


def global_batch(name: str):
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    x1 = torch.randn(WORLD * BATCH, IN, generator=g, dtype=torch.float64)
    return x1, x1 + 0.5 * torch.randn(WORLD * BATCH, IN, generator=g, dtype=torch.float64)  # two correlated views


def grads_and_loss(name: str, model: nn.Module, x1, x2, gather: bool):
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    z1, z2 = model(x1, x2)
    loss = CASES[name][1](inner, z1, z2, gather)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in inner.named_parameters()}, loss.detach()


def rank_results(rank: int) -> dict:
    results = {"world": torch.tensor(world())}
    local = slice(rank * BATCH, (rank + 1) * BATCH)

    # gather_with_grad: the concatenation forward; backward sums what every rank sends to a slice.
    x = (torch.arange(BATCH * 2, dtype=torch.float64).view(BATCH, 2) + 100 * rank).requires_grad_()
    gathered = gather_with_grad(x)
    rows = torch.arange(1, WORLD * BATCH + 1, dtype=torch.float64).view(-1, 1)  # a weight per gathered row
    (gathered * rows * (rank + 1)).sum().backward()
    results["gathered"], results["gather_grad"] = gathered.detach(), x.grad

    # The incoming gradient is not summed in place: autograd hands the same tensor to the other branch of a sum.
    w = torch.zeros(WORLD * BATCH, 2, dtype=torch.float64, requires_grad=True)
    (((w * 1.0) + gather_with_grad(x.detach().requires_grad_())) * torch.arange(WORLD * BATCH * 2.0).view(-1, 2)).sum().backward()
    results["branch_grad"] = w.grad

    for name in CASES:
        model = DistributedDataParallel(make_model(name))
        x1, x2 = global_batch(name)
        grads, loss = grads_and_loss(name, model, x1[local], x2[local], gather=True)
        results.update({f"{name}/grad/{k}": v for k, v in grads.items()})
        results[f"{name}/loss"] = loss

    teacher = [t[local] for t in global_batch("clip")]
    results["center"] = dino_center(torch.ones(1, IN, dtype=torch.float64), teacher, momentum=0.5)
    results["mean"] = all_reduce_mean(torch.tensor([float(rank)]))
    leaf = torch.tensor([float(rank)], requires_grad=True)
    results["mean_needs_grad"] = all_reduce_mean(leaf).requires_grad
    results["leaf_after_mean"] = leaf.detach()

    # DINO's per-parameter clipping on gradients sharded as FSDP2 shards them (DTensors, Shard(0)).
    mesh = init_device_mesh("cpu", (WORLD,))
    params = []
    for grad in clip_grads():
        p = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, [Shard(0)]))
        p.grad = distribute_tensor(grad, mesh, [Shard(0)])
        params.append(p)
    clip_each_gradient(params, CLIP)
    results["clipped"] = [p.grad.full_tensor() for p in params]

    try:
        gather_with_grad(torch.zeros(3 if rank == 0 else 2, DIM))
        results["mismatch"] = "no error"
    except ValueError as e:
        results["mismatch"] = str(e)
    return results


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    try:
        torch.save(rank_results(rank), f"{out_dir}/rank{rank}.pt")
    finally:
        # The DDP models must be gone before the process group: a Reducer that drops the group's last
        # reference joins gloo's threads while holding the GIL, and deadlocks if one of them needs it.
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    # Forked ranks inherit the imported torch instead of importing it again (seconds each on a busy CI box);
    # like DataLoader workers, they use one intra-op thread, which keeps fork safe with OpenMP.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ranks = mp.start_processes(worker, args=(str(out_dir),), nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=0.5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within 60 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gather_with_grad_concatenates_and_sums_gradients(ranks):
    expected = torch.cat([torch.arange(BATCH * 2, dtype=torch.float64).view(BATCH, 2) + 100 * r for r in range(WORLD)])
    for r, res in enumerate(ranks):
        assert res["world"].tolist() == [r, WORLD]
        assert torch.equal(res["gathered"], expected)
        # Rank q's loss weighs gathered row j by (q + 1) * (j + 1), so rank r's rows j = r * BATCH + i receive
        # (1 + 2 + ... + WORLD) * (j + 1): their own rows' weights, not another slice's.
        rows = torch.arange(r * BATCH + 1, (r + 1) * BATCH + 1, dtype=torch.float64).view(-1, 1).expand(BATCH, 2)
        assert torch.equal(res["gather_grad"], WORLD * (WORLD + 1) / 2 * rows)
        assert torch.equal(res["branch_grad"], torch.arange(WORLD * BATCH * 2.0, dtype=torch.float64).view(-1, 2))


@pytest.mark.parametrize("name", sorted(CASES))
def test_ddp_gradients_equal_single_process_on_global_batch(ranks, name):
    x1, x2 = global_batch(name)
    ref_grads, ref_loss = grads_and_loss(name, make_model(name), x1, x2, gather=False)
    for r, res in enumerate(ranks):
        for param, ref in ref_grads.items():
            assert ref.abs().max() > 1e-6, f"{name}: reference gradient of {param} is zero, the check would be vacuous"
            torch.testing.assert_close(res[f"{name}/grad/{param}"], ref, rtol=1e-8, atol=1e-10, msg=f"{name} rank {r} {param}")
    # Local losses average (as DDP averages their gradients) to the global one.
    mean_loss = sum(res[f"{name}/loss"] for res in ranks) / WORLD
    torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-10, atol=1e-12)


def test_dino_center_and_all_reduce_mean_use_every_rank(ranks):
    teacher = list(global_batch("clip"))
    expected = dino_center(torch.ones(1, IN, dtype=torch.float64), teacher, momentum=0.5)
    for res in ranks:
        torch.testing.assert_close(res["center"], expected, rtol=1e-12, atol=1e-12)
        assert res["mean"].item() == pytest.approx(sum(range(WORLD)) / WORLD)


def test_dino_clips_each_sharded_gradient_by_the_norm_of_the_whole(ranks):
    """recipes.dino.model.clip_each_gradient under FSDP: each rank holds half of every gradient, and each is
    scaled by its whole norm (one all-reduce of the shards' squares), as one process clips the full ones."""
    expected = [g * (CLIP / (g.norm() + 1e-6)).clamp(max=1.0) for g in clip_grads()]
    assert [bool(g.norm() > CLIP) for g in clip_grads()] == [True, False, True, False]
    for res in ranks:
        for got, want in zip(res["clipped"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_all_reduce_mean_leaves_its_input_alone_and_records_no_gradient(ranks):
    # DINO's center averages the teacher's batch mean: summing into the caller's tensor in place would corrupt it.
    for r, res in enumerate(ranks):
        assert res["leaf_after_mean"].item() == r and res["mean_needs_grad"] is False


def test_mismatched_batch_sizes_raise_on_every_rank(ranks):
    for res in ranks:
        assert "equal batch sizes" in res["mismatch"] and "[3, 2]" in res["mismatch"]


def test_single_process_is_identity():
    x = torch.randn(3, 2)
    assert world() == (0, 1)
    assert gather_with_grad(x) is x
    assert all_reduce_mean(x) is x


def test_shard_blocks_refuses_parameters_outside_every_unit():
    """A parameter of the LightningModule itself (a CLIP logit scale, say) would be neither sharded nor
    averaged under FSDP2: each rank's copy would drift apart without an error."""
    from types import SimpleNamespace

    import lightning as L

    from core.fsdp import shard_blocks

    class Loose(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)
            self.logit_scale = nn.Parameter(torch.zeros(()))

    model = Loose()
    model._trainer, model._device_mesh = SimpleNamespace(strategy=SimpleNamespace()), object()  # as under FSDP2
    with pytest.raises(ValueError, match=r"holds parameters of its own \(logit_scale\); put them in a submodule"):
        shard_blocks(model)
