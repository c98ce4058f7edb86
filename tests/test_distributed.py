"""Global-batch losses in a real 2-process run (gloo, CPU): every gradient that DistributedDataParallel
produces with `gather=True` must equal the gradient of one process on the concatenated batch.

The two ranks are started once for the module; each writes its results with torch.save and the tests
compare them with a single-process reference computed here.
"""

import copy
import gc
import logging
import math
import time
import traceback
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo  # noqa: F401  DDP imports it lazily (seconds); imported here, forked ranks inherit it
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
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


class Tower(nn.Module):
    """An encoder as shard_blocks meets them: an embedding, blocks in a ModuleList a level down, and a
    `tokens` method that callers run outside forward (core.text's encoders, MLM heads)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(IN, 4, bias=False)
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def run(self, x):
        x = self.embed(x)
        for block in self.trunk.blocks:
            x = x + torch.tanh(block(x))
        return x

    def tokens(self, x):
        return self.run(x)

    def forward(self, x):  # not through `tokens`: FSDP reshards a root after a registered method nested in forward
        return self.run(x).sum(-1)


def two_towers():
    """A LightningModule with a trained tower, a frozen one (DINO's teacher) and a child without parameters."""
    import lightning as L

    class TwoTowers(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder, self.teacher = Tower().double(), Tower().double().requires_grad_(False)
            self.loss = nn.MSELoss()

    return TwoTowers()


UNITS = ["encoder", "encoder.trunk.blocks.0", "encoder.trunk.blocks.1", "teacher", "teacher.trunk.blocks.0", "teacher.trunk.blocks.1"]


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
        results.update(sharding_results(rank, mesh))
    except Exception:  # reported by the sharding tests; the other tests' results still come back
        results["sharding_error"] = traceback.format_exc()

    try:
        gather_with_grad(torch.zeros(3 if rank == 0 else 2, DIM))
        results["mismatch"] = "no error"
    except ValueError as e:
        results["mismatch"] = str(e)
    return results


def outcome(f):
    """f()'s result, or its error as "ExceptionName: message" (a rank that raised would stop every test)."""
    try:
        return f()
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def sharding_results(rank: int, mesh) -> dict:
    """core.fsdp.shard_blocks on a model handed over as ModelParallelStrategy hands it (its 2-D mesh of a
    data-parallel dimension of 1 and a tensor-parallel one of 2: 2 ranks on one node), and whole_norms' refusals."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from core.fsdp import shard_blocks, whole_norms

    rank_zero_only.rank = rank  # as Lightning sets it in a launched run: rank 0 alone logs
    results = {}
    model = two_towers()
    reference = copy.deepcopy(model)
    model._trainer = SimpleNamespace(strategy=SimpleNamespace())
    model._device_mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("data_parallel", "tensor_parallel"))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(handler)
    shard_blocks(model)
    shard_blocks(model)  # again: nothing happens
    logging.getLogger("lightning.pytorch.utilities.rank_zero").removeHandler(handler)
    results["shard/messages"] = [m for m in messages if m.startswith("FSDP")]
    results["shard/units"] = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
    results["shard/meshes"] = sorted({p.device_mesh.size() for p in model.parameters() if isinstance(p, DTensor)})
    results["shard/local_rows"] = model.encoder.embed.weight.to_local().shape[0]
    results["shard/all_dtensors"] = all(isinstance(p, DTensor) for p in model.parameters())

    x = global_batch("clip")[0]
    local = x[rank * BATCH : (rank + 1) * BATCH]
    with torch.no_grad():
        model.teacher(local)
    # A part without a gradient has no backward to reshard it for: it reshards after its forward.
    results["shard/teacher_resharded"] = isinstance(model.teacher.embed.weight, DTensor)
    out = model.encoder(local)
    # A trained part keeps its gathered weights from its forward to its backward (no second all-gather).
    results["shard/encoder_gathered"] = not isinstance(model.encoder.embed.weight, DTensor)
    out.pow(2).sum().backward()
    results["shard/grads"] = {n: p.grad.full_tensor() for n, p in model.encoder.named_parameters()}
    # The reference: one process, the global batch, the ranks' mean loss (FSDP averages gradients as DDP does).
    ref_loss = sum(reference.encoder(x[r * BATCH : (r + 1) * BATCH]).pow(2).sum() for r in range(WORLD)) / WORLD
    ref_loss.backward()
    results["shard/ref_grads"] = {n: p.grad for n, p in reference.encoder.named_parameters()}
    # `tokens` gathers the weights outside forward too.
    results["shard/tokens"] = outcome(lambda: model.encoder.tokens(local).detach())
    results["shard/ref_tokens"] = reference.encoder.tokens(local).detach()

    # whole_norms: all plain or all sharded (Shard placements) on one mesh, anything else refused.
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sharded, replicated = distribute_tensor(g, mesh, [Shard(0)]), distribute_tensor(g, mesh, [Replicate()])
    on_one_rank = distribute_tensor(g, model.device_mesh["data_parallel"], [Shard(0)])  # a mesh of this rank alone
    results["norms/sharded"] = outcome(lambda: whole_norms([sharded, sharded * 2]))
    for name, tensors in {"mixed": [sharded, g], "plain_first": [g, sharded], "replicated": [sharded, replicated],
                          "two_meshes": [sharded, on_one_rank]}.items():  # fmt: skip
        results[f"norms/{name}"] = outcome(lambda tensors=tensors: whole_norms(tensors))
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

    class OnlyLoose(L.LightningModule):  # no submodule with parameters: refused all the same
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.zeros(()))

    for model in (Loose(), OnlyLoose()):
        model._trainer, model._device_mesh = SimpleNamespace(strategy=SimpleNamespace()), object()  # as under FSDP2
        with pytest.raises(ValueError, match=r"holds parameters of its own \(logit_scale\); put them in a submodule"):
            shard_blocks(model)


def sharding(ranks) -> list[dict]:
    """The ranks' results, once sure that their sharding section ran to its end."""
    for res in ranks:
        assert "sharding_error" not in res, res["sharding_error"]
    return ranks


def test_shard_blocks_makes_every_block_and_every_part_with_parameters_a_unit_once(ranks):
    """Each entry of a ModuleList (nested too) is a unit, then each child with parameters; a child without
    parameters is none, and a second call adds nothing. Rank 0 says so once."""
    for res in sharding(ranks):
        assert res["shard/units"] == UNITS
        assert res["shard/all_dtensors"]
    assert ranks[0]["shard/messages"] == ["FSDP: 6 units of TwoTowers sharded over 2 ranks"]


def test_shard_blocks_shards_over_every_rank_whatever_mesh_the_strategy_gave(ranks):
    """ModelParallelStrategy's 2-D mesh puts the 2 ranks of a node in its tensor-parallel dimension: sharding
    over its data-parallel dimension (size 1) would keep whole copies and sync nothing."""
    for res in sharding(ranks):
        assert res["shard/meshes"] == [WORLD]
        assert res["shard/local_rows"] == 4 // WORLD  # the embedding's 4 rows, half a rank


def test_sharded_gradients_average_the_ranks_and_tokens_runs_outside_forward(ranks):
    for res in sharding(ranks):
        assert res["shard/grads"].keys() == res["shard/ref_grads"].keys()
        for name, ref in res["shard/ref_grads"].items():
            torch.testing.assert_close(res["shard/grads"][name], ref, rtol=1e-10, atol=1e-12, msg=name)
        assert isinstance(res["shard/tokens"], torch.Tensor), res["shard/tokens"]
        torch.testing.assert_close(res["shard/tokens"], res["shard/ref_tokens"], rtol=1e-10, atol=1e-12)


def test_a_frozen_part_reshards_after_forward_and_a_trained_one_stays_gathered_for_backward(ranks):
    """DINO's teacher has no backward: left gathered after its forward, every rank would hold it whole."""
    for res in sharding(ranks):
        assert res["shard/teacher_resharded"] is True
        assert res["shard/encoder_gathered"] is True


def test_whole_norms_refuse_tensors_not_sharded_as_shard_blocks_shards_them(ranks):
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for res in sharding(ranks):
        torch.testing.assert_close(res["norms/sharded"], torch.stack([g.norm(), 2 * g.norm()]), rtol=1e-12, atol=1e-12)
        for name in ("mixed", "plain_first", "replicated", "two_meshes"):
            assert isinstance(res[f"norms/{name}"], str) and res[f"norms/{name}"].startswith("ValueError: whole_norms:"), (name, res[f"norms/{name}"])


def test_whole_norms_of_plain_tensors_are_their_l2_norms():
    from core.fsdp import whole_norms

    tensors = [torch.tensor([3.0, -4.0]), torch.ones(2, 2), torch.zeros(3)]
    torch.testing.assert_close(whole_norms(tensors), torch.tensor([5.0, 2.0, 0.0]))
