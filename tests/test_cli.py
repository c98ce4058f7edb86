"""core.cli: last.ckpt holds the end of training, and `fit --ckpt_path last` resumes from it."""

import csv
import os

import torch

from conftest import ROOT, mae_demo_run
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
    with open(os.path.join(cli.trainer.logger.log_dir, "metrics.csv")) as f:
        trained = [row["step"] for row in csv.DictReader(f) if row.get("train/loss")]
    assert trained == ["3", "4"]  # continued from step 3: a fresh start would log steps 0-4
    assert torch.load(last, weights_only=True)["global_step"] == 5
