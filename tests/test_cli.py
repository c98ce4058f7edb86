"""core.cli: last.ckpt holds the end of training, `fit --ckpt_path last` resumes from it, and a resumed run
continues the random streams of the broken one."""

import csv
import functools
import io
import os
import random
import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from jsonargparse import Namespace
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, mae_demo_run
import core.cli
from core.cli import RankSeed, RecipeCLI, SameStepOnResume, random_state, refuse_unsafe_resume
from core.data import ShardDataModule
from recipes.mae.model import MAE


def test_last_checkpoint_holds_the_final_step_and_a_run_resumes_from_it(tmp_path):
    # Saving every 2 steps, a 3-step run's last save would be step 2; the end of training must be in it.
    mae_demo_run(MAE, "mae", tmp_path, "--checkpoint.every_n_train_steps=2", "--model.encoder_depth=1")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3

    from core.cli import run

    config = os.path.join(ROOT, "recipes", "mae", "configs", "demo.yaml")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with warnings.catch_warnings(record=True) as warned:
            cli = run(MAE, args=[
                "fit", "--config", config, "--ckpt_path", "last", "--model.encoder_depth=1",
                "--data.batch_size=4", "--data.val_batch_size=10", "--data.num_workers=0",
                "--trainer.max_steps=5", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
                "--checkpoint.every_n_train_steps=2", "--model.pictures_every_n_steps=0",
                f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--checkpoint.dirpath={tmp_path}/checkpoints",
            ])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert cli.trainer.global_step == 5
    # A new stream from the resume step is the design (core/data/README.md): Lightning's alarm about it is not shown.
    assert not [w for w in warned if "resuming from a checkpoint that ended before the epoch ended" in str(w.message)]
    with open(os.path.join(cli.trainer.logger.log_dir, "metrics.csv")) as f:
        trained = [row["step"] for row in csv.DictReader(f) if row.get("train/loss")]
    assert trained == ["3", "4"]  # continued from step 3: a fresh start would log steps 0-4
    assert torch.load(last, weights_only=True)["global_step"] == 5
    # The same command again, fresh: its last.ckpt replaces the old one (with Lightning's default it would be
    # last-v1.ckpt, and the README's export of last.ckpt would score the earlier run).
    mae_demo_run(MAE, "mae", tmp_path, "--model.encoder_depth=1")
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last.ckpt"]
    # Without a logger the run trains (Lightning's LearningRateMonitor refuses to start without one).
    mae_demo_run(MAE, "mae", tmp_path, "--model.encoder_depth=1", "--trainer.logger=false", check_logs=False)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole_and_a_cut_one_is_refused_by_name(tmp_path, monkeypatch):
    """Lightning's save writes a temporary file in $TMPDIR and moves it: across filesystems the move copies over
    the old `last.ckpt`, and a kill mid-copy left neither checkpoint whole. A cut-short file given to resume
    failed deep in torch.load (a bare EOFError)."""
    from jsonargparse import Namespace

    from core.cli import LastCheckpoint, refuse_unsafe_resume

    class Uploader(CSVLogger):  # a logger that uploads each checkpoint when told of it, as Wandb's can
        seen = []

        def after_save_checkpoint(self, checkpoint_callback):
            self.seen.append(torch.load(checkpoint_callback.last_model_path, weights_only=True)["global_step"])

    def fit(max_steps):
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=Uploader(tmp_path), enable_progress_bar=False, enable_model_summary=False,
            callbacks=[LastCheckpoint(tmp_path, save_last=True, save_top_k=0, every_n_train_steps=2, enable_version_counter=False)],
        )  # fmt: skip
        trainer.fit(Draws(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1))

    fit(2)
    assert Uploader.seen == [2]  # told once the file is in place
    last = tmp_path / "last.ckpt"
    whole = last.read_bytes()

    def killed_midway(checkpoint, path):  # the copy onto `path` stops after 100 bytes
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[:100])
        raise RuntimeError("killed")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", killed_midway)
    with pytest.raises(RuntimeError, match="killed"):
        fit(4)
    assert last.read_bytes() == whole  # the step-2 checkpoint, untouched
    assert (tmp_path / "last.ckpt.partial").stat().st_size == 100

    last.write_bytes(whole[:100])  # a cut-short last.ckpt, as the old save could leave
    (tmp_path / "step=2.ckpt").write_bytes(whole)
    with pytest.raises(ValueError, match=r"last.ckpt' is not a whole checkpoint \(100 bytes.*a save cut short.*in its folder \(step=2.ckpt\)"):
        refuse_unsafe_resume(Namespace({"ckpt_path": "last", "weights_only": None, "checkpoint.dirpath": str(tmp_path)}))
    # Named by its path, Lightning's CLI reads it (for its hyperparameters) before anything is built.
    args = ["fit", "--config", os.path.join(ROOT, "recipes/mae/configs/demo.yaml"), f"--ckpt_path={last}"]
    with pytest.raises(ValueError, match=r"last.ckpt' is not a whole checkpoint"):
        RecipeCLI(MAE, ShardDataModule, args=args)


