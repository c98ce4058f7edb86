"""The masked autoencoders' demo configs, and DINO's and BYOL's with a ViT, in real 2-process runs (gloo on CPU), under DDP
as their paper configs train and under FSDP (FSDP2 with Lightning's ModelParallelStrategy, `core.fsdp`):
started as users start it, `python recipes/<name>/train.py fit ...`. MAE's first runs let Lightning's launcher
start the second rank, which it does only once the first has imported and parsed its config; the others start both
ranks at once with the environment `torchrun` gives its workers (Lightning then takes the ranks from it and
launches nothing), so that their imports, most of a run's time, overlap.

Rank 0 saves reconstruction pictures on train and val steps while the other rank goes on to the gradient
all-reduce, so nothing in the picture path may wait for the other ranks: the run must finish (it hung
before) with the pictures of every picture step. Under FSDP the model is sharded, every rank runs the same
number of validation batches (`data.val_batches`), and training computes what DDP computes.
"""

import glob
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from core.export import export_checkpoint, load_encoder
from core.fsdp import shard_blocks
from recipes.mae.model import MAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp": ["--trainer.strategy=ModelParallelStrategy", "--trainer.strategy.save_distributed_checkpoint=false"],
}


MASKED = ["--model.pictures_every_n_steps=1", "--model.encoder_depth=1"]
# The siamese recipes with a ViT (the demos train ResNets); DINO with its per-parameter gradient clipping on
# (on the shards under FSDP), BYOL with LARS at trust 1, unclipped, so that its weights move measurably. Both
# of those steps are blind to the gradients' scale (clipped norms, LARS's trust ratio), and Adam's nearly so
# (only through its eps): DINO with plain SGD, unclipped and without weight decay (which would move DINO's
# weights far more than its first gradients do), is the run whose weights part if FSDP summed the ranks'
# gradients instead of averaging them.
VIT = ["--model.backbone.class_path=core.vit.ViT", "--model.backbone.init_args.input_size=[32,32]", "--model.backbone.init_args.patch_size=[4,4]",
       "--model.backbone.init_args.size=tiny", "--model.backbone.init_args.depth=1"]  # fmt: skip
# What a launcher sets in each rank; a pytest started under one must not hand its own to the runs.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID",
                  "MASTER_ADDR", "MASTER_PORT")  # fmt: skip
