"""Export pretrained encoders from a training checkpoint, and load them back without any recipe code.

    python -m core.export runs/mae/.../last.ckpt --out exported/mae

writes, for each encoder the recipe declares, `model.safetensors` + `config.json` (+ tokenizer files for
text) into `OUT/<name>/` (or straight into OUT when there is one encoder). Then

    from core import load_encoder
    enc = load_encoder("exported/mae")
    enc(x)        # (N, D), one embedding per input
    enc.input     # what x must be: image size and normalisation, sample rate and spectrogram settings, ...

How a recipe declares its encoders: in `on_save_checkpoint` it stores
`checkpoint["encoders"] = {"image": describe_encoder("encoder.", self.encoder, input_spec)}`; the
checkpoint then carries everything needed to rebuild the encoder, and is read with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule

FORMAT_VERSION = 1


def ship_tokenizer(source: str, folder: str, what: str) -> None:
    """Save the tokenizer of `source` into `folder` with every file it needs (vocab/merges of a BPE tokenizer, a
    sentencepiece model, ...), as transformers writes them, and check the copy tokenizes as the original does."""
    from core.text import load_tokenizer

    if not any(os.path.isfile(os.path.join(source, file)) for file in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{what}, {source!r}, holds no tokenizer.json or tokenizer_config.json; the export would not load without it")
    original = load_tokenizer(source)
    original.save_pretrained(folder)
    probe = "Pretrain encoders on your own data: 123 héllo\tworld!"
    if load_tokenizer(folder)(probe)["input_ids"] != original(probe)["input_ids"]:
        raise ValueError(f"{what}, {source!r}, does not tokenize the same once saved to {folder!r}; the export would not match its weights")


def backbone_classes() -> dict[str, type[nn.Module]]:
    """The backbones an exported config may name: the core classes, and nothing that executes code."""
    from core.resnet import ResNet
    from core.text import TextTransformer
    from core.vit import ViT

    return {"ViT": ViT, "ResNet": ResNet, "TextTransformer": TextTransformer}


def validation_view(module) -> dict:
    """How the run's validation transform views a sample beyond the input's size and normalisation: an
    image's resize before the centre crop (``ImageEval.resize``, 256 for 224 in the ImageNet configs) and its
    interpolation, what a clip too short becomes (``VideoClip.short_clips``). Recipes add it to their input
    spec, so that core.evaluate and core.finetune see the encoder's inputs as its validation did. Empty
    outside a fit (no trainer, no datamodule)."""
    trainer = getattr(module, "_trainer", None)
    transform = getattr(getattr(trainer, "datamodule", None), "val_transform", None)
    return {key: getattr(transform, key) for key in ("resize", "interpolation", "short_clips") if hasattr(transform, key)}


def describe_encoder(prefix: str, backbone: nn.Module, input_spec: dict) -> dict:
    """What goes in `checkpoint["encoders"][name]`: where the weights are in the state dict, the backbone's
    class and init arguments, and the input it expects.

    input_spec: {"modality": "image", "size": [H, W], "mean": [...], "std": [...]}, or
    {"modality": "video", "frames": T, "stride": s, "size": [H, W], "mean", "std"}, each optionally with
    the validation view's "resize", "interpolation" and "short_clips" (`validation_view`), or
    {"modality": "audio", "sample_rate": 16000, "seconds": 1.0, "n_mels": 128, "hop_ms": 10, "win_ms": 25,
    "mean": m, "std": s, optionally "frames": F to crop/pad the spectrogram to F frames} (the encoder takes
    waveforms and computes log-mel itself), or
    {"modality": "text", "tokenizer": "<dir with the tokenizer files>", "max_len": L}.
    """
    classes, cls = backbone_classes(), type(backbone)
    if isinstance(backbone, FSDPModule):  # fully_shard swaps a ViT's class for FSDPViT(FSDPModule, ViT)
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    name = cls.__name__
    if classes.get(name) is not cls:  # a subclass could compute something the exported core class does not
        raise ValueError(f"cannot export a {type(backbone).__name__}: exportable backbones are {sorted(classes)}")
    if "modality" not in input_spec:
        raise ValueError(f"input_spec needs a 'modality' key, got {input_spec}")
    return {"prefix": prefix, "backbone": {"class": name, "args": backbone.config}, "input": input_spec}


class Encoder(nn.Module):
    """A pretrained backbone with what turns raw inputs into its inputs. `forward(x) -> (N, D)`.

    images and video: x is a normalised float tensor (N, 3, H, W) or (N, 3, T, H, W), as `input` says;
    audio: x is a waveform batch (N, samples) at `input["sample_rate"]`; log-mel happens here;
    text: x is a list of strings, tokenised here.
    """

    def __init__(self, backbone: nn.Module, input_spec: dict):
        super().__init__()
        self.backbone, self.input = backbone, dict(input_spec)
        self.embed_dim = backbone.embed_dim
        self.tokenizer = None
        if self.input["modality"] == "text":
            from core.text import TextTokenizer

            self.tokenizer = TextTokenizer(self.input["tokenizer"], self.input["max_len"])

    def preprocess(self, x):
        """Raw input -> what the backbone takes (also the 'raw input' baseline of core.evaluate)."""
        modality = self.input["modality"]
        if modality == "audio":
            from core.augment import log_mel

            spec = self.input
            return log_mel(x, spec["sample_rate"], n_mels=spec["n_mels"], hop_ms=spec["hop_ms"], win_ms=spec["win_ms"], mean=spec["mean"], std=spec["std"], frames=spec.get("frames"))
        if modality == "text":
            tokens = self.tokenizer([x] if isinstance(x, str) else list(x))
            device = next(self.backbone.parameters()).device
            return {name: value.to(device) for name, value in tokens.items()}
        return x

    def tokens(self, x) -> torch.Tensor:
        """(N, L, D): every patch token of a ViT backbone, for probes that read all of them
        (core.probe.attentive_probe_accuracy); `forward` pools them into one vector."""
        return self.vit_backbone().tokens(self.preprocess(x))[:, 1:]

    def raw_tokens(self, x) -> torch.Tensor:
        """(N, L, prod(patch) * C): the backbone's input cut into the patches it embeds, the raw-input
        baseline for `tokens`."""
        from core.masking import patchify

        return patchify(self.preprocess(x), self.vit_backbone().patch_embed.patch_size)

    def vit_backbone(self) -> nn.Module:
        """The backbone, when it is a ViT (one with patch tokens); a clear error otherwise."""
        if not hasattr(self.backbone, "patch_embed"):
            raise ValueError(f"a {type(self.backbone).__name__} encoder has no patch tokens: token probes need a ViT")
        return self.backbone

    def forward(self, x) -> torch.Tensor:
        x = self.preprocess(x)
        if isinstance(x, dict):
            return self.backbone(x["input_ids"], x["attention_mask"])
        return self.backbone(x)


def export_checkpoint(ckpt_path: str, out: str) -> list[str]:
    """Write every encoder declared in the checkpoint; returns the folders written."""
    if os.path.isdir(ckpt_path) and not os.path.isfile(os.path.join(ckpt_path, ".metadata")):
        raise IsADirectoryError(f"{ckpt_path} is a folder; export takes a checkpoint file (runs/<run>/checkpoints/last.ckpt)")
    if os.path.isdir(ckpt_path):
        # torch's distributed checkpoint reads its .metadata with pickle.load, which can run code.
        raise IsADirectoryError(
            f"{ckpt_path} is a distributed checkpoint folder (ModelParallelStrategy's default), whose metadata is "
            "a pickle that export does not load; train with --trainer.strategy.save_distributed_checkpoint=false "
            "so that rank 0 writes the full weights in one file"
        )
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    encoders = ckpt.get("encoders")
    if not encoders:
        raise ValueError(f"{ckpt_path} declares no encoders (its recipe must set checkpoint['encoders'])")
    state = ckpt["state_dict"]
    written = []
    for name, entry in encoders.items():
        folder = out if len(encoders) == 1 else os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        prefix = entry["prefix"]
        weights = {k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"no weights under {prefix!r} in {ckpt_path}")
        input_spec = dict(entry["input"])
        if input_spec["modality"] == "text":  # ship the tokenizer with the weights
            ship_tokenizer(input_spec["tokenizer"], folder, f"{ckpt_path}: the tokenizer of encoder {name!r}")
            input_spec["tokenizer"] = "."
        save_file(weights, os.path.join(folder, "model.safetensors"))
        config = {"format_version": FORMAT_VERSION, "name": name, "backbone": entry["backbone"], "input": input_spec}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        written.append(folder)
    return written


SPEC_KEYS = {
    "image": ("size", "mean", "std"),
    "video": ("frames", "stride", "size", "mean", "std"),
    "audio": ("sample_rate", "seconds", "n_mels", "hop_ms", "win_ms", "mean", "std"),
    "text": ("tokenizer", "max_len"),
}


def check_config(config: dict, where: str) -> None:
    """An exported config this code can rebuild, or an error naming the file and what is wrong with it."""
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {config.get('format_version')!r}; this code reads version {FORMAT_VERSION}")
    missing = [key for key in ("backbone", "input") if key not in config]
    missing += [f"backbone.{key}" for key in ("class", "args") if key not in config.get("backbone", {})]
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}")
    modality = config["input"].get("modality")
    if modality not in SPEC_KEYS:
        raise ValueError(f"{where}: input.modality {modality!r} is not one of {sorted(SPEC_KEYS)}")
    missing = [f"input.{key}" for key in SPEC_KEYS[modality] if key not in config["input"]]
    if missing:
        raise ValueError(f"{where}: a {modality} input needs {', '.join(missing)}")


def load_encoder(path: str, pretrained: bool = True) -> Encoder:
    """Rebuild an exported encoder from `path` (a folder with config.json and model.safetensors).
    pretrained=False gives the same architecture at random init: the baseline every recipe compares with."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not an exported encoder: {config_path} is missing")
    with open(config_path) as f:
        config = json.load(f)
    check_config(config, config_path)
    classes = backbone_classes()
    cls_name = config["backbone"]["class"]
    if cls_name not in classes:
        raise ValueError(f"{config_path} names backbone {cls_name!r}; known: {sorted(classes)}")
    backbone = classes[cls_name](**config["backbone"]["args"])
    if pretrained:
        backbone.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    input_spec = dict(config["input"])
    if input_spec["modality"] == "text":
        input_spec["tokenizer"] = os.path.normpath(os.path.join(path, input_spec["tokenizer"]))
    return Encoder(backbone, input_spec).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export the pretrained encoder(s) of a recipe checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    for folder in export_checkpoint(args.checkpoint, args.out):
        print(f"wrote {folder}/model.safetensors and config.json")


if __name__ == "__main__":
    main()
