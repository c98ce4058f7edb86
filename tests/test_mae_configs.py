"""The paper configs of the masked-autoencoder recipes parse against the recipes' signatures and hold the
papers' hyper-parameters (global batch, epochs, optimizer, masking, decoder), as stated in each README."""

import glob
import os

import pytest

from conftest import ROOT, resolved_config
from recipes.audiomae.model import AudioMAE
from recipes.cropmae.model import CropMAE
from recipes.mae.model import MAE
from recipes.videomae.model import VideoMAE

CLASSES = {"mae": MAE, "videomae": VideoMAE, "audiomae": AudioMAE, "cropmae": CropMAE}
ADAM = dict(betas=[0.9, 0.95])
VIDEOMAE = dict(**ADAM, num_frames=16, tubelet_size=2, image_size=224, patch_size=16, size="base", mask_ratio=0.9,
                base_lr=1.5e-4, weight_decay=0.05, warmup_epochs=40, min_lr_ratio=0.0666667, decoder_dim=384,
                decoder_depth=4, decoder_heads=6, norm_pix_loss=True)  # fmt: skip

# config: (global batch, epochs, model settings) from each paper (VideoMAE's: its released scripts, which the
# README follows where they differ from the paper's table)
PAPER = {
    "mae/configs/vit_base_in1k.yaml": (4096, 800, dict(
        **ADAM, image_size=224, patch_size=16, size="base", mask_ratio=0.75, norm_pix_loss=True, base_lr=1.5e-4,
        weight_decay=0.05, warmup_epochs=40, decoder_dim=512, decoder_depth=8, decoder_heads=16,
    )),
    "videomae/configs/kinetics400_vit_base.yaml": (2048, 800, dict(**VIDEOMAE, stride=4)),
    "videomae/configs/ssv2_vit_base.yaml": (2048, 800, dict(**VIDEOMAE, stride=2)),
    "audiomae/configs/audioset2m_vit_base.yaml": (512, 32, dict(
        **ADAM, sample_rate=16000, seconds=10.0, n_mels=128, hop_ms=10.0, win_ms=25.0, n_frames=1024, patch_size=16,
        size="base", mask_ratio=0.8, masking="random", norm_pix_loss=True, base_lr=2e-4, weight_decay=1e-4,
        warmup_epochs=3, decoder_dim=512, decoder_depth=16, decoder_heads=16,
    )),
    "cropmae/configs/imagenet_vit_small.yaml": (2048, 400, dict(
        **ADAM, image_size=224, patch_size=16, size="small", mask_ratio=0.985, norm_pix_loss=True, base_lr=1e-4,
        weight_decay=0.05, warmup_epochs=20, decoder_dim=256, decoder_depth=4, decoder_heads=8,
    )),
}  # fmt: skip


def test_every_config_is_the_demo_or_a_checked_paper_config():
    found = {os.path.relpath(p, os.path.join(ROOT, "recipes")) for name in CLASSES for p in glob.glob(f"{ROOT}/recipes/{name}/configs/*.yaml")}
    assert found == set(PAPER) | {f"{name}/configs/demo.yaml" for name in CLASSES}


@pytest.mark.parametrize("path", sorted(PAPER))
def test_paper_config_holds_the_papers_settings(path, capsys):
    batch, epochs, model = PAPER[path]
    config = resolved_config(CLASSES[path.split("/")[0]], path, capsys)
    trainer, data = config["trainer"], config["data"]
    devices = trainer["devices"] if isinstance(trainer["devices"], int) else len(trainer["devices"])
    assert data["batch_size"] * devices * trainer["num_nodes"] * (trainer["accumulate_grad_batches"] or 1) == batch
    assert trainer["max_epochs"] == epochs
    assert {k: config["model"][k] for k in model} == model
    # The clips and crops the data transforms cut are the ones the model is built for.
    for split in ("train_transform", "val_transform"):
        view = data[split]["init_args"]
        for key in ("num_frames", "stride", "sample_rate", "seconds"):
            if key in view:
                assert view[key] == model[key], (split, key)
        assert view.get("size", model.get("image_size")) == model.get("image_size"), split
