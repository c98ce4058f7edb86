"""The offline demo data (data/make_demo.py): reproducible, decodable, balanced, with disjoint splits.

Builds tiny versions (``--scale``) of every set three times: twice with seed 0 (with 2 and 1 worker
processes, in different folders and at different times) and once with seed 1.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import defaultdict
from types import SimpleNamespace

import braceexpand
import numpy as np
import pytest
import torch
from PIL import Image

from core.data.decoders import decode_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "data", "make_demo.py")
SCALE = "0.02"  # the smallest split (video val, 500 at full scale) still holds every class
LABELED = {"image": "png", "video": "mp4", "audio": "flac"}
CLASS_FIELD = {"image": "shape", "video": "motion", "audio": "sound"}  # json field holding the class name


def build(cwd, *args: str) -> str:
    """Run make_demo.py in ``cwd`` with ``--out demo`` (a relative path, as ``make data`` has); return the folder."""
    os.makedirs(cwd, exist_ok=True)
    command = [sys.executable, SCRIPT, "--out", "demo", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return os.path.join(cwd, "demo")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("demo")
    return {
        "seed0": build(tmp / "a", "--seed", "0", "--scale", SCALE, "--workers", "2"),
        "seed0_again": build(tmp / "b", "--seed", "0", "--scale", SCALE, "--workers", "1"),
        "seed1": build(tmp / "c", "--seed", "1", "--scale", SCALE),
    }


def file_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    hashes = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` of a shard, read with the standard library only."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def split_samples(info_dir: str, split_info: dict) -> dict[str, dict[str, bytes]]:
    """All samples of one split, from the shards its brace pattern names (which must all exist)."""
    pattern = os.path.join(info_dir, os.path.basename(split_info["pattern"]))
    files = list(braceexpand.braceexpand(pattern))
    assert len(files) == split_info["shards"] and all(os.path.isfile(f) for f in files), pattern
    samples = {}
    for f in files:
        samples.update(read_tar(f))
    return samples


def load_info(folder: str) -> dict:
    with open(os.path.join(folder, "info.json")) as f:
        return json.load(f)


def test_same_seed_gives_byte_identical_files(builds):
    first, again = file_hashes(builds["seed0"]), file_hashes(builds["seed0_again"])
    assert {p for p in first if p.endswith(".tar")} >= {f"{m}/train-000000.tar" for m in LABELED}
    assert first == again


def test_different_seed_changes_the_data(builds):
    seed0, seed1 = file_hashes(builds["seed0"]), file_hashes(builds["seed1"])
    assert seed0.keys() == seed1.keys()
    for path in seed0:
        if path.endswith(".tar") and path.split("/")[0] in LABELED:
            assert seed0[path] != seed1[path], path
    for domain in ("prose", "code"):  # the seed picks and orders the chunks of each text split
        shards = sorted(p for p in seed0 if p.startswith(f"text/{domain}/"))
        assert [seed0[p] for p in shards] != [seed1[p] for p in shards], domain


@pytest.mark.parametrize("modality", list(LABELED))
def test_labeled_shards_decode_and_cover_all_classes(builds, modality):
    folder = os.path.join(builds["seed0"], modality)
    info = load_info(folder)
    classes = info["classes"]
    assert len(classes) == 10 == len(set(classes))
    keys = {}
    for split, split_info in info["splits"].items():
        samples = split_samples(folder, split_info)
        assert len(samples) == split_info["samples"]
        keys[split] = set(samples)
        counts = [0] * len(classes)
        for key, members in samples.items():
            assert set(members) == {LABELED[modality], "cls", "txt", "json"}, key
            decoded = decode_sample({"__key__": key, **members})
            label, meta = decoded["label"], decoded["json"]
            counts[label] += 1
            assert meta[CLASS_FIELD[modality]] == classes[label], key
            assert classes[label] in decoded["text"], (key, decoded["text"])  # every caption names the class
            if modality == "image":
                assert decoded["image"].size == (32, 32) and decoded["image"].mode == "RGB"
            elif modality == "video":
                assert tuple(decoded["video"].frames().shape) == (16, 32, 32, 3) and decoded["fps"] == 8
            else:
                assert tuple(decoded["audio"].shape) == (1, 16_000) and decoded["sample_rate"] == 16_000
                assert decoded["audio"].samples().abs().max() < 1
        assert counts == split_info["samples_per_class"]
        assert min(counts) > 0, f"{modality} {split}: a class has no sample: {counts}"
    assert keys["train"] and keys["val"] and not keys["train"] & keys["val"]


def test_text_domains(builds):
    folder = os.path.join(builds["seed0"], "text")
    info = load_info(folder)
    assert set(info["domains"]) == {"prose", "code"}
    for domain, splits in info["domains"].items():
        sources, keys = {}, {}
        for split, split_info in splits.items():
            samples = split_samples(os.path.join(folder, domain), split_info)
            assert len(samples) == split_info["samples"] > 0
            keys[split] = set(samples)
            sources[split] = set()
            for key, members in samples.items():
                assert set(members) == {"txt", "json"}, key
                text, meta = members["txt"].decode("utf-8"), json.loads(members["json"])
                assert meta["domain"] == domain and meta["chars"] == len(text), key
                assert 512 <= len(text) <= 2000 + 512, (key, len(text))
                sources[split].add(meta["source"])
                if domain == "code":
                    assert meta["source"].startswith("Lib/") and meta["source"].endswith(".py"), meta
                else:
                    assert meta["source"].startswith(("pydoc_data.topics:", "docstrings:")), meta
        assert not keys["train"] & keys["val"], domain
        assert not sources["train"] & sources["val"], f"{domain}: a source is in both splits"


def test_only_builds_the_named_modalities(tmp_path):
    out = build(tmp_path, "--only", "audio", "--scale", "0.002")
    assert sorted(os.listdir(out)) == ["audio"]
    assert load_info(os.path.join(out, "audio"))["splits"]["val"]["samples"] == 2


def test_plain_sets_keep_the_labels_and_lose_the_background_and_clutter(builds, tmp_path):
    """--plain: the same keys and labels as the image and video sets, every background flat and named plain."""
    out = build(tmp_path, "--only", "image,video", "--scale", SCALE, "--plain")
    for modality in ("image", "video"):
        info = load_info(os.path.join(out, modality))
        assert info["options"] == {"plain": True}
        plain = split_samples(os.path.join(out, modality), info["splits"]["val"])
        usual_dir = os.path.join(builds["seed0"], modality)
        usual = split_samples(usual_dir, load_info(usual_dir)["splits"]["val"])
        assert sorted(plain) == sorted(usual)
        for key, sample in plain.items():
            assert sample["cls"] == usual[key]["cls"]
            assert json.loads(sample["json"])["background"] == "plain"
        if modality == "image":  # the pixels too: flat borders, where the usual textures and clutter break the check
            assert min(flat_border_fraction(s["png"]) for s in plain.values()) > 0.5
            assert sorted(flat_border_fraction(s["png"]) for s in usual.values())[len(usual) // 2] < 0.5


def flat_border_fraction(png: bytes) -> float:
    """The share of an image's outer pixel ring within the pixel noise (std 0.02 x 255) of the ring's median color."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (124, 3)
    return float((np.abs(ring - np.median(ring, axis=0)).max(axis=1) < 15).mean())