def test_a_resume_takes_the_newest_of_last_ckpt_and_slurms_requeue_saves(tmp_path, monkeypatch):
    """Lightning resumes "last" from last.ckpt even when a SLURM requeue save (hpc_ckpt_N.ckpt, on SIGUSR1) is
    later, and, under SLURM without ckpt_path, from the requeue save however old: a later run then lost the
    steps since, writing over last.ckpt."""
    from jsonargparse import Namespace

    from core.cli import newest_resume_point

    (tmp_path / "checkpoints").mkdir()
    last, requeued = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"step 400")
    requeued.write_bytes(b"step 14")

    def resolved(ckpt_path):
        config = Namespace({"ckpt_path": ckpt_path, "trainer.default_root_dir": str(tmp_path), "checkpoint.dirpath": str(tmp_path / "checkpoints")})
        newest_resume_point(config)
        return config.ckpt_path

    os.utime(requeued, (1_000, 1_000))
    os.utime(last, (2_000, 2_000))
    assert resolved("last") == str(last)
    assert resolved(None) is None  # not under SLURM: no ckpt_path is a fresh start
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")
    assert resolved(None) == str(last)  # Lightning alone would take the older requeue save
    os.utime(requeued, (3_000, 3_000))
    assert resolved("last") == str(requeued)  # Lightning alone would take last.ckpt, 386 steps behind
    assert resolved(str(last)) == str(last)  # a named checkpoint is what it names
    requeued.unlink()
    last.unlink()
    assert resolved(None) is None and resolved("last") == "last"  # nothing to resume: Lightning starts afresh


class Draws(L.LightningModule):
    """Records what torch, numpy and Python's random draw at each training step, as a mask or a crop would."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.draws = {}

    def training_step(self, batch, batch_idx):
        self.draws[self.global_step] = (torch.rand(2).tolist(), np.random.rand(), random.random())
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_draws(out_dir, ckpt_path=None) -> dict:
    L.seed_everything(0)  # as every new process does
    model = Draws()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RankSeed(), ModelCheckpoint(out_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1)],
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1), ckpt_path=ckpt_path)
    return model.draws


def test_a_resumed_run_draws_what_the_unbroken_run_drew(tmp_path):
    unbroken = fit_draws(tmp_path / "unbroken")
    resumed = fit_draws(tmp_path / "resumed", ckpt_path=tmp_path / "unbroken" / "step=2.ckpt")
    assert sorted(resumed) == [2, 3]
    assert resumed[2] == unbroken[2] and resumed[3] == unbroken[3]
    assert resumed[2] != unbroken[0]  # started over from the seed, it would repeat the first steps' draws


def test_a_resume_on_another_number_of_ranks_keeps_the_seeded_streams_and_says_so():
    saved = RankSeed().state_dict()["ranks"][0]
    callback = RankSeed()
    callback.load_state_dict({"ranks": [saved, saved]})  # written by 2 ranks, resumed on 1
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="random streams of 2 ranks and this run has 1"):
        callback.on_train_start(SimpleNamespace(world_size=1, global_rank=0), None)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name, expected", [("ModelParallelStrategy", "ModelParallelStrategy"), ("ddp", "DDPStrategy")])
def test_a_strategy_named_by_its_class_name_is_that_class(name, expected):
    """Lightning takes a bare `--trainer.strategy` value for a registry name (`ddp`) and refuses a class name;
    the recipes' CLI builds the class it names. Nothing runs: the trainer is only built."""
    config = os.path.join(ROOT, "recipes/mae/configs/demo.yaml")
    cli = RecipeCLI(MAE, ShardDataModule, run=False, args=["--config", config, f"--trainer.strategy={name}"])
    assert type(cli.trainer.strategy).__name__ == expected


