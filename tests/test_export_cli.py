"""core.export / load_encoder round trips and the shared CLI."""

import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from core import load_encoder
from core.data import NoReadableShards
from core.data.shards import read_shard
from core.data.write import write_shards
from core.export import describe_encoder, export_checkpoint
from core.resnet import ResNet
from core.vit import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_checkpoint(path, backbone, spec, prefix="model.encoder."):
    # What Lightning writes, reduced to what export reads: the state dict and the declared encoders.
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    state["model.head.weight"] = torch.zeros(2, 2)  # weights outside the encoder are left out
    torch.save({"state_dict": state, "encoders": {"image": describe_encoder(prefix, backbone, spec)}}, path)


@pytest.mark.parametrize(
    "backbone, x",
    [
        (ViT((16, 16), (4, 4), size="tiny", depth=2, pool="mean"), torch.randn(3, 3, 16, 16)),
        (ViT((4, 16, 16), (2, 8, 8), size="tiny", depth=1), torch.randn(2, 3, 4, 16, 16)),
        (ViT((16, 16), (4, 4), dim=16, depth=1, heads=2, mlp_ratio=2.0, pos_embed="learned", init="trunc_normal"), torch.randn(2, 3, 16, 16)),
        (ResNet(18, small_images=True), torch.randn(2, 3, 16, 16)),
    ],
)
def test_export_round_trip_gives_identical_outputs(tmp_path, backbone, x):
    backbone.eval()
    spec = {"modality": "image", "size": list(x.shape[-2:]), "mean": [0.5] * 3, "std": [0.25] * 3}
    fake_checkpoint(tmp_path / "last.ckpt", backbone, spec)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    enc = load_encoder(folder)
    assert enc.input == spec
    with torch.no_grad():
        expected, got = backbone(x), enc(x)
        assert got.shape == (x.shape[0], backbone.embed_dim)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        fresh = load_encoder(folder, pretrained=False)(x)
    assert not torch.allclose(fresh, expected)  # the random-init baseline really is another network


def test_export_refuses_checkpoint_without_encoders(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="declares no encoders"):
        export_checkpoint(str(tmp_path / "x.ckpt"), str(tmp_path / "out"))


def test_export_never_unpickles_code_from_a_checkpoint(tmp_path):
    """A checkpoint is read with weights_only=True: a payload that would run code is refused, not run."""
    from test_data_stream import TouchFile

    marker = tmp_path / "unpickled"
    torch.save({"state_dict": {}, "encoders": TouchFile(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        export_checkpoint(str(tmp_path / "evil.ckpt"), str(tmp_path / "out"))
    assert not marker.exists()


def test_export_refuses_a_distributed_checkpoint_folder_without_unpickling_it(tmp_path):
    """FSDP's default checkpoint is a folder whose .metadata torch reads with pickle.load: export says how to get
    a one-file checkpoint instead, and runs nothing."""
    from test_data_stream import TouchFile

    marker = tmp_path / "unpickled"
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(TouchFile(str(marker)), f)
    with pytest.raises(IsADirectoryError, match="save_distributed_checkpoint=false"):
        export_checkpoint(str(folder), str(tmp_path / "out"))
    assert not marker.exists()


def test_export_names_the_core_class_of_a_backbone_fsdp_has_wrapped_and_refuses_other_subclasses():
    """fully_shard turns a ViT into FSDPViT(FSDPModule, ViT), a class made on the fly: the checkpoint must say ViT.
    A user's subclass of ViT may compute something else, and is refused rather than exported as a ViT."""
    backbone = ViT((8, 8), (4, 4), size="tiny", depth=1)
    backbone.__class__ = type("FSDPViT", (FSDPModule, ViT), {})
    assert describe_encoder("encoder.", backbone, {"modality": "image"})["backbone"]["class"] == "ViT"
    backbone.__class__ = type("MyViT", (ViT,), {})
    with pytest.raises(ValueError, match="cannot export a MyViT"):
        describe_encoder("encoder.", backbone, {"modality": "image"})


def test_load_encoder_names_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(str(tmp_path))


def test_load_encoder_names_what_a_config_lacks(tmp_path):
    backbone = ViT((8, 8), (4, 4), size="tiny", depth=1)
    fake_checkpoint(tmp_path / "last.ckpt", backbone, {"modality": "image", "size": [8, 8], "mean": [0] * 3, "std": [1] * 3})
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "e"))
    good = json.loads(open(os.path.join(folder, "config.json")).read())
    for change, message in [
        (lambda c: c.pop("backbone"), "config.json: no backbone"),
        (lambda c: c.update(format_version=99), "format_version 99; this code reads version 1"),
        (lambda c: c["input"].update(modality="Image"), "input.modality 'Image' is not one of"),
        *[(lambda c, key=key: c["input"].pop(key), f"a image input needs input.{key}") for key in ("size", "mean", "std")],
    ]:
        config = json.loads(json.dumps(good))
        change(config)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match=message):
            load_encoder(folder)