def test_plain_sets_refuse_to_overwrite_the_demo_sets(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--only", "image", "--plain"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "--out" in result.stderr
    assert not os.path.exists(tmp_path / "data")


def test_unknown_modality_is_an_error(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(tmp_path), "--only", "image,smell"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "smell" in result.stderr


@pytest.mark.parametrize("modality", [[], ["--video"]], ids=["image", "video"])
def test_supervised_reference_trains_and_reports(builds, capsys, monkeypatch, modality):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import supervised_reference

    supervised_reference.main(["--demo", builds["seed0"], "--steps", "2", "--batch-size", "8", "--width", "4", *modality])
    lines = capsys.readouterr().out.strip().splitlines()
    assert ("ViT-tiny" in lines[0]) == bool(modality)
    row = lines[-1].split("|")
    assert row[1].strip() == "with labels" and 0 <= float(row[2]) <= 100 and 0 <= float(row[3]) <= 100


@pytest.mark.parametrize("method", ["byol", "simsiam", "vicreg", "dino"])
def test_ssl_reference_trains_and_reports(builds, capsys, monkeypatch, method):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import ssl_reference

    args = ["--demo", builds["seed0"], "--steps", "3", "--batch-size", "8", "--width", "4", "--hidden", "16", "--eval-every", "2"]
    ssl_reference.main([method, *args])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[1]) for row in rows] == [0, 2, 3]  # the score before training, every 2 steps and at the end
    assert all(math.isfinite(float(row[2])) for row in rows[1:]) and all(0 <= float(row[3]) <= 100 for row in rows)