def test_a_resume_loads_weights_only_and_neither_downloads_nor_reads_shard_folders(tmp_path):
    from jsonargparse import Namespace

    from core.cli import refuse_unsafe_resume

    config = Namespace(ckpt_path=str(tmp_path / "last.ckpt"), weights_only=None)
    refuse_unsafe_resume(config)
    assert config.weights_only is True  # torch's own default yields to an environment variable
    config = Namespace(ckpt_path="last", weights_only=False)  # said in a config: left as said
    refuse_unsafe_resume(config)
    assert config.weights_only is False
    with pytest.raises(ValueError, match="is a folder .*sharded checkpoint.*save_distributed_checkpoint=false"):
        refuse_unsafe_resume(Namespace(ckpt_path=str(tmp_path), weights_only=None))
    (tmp_path / "last.ckpt").mkdir()  # an FSDP run's sharded last checkpoint
    with pytest.raises(ValueError, match="last.ckpt' is a folder"):
        refuse_unsafe_resume(Namespace({"ckpt_path": "last", "weights_only": None, "checkpoint.dirpath": str(tmp_path)}))
    # Lightning would fetch a URL with torch.hub and load it with weights_only=False; refused before anything runs.
    args = ["fit", "--config", os.path.join(ROOT, "recipes/mae/configs/demo.yaml"), "--ckpt_path=https://example.com/last.ckpt"]
    with pytest.raises(ValueError, match=r"ckpt_path='https://example.com/last.ckpt': checkpoints are not downloaded"):
        RecipeCLI(MAE, ShardDataModule, args=args)


def test_a_checkpoints_saved_settings_import_nothing(tmp_path, monkeypatch):
    """Lightning's CLI merged a checkpoint's hyperparameters into the config, whose parser imports and builds
    the `class_path` they name (a recipe's backbone): a crafted checkpoint ran code around weights_only."""
    from recipes.byol.model import BYOL

    marker = tmp_path / "imported"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Backbone:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"hyper_parameters": {"backbone": {"class_path": "planted.Backbone", "init_args": {}}}}, crafted)
    args = ["fit", "--config", os.path.join(ROOT, "recipes/byol/configs/demo.yaml"), f"--ckpt_path={crafted}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path}"]  # fmt: skip
    with pytest.raises(Exception):  # resuming from it fails: it holds no state
        RecipeCLI(BYOL, ShardDataModule, args=args)
    assert not marker.exists()


def test_a_transform_normalising_otherwise_than_the_model_is_refused_naming_both_keys():
    """The model's mean/std (and an audio model's rate and length) go into its export: a transform with other
    values trained on inputs that core.evaluate, core.finetune and the pictures would not reproduce."""
    from core.augment import AudioClip, ImageCrop, ImageEval
    from core.cli import InputsMatchModel
    from recipes.audiomae.model import AudioMAE

    model = MAE(image_size=32, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    data = SimpleNamespace(train_transform=ImageCrop(32, mean=(0.5, 0.5, 0.5)), val_transform=ImageEval(32))
    with pytest.raises(ValueError, match=r"data.train_transform.init_args.mean=\(0.5, 0.5, 0.5\) but model.mean="):
        InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), model)
    data.train_transform = ImageCrop(32)
    InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), model)
    audio = AudioMAE(sample_rate=16000, seconds=1.0, n_frames=96, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    data = SimpleNamespace(train_transform=AudioClip(8000, 2.0), val_transform=AudioClip(16000, 1.0, train=False))
    with pytest.raises(ValueError, match="data.train_transform.init_args.sample_rate=8000 but model.sample_rate=16000"):
        InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), audio)


