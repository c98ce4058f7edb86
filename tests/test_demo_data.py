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
import re
import shutil
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


def build(cwd, *args: str, absolute: bool = False) -> str:
    """Run make_demo.py in ``cwd`` with ``--out demo`` (a relative path, as ``make data`` has; with ``absolute``
    the folder's absolute path); return the folder."""
    os.makedirs(cwd, exist_ok=True)
    command = [sys.executable, SCRIPT, "--out", os.path.join(cwd, "demo") if absolute else "demo", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return os.path.join(cwd, "demo")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("demo")
    return {
        "seed0": build(tmp / "a", "--seed", "0", "--scale", SCALE, "--workers", "2"),
        # Another folder, named by its absolute path (info.json had held the --out path as given).
        "seed0_again": build(tmp / "b", "--seed", "0", "--scale", SCALE, "--workers", "1", absolute=True),
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


def test_plain_sets_refuse_to_overwrite_the_demo_sets_from_any_folder(tmp_path):
    """The guard compared --out with data/demo under the current folder: run from elsewhere, `--out
    <repository>/data/demo` overwrote the demo sets, and a data/demo of that other folder was refused. A copy
    of the scripts stands in for the repository, so that the real demo sets are never at stake."""
    scripts = tmp_path / "repository" / "data"
    scripts.mkdir(parents=True)
    for file in glob.glob(os.path.join(ROOT, "data", "*.py")):
        shutil.copy(file, scripts)
    (tmp_path / "elsewhere").mkdir()

    def run(cwd, out):
        command = [sys.executable, str(scripts / "make_demo.py"), "--out", out, "--only", "image", "--plain", "--scale", SCALE]
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True)

    for cwd, out in ((tmp_path / "elsewhere", str(scripts / "demo")), (tmp_path / "repository", "data/demo")):
        result = run(cwd, out)
        assert result.returncode != 0 and "--plain would overwrite the demo sets" in result.stderr, (cwd, out)
    assert not (scripts / "demo").exists()
    assert run(tmp_path / "elsewhere", "data/demo").returncode == 0  # not the demo sets: a folder of its own
    assert (tmp_path / "elsewhere" / "data" / "demo" / "image" / "info.json").is_file()


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


def test_supervised_reference_scores_features_in_eval_mode_and_leaves_the_running_statistics(builds, monkeypatch):
    """Its features had been taken with BatchNorm in training mode: each batch normalised by its own
    statistics, and the running ones overwritten by the split being scored."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import supervised_reference
    from core.augment import ImageEval
    from core.resnet import ResNet

    torch.manual_seed(0)
    backbone = ResNet(18, width=4)
    modes, running = [], copy.deepcopy({k: v for k, v in backbone.state_dict().items() if "running" in k})
    backbone.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    x, y = supervised_reference.features(backbone, os.path.join(builds["seed0"], "image", "val-*.tar"), ImageEval(32, resize=32), "image")
    assert len(x) == len(y) > 0 and modes and not any(modes) and backbone.training
    assert all(backbone.state_dict()[k].equal(v) for k, v in running.items())


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


@pytest.mark.parametrize("modality", list(LABELED))
def test_probe_raw_loads_each_split_as_stored(builds, monkeypatch, modality):
    """probe_raw's features are the inputs as the shards store them, in shard order with their labels:
    pixels / 255, every frame's pixels / 255, or the log-mel of the channels' mean."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import probe_raw
    from core.augment import log_mel

    demo = builds["seed0"]
    info = load_info(os.path.join(demo, modality))["splits"]["val"]
    x, y = probe_raw.load_split(probe_raw.split_pattern(demo, modality, "val"), modality)
    samples = split_samples(os.path.join(demo, modality), info)
    assert len(y) == len(x) == info["samples"] == len(samples)
    first = sorted(samples)[0]  # read_batches keeps the shards' order, and one shard's samples are in key order
    decoded = decode_sample({"__key__": first, **samples[first]})
    assert y[0].item() == decoded["label"]
    if modality == "image":
        expected = torch.from_numpy(np.array(decoded["image"])).float() / 255  # (32, 32, 3)
    elif modality == "video":
        expected = decoded["video"].frames().float() / 255  # (T, 32, 32, 3)
    else:
        expected = log_mel(decoded["audio"].samples().mean(0, keepdim=True), sample_rate=16_000)  # (1, 1, 128, frames)
    torch.testing.assert_close(x[0], expected.flatten())


def test_probe_raw_prints_a_row_per_modality(builds, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import probe_raw

    probe_raw.main(["--demo", builds["seed0"], "--only", "image, audio", "--steps", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["image", "audio"]
    counts = {m: load_info(os.path.join(builds["seed0"], m))["splits"] for m in ("image", "audio")}
    image, audio = rows
    assert image[2:5] == ["3072", str(counts["image"]["train"]["samples"]), str(counts["image"]["val"]["samples"])]
    assert int(audio[-6]) % 128 == 0 and audio[-5:-3] == [str(counts["audio"][s]["samples"]) for s in ("train", "val")]
    assert all(0 <= float(value.rstrip("%")) <= 100 for row in rows for value in row[-3:-1])
    with pytest.raises(SystemExit):
        probe_raw.main(["--demo", builds["seed0"], "--only", "image,smell"])
    assert "unknown modality smell" in capsys.readouterr().err


def test_nuisance_cues_knn_standardises_each_feature(monkeypatch):
    """nuisance_cues' kNN puts every feature on one scale: a class read from a feature spread over 0.1 is
    still found beside an uninformative one spread over 1000, which would decide every distance unscaled."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import nuisance_cues

    rng = np.random.default_rng(0)

    def draw(n):
        labels = np.arange(n) % 10
        informative = labels * 0.01 + rng.normal(0, 0.001, n)  # the classes 0.01 apart
        return np.stack([informative, rng.normal(0, 1000, n)], 1), labels

    (train, train_labels), (test, test_labels) = draw(500), draw(200)
    assert nuisance_cues.knn_accuracy(train, train_labels, test, test_labels) > 0.6  # 0.715; unscaled, near chance
    assert nuisance_cues.knn_accuracy(train, train_labels, test, rng.permutation(test_labels)) < 0.3


def test_nuisance_cues_prints_what_data_readme_says(capsys, monkeypatch):
    """data/README.md quotes nuisance_cues.py's numbers; when the generators change them, the README must follow."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import nuisance_cues

    nuisance_cues.main()
    out = capsys.readouterr().out
    with open(os.path.join(ROOT, "data", "README.md")) as f:
        readme = " ".join(f.read().split())
    quoted = re.findall(r"-?\d+\.\d%?", out)
    medians = dict(re.findall(r"(click train|pure tone) (-\d+\.\d)", out))
    assert len(quoted) == 15, out  # 3 scores, 10 class medians, 2 shares of the backgrounds
    for number in [*quoted[:3], medians["click train"], medians["pure tone"], *quoted[-2:]]:
        assert number in readme, f"nuisance_cues.py prints {number}, which data/README.md does not quote:\n{out}"


# --- The generators themselves: every measured result rests on each label being what its sample shows.
# These call the generator functions on a few samples each, not whole sets, and check the property on
# the rendered pixels and waveforms.


@pytest.fixture
def generators(monkeypatch) -> SimpleNamespace:
    """The generator modules, imported from data/ as make_demo.py imports them."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "data"))
    import demo_audio
    import demo_image
    import demo_shapes
    import demo_text
    import demo_video
    import make_demo

    return SimpleNamespace(
        shapes=demo_shapes, image=demo_image, video=demo_video, audio=demo_audio, text=demo_text, make=make_demo
    )


# Points (x, y) in a shape's own frame (y up) inside and outside each class's
# shape: together they tell each class from every other one.
C36, S36, C72, S72 = np.cos(np.pi / 5), np.sin(np.pi / 5), np.cos(2 * np.pi / 5), np.sin(2 * np.pi / 5)
SHAPE_POINTS = {
    "circle": ([(0, 0), (0.95, 0), (0, -0.95), (0.67, 0.67)], [(0.75, 0.75)]),
    "ring": ([(0.78, 0), (0, -0.78), (-0.6, 0.6)], [(0, 0), (0.3, 0)]),
    "triangle": ([(0.9, 0), (0, 0), (-0.45, 0), (0.3, 0.3)], [(-0.6, 0), (0.5, 0.5), (0.9 * C72, 0.9 * S72)]),
    "square": ([(0.9, 0), (0, 0.9), (-0.9, 0), (0, -0.9), (0.45, 0.45)], [(0.6, 0.6)]),
    "star": ([(0.9, 0), (0, 0), (0.4 * C36, 0.4 * S36), (0.9 * C72, 0.9 * S72)], [(0.6 * C36, 0.6 * S36), (-0.6, 0)]),
    "cross": ([(0.9, 0), (0, 0.9), (-0.9, 0), (0, -0.9)], [(0.6, 0.6), (0.5, 0.35)]),
    "crescent": ([(-0.9, 0), (0, 0.95), (0, -0.95)], [(0, 0), (0.6, 0), (0.9, 0)]),
    "heart": ([(0, 0), (0, -0.9), (0.5, 0.5), (-0.5, 0.5)], [(0, 0.75), (0.7, -0.6)]),
    "arrow": ([(0.9, 0), (-0.9, 0), (0.2, 0.5)], [(-0.5, 0.4), (-0.9, 0.3)]),
    "bowtie": ([(0.9, 0.7), (-0.9, -0.7), (0, 0)], [(0, 0.5), (0.1, 0.4)]),
}


def test_shape_functions_draw_the_named_shapes(generators):
    """Each image class's shape function is the shape its name says (a ring has a hole, a star has notches,
    an arrow a head...): swapped or broken drawers would label one shape with another's name."""
    assert list(generators.shapes.SHAPES) == list(SHAPE_POINTS)
    for name, (inside, outside) in SHAPE_POINTS.items():
        shape = generators.shapes.SHAPES[name]
        x, y = np.array(inside + outside, float).T
        assert shape(x, y).tolist() == [True] * len(inside) + [False] * len(outside), name


def test_class_orders_are_the_documented_ones(generators):
    """A class's index is what the shards store (`cls`): the orders are data/README.md's lists, and a reorder
    would relabel every set built before it."""
    assert generators.image.CLASSES == ["circle", "ring", "triangle", "square", "star", "cross", "crescent", "heart", "arrow", "bowtie"]
    assert generators.video.CLASSES == [
        "moving left", "moving right", "moving up", "moving down", "rotating clockwise", "rotating counterclockwise",
        "growing", "shrinking", "circling", "blinking",
    ]  # fmt: skip
    assert generators.audio.CLASSES == [
        "pure tone", "harmonic tone", "chord", "rising chirp", "falling chirp", "tremolo tone", "vibrato tone",
        "noise burst", "click train", "plucked string",
    ]  # fmt: skip


def coverage_area(shapes, shape, radius: float) -> float:
    """Pixel area of ``shape`` at ``radius``, rendered whole on a canvas with room to spare."""
    size = int(2 * radius * 1.5) + 4
    return float(shapes.shape_coverage(shape, shapes.pixel_grid(size, 3), (size / 2, size / 2), radius, 0.3).sum())


def test_every_shape_lies_within_its_reach(generators):
    """SHAPE_REACH bounds every shape (paint_shape's window is sized by it), and is not loose: the bowtie's
    corners come within a few hundredths of it."""
    shapes = generators.shapes
    x, y = np.meshgrid(np.linspace(-1.5, 1.5, 1201), np.linspace(-1.5, 1.5, 1201))
    reach = {name: float(np.hypot(x, y)[shape(x, y)].max()) for name, shape in shapes.SHAPES.items()}
    assert max(reach.values()) <= shapes.SHAPE_REACH
    assert reach["bowtie"] > shapes.SHAPE_REACH - 0.05


@pytest.mark.parametrize("name", SHAPE_POINTS)
def test_paint_shape_draws_the_whole_shape(generators, name):
    """paint_shape rasterizes only the shape's bounding box (SHAPE_REACH radii + 1 around the center): the
    picture is the one compositing the shape's coverage over the whole canvas gives, so no part of the shape
    is cut off (the heart and the bowtie reach past the unit disk: a window of radius + 1 cut up to 5% of a
    large bowtie off at some angles)."""
    shapes, shape = generators.shapes, generators.shapes.SHAPES[name]
    grid, color = shapes.pixel_grid(40, 3), np.array([1.0, 0.5, 0.0])
    for center, radius, angle in [((14.3, 21.7), 12.0, 0.0), ((23.1, 16.4), 12.0, 0.7), ((20.0, 20.0), 9.0, 2.3), ((17.5, 24.2), 6.5, 4.0)]:
        painted = np.zeros((40, 40, 3))
        shapes.paint_shape(painted, grid, shape, center, radius, angle, color)
        whole = shapes.composite(np.zeros((40, 40, 3)), shapes.shape_coverage(shape, grid, center, radius, angle), color)
        np.testing.assert_allclose(painted, whole, atol=1e-6, err_msg=f"{name} at {center}, r {radius}, angle {angle}")


def test_shapes_are_anti_aliased_and_sized_by_their_radius(generators):
    """Supersampling gives edge pixels partial coverage, and a disk of radius r covers pi r^2 pixels."""
    shapes = generators.shapes
    coverage = shapes.shape_coverage(shapes.disk, shapes.pixel_grid(32, 3), (15.7, 16.2), 9.0, 0.0)
    edge = (coverage > 0.05) & (coverage < 0.95)
    assert edge.sum() > 30  # the rim of the disk: about its circumference in pixels
    assert coverage.sum() == pytest.approx(np.pi * 81, rel=0.02)


def test_shape_coverage_turns_counterclockwise_on_screen(generators):
    """The angle turns a shape counterclockwise as seen (v points down): at 0 the heart's lobes are up, at +90
    degrees they are to the left, at -90 to the right. The video's rotation senses rest on this."""
    shapes = generators.shapes
    v, u = np.mgrid[0:40, 0:40] + 0.5
    offsets = {}
    for degrees in (0, 90, -90):
        cov = shapes.shape_coverage(shapes.heart, shapes.pixel_grid(40, 3), (20, 20), 12.0, np.radians(degrees))
        offsets[degrees] = ((cov * u).sum() / cov.sum() - 20, (cov * v).sum() / cov.sum() - 20)
    assert offsets[0][1] < -1 and abs(offsets[0][0]) < 0.1  # lobes up
    assert offsets[90][0] < -1 and abs(offsets[90][1]) < 0.1  # lobes left
    assert offsets[-90][0] > 1 and abs(offsets[-90][1]) < 0.1  # lobes right


def test_clutter_draws_its_items(generators):
    """draw_distractors paints `count` items: the usual sets' 0-3 clutter items are really there."""
    shapes = generators.shapes
    grid = shapes.pixel_grid(32, 2)
    changed = []
    for seed in range(10):
        canvas = np.full((32, 32, 3), 0.5)
        shapes.draw_distractors(np.random.default_rng(seed), canvas, grid, 3)
        changed.append(int((np.abs(canvas - 0.5).max(-1) > 0.1).sum()))
    assert min(changed) > 0 and np.median(changed) >= 5, changed
    canvas = np.full((32, 32, 3), 0.5)
    shapes.draw_distractors(np.random.default_rng(0), canvas, grid, 0)
    assert (canvas == 0.5).all()


def test_backgrounds_keep_clear_of_the_object_color(generators):
    """An object's color keeps MIN_CONTRAST (less the jitter) from the flat background and the first texture
    color; the blended second texture color comes that close in about 15% of textured backgrounds, as
    data/README.md measures (data/nuisance_cues.py: 15.3%)."""
    shapes = generators.shapes
    rng = np.random.default_rng(1)
    least = shapes.MIN_CONTRAST - 20 * np.sqrt(3)  # the background color's own jitter: +-20 per channel
    close = []
    for _ in range(2000):
        _, color = shapes.pick_color(rng)
        _, flat = shapes.plain_background(rng, 2, color)
        kind, (first, second) = shapes.background_colors(rng, color)
        assert np.linalg.norm((flat[0, 0] - color) * 255) >= least
        assert np.linalg.norm((first - color) * 255) >= least
        if kind != "plain":
            close.append(np.linalg.norm((second - color) * 255) < shapes.MIN_CONTRAST)
    assert 0.12 < np.mean(close) < 0.20


def image_reach(generators, meta: dict) -> float:
    """How far from its center (pixels) an image's object can paint: paint_shape's window."""
    return generators.shapes.SHAPE_REACH * meta["radius"] + 1


def plain_image_object(generators, pixels: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """A plain image's object coverage (H, W) in [0, 1] and its flat background color (RGB 0..255), from the
    pixels: the background is the median away from the object, coverage the projection onto the named color."""
    f = pixels.astype(float)
    v, u = np.mgrid[0 : f.shape[0], 0 : f.shape[1]] + 0.5
    away = np.hypot(u - meta["center"][0], v - meta["center"][1]) > image_reach(generators, meta)
    background = np.median(f[away], axis=0)
    direction = np.array(generators.shapes.COLORS[meta["color"]], float) - background
    toward = (f - background) @ direction / (direction @ direction)  # about 1 on the object, less the color's jitter
    return np.clip(toward / np.percentile(toward, 99), 0, 1), background


def test_image_draws_the_labeled_shape(generators):
    """On the plain images, the object's pixels match the labeled class's shape at the recorded place, size and
    angle better than any other class's (by IoU), they have the named color, and most of the shape is in view."""
    shapes, image = generators.shapes, generators.image
    grid = shapes.pixel_grid(image.SIZE, 3)
    for label, name in enumerate(image.CLASSES):
        for seed in range(3):
            pixels, meta = image.render_image(np.random.default_rng([seed, label]), label, plain=True)
            assert meta["shape"] == name
            drawn, _ = plain_image_object(generators, pixels, meta)
            iou = {}
            for other in image.CLASSES:
                cov = shapes.shape_coverage(shapes.SHAPES[other], grid, meta["center"], meta["radius"], np.radians(meta["angle_deg"]))
                iou[other] = np.minimum(drawn, cov).sum() / np.maximum(drawn, cov).sum()
            assert max(iou, key=iou.get) == name and iou[name] > 0.75, (name, seed, iou)
            core = pixels[drawn > 0.9].astype(float).mean(0)
            assert np.linalg.norm(core - shapes.COLORS[meta["color"]]) < 45, (name, seed, meta["color"], core)
            in_view = drawn.sum() / coverage_area(shapes, shapes.SHAPES[name], meta["radius"])
            assert in_view > 0.75, (name, seed, in_view)


def test_image_nuisances_do_not_depend_on_the_label(generators):
    """With the same generator state, every label gives the same color, background, clutter, place, size,
    angle and noise: only the shape differs, so no nuisance tells the class."""
    image = generators.image
    v, u = np.mgrid[0 : image.SIZE, 0 : image.SIZE] + 0.5
    for seed in range(4):
        renders = [image.render_image(np.random.default_rng(seed), label) for label in range(len(image.CLASSES))]
        pixels0, meta0 = renders[0]
        far = np.hypot(u - meta0["center"][0], v - meta0["center"][1]) > image_reach(generators, meta0) + 0.5
        for pixels, meta in renders:
            assert {k: x for k, x in meta.items() if k != "shape"} == {k: x for k, x in meta0.items() if k != "shape"}
            np.testing.assert_array_equal(pixels[far], pixels0[far])


def test_plain_images_have_a_flat_background_and_no_clutter(generators):
    """--plain: away from the object every pixel is one flat color plus the pixel noise (std 0.02): no texture,
    no clutter item."""
    image = generators.image
    v, u = np.mgrid[0 : image.SIZE, 0 : image.SIZE] + 0.5
    for seed in range(30):
        pixels, meta = image.render_image(np.random.default_rng(seed), seed % 10, plain=True)
        _, background = plain_image_object(generators, pixels, meta)
        away = np.hypot(u - meta["center"][0], v - meta["center"][1]) > image_reach(generators, meta)
        assert np.abs(pixels[away] - background).max() < 0.02 * 255 * 5, (seed, meta)  # 5 std of the noise


def video_track(frames: np.ndarray) -> SimpleNamespace:
    """The object of a plain clip, frame by frame, from its pixels: area (T,), centroid u and v (T,) and the
    turn between frames (T - 1,) in radians, counterclockwise on screen positive.

    The object's weight is its distance from the flat background's color; the turn is the change of phase of
    the complex moment sum w z^k about the centroid (z = du - i dv, y up) divided by k, with k (2..5) the
    order the shape shows best (a triangle's 3, a square's 4, a star's 5)."""
    f = frames.astype(float)
    distance = np.linalg.norm(f - np.median(f.reshape(-1, 3), axis=0), axis=-1)
    w = np.clip(distance / max(np.percentile(distance, 99.9), 1.0), 0, 1) * (distance > 25)  # 25: 6 std of the noise
    v, u = np.mgrid[0 : f.shape[1], 0 : f.shape[2]] + 0.5
    area = w.sum((1, 2))
    cu = (w * u).sum((1, 2)) / np.maximum(area, 1e-9)
    cv = (w * v).sum((1, 2)) / np.maximum(area, 1e-9)
    z = (u - cu[:, None, None]) - 1j * (v - cv[:, None, None])
    moments = {k: (w * z**k).sum((1, 2)) for k in range(2, 6)}
    strength = {k: np.abs(m).min() / (w * np.abs(z) ** k).sum((1, 2)).max() for k, m in moments.items()}
    k = max(strength, key=strength.get)
    turn = np.angle(moments[k][1:] * np.conj(moments[k][:-1])) / k
    return SimpleNamespace(area=area, u=cu, v=cv, turn=turn)


def test_video_motion_is_the_labeled_motion(generators):
    """On plain clips, the object's pixels do what the label says: left moves left (and not up or down), up
    moves up (v points down), clockwise turns clockwise as seen, growing grows, circling goes round, blinking
    vanishes and comes back while the others stay in view; a moving object stays mostly in the frame."""
    video = generators.video
    for label, motion in enumerate(video.CLASSES):
        for seed in range(4):
            frames, meta = video.render_clip(np.random.default_rng([seed, label]), label, plain=True)
            assert meta["motion"] == motion and meta["shape"] not in ("circle", "ring")
            track, why = video_track(frames), (motion, seed, meta["shape"])
            du, dv = track.u[-1] - track.u[0], track.v[-1] - track.v[0]
            shown = track.area > 3
            if motion == "blinking":
                assert shown.any() and not shown.all() and (np.diff(shown.astype(int)) != 0).sum() >= 2, why
                continue
            assert shown.all(), why
            if motion.startswith("moving"):
                assert track.area.min() > 0.5 * track.area.max(), why  # a sliver may leave the frame, not the object
                along, across = {"left": (-du, dv), "right": (du, dv), "up": (-dv, du), "down": (dv, du)}[motion.split()[1]]
                assert along > 6 and abs(across) < 1, (why, du, dv)
            elif motion.startswith("rotating"):
                sense = -1 if motion == "rotating clockwise" else 1
                assert (sense * track.turn > 0).sum() >= 13 and sense * track.turn.sum() > np.radians(60), (why, track.turn)
            elif motion in ("growing", "shrinking"):
                ratio = track.area[-1] / track.area[0]
                assert (ratio > 3) if motion == "growing" else (ratio < 1 / 3), (why, ratio)
            else:  # circling: the heading of the path turns by more than half a turn, the object does not
                steps = np.diff(np.stack([track.u, -track.v], 1), axis=0)
                heading = np.unwrap(np.arctan2(steps[:, 1], steps[:, 0]))
                assert abs(heading[-1] - heading[0]) > np.pi and np.abs(steps).sum(1).min() > 0.5, (why, heading)
                assert track.area.min() > 0.8 * track.area.max(), why


def test_video_shapes_are_those_whose_rotation_shows(generators):
    """The video draws its shapes from MOVERS: every shape that looks different when turned, and only those
    (a rotating circle or ring would look still)."""
    shapes = generators.shapes
    grid = shapes.pixel_grid(32, 2)
    turned = set()
    for name, shape in shapes.SHAPES.items():
        a, b = (shapes.shape_coverage(shape, grid, (16, 16), 8.0, angle) for angle in (0.4, 0.75))
        if np.abs(a - b).sum() > 0.1 * a.sum():
            turned.add(name)
    assert sorted(generators.video.MOVERS) == sorted(turned) and len(turned) == 8


def test_video_nuisances_do_not_depend_on_the_label(generators):
    """With the same generator state, every motion gets the same shape, color, background and clutter, and
    the same starting size and angle (but for growing and shrinking, whose sizes are the motion)."""
    video = generators.video
    for seed in range(4):
        metas = [video.render_clip(np.random.default_rng(seed), label)[1] for label in range(len(video.CLASSES))]
        nuisances = [(m["shape"], m["color"], m["background"]) for m in metas]
        assert len(set(nuisances)) == 1, nuisances
        starts = {}
        for motion in video.CLASSES:
            _, radius, angle, _ = video.trajectory(np.random.default_rng(seed), motion)
            starts[motion] = (angle[0], None if motion in ("growing", "shrinking") else radius[0])
        assert len({a for a, _ in starts.values()}) == 1 and len({r for _, r in starts.values() if r is not None}) == 1


def test_plain_videos_have_a_flat_background_and_no_clutter(generators):
    """--plain videos: when a blinking object is off, the frame is one flat color plus the pixel noise (std
    0.015): no texture and no clutter item (the usual clips have 1-4)."""
    video = generators.video
    blinking = video.CLASSES.index("blinking")
    for seed in range(10):
        frames, _ = video.render_clip(np.random.default_rng(seed), blinking, plain=True)
        f = frames.astype(float)
        spread = np.abs(f - np.median(f.reshape(-1, 3), axis=0)).max(axis=(1, 2, 3))  # per frame
        assert spread.min() < 0.015 * 255 * 5, (seed, spread)


def audio_event_alone(generators, monkeypatch, seed, label: int) -> tuple[np.ndarray, dict, int, int]:
    """A demo clip rendered without its background noise: the waveform, its metadata and the event's first
    sample and length (from the metadata, rounded to the millisecond)."""
    audio = generators.audio
    with monkeypatch.context() as patch:
        patch.setattr(audio, "colored_noise", lambda rng, n, exponent: np.zeros(n))
        clip, meta = audio.render_clip(np.random.default_rng(seed), label)
    rate = audio.SAMPLE_RATE
    return clip.astype(float), meta, round(meta["onset_s"] * rate), round(meta["duration_s"] * rate)


def band_share(x: np.ndarray, frequency: float, rate: int, width: float = 0.02) -> float:
    """Share of the power of ``x`` (Hann window) within ``width`` (relative) of ``frequency``."""
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(power[np.abs(freqs - frequency) <= width * frequency].sum() / power.sum())


def peak_frequency(x: np.ndarray, rate: int) -> float:
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x)))))])