# name: (recipe, its arguments)
RECIPES = {"mae": ("mae", MASKED), "videomae": ("videomae", MASKED), "audiomae": ("audiomae", MASKED), "cropmae": ("cropmae", MASKED),
           "dino-vit": ("dino", [*VIT, "--model.clip_grad=0.001"]), "byol-vit": ("byol", [*VIT, "--model.lars_trust=1.0", "--model.lars_clip=false"]),
           "dino-vit-bf16": ("dino", [*VIT, "--trainer.precision=bf16-mixed"]),
           "dino-vit-sgd": ("dino", [*VIT, "--model.optimizer=sgd", "--model.weight_decay=0", "--model.weight_decay_end=0", "--model.base_lr=5",
                            "--trainer.gradient_clip_val=null"])}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(name, strategy, resume) -> (output folder, finished process), each run started once for the module;
    `resume`: a checkpoint to continue from for one more step."""
    done = {}

    def run(name: str, strategy: str, resume: str | None = None):
        if (name, strategy, resume) in done:
            return done[name, strategy, resume]
        out = tmp_path_factory.mktemp(f"{name}-{strategy}")
        env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES} | {"OMP_NUM_THREADS": "1"}
        recipe, recipe_args = RECIPES[name]
        args = [
            sys.executable, os.path.join("recipes", recipe, "train.py"), "fit",
            "--config", os.path.join("recipes", recipe, "configs", "demo.yaml"),
            "--trainer.devices=2", *STRATEGIES[strategy],
            "--data.batch_size=4", "--data.val_batch_size=10", "--data.val_batches=1", "--data.num_workers=0",
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0",
            *([f"--ckpt_path={resume}", "--trainer.max_steps=3"] if resume else []),
            # No warmup and a learning rate for steps of about 1e-3, so that the runs' weights would part if
            # FSDP did not average the gradients over the ranks as DDP does.
            "--model.warmup_epochs=0", "--model.base_lr=0.05",
            *recipe_args,
            "--checkpoint.every_n_train_steps=1", "--checkpoint.save_top_k=-1", "--checkpoint.filename={step}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            f"--checkpoint.dirpath={out}/checkpoints",
        ]  # fmt: skip
        try:
            result = launched_by_lightning(args, env) if name == "mae" and not resume else launched_together(args, env, out)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"the 2-rank {strategy} run did not finish in {error.timeout} s (ranks waiting on each other?)")
        done[name, strategy, resume] = out, result
        return out, result

    return run


def launched_by_lightning(args: list[str], env: dict, timeout: float = 130) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launched_together(args: list[str], env: dict, out, timeout: float = 130) -> subprocess.CompletedProcess:
    """Both ranks started at once with the variables `torchrun --standalone --nproc-per-node 2` sets (Lightning's
    TorchElasticEnvironment reads them); their outputs joined, rank 0's first. The free port is found by binding
    and closing, so another process can take it before rank 0 listens on it: then the run is started again."""
    for _ in range(3):
        result = launched_together_once(args, env, out, timeout)
        if "EADDRINUSE" not in result.stderr:
            return result
    return result


def launched_together_once(args: list[str], env: dict, out, timeout: float) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "test"}  # fmt: skip
    ranks = []
    for rank in range(2):
        with open(out / f"rank{rank}.out", "w") as stdout, open(out / f"rank{rank}.err", "w") as stderr:
            rank_env = {**env, **torchrun, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            ranks.append(subprocess.Popen(args, cwd=ROOT, env=rank_env, stdout=stdout, stderr=stderr))
    # As torchrun does, a rank that fails stops the other, which would otherwise wait for it until the timeout.
    deadline = time.monotonic() + timeout
    try:
        while (codes := [rank.poll() for rank in ranks]) != [0, 0]:
            if any(codes):  # a rank failed (a code other than None or 0)
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(args, timeout)
            time.sleep(0.1)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    stdout, stderr = ("".join((out / f"rank{rank}.{kind}").read_text() for rank in range(2)) for kind in ("out", "err"))
    return subprocess.CompletedProcess(args, next((code for code in codes if code), 0), stdout, stderr)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("name", ["mae", "videomae", "audiomae", "cropmae"])
def test_demo_config_trains_on_two_ranks_and_saves_its_pictures(runs, name, strategy):
    out, result = runs(name, strategy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pictures = sorted(os.path.basename(p) for p in glob.glob(f"{out}/**/reconstructions/*.png", recursive=True))
    assert pictures == ["train_step0000000.png", "train_step0000001.png", "val_step0000002.png"]
    assert os.path.isfile(f"{out}/checkpoints/last.ckpt")
    if strategy == "fsdp":  # the model summary names the classes fully_shard gave the encoder and decoder
        assert "FSDPViT" in result.stdout and "Decoder" in result.stdout.split("FSDPViT")[1], result.stdout[-3000:]
        assert "sharded over 2 ranks" in result.stdout + result.stderr


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def without_key_bias(key: str, value: torch.Tensor) -> torch.Tensor:
    """An attention's qkv bias without its middle third, the keys' bias: it adds q.b to every logit of a query,
    which the softmax cancels, so its gradient is rounding error alone, which Adam scales up to steps of the
    learning rate's size in whatever direction the rounding of each run points (DINO's runs part there)."""
    if key.endswith("attn.qkv.bias"):
        q, _, v = value.chunk(3)
        return torch.cat([q, v])
    return value


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name, exported, trained",
    [("mae", "encoder.", "encoder."), ("videomae", "encoder.", "encoder."), ("audiomae", "encoder.", "encoder."),
     ("cropmae", "encoder.", "encoder."), ("dino-vit", "teacher_backbone.", "backbone."), ("byol-vit", "backbone.", "backbone."),
     ("dino-vit-sgd", "teacher_backbone.", "backbone.")],
)  # fmt: skip
def test_fsdp_trains_as_ddp_does_and_its_checkpoint_exports(runs, tmp_path, name, exported, trained):
    # CropMAE runs its encoder twice a step (global and local view): FSDP gathers and frees it twice. DINO's
    # teacher runs forward only, on the global crops; its student also on the smaller local crops. BYOL's
    # LARS takes each sharded weight's whole norm, and its target follows by EMA.
    (ddp, ddp_result), (fsdp, fsdp_result) = runs(name, "ddp"), runs(name, "fsdp")
    assert ddp_result.returncode == 0 and fsdp_result.returncode == 0, fsdp_result.stderr[-3000:]
    assert "sharded over 2 ranks" in fsdp_result.stdout + fsdp_result.stderr
    # Same seeds, data and masks per rank: after each step the full weights agree (summation order aside).
    for step in (1, 2):
        by_ddp, by_fsdp = weights(ddp / "checkpoints" / f"step={step}.ckpt"), weights(fsdp / "checkpoints" / f"step={step}.ckpt")
        assert by_ddp.keys() == by_fsdp.keys()
        for key, value in by_ddp.items():
            torch.testing.assert_close(without_key_bias(key, by_fsdp[key]), without_key_bias(key, value), rtol=1e-4, atol=1e-6, msg=f"step {step}: {key}")
    first, second = weights(fsdp / "checkpoints" / "step=1.ckpt"), weights(fsdp / "checkpoints" / "step=2.ckpt")
    moved = max((second[key] - first[key]).abs().max().item() for key in first if key.startswith(trained))
    assert moved > 1e-4, f"the second step moved no weight by more than {moved}: the comparison would be blind"
    # The checkpoint holds full tensors, so the export is the one DDP's checkpoint gives.
    (folder,) = export_checkpoint(str(fsdp / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    encoder = load_encoder(folder)
    for key, value in encoder.backbone.state_dict().items():
        torch.testing.assert_close(value, second[exported + key], rtol=0, atol=0, msg=key)


@pytest.mark.timeout(150)
def test_fsdp_trains_in_bf16_mixed(runs):
    """The GPU runs' precision through FSDP2's gathered blocks (a bf16 gather policy failed here: CPU LayerNorm
    refuses bf16 weights with float32 inputs)."""
    out, result = runs("dino-vit-bf16", "fsdp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sharded over 2 ranks" in result.stdout + result.stderr and "bf16" in result.stdout + result.stderr
    assert all(v.isfinite().all() for v in weights(out / "checkpoints" / "last.ckpt").values() if v.is_floating_point())


@pytest.mark.timeout(300)
def test_a_run_resumed_under_fsdp_continues_as_under_ddp(runs):
    """The sharded optimizer state comes back from the full checkpoint: without Adam's moments the step after
    the resume would differ from DDP's, which restores them whole."""
    steps = {}
    for strategy in STRATEGIES:
        out, _ = runs("mae", strategy)
        resumed, result = runs("mae", strategy, resume=str(out / "checkpoints" / "step=2.ckpt"))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Restored all states" in result.stdout + result.stderr
        steps[strategy] = weights(resumed / "checkpoints" / "step=3.ckpt")
    for key, value in steps["ddp"].items():
        torch.testing.assert_close(steps["fsdp"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_lightnings_fsdp1_strategy_is_refused_naming_the_one_to_use():
    model = MAE(image_size=32, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    model.trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="trainer.strategy: .*--trainer.strategy=ModelParallelStrategy"):
        shard_blocks(model)


def test_synchronised_batchnorm_under_fsdp2_is_refused_not_dropped():
    """`trainer.sync_batchnorm: true` (the siamese paper configs) with ModelParallelStrategy: Lightning would
    leave BatchNorm per rank without a word."""
    model = MAE(image_size=32, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    strategy = ModelParallelStrategy()
    strategy._layer_sync = TorchSyncBatchNorm()  # what the Trainer sets for sync_batchnorm=True
    model.trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(ValueError, match="trainer.sync_batchnorm: ModelParallelStrategy does not synchronise"):
        shard_blocks(model)
    ddp = DDPStrategy()  # the siamese paper configs: DDP with sync_batchnorm, which Lightning applies
    ddp._layer_sync = TorchSyncBatchNorm()
    model.trainer = SimpleNamespace(strategy=ddp)
    shard_blocks(model)  # nothing to shard, nothing refused


def test_sharded_checkpoint_folders_are_refused_naming_the_key():
    """ModelParallelStrategy's default checkpoint, a folder of shards, keeps its metadata in a pickle: neither a
    resume nor core.export would load it, so the run would train and leave nothing usable."""
    model = MAE(image_size=32, patch_size=4, size="tiny", encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    model.trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match="trainer.strategy.save_distributed_checkpoint: .*=false"):
        shard_blocks(model)
    model.trainer = SimpleNamespace(strategy=ModelParallelStrategy(save_distributed_checkpoint=False))
    shard_blocks(model)  # no device mesh outside a launched run: nothing to shard, nothing refused