def test_a_view_sized_otherwise_than_the_model_is_refused_naming_both_keys():
    """A ResNet takes any size, so a 64-px val view of a model recorded at 32 px trained silently, and the
    export then described a 32-px view: core.evaluate scored other inputs than the online probe had."""
    from core.augment import ImageEval, MultiCrop, TwoViews
    from core.cli import InputsMatchModel
    from core.resnet import ResNet
    from recipes.byol.model import BYOL
    from recipes.dino.model import DINO

    byol = BYOL(ResNet(18, width=8), image_size=32, projector_hidden=16, projection_dim=8, predictor_hidden=16)
    data = SimpleNamespace(train_transform=TwoViews(32), val_transform=ImageEval(64, resize=64))
    with pytest.raises(ValueError, match=r"data.val_transform.init_args.size=64 but model.image_size=32"):
        InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), byol)
    data.val_transform = ImageEval(32, resize=32)
    InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), byol)
    dino = DINO(ResNet(18, width=8), global_size=32, local_size=16, out_dim=64, hidden_dim=16, bottleneck_dim=8)
    for train, val, wrong in [(MultiCrop(32, 24, n_local=2), ImageEval(32, resize=32), r"train_transform.init_args.local_size=24 but model.local_size=16"),
                              (MultiCrop(48, 16, n_local=2), ImageEval(32, resize=32), r"train_transform.init_args.global_size=48 but model.global_size=32"),
                              (MultiCrop(32, 16, n_local=2), ImageEval(64, resize=64), r"val_transform.init_args.size=64 but model.global_size=32")]:  # fmt: skip
        with pytest.raises(ValueError, match=wrong):
            InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=SimpleNamespace(train_transform=train, val_transform=val)), dino)


DEMO = os.path.join(ROOT, "recipes/mae/configs/demo.yaml")


def test_rank_seed_leaves_rank_zeros_stream_where_the_model_build_left_it():
    """Rank 0 is not reseeded: reseeded after the weights' init, it would draw the init's numbers again."""
    torch.manual_seed(0)
    torch.rand(3)  # the model's init
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(state)
    RankSeed().setup(SimpleNamespace(global_rank=0), None, "fit")
    assert torch.equal(torch.rand(4), expected)


def test_a_resume_gives_each_rank_its_own_saved_streams():
    torch.manual_seed(1)
    first = random_state()
    torch.manual_seed(2)
    second = random_state()
    expected = torch.rand(3)
    callback = RankSeed()
    callback.load_state_dict({"ranks": [first, second]})
    torch.manual_seed(7)
    callback.on_train_start(SimpleNamespace(world_size=2, global_rank=1), None)
    assert torch.equal(torch.rand(3), expected)  # rank 1's, not rank 0's


def resumed(saved_run: dict, run: dict) -> None:
    """SameStepOnResume between a run that saved and one that resumes (batch size, ranks, accumulation)."""
    trainer = lambda batch, ranks, accumulate: SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=batch), world_size=ranks, accumulate_grad_batches=accumulate
    )
    saving, resuming = SameStepOnResume(), SameStepOnResume()
    saving.setup(trainer(**saved_run), None, "fit")
    resuming.setup(trainer(**run), None, "fit")
    resuming.load_state_dict(saving.state_dict())
    resuming.on_train_start(None, None)


def test_samples_per_step_count_every_rank():
    assert core.cli.samples_per_step(SimpleNamespace(datamodule=SimpleNamespace(batch_size=4), world_size=2, accumulate_grad_batches=3)) == 24
    # Twice the ranks with the same data.batch_size: twice the samples per step, the schedules' total halved.
    with pytest.raises(ValueError, match="samples per step 128 where this run takes 256"):
        resumed(dict(batch=128, ranks=1, accumulate=1), dict(batch=128, ranks=2, accumulate=1))


