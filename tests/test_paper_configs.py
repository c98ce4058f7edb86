"""The paper configs of the masked-autoencoder and Siamese recipes parse against the recipes' signatures and
hold the papers' hyper-parameters (global batch, epochs, optimizer, masking, decoders and heads), as stated in
each README."""

import glob
import os

import pytest

from conftest import ROOT, resolved_config
from recipes.audiomae.model import AudioMAE
from recipes.barlowtwins.model import BarlowTwins
from recipes.byol.model import BYOL
from recipes.cropmae.model import CropMAE
from recipes.dino.model import DINO
from recipes.mae.model import MAE
from recipes.simsiam.model import SimSiam
from recipes.videomae.model import VideoMAE
from recipes.vicreg.model import VICReg

CLASSES = {
    "mae": MAE, "videomae": VideoMAE, "audiomae": AudioMAE, "cropmae": CropMAE,
    "byol": BYOL, "simsiam": SimSiam, "barlowtwins": BarlowTwins, "vicreg": VICReg, "dino": DINO,
}  # fmt: skip

ADAM = dict(betas=[0.9, 0.95])
VIDEOMAE = dict(**ADAM, num_frames=16, tubelet_size=2, image_size=224, patch_size=16, size="base", mask_ratio=0.9,
                base_lr=1.5e-4, weight_decay=0.05, warmup_epochs=40, min_lr_ratio=0.0666667, decoder_dim=384,
                decoder_depth=4, decoder_heads=6, norm_pix_loss=True)  # fmt: skip

# config: (global batch, epochs, model settings) from each paper (the CIFAR one: solo-learn's BYOL setting;
# VideoMAE's: its released scripts, which its README follows where they differ from the paper's table)
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
    "byol/configs/imagenet_resnet50.yaml": (4096, 300, dict(
        base_lr=0.2, weight_decay=1.5e-6, warmup_epochs=10, base_momentum=0.996, projector_hidden=4096,
        projection_dim=256, predictor_hidden=4096, image_size=224,
    )),
    "byol/configs/cifar10_resnet18.yaml": (256, 1000, dict(
        base_lr=1.0, weight_decay=1e-5, warmup_epochs=10, base_momentum=0.99, lars_trust=0.02, lars_clip=True, projector_hidden=4096,
        projection_dim=256, predictor_hidden=4096, image_size=32,
    )),
    "simsiam/configs/imagenet_resnet50.yaml": (512, 100, dict(
        base_lr=0.05, weight_decay=1e-4, warmup_epochs=0, fix_predictor_lr=True, projection_dim=2048,
        predictor_hidden=512, image_size=224,
    )),
    "barlowtwins/configs/imagenet_resnet50.yaml": (2048, 1000, dict(
        lr_weights=0.2, lr_biases=0.0048, weight_decay=1.5e-6, warmup_epochs=10, lambd=5e-3,
        projector_dims=[8192, 8192, 8192], image_size=224,
    )),
    "vicreg/configs/imagenet_resnet50.yaml": (2048, 1000, dict(
        base_lr=0.2, weight_decay=1e-6, warmup_epochs=10, sim_weight=25.0, var_weight=25.0, cov_weight=1.0,
        projector_dims=[8192, 8192, 8192], image_size=224,
    )),
    "dino/configs/imagenet_vit_small.yaml": (1024, 300, dict(
        base_lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=10, teacher_temp=0.07,
        warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9,
        base_momentum=0.996, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, global_size=224, local_size=96,
        freeze_last_layer_epochs=1, clip_grad=3.0,
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
    backbone = config["model"].get("backbone")
    if backbone is None:  # the masked autoencoders build their own ViT
        assert data["train_transform"]["init_args"].get("size", model.get("image_size")) == model.get("image_size")
    elif backbone["class_path"] == "core.resnet.ResNet":
        assert trainer["sync_batchnorm"] is (devices * trainer["num_nodes"] > 1)  # the papers synchronise BatchNorm
        assert backbone["init_args"]["width"] == 64  # the paper's full width
    else:
        assert backbone["init_args"]["size"] == "small" and backbone["init_args"]["patch_size"] == [16, 16]
        # DINO's ViT-S student: stochastic depth, learned positions, DeiT's initialisation
        assert {k: backbone["init_args"][k] for k in ("drop_path", "pos_embed", "init")} == {"drop_path": 0.1, "pos_embed": "learned", "init": "trunc_normal"}
