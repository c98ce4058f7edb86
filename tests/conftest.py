"""Fixtures and helpers more than one test module uses."""

import csv
import glob
import io
import os
import tarfile
from types import SimpleNamespace

import pytest
import torch
import yaml

from core import bench as harness
from core.bench import copy_renamed
from core.data.shards import local_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tar_with(path, members: list[tuple[str, bytes | tuple[bytes, str]]]) -> None:
    """A tar of exactly these members, for shards the repo's writer would not make: (name, data) for a file,
    (name, (tarfile.SYMTYPE or tarfile.LNKTYPE, target)) for a link."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def adamw_rates(monkeypatch):
    """The learning rates of every AdamW step taken while the test runs, one list of its groups' rates a step."""
    rates = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            rates.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return rates


def noisy_views(n: int, size: int = 16, seed: int = 0) -> dict:
    """A siamese batch: random images and a noisy copy as the two views, ``{"views": [(n, 3, size, size)] * 2}``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return {"views": [x, x + 0.3 * torch.randn(n, 3, size, size, generator=g)]}


def flat(module: torch.nn.Module) -> torch.Tensor:
    """A detached copy of every parameter of ``module``, flattened into one vector (to compare before and after a step)."""
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def assert_same_gradients(model: torch.nn.Module, reference: torch.nn.Module, reference_name, scale: float = 1.0, **tolerance) -> None:
    """Every gradient of ``model`` equals ``scale`` times the reference's parameter named ``reference_name(name)``
    (a recipe's benchmark reference, recipes/<name>/bench.py); parameters without a gradient have none there either."""
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        ref = ref_params[reference_name(name)]
        if p.grad is None:
            assert ref.grad is None, name
        else:
            torch.testing.assert_close(p.grad, scale * ref.grad, msg=name, **tolerance)


def assert_same_as_reference(model, bench, batch: dict, **tolerance) -> None:
    """A siamese recipe's model and its benchmark's reference (recipes/<name>/bench.py, lightly's method on a
    copy of the backbone), from the same weights: the same loss and gradients on the two views of `batch`."""
    reference = bench.reference_for(model)
    copy_renamed(model, reference, bench.reference_name)
    loss, ref_loss = model.training_step(batch, 0), reference.loss(*batch["views"])
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    loss.backward()
    ref_loss.backward()
    assert_same_gradients(model, reference, bench.reference_name, **tolerance)


def same_reconstruction_as_reference(model, reference, *inputs: torch.Tensor) -> torch.Tensor:
    """A masked autoencoder's `reconstruct(*inputs, generator)` and its benchmark's reference built on
    core.mae_reference (`reference(*inputs, noise)`), the noise drawn from the same seed: the same mask,
    predictions and loss. Backpropagates both losses and returns the recipe's, for the gradients' check."""
    loss, pred, mask = model.reconstruct(*inputs, torch.Generator().manual_seed(1))
    noise = torch.rand(*mask.shape, generator=torch.Generator().manual_seed(1))
    ref_loss, ref_pred, ref_mask = reference(*inputs, noise)
    torch.testing.assert_close(ref_mask.bool(), mask)
    torch.testing.assert_close(ref_pred, pred)
    torch.testing.assert_close(ref_loss, loss)
    loss.backward()
    ref_loss.backward()
    # A reference that differed where it counts would show: another mask gives another loss.
    assert not torch.isclose(reference(*inputs)[0], loss)
    return loss


def bench_steps(bench, argv: list[str]) -> None:
    """Two steps of each implementation of a recipe's benchmark (recipes/<name>/bench.py), in this process;
    each must move its weights (a step that skipped the update would time half the work)."""
    args = bench.parser().parse_args(argv)
    for impl in ("reference", "ours"):
        step = bench.build(impl, args)
        weights = [p for group in step.optimizer.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in weights]
        step()
        step()
        assert any(not torch.equal(b, p) for b, p in zip(before, weights)), f"{impl}: the step left every weight as it was"


def bench_sides(monkeypatch, bench, argv: list[str], record: tuple[str, ...]) -> dict:
    """Both implementations of a recipe's benchmark (recipes/<name>/bench.py) as its command line `argv`
    sets them up (through its `main`) and as core.bench.measure builds each (seed 0), untimed: {impl: the
    parts its step runs (`loss`, `optimizer`, `before_step`, `after`, the `args` it runs under, as
    core.bench.training_step got them) and `models`: what the bench module's callables named in `record`
    returned first while building it (the recipe's model class, `reference_for`)}."""
    runs, steps, made = [], [], {}
    monkeypatch.setattr(harness, "run", lambda build, args, title: runs.append((build, args)))
    bench.main(argv)
    ((build, args),) = runs
    training_step = harness.training_step

    def recording(loss, optimizer, args, before_step=None, after=None):
        steps.append(SimpleNamespace(loss=loss, optimizer=optimizer, args=args, before_step=before_step, after=after))
        return training_step(loss, optimizer, args, before_step, after)

    monkeypatch.setattr(harness, "training_step", recording)
    for name in record:
        def made_by(*a, _call=getattr(bench, name), _name=name, **kw):
            result = _call(*a, **kw)
            made.setdefault(_name, result)
            return result

        monkeypatch.setattr(bench, name, made_by)
    sides = {}
    for impl in harness.IMPLS:
        made.clear()
        torch.manual_seed(0)
        build(impl, args)
        (side,) = steps
        steps.clear()
        assert vars(side.args) == vars(args), f"{impl}: the step does not run under the command line's settings"
        side.models = dict(made)
        sides[impl] = side
    return sides


def trainable(model, name=lambda n: n, skip=()) -> set[str]:
    """`name` of each parameter of `model` that requires a gradient, but those named in `skip`."""
    return {name(n) for n, p in model.named_parameters() if p.requires_grad and n not in skip}


def optimizer_settings(optimizer, model, keys, name=lambda n: n, skip=()) -> dict:
    """{name(a parameter's name in `model`): its optimizer group's `keys`} for every trainable parameter that
    `optimizer` steps."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows = [(names[id(p)], g) for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    return {name(n): {k: g[k] for k in keys} for n, g in rows if n not in skip}


def assert_same_optimizer_settings(ours, model, ref, reference, reference_name, skip=()) -> None:
    """The two steps' optimizers train the same parameters (each of ours is the reference's parameter named
    `reference_name(name)`; `skip`: ours only) with the same settings, those that both kinds of optimizer
    have (lr, momentum, weight decay, trust coefficient; or all of AdamW's); every trainable parameter of
    either model is stepped, and no other (a target or teacher is frozen on both sides)."""
    keys = set.intersection(*(set(g) for g in [*ours.optimizer.param_groups, *ref.optimizer.param_groups])) - {"params"}
    assert {"lr", "weight_decay"} <= keys
    mine = optimizer_settings(ours.optimizer, model, keys, reference_name, skip)
    theirs = optimizer_settings(ref.optimizer, reference, keys)
    assert set(mine) == trainable(model, reference_name, skip), "ours leaves trainable parameters out of its optimizer"
    assert set(theirs) == trainable(reference), "the reference leaves trainable parameters out of its optimizer"
    assert mine == theirs


@torch.no_grad()
def nudge_trainable(model, reference, reference_name, seed=0) -> None:
    """Move each trainable parameter of `model` and its reference counterpart by the same random step (as an
    optimizer step would, so that an EMA then has something to average)."""
    ref_params = dict(reference.named_parameters())
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            step = 0.1 * torch.randn(p.shape, generator=g)
            p.add_(step)
            ref_params[reference_name(name)].add_(step)


def assert_same_siamese_bench_steps(
    monkeypatch, bench, argv, model_class: str, optimizers: tuple[type, type], loss_from_reference=lambda ref: ref, scale=1.0, **tolerance
):
    """Both steps of a siamese recipe's benchmark from one command line (recipes/<name>/bench.py): from the same
    weights the same loss (ours is `loss_from_reference` of lightly's) on the same views, the same gradients
    (`scale` times lightly's), each side its own kind of optimizer (`optimizers`: ours, the reference's) with the
    same settings for the same parameters, the same EMA step after it (or none on both sides), then the same
    loss again (a target now apart from the online network), on the device asked for; `tolerance` for the
    gradients. Returns (ours, reference) models."""
    sides = bench_sides(monkeypatch, bench, argv, (model_class, "reference_for"))
    ours, ref = sides["ours"], sides["reference"]
    model, reference = ours.models[model_class], ref.models["reference_for"]
    assert (type(ours.optimizer), type(ref.optimizer)) == optimizers
    loss, ref_loss = ours.loss(), ref.loss()
    torch.testing.assert_close(loss, loss_from_reference(ref_loss))
    loss.backward()
    ref_loss.backward()
    for side in (ours, ref):
        if side.before_step is not None:
            side.before_step()
    assert_same_gradients(model, reference, bench.reference_name, scale=scale, **tolerance)
    assert_same_optimizer_settings(ours, model, ref, reference, bench.reference_name)
    nudge_trainable(model, reference, bench.reference_name)
    for side in (ours, ref):
        if side.after is not None:
            side.after()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():  # the targets too, if any
        torch.testing.assert_close(p, ref_params[bench.reference_name(name)], msg=name)
    torch.testing.assert_close(ours.loss(), loss_from_reference(ref.loss()))
    assert_bench_builds_on_the_device(monkeypatch, bench, argv)
    return model, reference


def assert_bench_builds_on_the_device(monkeypatch, bench, argv) -> None:
    """`--device` reaches both sides: built for the meta device (no memory, nothing computed), every parameter
    either side's optimizer steps is there."""
    for impl, side in bench_sides(monkeypatch, bench, [*argv, "--device", "meta"], ()).items():
        devices = {p.device.type for g in side.optimizer.param_groups for p in g["params"]}
        assert devices == {"meta"}, impl



def patch_pixels(mask: torch.Tensor) -> torch.Tensor:
    """(B, 16) patch mask of a 4x4 grid -> (B, 3, 16, 16) pixel mask."""
    grid = mask.view(-1, 1, 4, 4).float()
    return grid.repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)


def resolved_config(model_class, path: str, capsys) -> dict:
    """The full config the CLI resolves from ``recipes/<path>``, validated against the recipe's signature."""
    from core.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(model_class, args=["fit", "--config", os.path.join(ROOT, "recipes", path), "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def mae_demo_run(model_class, recipe: str, tmp_path, *extra_args: str, check_logs: bool = True):
    """Run ``recipes/<recipe>/configs/demo.yaml`` for 3 tiny steps with its outputs in ``tmp_path``, check that
    it logged the losses and probe accuracies and saved train and val reconstruction pictures; return the CLI."""
    from core.cli import run  # imports lightning, which most test modules never need: only when a demo runs

    config = os.path.join(ROOT, "recipes", recipe, "configs", "demo.yaml")
    with open(config) as f:
        data = yaml.safe_load(f)["data"]
    try:
        for split in ("train", "val"):
            local_files(os.path.join(ROOT, data[split]))
    except FileNotFoundError as error:
        pytest.fail(f"{error}: build the demo shards with `make data`")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the demo configs name the shards relative to the repository
        cli = run(model_class, args=[
            "fit", "--config", config,
            "--data.batch_size=4", "--data.val_batch_size=10", "--data.num_workers=0",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
            "--model.pictures_every_n_steps=2",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--checkpoint.dirpath={tmp_path}/checkpoints", *extra_args,
        ])  # fmt: skip
    assert cli.trainer.global_step == 3
    if not check_logs:
        return cli
    log_dir = cli.trainer.log_dir
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        logged = {key for row in csv.DictReader(f) for key, value in row.items() if value}
    assert {"train/loss", "val/loss", "probe/linear_acc", "probe/knn_acc"} <= logged
    assert os.path.isfile(os.path.join(log_dir, "reconstructions", "train_step0000000.png"))
    assert glob.glob(os.path.join(log_dir, "reconstructions", "val_step*.png"))
    return cli