def test_another_split_of_the_same_batch_over_the_ranks_resumes():
    resumed(dict(batch=128, ranks=1, accumulate=1), dict(batch=64, ranks=2, accumulate=1))
    resumed(dict(batch=32, ranks=2, accumulate=2), dict(batch=16, ranks=4, accumulate=2))


def test_a_transform_with_another_std_or_clip_length_than_the_model_is_refused():
    from core.augment import AudioClip, ImageCrop, ImageEval
    from core.cli import InputsMatchModel
    from recipes.audiomae.model import AudioMAE

    model = MAE(image_size=32, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    data = SimpleNamespace(train_transform=ImageCrop(32, std=(0.5, 0.5, 0.5)), val_transform=ImageEval(32))
    with pytest.raises(ValueError, match=r"data.train_transform.init_args.std=\(0.5, 0.5, 0.5\) but model.std="):
        InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), model)
    audio = AudioMAE(sample_rate=16000, seconds=1.0, n_frames=96, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    data = SimpleNamespace(train_transform=AudioClip(16000, 2.0), val_transform=AudioClip(16000, 1.0, train=False))
    with pytest.raises(ValueError, match="data.train_transform.init_args.seconds=2.0 but model.seconds=1.0"):
        InputsMatchModel().on_fit_start(SimpleNamespace(datamodule=data), audio)


@pytest.mark.parametrize("url", ["s3://bucket/run/last.ckpt", "gs://bucket/last.ckpt", "hf://org/repo/last.ckpt"])
def test_a_checkpoint_in_an_object_store_is_not_downloaded(url):
    with pytest.raises(ValueError, match="checkpoints are not downloaded at run time"):
        refuse_unsafe_resume(Namespace(ckpt_path=url, weights_only=None))


def test_the_newest_resume_point_is_the_one_checked(tmp_path):
    """`--ckpt_path last` resolved to a later SLURM requeue save: that file is checked, not last.ckpt."""
    (tmp_path / "checkpoints").mkdir()
    last, requeued = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 1}, last)
    requeued.write_bytes(last.read_bytes()[:100])  # the requeue save cut short by the job's end
    os.utime(last, (1_000, 1_000))
    os.utime(requeued, (2_000, 2_000))
    args = ["fit", "--config", DEMO, "--ckpt_path=last", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            f"--checkpoint.dirpath={tmp_path}/checkpoints", "--trainer.max_steps=1"]  # fmt: skip
    with pytest.raises(ValueError, match=r"hpc_ckpt_1.ckpt' is not a whole checkpoint .*in its folder \(none there\)"):
        RecipeCLI(MAE, ShardDataModule, args=args)
    # `--ckpt_path hpc`, Lightning's name for the highest-numbered requeue save, is checked too (it had reached
    # torch's loader, which failed on the cut-short file without naming it).
    torch.save({"global_step": 1}, tmp_path / "hpc_ckpt_2.ckpt")
    (tmp_path / "hpc_ckpt_10.ckpt").write_bytes(requeued.read_bytes())
    with pytest.raises(ValueError, match=r"hpc_ckpt_10.ckpt' is not a whole checkpoint"):
        RecipeCLI(MAE, ShardDataModule, args=[*args[:3], "--ckpt_path=hpc", *args[4:]])


def test_every_run_gets_the_projects_callbacks_and_checkpointing(monkeypatch):
    from core.cli import InputsMatchModel, LastCheckpoint, LearningRates
    from core.probe import OnlineProbe

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(core.cli, "RecipeCLI", functools.partial(RecipeCLI, run=False))
    cli = core.cli.run(MAE, args=["--config", DEMO, "--trainer.logger=false"])
    kinds = [type(c) for c in cli.trainer.callbacks]
    for kind in (RankSeed, SameStepOnResume, InputsMatchModel, OnlineProbe, LastCheckpoint, LearningRates):
        assert kinds.count(kind) == 1, kind
    checkpoint = cli.trainer.checkpoint_callback
    assert isinstance(checkpoint, LastCheckpoint)
    assert (checkpoint.save_last, checkpoint.save_top_k, checkpoint._every_n_train_steps) == (True, 0, 100)  # the demo's 100
    assert checkpoint._enable_version_counter is False
    # A config without checkpoint.* saves every 500 steps, as the CLI's docstring says.
    assert cli.parser.get_default("checkpoint.every_n_train_steps") == 500


