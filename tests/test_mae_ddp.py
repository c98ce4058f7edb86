"""The masked autoencoders' demo configs in a real 2-process DDP run (gloo on CPU), as their paper configs
train: started as users start it, `python recipes/<name>/train.py fit ...`, Lightning's launcher starting the
second rank the same way. Rank 0 saves reconstruction pictures on train and val steps while the other rank
goes on to DDP's gradient all-reduce, so nothing in the picture path may wait for the other ranks: the run
must finish (it hung before) with the pictures of every picture step.
"""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", ["mae", "videomae", "audiomae", "cropmae"])
def test_demo_config_trains_under_ddp_and_saves_its_pictures(name, tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    args = [
        sys.executable, os.path.join("recipes", name, "train.py"), "fit",
        "--config", os.path.join("recipes", name, "configs", "demo.yaml"),
        "--trainer.devices=2", "--trainer.strategy=ddp",
        "--data.batch_size=4", "--data.val_batch_size=10", "--data.num_workers=0",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--model.pictures_every_n_steps=1", "--model.encoder_depth=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path}/checkpoints",
    ]  # fmt: skip
    try:
        result = subprocess.run(args, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=130)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-rank run did not finish in {error.timeout} s (ranks waiting on each other?)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pictures = sorted(os.path.basename(p) for p in glob.glob(f"{tmp_path}/**/reconstructions/*.png", recursive=True))
    assert pictures == ["train_step0000000.png", "train_step0000001.png", "val_step0000002.png"]
    assert os.path.isfile(f"{tmp_path}/checkpoints/last.ckpt")