def test_load_encoder_refuses_weights_that_do_not_match_the_config(tmp_path):
    """An export that lost a tensor must not load as a partly random network (and read as a bad pretraining)."""
    from safetensors.torch import load_file, save_file

    fake_checkpoint(tmp_path / "last.ckpt", ViT((8, 8), (4, 4), size="tiny", depth=1), {"modality": "image", "size": [8, 8], "mean": [0] * 3, "std": [1] * 3})
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "e"))
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights.pop("norm.weight")
    save_file(weights, os.path.join(folder, "model.safetensors"))
    with pytest.raises(RuntimeError, match="norm.weight"):
        load_encoder(folder)


def test_the_export_keeps_the_validation_view_in_its_input_spec(tmp_path):
    """Evaluation resizes to `resize` then center-crops `size`; without them it would crop a 224 image to 224."""
    spec = {"modality": "image", "size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3, "resize": 10, "interpolation": "bicubic"}
    fake_checkpoint(tmp_path / "last.ckpt", ViT((8, 8), (4, 4), size="tiny", depth=1), spec)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "e"))
    assert json.load(open(os.path.join(folder, "config.json")))["input"] == spec and load_encoder(folder).input == spec


def test_export_names_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; export takes a checkpoint file"):
        export_checkpoint(str(tmp_path), str(tmp_path / "out"))