def test_ssl_reference_starts_from_a_saved_backbone(builds, capsys, monkeypatch, tmp_path):
    """--init-backbone loads exactly what --save-backbone wrote: with no training steps in between, the
    weights and BatchNorm statistics come back unchanged and the score before training is the first run's last."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import ssl_reference

    def scores(method, steps, *extra):
        args = ["--demo", builds["seed0"], "--steps", steps, "--batch-size", "8", "--width", "4", "--hidden", "16", *extra]
        ssl_reference.main([method, *args])
        rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
        return [float(row[3]) for row in rows]

    trained, reloaded = str(tmp_path / "vicreg.pt"), str(tmp_path / "again.pt")
    first = scores("vicreg", "2", "--save-backbone", trained)
    second = scores("byol", "0", "--init-backbone", trained, "--save-backbone", reloaded)
    assert second == [first[-1]]
    before, after = torch.load(trained, weights_only=True), torch.load(reloaded, weights_only=True)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any("running_mean" in k for k in before)  # the BatchNorm statistics travel too


def test_ssl_reference_byol_target_follows_the_online_network(builds, monkeypatch):
    """The EMA moves the target by (1 - momentum) of the way to the online network: with one step at
    momentum 0.99 the target is 0.99 * its start + 0.01 * the online weights."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import ssl_reference

    recorded = {}

    def spy(module):
        recorded["target"] = copy.deepcopy(module)
        recorded["online"] = module
        recorded["start"] = [p.detach().clone() for p in recorded["target"].parameters()]
        return recorded["target"]

    monkeypatch.setattr(ssl_reference, "copy", SimpleNamespace(deepcopy=spy))
    ssl_reference.main(["byol", "--demo", builds["seed0"], "--steps", "1", "--batch-size", "8", "--width", "4", "--hidden", "16"])
    for start, t, o in zip(recorded["start"], recorded["target"].parameters(), recorded["online"].parameters(), strict=True):
        assert torch.allclose(t, 0.99 * start + 0.01 * o, atol=1e-6)
    assert any(not torch.equal(t, start) for start, t in zip(recorded["start"], recorded["target"].parameters()))


def test_audio_loss_floor_is_below_predicting_zero_and_above_zero(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import audio_loss_floor

    oracle, zero = audio_loss_floor.loss_floor(clips=3, draws=8)
    # A normalised target with the unbiased variance scores (n - 1) / n against zero, n = 256 values per patch.
    assert zero == pytest.approx(255 / 256, abs=1e-3)  # the 1e-6 added to the variance moves it a little
    # Knowing the event and the noise spectrum explains part of each patch, never the noise draw itself.
    assert 0.3 < oracle < 0.9 * zero