def envelope_and_frequency(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and instantaneous frequency (Hz) of ``x`` from its analytic signal, smoothed over 5 ms."""
    spectrum = np.fft.fft(x)
    spectrum[len(x) // 2 + 1 :] = 0
    spectrum[1 : (len(x) + 1) // 2] *= 2
    analytic = np.fft.ifft(spectrum)
    smooth = np.ones(80) / 80
    frequency = np.diff(np.unwrap(np.angle(analytic))) * rate / (2 * np.pi)
    return np.convolve(np.abs(analytic), smooth, "valid"), np.convolve(frequency, smooth, "valid")[80:-80]


def test_audio_event_is_the_labeled_sound(generators, monkeypatch):
    """Each clip's event (rendered without its noise) is the labeled sound: a pure tone has one partial, a
    harmonic tone overtones, a chord a root, fifth and a minor or major third (both occur), chirps rise or fall,
    a tremolo's loudness and a vibrato's pitch wobble, a noise burst has no partial, clicks are spikes at the
    recorded rate, and a
    plucked string dies away while the sustained sounds do not."""
    audio, rate = generators.audio, generators.audio.SAMPLE_RATE
    thirds = set()
    for label, kind in enumerate(audio.CLASSES):
        for seed in range(4):
            clip, meta, start, n = audio_event_alone(generators, monkeypatch, [seed, label], label)
            assert meta["sound"] == kind
            event = clip[start + 16 : start + n - 16]  # the metadata's times are rounded to 1 ms
            middle = clip[start + int(0.05 * rate) : start + n - int(0.08 * rate)]  # past the attack, before the release
            f0, why = meta.get("pitch_hz"), (kind, seed, meta)
            amplitude, frequency = envelope_and_frequency(middle, rate)
            steady = amplitude.min() / amplitude.max()
            quarter = len(event) // 4
            decay = np.sqrt(np.mean(event[-quarter:] ** 2) / np.mean(event[:quarter] ** 2))
            crest = np.abs(event).max() / np.sqrt(np.mean(event**2))
            if kind == "pure tone":
                assert band_share(event, f0, rate) > 0.95 and band_share(event, 2 * f0, rate) < 0.001, why
                assert frequency.std() / frequency.mean() < 0.005, why
            elif kind == "harmonic tone":
                assert band_share(event, f0, rate) > 0.2 and band_share(event, 2 * f0, rate) > 0.03, why
            elif kind == "chord":
                minor, major = (band_share(event, f0 * 2 ** (q / 12), rate, 0.01) for q in (3, 4))
                assert band_share(event, f0, rate, 0.01) > 0.2 and band_share(event, f0 * 2 ** (7 / 12), rate, 0.01) > 0.2, why
                assert max(minor, major) > 0.2 and min(minor, major) < 0.02, why
                thirds.add("minor" if minor > major else "major")
            elif kind in ("rising chirp", "falling chirp"):
                first, last = (peak_frequency(part, rate) for part in (event[: len(event) // 3], event[-len(event) // 3 :]))
                assert (last / first if kind == "rising chirp" else first / last) > 1.3, (why, first, last)
            elif kind == "tremolo tone":
                assert steady < 0.5 and abs(peak_frequency(event, rate) / f0 - 1) < 0.02, (why, steady)
            elif kind == "vibrato tone":
                assert steady > 0.7 and frequency.std() / frequency.mean() > 0.01, why
            elif kind == "noise burst":
                power = np.abs(np.fft.rfft(event * np.hanning(len(event)))) ** 2
                assert np.sort(power)[-5:].sum() / power.sum() < 0.2 and crest < 6, why
            elif kind == "click train":  # about rate x duration spikes (the attack and release may hide one each)
                spikes = np.flatnonzero(np.abs(event) > 0.3 * np.abs(event).max())
                clicks = 1 + int((np.diff(spikes) > 0.002 * rate).sum())
                assert crest > 8 and abs(clicks - meta["rate_hz"] * meta["duration_s"]) <= 2, (why, crest, clicks)
            else:
                assert kind == "plucked string" and decay < 0.4, (why, decay)
            if kind in ("pure tone", "harmonic tone", "chord", "rising chirp", "falling chirp", "vibrato tone"):
                assert decay > 0.6, (why, decay)  # sustained
            if kind in ("pure tone", "rising chirp", "falling chirp"):
                assert steady > 0.7, (why, steady)
    assert thirds == {"minor", "major"}


def test_audio_event_sits_at_its_onset_at_its_gain(generators, monkeypatch):
    """Without its noise a clip is silent before the recorded onset and after onset + duration, and the event
    peaks at the recorded gain (dBFS)."""
    audio = generators.audio
    for label in range(len(audio.CLASSES)):
        for seed in range(2):
            clip, meta, start, n = audio_event_alone(generators, monkeypatch, [seed, label], label)
            assert start > 16 or meta["onset_s"] < 0.002
            assert not clip[: max(start - 16, 0)].any() and not clip[start + n + 16 :].any(), meta
            peak_db = 20 * np.log10(np.abs(clip[start : start + n]).max())
            assert peak_db == pytest.approx(meta["gain_db"], abs=1.5), meta


def test_audio_noise_has_the_named_color_and_snr(generators, monkeypatch):
    """The background noise is the named color (power falls 0, 1 or 2 decades a decade for white, pink, brown)
    and sits the recorded SNR below the event: the noise is found by fitting the clip to the event rendered
    alone and the noise the generator drew."""
    audio, rate = generators.audio, generators.audio.SAMPLE_RATE
    slopes = {"white": 0.0, "pink": -1.0, "brown": -2.0}
    seen = set()
    for seed in range(12):
        label = seed % 10
        drawn = []
        with monkeypatch.context() as patch:
            patch.setattr(audio, "colored_noise", lambda *a, real=audio.colored_noise: drawn.append(real(*a)) or drawn[-1])
            clip, meta = audio.render_clip(np.random.default_rng([seed, 7]), label)
        event, same_meta, start, n = audio_event_alone(generators, monkeypatch, [seed, 7], label)
        assert same_meta == meta and len(drawn) == 1
        # clip = (event + g * noise) / s for the peak normalization s: least squares gives 1 / s and g / s.
        (a, b), *_ = np.linalg.lstsq(np.stack([event, drawn[0]], 1), clip.astype(float), rcond=None)
        snr = 20 * np.log10(np.sqrt(np.mean(event[start : start + n] ** 2)) / (b / a))
        assert snr == pytest.approx(meta["snr_db"], abs=0.3), meta
        power = np.abs(np.fft.rfft(drawn[0])) ** 2
        freqs = np.fft.rfftfreq(len(drawn[0]), 1 / rate)
        band = (freqs > 100) & (freqs < 4000)
        slope = np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0]
        assert slope == pytest.approx(slopes[meta["noise"]], abs=0.2), (meta, slope)
        seen.add(meta["noise"])
    assert seen == set(slopes)


def test_audio_nuisances_are_drawn_alike_for_every_class(generators):
    """Every class spreads over the documented ranges of loudness, onset, duration, SNR and noise colors:
    none is tied to the class (beyond what data/README.md measures)."""
    audio = generators.audio
    ranges = {"gain_db": (-26, -6), "onset_s": (0, 0.35), "duration_s": (0.35, 0.65), "snr_db": (0, 25)}
    for label in range(len(audio.CLASSES)):
        metas = [audio.render_clip(np.random.default_rng([seed, label, 3]), label)[1] for seed in range(12)]
        for field, (lo, hi) in ranges.items():
            values = [m[field] for m in metas]
            assert lo <= min(values) and max(values) <= hi and max(values) - min(values) > 0.4 * (hi - lo), (label, field, values)
        assert len({m["noise"] for m in metas}) >= 2, label
        if audio.CLASSES[label] not in ("click train", "noise burst", "rising chirp", "falling chirp"):  # f0 is the pitch
            assert all(150 <= m["pitch_hz"] <= 1500 for m in metas), label


def test_text_chunks_and_splits(generators):
    """Chunks hold 512-2000 characters (a short tail joins the chunk before it) and lose no text; every source
    goes to one split, about 10% of sources to val; keys are unique."""
    text = generators.text
    words = [f"word{i}" for i in range(400)]
    paragraphs = [" ".join(words[(7 * j) % 300 : (7 * j) % 300 + 20 + j % 50]) for j in range(60)]
    document = "\n\n".join(paragraphs)
    chunks = text.chunk_text(document)
    assert all(512 <= len(c) <= 2000 + 2 + 511 for c in chunks) and sum(len(c) > 2000 for c in chunks) <= 1
    assert "\n\n".join(chunks) == document
    assert text.chunk_text(document[:400]) == []
    assert [len(c) for c in text.split_long("x" * 4500, 2000)] == [2000, 2000, 500]

    sources = [(f"source-{i}", document) for i in range(300)]
    splits = text.text_samples("prose", sources)
    where = defaultdict(set)
    for split, samples in splits.items():
        for s in samples:
            where[s["json"]["source"]].add(split)
    assert all(len(s) == 1 for s in where.values()) and len(where) == 300
    val = sum(s == {"val"} for s in where.values()) / 300
    assert 0.05 < val < 0.15
    keys = [s["__key__"] for samples in splits.values() for s in samples]
    assert len(keys) == len(set(keys)) == 300 * len(chunks)


def test_text_code_domain_is_python_source(builds):
    """The code domain holds the standard library's source, the prose domain English: most code chunks have
    Python statements, few prose chunks do."""
    folder = os.path.join(builds["seed0"], "text")
    statement = re.compile(r"^\s*(def |class |import |from \S+ import |return\b|if .*:\s*$|for .*:\s*$)", re.M)
    share = {}
    for domain, splits in load_info(folder)["domains"].items():
        samples = [split_samples(os.path.join(folder, domain), split_info) for split_info in splits.values()]
        chunks = [members["txt"].decode() for split in samples for members in split.values()]
        share[domain] = np.mean([bool(statement.search(c)) for c in chunks])
    assert share["code"] > 0.75 and share["prose"] < 0.4, share


def test_every_sample_has_its_own_generator(generators, monkeypatch):
    """Each sample's generator is seeded by (seed, modality, split, index), all different: train and val, or
    two samples of one class, never repeat each other's draws."""
    make = generators.make
    seeds = []
    real = np.random.default_rng
    monkeypatch.setattr(make.np.random, "default_rng", lambda seed=None: seeds.append(tuple(seed)) or real(seed))
    pngs = {}
    for modality in make.LABELED:
        for split in make.SPLITS:
            for index in (0, 1, 10):
                sample = make.labeled_sample((0, modality, split, index, {}))
                if modality == "image":
                    pngs[split, index] = sample["png"]
    assert len(seeds) == len(set(seeds)) == 3 * 2 * 3
    assert len(set(pngs.values())) == len(pngs)  # index 0 and 10 have the same label


def test_labels_are_balanced(generators):
    """Any number of samples splits over the classes within one of each other."""
    for count in range(1, 60):
        labels = [generators.make.balanced_label(i, 10) for i in range(count)]
        per_class = [labels.count(c) for c in range(10)]
        assert max(per_class) - min(per_class) <= 1 and sum(per_class) == count


def test_sets_have_the_documented_shards(builds):
    """Every split is in SHARDS[split] shards (4 train, 2 val: each rank of a small run gets whole shards)."""
    for modality in LABELED:
        info = load_info(os.path.join(builds["seed0"], modality))
        assert {split: s["shards"] for split, s in info["splits"].items()} == {"train": 4, "val": 2}, modality


def test_write_split_fills_its_shards_and_replaces_an_earlier_build(generators, tmp_path):
    """A count that does not divide evenly still fills SHARDS[split] shards, and building again at another
    scale replaces the earlier shards, leaving none behind."""
    make = generators.make
    samples = lambda n: ({"__key__": f"train-{i:06d}", "cls": b"0"} for i in range(n))
    assert make.write_split(samples(10), str(tmp_path), "train", 10)["shards"] == 4
    assert make.write_split(samples(3), str(tmp_path), "train", 3)["shards"] == 3
    assert sorted(os.listdir(tmp_path)) == [f"train-00000{i}.tar" for i in range(3)]


def test_shards_keep_the_sample_order_whatever_the_workers(generators, monkeypatch, tmp_path):
    """Shards hold the samples in index order even when a later chunk of work is done first (here the first
    16 samples are slow): the bytes do not depend on the number of workers or on which finishes first."""
    import time
    from multiprocessing import Pool

    make, parent = generators.make, os.getpid()
    real = make.balanced_label

    def slow_first_chunk(index, num_classes):
        if index < 16 and os.getpid() != parent:  # imap's first chunk of 16, in a (forked) worker
            time.sleep(0.01)
        return real(index, num_classes)

    monkeypatch.setattr(make, "balanced_label", slow_first_chunk)
    with Pool(2) as pool:
        info = make.build_labeled(pool, str(tmp_path), "audio", 0, 0.01, {})
    folder = os.path.join(tmp_path, "audio")
    for split, split_info in info["splits"].items():
        keys = [key for f in braceexpand.braceexpand(os.path.join(folder, os.path.basename(split_info["pattern"]))) for key in read_tar(f)]
        assert keys == [f"{split}-{i:06d}" for i in range(split_info["samples"])], split


def test_text_scale_multiplies_the_sample_count(generators, monkeypatch, tmp_path):
    """--scale cuts the text splits as it cuts the labeled ones: ceil(count * scale) chunks."""
    make = generators.make
    document = "\n\n".join("lorem ipsum dolor sit amet " * 8 + str(i) for i in range(100))
    docs = lambda: [(f"source-{i}", document) for i in range(40)]
    monkeypatch.setattr(make.demo_text, "prose_documents", docs)
    monkeypatch.setattr(make.demo_text, "code_documents", docs)
    full = make.demo_text.text_samples("prose", docs())
    info = make.build_text(str(tmp_path), 0, 0.3)
    for domain in ("prose", "code"):
        assert {split: info["domains"][domain][split]["samples"] for split in make.SPLITS} == {
            split: math.ceil(len(full[split]) * 0.3) for split in make.SPLITS
        }