def test_the_export_records_the_validation_view_and_evaluation_uses_it(tmp_path):
    """The ImageNet configs validate on a 224 crop of the image resized to 256 (MAE's linear-probe view);
    core.evaluate must see the encoder's inputs the same way, not a 224 crop of 224."""
    from types import SimpleNamespace

    from core.augment import ImageEval, VideoClip
    from core.evaluate import eval_transform
    from core.export import validation_view

    def module(val_transform):
        return SimpleNamespace(_trainer=SimpleNamespace(datamodule=SimpleNamespace(val_transform=val_transform)))

    view = validation_view(module(ImageEval(224)))
    assert view == {"resize": 256, "interpolation": "bicubic"}
    spec = {"modality": "image", "size": [224, 224], "mean": [0.5] * 3, "std": [0.25] * 3, **view}
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    torch.testing.assert_close(eval_transform(spec)({"image": image})["image"], ImageEval(224, mean=(0.5,) * 3, std=(0.25,) * 3)({"image": image})["image"])
    # A clip's interpolation too: it was dropped, and core.evaluate resized a bicubic run's clips bilinearly.
    view = validation_view(module(VideoClip(4, 2, 8, train=False, short_clips="repeat_last", interpolation="bicubic")))
    assert view == {"short_clips": "repeat_last", "interpolation": "bicubic"}
    spec = {"modality": "video", "frames": 4, "stride": 2, "size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3, **view}
    video = {"video": np.random.default_rng(0).integers(0, 255, (8, 12, 16, 3), dtype=np.uint8)}
    reference = VideoClip(4, 2, 8, train=False, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic")(video)["video"]
    torch.testing.assert_close(eval_transform(spec)(video)["video"], reference)
    assert not eval_transform({**spec, "interpolation": "bilinear"})(video)["video"].equal(reference)
    assert validation_view(SimpleNamespace(_trainer=None)) == {}  # outside a fit


def test_export_cli(tmp_path):
    backbone = ViT((8, 8), (4, 4), size="tiny", depth=1)
    fake_checkpoint(tmp_path / "last.ckpt", backbone, {"modality": "image", "size": [8, 8], "mean": [0] * 3, "std": [1] * 3})
    out = subprocess.run(
        [sys.executable, "-m", "core.export", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "e")],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    assert "model.safetensors" in out.stdout
    assert "Warning" not in out.stderr, out.stderr  # runpy's warning when core/__init__ imports core.export
    assert os.path.isfile(tmp_path / "e" / "config.json")


def mae_cli(*args: str) -> int | str | None:
    """`python recipes/mae/train.py fit --config <demo> ...` in this process (the CLI a recipe's train.py runs):
    the exit status; what it printed is in capsys."""
    from core.cli import run
    from recipes.mae.model import MAE

    with pytest.raises(SystemExit) as stopped:
        run(MAE, args=["fit", "--config", os.path.join(ROOT, "recipes/mae/configs/demo.yaml"), *args])
    return stopped.value.code


def test_print_config_shows_every_section(capsys):
    assert mae_cli("--print_config") in (0, None)
    printed = capsys.readouterr().out
    for key in ("model:", "data:", "trainer:", "probe:", "checkpoint:", "mask_ratio: 0.75", "seed_everything:"):
        assert key in printed


def test_wrong_config_key_is_named(tmp_path, capsys):
    # A misspelling, not a prefix: argparse accepts unambiguous prefixes (`--model.mask_rati`) as the full name.
    assert mae_cli("--model.mask_ratoi=0.5") not in (0, None)
    assert "mask_ratoi" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    with open(os.path.join(ROOT, "recipes/mae/configs/demo.yaml")) as f:
        bad.write_text(f.read().replace("mask_ratio:", "mask_ratoi:"))
    assert mae_cli("--config", str(bad)) not in (0, None)
    assert "mask_ratoi" in capsys.readouterr().err


def test_text_encoder_round_trip_ships_its_tokenizer(tmp_path):
    from core.text import TextTokenizer, TextTransformer, train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1", "masked autoencoders"] * 20
    train_tokenizer(texts, vocab_size=300, out_dir=str(tmp_path / "tok"))
    tok = TextTokenizer(str(tmp_path / "tok"), max_len=16)
    backbone = TextTransformer(vocab_size=tok.vocab_size, dim=32, depth=1, heads=2, max_len=16, pad_id=tok.pad_id).eval()
    spec = {"modality": "text", "tokenizer": str(tmp_path / "tok"), "max_len": 16}
    fake_checkpoint(tmp_path / "last.ckpt", backbone, spec)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    assert "tokenizer.json" in os.listdir(folder)
    (tmp_path / "tok" / "tokenizer.json").unlink()  # the export must not depend on the training-time folder
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"the tokenizer of encoder .* holds no tokenizer.json"):
        export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "again"))  # not an export that cannot load
    enc = load_encoder(folder)
    sentences = ["the lazy fox", "return x"]
    with torch.no_grad():
        batch = tok(sentences)
        torch.testing.assert_close(enc(sentences), backbone(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0)
        torch.testing.assert_close(enc("the lazy fox"), enc(sentences[:1]), rtol=0, atol=0)  # one string, one text


def tone_shards(tmp_path):
    """8x8 images whose label is noise but whose JSON 'tone' (dark or light) is plain in the pixels:
    60 training and 40 validation samples, one shard each."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def samples(n, prefix):
        for i in range(n):
            tone = ["dark", "light"][i % 2]
            pixels = rng.integers(0, 100, (8, 8, 3)) + (0 if tone == "dark" else 150)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
            yield {"__key__": f"{prefix}{i}", "png": buf.getvalue(), "cls": int(rng.integers(0, 2)), "json": {"tone": tone}}

    write_shards(samples(60, "t"), str(tmp_path / "train-%06d.tar"))
    write_shards(samples(40, "v"), str(tmp_path / "val-%06d.tar"))
    return ["--train", str(tmp_path / "train-000000.tar"), "--val", str(tmp_path / "val-000000.tar"), "--num-workers", "0"]


IMAGE_8PX = {"modality": "image", "size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}


def test_evaluate_draws_the_random_init_baseline_at_several_seeds(tmp_path):
    from core.evaluate import evaluate

    fake_checkpoint(tmp_path / "last.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    shards = tone_shards(tmp_path)
    train, val = shards[1], shards[3]
    one = evaluate(folder, train, val, num_workers=0, target="json.tone")
    three = evaluate(folder, train, val, num_workers=0, target="json.tone", init_seeds=3)
    draws = ["random init", "random init, seed 1", "random init, seed 2"]
    assert [*three] == ["pretrained", "random init, mean of seeds 0-2", *draws, "raw input"]
    assert three["random init"] == one["random init"]  # seed 0 is the one-draw baseline
    for key in ("linear_acc", "knn_acc"):
        assert three["random init, mean of seeds 0-2"][key] == pytest.approx(sum(three[d][key] for d in draws) / 3)
    assert len({three[d]["knn_acc"] for d in draws} | {three[d]["linear_acc"] for d in draws}) > 1  # other weights


def test_evaluate_probes_the_exported_weights_against_seed_zeros_draw_both_in_eval_mode(tmp_path, monkeypatch):
    """The rows every README verdict compares: "pretrained" holds the export's weights, "random init" the draw
    at seed 0, and both extract features in eval mode (BatchNorm's running statistics, no dropout)."""
    import core.evaluate

    torch.manual_seed(7)  # weights no seed-0 draw gives
    fake_checkpoint(tmp_path / "last.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    shards = tone_shards(tmp_path)
    seen, real = {}, core.evaluate.features
    monkeypatch.setattr(core.evaluate, "features", lambda encoders, *a, **k: seen.update(encoders) or real(encoders, *a, **k))
    core.evaluate.evaluate(folder, shards[1], shards[3], num_workers=0, target="json.tone")
    exported = load_encoder(folder).state_dict()
    torch.manual_seed(0)
    load_encoder(folder)  # evaluate builds the pretrained encoder first, which draws too
    drawn = load_encoder(folder, pretrained=False).state_dict()
    pretrained, random_init = seen["pretrained"].state_dict(), seen["random init"].state_dict()
    assert all(pretrained[k].equal(exported[k]) for k in exported) and all(random_init[k].equal(drawn[k]) for k in drawn)
    assert not all(random_init[k].equal(exported[k]) for k in exported)
    assert not any(m.training for name in ("pretrained", "random init") for m in seen[name].modules())


def test_evaluate_numbers_the_classes_of_both_splits_alike_and_its_raw_row_is_the_pixels(tmp_path):
    """A val split holding one of the two tones: numbered on its own it would call "light" class 0, where
    the training split calls it 1, and every raw-pixel prediction would be scored wrong."""
    from core.evaluate import evaluate, features

    fake_checkpoint(tmp_path / "last.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    train = tone_shards(tmp_path)[1]

    def light(i: int) -> bytes:  # as tone_shards draws a light image
        buffer = io.BytesIO()
        pixels = np.random.default_rng(100 + i).integers(0, 100, (8, 8, 3)) + 150
        PIL.Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    write_shards([{"__key__": f"l{i}", "png": light(i), "json": {"tone": "light"}} for i in range(20)], str(tmp_path / "light-%06d.tar"))
    scores = evaluate(folder, train, str(tmp_path / "light-000000.tar"), num_workers=0, target="json.tone")
    assert scores["raw input"]["linear_acc"] == 1.0
    pooled, _, _ = features({"pretrained": load_encoder(folder)}, str(tmp_path / "light-000000.tar"), 4, 4, 0, "json.tone")
    assert pooled["raw input"].shape == (4, 3 * 8 * 8) and pooled["pretrained"].shape[1] != 3 * 8 * 8
    # A limit inside a batch: the encoder sees the samples up to it and no more.
    encoder, encoded = load_encoder(folder), []
    encoder.backbone.register_forward_pre_hook(lambda _, args: encoded.append(len(args[0])))
    pooled, targets, _ = features({"pretrained": encoder}, str(tmp_path / "light-000000.tar"), 6, 4, 0, "json.tone")
    assert encoded == [4, 2] and len(targets) == 6 and all(len(v) == 6 for v in pooled.values())


def test_evaluate_refuses_a_val_split_sharing_training_shards_and_limits_below_one(tmp_path):
    """The same shards as --train and --val would score the probes on the samples they were fitted on."""
    from core.evaluate import evaluate

    fake_checkpoint(tmp_path / "last.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    shards = tone_shards(tmp_path)
    with pytest.raises(ValueError, match="--train and --val share 1 shard"):
        evaluate(folder, f"{{{shards[1]},{shards[3]}}}", shards[3], num_workers=0, target="json.tone")
    for limits in ({"train_limit": 0}, {"val_limit": -5}):
        with pytest.raises(ValueError, match=f"{next(iter(limits))}={next(iter(limits.values()))} must be at least 1"):
            evaluate(folder, shards[1], shards[3], num_workers=0, target="json.tone", **limits)


def test_evaluate_fits_on_the_first_train_limit_samples_and_scores_the_first_val_limit(tmp_path, monkeypatch):
    """Limits that are not a multiple of the batch size: the probes see exactly the samples asked for."""
    import core.evaluate

    fake_checkpoint(tmp_path / "last.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    shards, sizes = tone_shards(tmp_path), []
    monkeypatch.setattr(core.evaluate, "probe_scores", lambda *xy: sizes.append([len(t) for t in xy]) or {"linear_acc": 0.0, "knn_acc": 0.0})
    core.evaluate.evaluate(folder, shards[1], shards[3], train_limit=30, val_limit=10, batch_size=8, num_workers=0, target="json.tone")
    assert sizes == [[30, 30, 10, 10]] * 3  # pretrained, random init, raw input


def test_evaluate_probes_the_label_or_any_json_field(tmp_path, capsys, caplog):
    """The raw-input probes must find the tone and not the label."""
    from core.evaluate import main as evaluate_main

    fake_checkpoint(tmp_path / "last.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "out"))
    common = [folder, *tone_shards(tmp_path)]
    rows = {}
    for target in ("label", "json.tone"):
        evaluate_main([*common, "--target", target])
        out = capsys.readouterr().out
        rows[target] = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| raw input")}
    assert rows["json.tone"]["raw input"] == 100.0
    assert rows["label"]["raw input"] < 80.0
    # A sample without the target is skipped and counted, naming it; with none to probe, the run stops.
    with caplog.at_level(logging.WARNING, logger="core.data.stream"), pytest.raises(NoReadableShards, match="'samples_skipped': 60"):
        evaluate_main([*common, "--target", "json.colour"])
    assert "has no JSON field 'colour'" in caplog.text
    one_unlabelled = [{k: v for k, v in raw.items() if k != "__url__" and (k, raw["__key__"]) != ("cls", "t0")} for raw in read_shard(common[2])]
    write_shards(one_unlabelled, str(tmp_path / "unlabelled-%06d.tar"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.data.stream"):
        evaluate_main([folder, "--train", str(tmp_path / "unlabelled-000000.tar"), *common[3:]])  # one unlabelled sample: left out
    assert re.search(r"sample 't0' of .* has no label \(a \.cls member\)", caplog.text)
    # Shards written class by class, read up to a limit, miss classes of the val split: said, not hidden.
    sorted_train = [{k: v for k, v in raw.items() if k != "__url__"} for raw in read_shard(common[2])]
    sorted_train.sort(key=lambda raw: raw["json"])  # the dark tone first
    write_shards(sorted_train, str(tmp_path / "sorted-%06d.tar"))
    common[2] = str(tmp_path / "sorted-000000.tar")
    with pytest.warns(UserWarning, match=r"1 of the 2 classes of the val split are not among the 10 training samples"):
        evaluate_main([*common, "--target", "json.tone", "--train-limit", "10"])


def test_evaluate_attentive_probe_on_vit_tokens(tmp_path, capsys):
    """--attentive adds a column scored on every patch token; the raw-input tokens are the 4x4 patches the
    ViT embeds, in which the tone is plain; encoders without patch tokens are refused before any data is read."""
    from core.evaluate import main as evaluate_main
    from core.masking import patchify

    backbone = ViT((8, 8), (4, 4), size="tiny", dim=16, depth=1, heads=2, pool="mean").eval()
    fake_checkpoint(tmp_path / "vit.ckpt", backbone, IMAGE_8PX)
    (folder,) = export_checkpoint(str(tmp_path / "vit.ckpt"), str(tmp_path / "vit"))
    enc, x = load_encoder(folder), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc.tokens(x), backbone.tokens(x)[:, 1:])  # (2, 4, 16): no class token
    torch.testing.assert_close(enc.raw_tokens(x), patchify(x, (4, 4)))  # (2, 4, 48)

    shards = tone_shards(tmp_path)
    evaluate_main([folder, *shards, "--target", "json.tone", "--attentive"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| features"))
    assert header.endswith("| linear probe acc | kNN acc | attentive probe acc |")
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:5]] for line in lines if line.startswith("| ") and line != header}
    assert set(rows) == {"pretrained", "random init", "raw input"}
    assert rows["raw input"][2] == 100.0  # standardised, not layer-normed: each raw patch keeps its brightness

    # RankMe of the val features, as is; --device names where the encoders run (cuda by default, when there is one)
    evaluate_main([folder, *shards, "--target", "json.tone", "--rank", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("| features")).endswith("| linear probe acc | kNN acc | RankMe |")
    ranks = {line.split("|")[1].strip(): float(line.split("|")[4]) for line in lines if line.startswith("| ") and "features" not in line}
    assert set(ranks) == {"pretrained", "random init", "raw input"}
    assert all(r >= 1.0 for r in ranks.values()), ranks
    assert ranks["pretrained"] <= 16 and ranks["random init"] <= 16, ranks  # at most the ViT's 16 dims

    fake_checkpoint(tmp_path / "resnet.ckpt", ResNet(18, small_images=True, width=4), IMAGE_8PX)
    (resnet,) = export_checkpoint(str(tmp_path / "resnet.ckpt"), str(tmp_path / "resnet"))
    with pytest.raises(ValueError, match="ResNet encoder has no patch tokens: token probes need a ViT"):
        evaluate_main([resnet, *shards, "--attentive"])