def test_a_config_without_a_checkpoint_folder_resumes_from_the_broken_runs_last_ckpt(tmp_path):
    # Lightning's default folder is the logger's version_N, a new one each run: `--ckpt_path last` found
    # nothing there and started afresh, throwing the broken run away.
    mae_demo_run(MAE, "mae", tmp_path, "--checkpoint.dirpath=null", "--model.encoder_depth=1", check_logs=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        cli = core.cli.run(MAE, args=[
            "fit", "--config", DEMO, "--ckpt_path=last", "--checkpoint.dirpath=null", "--model.encoder_depth=1",
            "--data.batch_size=4", "--data.num_workers=0", "--trainer.max_steps=5", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        ])  # fmt: skip
    assert cli.trainer.global_step == 5
    assert torch.load(last, weights_only=True)["global_step"] == 5


def test_a_fast_dev_run_leaves_the_runs_checkpoint_and_the_current_folder_alone(tmp_path, monkeypatch):
    """It replaced the run's last.ckpt with its one step, and wrote its pictures into the current folder."""
    mae_demo_run(MAE, "mae", tmp_path, "--model.encoder_depth=1", check_logs=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    core.cli.run(MAE, args=[
        "fit", "--config", os.path.join(ROOT, DEMO), "--trainer.fast_dev_run=true", "--model.encoder_depth=1", "--model.pictures_every_n_steps=1",
        f"--data.train={ROOT}/data/demo/image/train-{{000000..000003}}.tar", f"--data.val={ROOT}/data/demo/image/val-{{000000..000001}}.tar",
        "--data.batch_size=4", "--data.val_batch_size=10", "--data.num_workers=0",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}/checkpoints",
    ])  # fmt: skip
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert os.listdir(elsewhere) == [] and (tmp_path / "reconstructions" / "train_step0000000.png").is_file()


def test_last_checkpoint_as_a_link_holds_the_end_and_checkpointing_can_be_turned_off(tmp_path):
    """With `save_last: link` last.ckpt linked the last periodic save (step 2 of 3); enable_checkpointing
    false was refused by Lightning, as every run has a ModelCheckpoint."""
    mae_demo_run(MAE, "mae", tmp_path / "link", "--model.encoder_depth=1", "--checkpoint.save_last=link", "--checkpoint.save_top_k=-1",
                 "--checkpoint.every_n_train_steps=2", check_logs=False)  # fmt: skip
    assert torch.load(tmp_path / "link" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    mae_demo_run(MAE, "mae", tmp_path / "off", "--model.encoder_depth=1", "--trainer.enable_checkpointing=false", check_logs=False)
    assert not (tmp_path / "off" / "checkpoints").exists()


def test_only_fit_and_validate_are_offered_and_a_home_relative_folder_is_checked_too(tmp_path, monkeypatch, capsys):
    """test and predict need a test_step and a forward, which no recipe has. A run folder given as ~/...
    skipped the resume checks (they looked for the unexpanded path): a cut-short last.ckpt failed in torch."""
    with pytest.raises(SystemExit):
        core.cli.run(MAE, args=["--help"])
    assert "{fit,validate}" in capsys.readouterr().out
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"cut short")
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="is not a whole checkpoint"):
        core.cli.run(MAE, args=["fit", "--config", DEMO, "--ckpt_path=last", "--trainer.default_root_dir=~/run",
                                "--checkpoint.dirpath=~/run/checkpoints", "--trainer.logger=false"])  # fmt: skip
