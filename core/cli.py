"""The command line every recipe shares: LightningCLI with the project's callbacks built in.

A recipe's train.py is

    from core.cli import run
    from recipes.mae.model import MAE
    if __name__ == "__main__":
        run(MAE)

and is driven by YAML: `python recipes/mae/train.py fit --config recipes/mae/configs/demo.yaml`.
`--print_config` shows every option; the resolved config is saved as config.yaml next to the logs.
"""

from __future__ import annotations

import glob
import os
import random
import zipfile
from weakref import proxy

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from jsonargparse import Namespace
from lightning.pytorch import strategies
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn

from core.probe import OnlineProbe


def random_state() -> dict:
    """This process's random streams (torch, CUDA, numpy, Python), in types a `weights_only` load accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RankSeed(Callback):
    """Gives every rank its own stream of torch random numbers for what the training process draws (masks,
    colour steps with `device_color`), as the official MAE code seeds each process with seed + rank, and
    carries every rank's streams over a resume.

    `seed_everything` seeds every rank alike, so without this the i-th sample of each rank's batch would get
    the same mask. It runs after the model is built (ranks start from the same weights, as DDP needs) and
    leaves rank 0's stream alone, so a one-process run draws what it drew before. Data workers are seeded
    by the data module from (seed, rank, worker, step).

    Checkpoints hold each rank's streams (Lightning saves none), and a resumed run restores them when training
    starts: after the sanity check, which draws from them too, and before the first batch is read and goes
    through its steps on the device (`on_device` transforms). So a run resumed from a checkpoint of step k
    draws at step k + 1 what the unbroken run drew there, instead of starting over from the seed and
    repeating the masks of the first steps."""

    def __init__(self):
        self._resumed: list[dict] | None = None  # every rank's streams from a checkpoint, until restored

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)

    def state_dict(self) -> dict:
        # Lightning builds the checkpoint on every rank (only rank 0 writes it), so every rank gathers here.
        state = random_state()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {"ranks": [state]}
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed = state_dict["ranks"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed is None:
            return
        states, self._resumed = self._resumed, None
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random streams of {len(states)} ranks and this run has "
                f"{trainer.world_size}: each rank's streams start over from its seed"
            )
            return
        set_random_state(states[trainer.global_rank])


def samples_per_step(trainer: L.Trainer) -> int | None:
    """Samples in one optimizer step over all ranks (batch x ranks x accumulation); None without a batch size."""
    batch = getattr(trainer.datamodule, "batch_size", None)
    return batch * trainer.world_size * trainer.accumulate_grad_batches if isinstance(batch, int) else None


class SameStepOnResume(Callback):
    """Refuses to resume with another number of samples per optimizer step, or per batch over all ranks, than
    the checkpoint's. The schedules (learning rate, EMA momentum, weight decay, DINO's temperatures) count
    optimizer steps over the run's total, which the first sets: resumed from step 32 of 64 on twice the ranks,
    a run whose total is now 32 would be past its end, its learning rate 0 and its EMA teacher frozen for the
    rest of the samples. Lightning restores the epoch's progress in batches, which the second sets: batches
    of half the size with twice the accumulation would run the epoch on past its samples, and the schedules
    past their end. Another split of the same batch over the ranks (2 ranks of 64 where 1 rank took 128)
    resumes."""

    def __init__(self):
        self.samples: dict[str, int] = {}
        self._saved: dict = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        step = samples_per_step(trainer)
        if step is not None:
            self.samples = {"samples_per_step": step, "samples_per_batch": step // trainer.accumulate_grad_batches}

    def state_dict(self) -> dict:
        return dict(self.samples)

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = {name: value for name, value in state_dict.items() if value is not None}  # None: no batch size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self._saved = self._saved, {}
        differ = {name: (saved[name], value) for name, value in self.samples.items() if saved.get(name, value) != value}
        if differ:
            raise ValueError(
                "the checkpoint trained on other batches than this run's: "
                + ", ".join(f"{name.replace('_', ' ')} {old} where this run takes {new}" for name, (old, new) in differ.items())
                + " (per step: data.batch_size x devices x nodes x trainer.accumulate_grad_batches; per batch: without "
                "the accumulation). The schedules count optimizer steps, and Lightning restores the epoch's progress "
                "in batches: both would be read in other units. Resume with the same batch over all ranks (fewer "
                "devices, each with a larger data.batch_size), or start a new run from the checkpoint's weights"
            )


class SameModelOnResume(Callback):
    """Refuses to resume from another model's checkpoint. VICReg's and Barlow Twins' paper configs build the
    same ResNet-50 and projector, so Lightning would load one's weights, optimizer state and step into the
    other without an error. Compared by class name, so that a recipe copied and changed resumes its own runs."""

    def __init__(self):
        self.model: str | None = None
        self._saved: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.model = type(pl_module).__name__

    def state_dict(self) -> dict:
        return {"model": self.model}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict.get("model")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self._saved = self._saved, None
        if saved is not None and saved != self.model:
            raise ValueError(f"the checkpoint is a {saved} run's and this run trains a {self.model}: resume with the recipe that wrote it")


# (the transform's attribute, the model's hyperparameter) that must agree
MATCHING_INPUTS = [
    ("mean", "mean"), ("std", "std"), ("sample_rate", "sample_rate"), ("seconds", "seconds"),
    ("size", "image_size"), ("size", "global_size"), ("global_size", "global_size"), ("local_size", "local_size"),
]  # fmt: skip


class InputsMatchModel(Callback):
    """Refuses at fit start a data transform whose normalisation (an image's or clip's mean and std), view
    size or audio clip (sample rate, seconds) is not the model's: the model's are what its export records, so
    core.evaluate, core.finetune and the reconstruction pictures would see other inputs than training did."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.hparams
        for name in ("train_transform", "val_transform"):
            transform = getattr(trainer.datamodule, name, None)
            for key, model_key in MATCHING_INPUTS:
                if transform is None or not hasattr(transform, key) or model_key not in model:
                    continue
                ours, theirs = np.atleast_1d(np.asarray(getattr(transform, key), float)), np.atleast_1d(np.asarray(model[model_key], float))
                if ours.shape != theirs.shape or not np.allclose(ours, theirs):
                    raise ValueError(
                        f"data.{name}.init_args.{key}={getattr(transform, key)} but model.{model_key}={model[model_key]}: "
                        "set them alike (the model's go into its export, which evaluation and fine-tuning take inputs by)"
                    )


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` also holds the end of training. Lightning's saves it at the end
    only when no `last.ckpt` was written before, so with `every_n_train_steps` a run of 395 steps saving
    every 100 would leave step 300 as `last.ckpt`, and an export of it would miss the last 95 steps."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own bookkeeping (private; lightning is pinned below 2.7): skip a step already saved, and a
        # `fast_dev_run`, which saves nothing (it had replaced a real run's last.ckpt with its one step).
        if not self.save_last or trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step:
            return
        if self.save_last == "link":  # it would link the last periodic save, not the end: written as a file instead
            self._last_checkpoint_saved = ""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Written beside the checkpoint, then renamed over it: Lightning's save goes through a temporary file in
        $TMPDIR and a move, which across filesystems (a node's local /tmp, shared checkpoint storage) copies
        over the old file, so a run killed mid-copy was left with a cut-short `last.ckpt` and nothing to
        resume from. A rename within one folder replaces the old file whole or not at all."""
        if "://" in filepath:  # object stores write whole objects
            return super()._save_checkpoint(trainer, filepath)
        # Lightning's own steps (private; lightning is pinned below 2.7), with the rename before the loggers
        # hear of the file (one that uploads it would find the old one, or none).
        partial = filepath + ".partial"
        trainer.save_checkpoint(partial, self.save_weights_only)  # every rank; rank 0 writes, then a barrier
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            os.replace(partial, filepath)
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class LearningRates(LearningRateMonitor):
    """Lightning's LearningRateMonitor, idle in a run without a logger (``--trainer.logger=false``), which
    Lightning's refuses to start."""

    def on_train_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class RecipeCLI(LightningCLI):
    """Adds, to every recipe, an online probe (`probe.*`), checkpointing that keeps `last.ckpt` (`checkpoint.*`:
    every 500 steps and at the end), so `fit --ckpt_path last` resumes a broken run, and a learning-rate
    monitor; before anything is built, it resolves and checks the resume checkpoint."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OnlineProbe, "probe")
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        # A run again into the same folder replaces its last.ckpt (Lightning's default would write last-v1.ckpt
        # beside it, and an export of last.ckpt would take the earlier run).
        parser.set_defaults({
            "checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 500,
            "checkpoint.enable_version_counter": False,
        })  # fmt: skip
        parser.add_lightning_class_args(LearningRates, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """`fit` and `validate`: `test` and `predict` need a `test_step` and a `forward`, which no recipe has."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def _parse_ckpt_path(self) -> None:
        """Lightning's merges a checkpoint's saved hyperparameters into the config, whose parser imports and
        builds any `class_path` they name (a recipe's `backbone`): a crafted checkpoint would run code around
        `weights_only`. Not done: a resume takes its settings from the config, for a path as for `last` (which
        Lightning never merged). The checkpoint is resolved and checked here, before anything reads it."""
        if self.config.get("subcommand"):
            config = self.config[self.config.subcommand]
            for key in ("trainer.default_root_dir", "checkpoint.dirpath", "ckpt_path"):  # as Lightning reads them
                if isinstance(config.get(key), str):
                    config[key] = os.path.expanduser(config[key])
            fixed_checkpoint_dir(config)
            newest_resume_point(config)
            refuse_unsafe_resume(config)

    def before_instantiate_classes(self) -> None:
        # `--trainer.strategy=ModelParallelStrategy` reaches Lightning as a registry name, which it lowercases
        # and refuses ("invalid strategy name"); a strategy class named by its class name is what was meant.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("trainer.enable_checkpointing") is False:
            # Lightning then refuses any ModelCheckpoint, and every run has one (`checkpoint.*`): it saves nothing.
            config["trainer.enable_checkpointing"] = True
            config["checkpoint.save_last"], config["checkpoint.save_top_k"] = False, 0
        name = config.get("trainer.strategy")
        named = getattr(strategies, name, None) if isinstance(name, str) else None
        if isinstance(named, type) and issubclass(named, strategies.Strategy):
            config["trainer.strategy"] = Namespace(class_path=f"lightning.pytorch.strategies.{name}", init_args=Namespace())


def fixed_checkpoint_dir(config: Namespace) -> None:
    """Without `checkpoint.dirpath`, checkpoints go to `<trainer.default_root_dir>/checkpoints`. Lightning's
    default is the logger's folder, `.../version_N/checkpoints`, a new one each run: `--ckpt_path last` then
    looked in the new run's empty folder and started afresh, losing the broken run."""
    if not config.get("checkpoint.dirpath"):
        config["checkpoint.dirpath"] = os.path.join(config.get("trainer.default_root_dir") or os.getcwd(), "checkpoints")


def newest_resume_point(config: Namespace) -> None:
    """Resume from the newest of `last.ckpt` and Lightning's SLURM requeue checkpoints, for `--ckpt_path last`
    and, under SLURM, for no ckpt_path. On SIGUSR1 (`sbatch --signal=SIGUSR1@90`) Lightning saves
    `hpc_ckpt_N.ckpt` in trainer.default_root_dir and requeues the job; it then resumes "last" from
    `last.ckpt` even when the requeue save is later, and no ckpt_path from the highest-numbered requeue save
    however old, which a later `last.ckpt` then lost to: each picks the newest file here."""
    path = config.get("ckpt_path")
    if path != "last" and not (path is None and SLURMEnvironment.detect()):
        return
    candidates = requeue_saves(config)
    if path is not None or candidates:  # without requeue saves, no ckpt_path stays a fresh start
        candidates.append(os.path.join(config["checkpoint.dirpath"], "last.ckpt"))
    existing = [candidate for candidate in candidates if os.path.isfile(candidate)]
    if existing:
        config["ckpt_path"] = max(existing, key=os.path.getmtime)


def requeue_saves(config: Namespace) -> list[str]:
    """Lightning's SLURM requeue checkpoints, `hpc_ckpt_N.ckpt` in trainer.default_root_dir, by N."""
    saves = glob.glob(os.path.join(glob.escape(config.get("trainer.default_root_dir") or os.getcwd()), "hpc_ckpt_*.ckpt"))
    numbered = {save: os.path.basename(save)[len("hpc_ckpt_") : -len(".ckpt")] for save in saves}
    return sorted((save for save, n in numbered.items() if n.isdigit()), key=lambda save: int(numbered[save]))


def refuse_unsafe_resume(config: Namespace) -> None:
    """Resume loads only tensors and plain containers (`weights_only=True` unless a config says otherwise,
    which this sets in the config), never downloads, never reads a sharded checkpoint folder, whose metadata is
    a pickle, and refuses a checkpoint cut short."""
    if config.get("weights_only", "absent") is None:
        config["weights_only"] = True
    path = config.get("ckpt_path")
    if not isinstance(path, str):
        return
    if "://" in path:
        raise ValueError(f"ckpt_path={path!r}: checkpoints are not downloaded at run time; copy it to a local path and pass that")
    if path == "last" and config.get("checkpoint.dirpath"):  # what Lightning will resolve it to
        path = os.path.join(config["checkpoint.dirpath"], "last.ckpt")
    saves = requeue_saves(config) if path == "hpc" else []
    if saves:  # the same: the highest-numbered requeue save
        path = saves[-1]
    if os.path.isdir(path):
        raise ValueError(
            f"ckpt_path={path!r} is a folder (a sharded checkpoint): its metadata is a pickle, which this project "
            "does not load; resume from a full checkpoint (--trainer.strategy.save_distributed_checkpoint=false)"
        )
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        others = sorted(f for f in os.listdir(os.path.dirname(path) or ".") if f.endswith(".ckpt") and f != os.path.basename(path))
        raise ValueError(
            f"ckpt_path={path!r} is not a whole checkpoint ({os.path.getsize(path):,} bytes, not a zip archive: a save cut "
            f"short?); resume from another one in its folder ({', '.join(others) or 'none there'})"
        )


def run(model_class: type[L.LightningModule], datamodule_class: type[L.LightningDataModule] | None = None, args=None) -> RecipeCLI:
    """A recipe's command line (its train.py calls this): `RecipeCLI` over the recipe's LightningModule and
    the shard datamodule (`datamodule_class`: another one of yours), with the callbacks every run gets:
    `RankSeed`, `SameStepOnResume`, `SameModelOnResume` and `InputsMatchModel`."""
    if datamodule_class is None:
        from core.data import ShardDataModule

        datamodule_class = ShardDataModule
    return RecipeCLI(
        model_class,
        datamodule_class,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [RankSeed(), SameStepOnResume(), SameModelOnResume(), InputsMatchModel()]},
        save_config_kwargs={"overwrite": True},
        args=args,
    )
