"""The five Siamese recipes through the real CLI on the demo shards: a few steps of each demo config, with
the online probe and the collapse monitor logged, then core.export and load_encoder on the checkpoint."""

import copy
import os

import pytest
import torch

from core import load_encoder
from core.cli import run
from core.export import export_checkpoint
from core.heads import feature_dim
from recipes.barlowtwins.model import BarlowTwins
from recipes.byol.model import BYOL
from recipes.dino.model import DINO
from recipes.simsiam.model import SimSiam
from recipes.vicreg.model import VICReg

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe: (LightningModule, overrides that shrink its demo config to a few seconds)
NARROW = "--model.backbone.init_args.width=4"
RECIPES = {
    "byol": (BYOL, [NARROW, "--model.projector_hidden=32", "--model.predictor_hidden=32"]),
    "simsiam": (SimSiam, [NARROW, "--model.projection_dim=32", "--model.predictor_hidden=8"]),
    "barlowtwins": (BarlowTwins, [NARROW, "--model.projector_dims=[32,32]"]),
    "vicreg": (VICReg, [NARROW, "--model.projector_dims=[32,32]"]),
    "dino": (DINO, [NARROW, "--model.out_dim=64", "--model.hidden_dim=32", "--model.bottleneck_dim=16"]),
}


def demo_run(name: str, out: str, *extra: str):
    """Three steps of the recipe's demo config, shrunk by NARROW's overrides, with its outputs in `out`."""
    model_class, overrides = RECIPES[name]
    return run(
        model_class,
        args=[
            "fit", "--config", f"recipes/{name}/configs/demo.yaml",
            "--trainer.max_steps=3", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=3",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            f"--checkpoint.dirpath={out}/ckpt", "--checkpoint.every_n_train_steps=3",
            "--data.batch_size=8", "--data.num_workers=0", "--data.samples_per_epoch=24",
            *overrides, *extra,
        ],
    )  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_demo_config_trains_a_few_steps_and_exports(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = str(tmp_path)
    cli = demo_run(name, out)
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/embedding_std", "probe/linear_acc", "probe/knn_acc", "probe/rankme"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"])
    # The effective rank of the val features lies between 1 and their width.
    assert 1 <= metrics["probe/rankme"] <= feature_dim(cli.model.backbone)

    (folder,) = export_checkpoint(f"{out}/ckpt/last.ckpt", f"{out}/export")
    enc = load_encoder(folder)
    assert enc.input["modality"] == "image" and enc.input["size"] == [32, 32]
    module = cli.model.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(images), module.embed({"image": images}))
        # The export holds the trained encoder, not a fresh one.
        assert not torch.allclose(load_encoder(folder, pretrained=False)(images), enc(images))
    # Lightning's own loading too, which builds the model with no trainer (configure_model had needed one).
    loaded = type(module).load_from_checkpoint(f"{out}/ckpt/last.ckpt", map_location="cpu", backbone=copy.deepcopy(module.backbone))
    assert all(value.equal(module.state_dict()[key]) for key, value in loaded.state_dict().items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_demo_config_trains_in_bf16_mixed_precision(name, tmp_path, monkeypatch):
    """The GPU runs' precision; on the CPU Lightning autocasts to bf16 too."""
    monkeypatch.chdir(ROOT)
    # DINO's 16-px local crops reach the ResNet's last stage as 1x1 maps, where the CPU's bf16 convolution
    # (oneDNN, torch 2.11) at times returns a non-finite weight gradient for a stride-2 3x3 kernel: an
    # upstream fault, not this recipe's (the same demo trained in bf16 on an H200). 24-px crops avoid it.
    local = ["--model.local_size=24", "--data.train_transform.init_args.local_size=24"] if name == "dino" else []
    cli = demo_run(name, str(tmp_path), "--trainer.precision=bf16-mixed", *local)
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert {"probe/linear_acc", "probe/knn_acc"} <= set(cli.trainer.callback_metrics)


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path, monkeypatch):
    """VICReg's and Barlow Twins' networks are alike (both paper configs: a ResNet-50 and an 8192-wide
    projector; here both shrunk alike): Barlow Twins went on from VICReg's weights, optimizer and step."""
    monkeypatch.chdir(ROOT)
    demo_run("vicreg", f"{tmp_path}/vicreg")
    with pytest.raises(ValueError, match="the checkpoint is a VICReg run's and this run trains a BarlowTwins"):
        demo_run("barlowtwins", f"{tmp_path}/barlowtwins", f"--ckpt_path={tmp_path}/vicreg/ckpt/last.ckpt", "--trainer.max_steps=5")
    assert demo_run("vicreg", f"{tmp_path}/vicreg", "--ckpt_path=last", "--trainer.max_steps=5").trainer.global_step == 5
