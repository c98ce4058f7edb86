"""The shard tools: ``python -m core.data.write`` for every input kind, read back through the data layer, and
``python -m core.data.inspect`` with its report and exit codes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.data import read_batches
from core.data.inspect import main as inspect_main
from core.data.shards import expand_urls, read_shard
from core.data.write import main as write_main
from core.data.write import write_shards
from test_data_stream import audio_bytes, image_bytes, junk_shards, npy_bytes, to_tensors, video_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def raw_members(pattern: str) -> dict[str, dict]:
    """{key: raw sample} of the shards, as stored."""
    return {raw["__key__"]: raw for url in expand_urls(pattern) for raw in read_shard(url)}


def pixels(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    files = {"dog/b.png": 30, "dog/sub/c.jpg": 60, "cat/a.png": 90, "cat/x.y.png": 120}
    for name, value in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(pixels(value), "png" if name.endswith("png") else "jpeg"))
    (root / "cat" / "a.txt").write_text("a cat on a mat\n")  # a caption file next to the image
    (root / "cat" / "notes.md").write_text("not media")
    return root


def test_image_folder_with_classes(image_folder, tmp_path, capsys):
    out = str(tmp_path / "shards" / "img-%06d.tar")
    summary = write_main(["--out", out, "--max-count", "3", "folder", str(image_folder)])
    printed = capsys.readouterr().out
    assert summary["samples"] == 4 and summary["shards"] == 2
    assert "wrote 4 samples in 2 shards" in printed and "classes: 0=cat, 1=dog" in printed
    pattern = str(tmp_path / "shards" / "img-{000000..000001}.tar")
    assert f"shards: {pattern}" in printed and "extensions: cls, jpg, png, txt" in printed

    raw = raw_members(pattern)
    assert sorted(raw) == ["cat_a_png", "cat_x_y_png", "dog_b_png", "dog_sub_c_jpg"]
    assert raw["dog_sub_c_jpg"]["jpg"] == (image_folder / "dog/sub/c.jpg").read_bytes()  # stored as-is
    batches = list(read_batches(pattern, to_tensors, batch_size=1))
    decoded = {b["__key__"][0]: (b["label"].item(), b["text"][0], b["image"][0, 0, 0, 0].item()) for b in batches}
    assert decoded["cat_a_png"] == (0, "a cat on a mat", 90)
    assert decoded["cat_x_y_png"] == (0, "cat", 120)
    assert decoded["dog_b_png"] == (1, "dog", 30)
    assert decoded["dog_sub_c_jpg"][:2] == (1, "dog") and abs(decoded["dog_sub_c_jpg"][2] - 60) < 3

    write_main(["--out", str(tmp_path / "again" / "img-%06d.tar"), "--max-count", "3", "folder", str(image_folder)])
    assert sorted(raw_members(str(tmp_path / "again" / "img-{000000..000001}.tar"))) == sorted(raw)  # stable keys


def test_class_folders_are_written_shuffled_unless_asked_to_keep_their_order(tmp_path):
    root = tmp_path / "classes"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"{i}.png").write_bytes(image_bytes(pixels(i), "png"))

    def written_order(*args):
        out = tmp_path / "-".join(args or ["default"])
        write_main(["--out", str(out / "s-%06d.tar"), *args, "folder", str(root)])
        return [raw["__key__"] for raw in read_shard(str(out / "s-000000.tar"))]

    in_order = written_order("--in-order")
    assert in_order == [f"{c}_{i}_png" for c in "abc" for i in range(5)]
    shuffled = written_order()
    assert sorted(shuffled) == in_order and shuffled != in_order
    assert [key[0] for key in shuffled[:5]] != ["a"] * 5  # the first shard's front is not one class
    assert written_order("--seed", "0") == shuffled and written_order("--seed", "1") != shuffled


def test_folder_mixing_class_folders_and_loose_files_is_an_error(image_folder, tmp_path):
    (image_folder / "loose.png").write_bytes(image_bytes(pixels(0), "png"))
    with pytest.raises(ValueError, match="loose.png"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "folder", str(image_folder)])


def test_flat_audio_folder_and_video_class_folders(tmp_path):
    wave = (0.3 * np.sin(np.linspace(0, 30, 400))[:, None]).astype(np.float32)  # (samples, 1)
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "one.flac").write_bytes(audio_bytes(wave, 8000, "FLAC"))
    (tmp_path / "audio" / "two.wav").write_bytes(audio_bytes(wave[:200], 8000, "WAV"))
    write_main(["--out", str(tmp_path / "a-%06d.tar"), "folder", str(tmp_path / "audio"), "--media", "audio"])
    batches = {b["__key__"][0]: b for b in read_batches(str(tmp_path / "a-000000.tar"), batch_size=1)}
    assert sorted(batches) == ["one_flac", "two_wav"] and "label" not in batches["one_flac"]
    assert batches["one_flac"]["audio"].shape == (1, 1, 400) and batches["two_wav"]["audio"].shape == (1, 1, 200)

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    for name in ("run/r1.mp4", "walk/w1.mp4", "walk/w2.mp4"):
        (tmp_path / "video" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "video" / name).write_bytes(video_bytes(frames, fps=5))
    write_main(["--out", str(tmp_path / "v-%06d.tar"), "folder", str(tmp_path / "video")])
    batches = list(read_batches(str(tmp_path / "v-000000.tar"), batch_size=3))
    assert batches[0]["label"].tolist() == [0, 1, 1] and batches[0]["text"] == ["run", "walk", "walk"]
    assert batches[0]["video"].shape == (3, 3, 16, 16, 3) and batches[0]["fps"].tolist() == [5.0] * 3


def test_csv_and_jsonl_captions_with_any_media(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "p.png").write_bytes(image_bytes(pixels(10), "png"))
    (media / "s.flac").write_bytes(audio_bytes(np.zeros((100, 1), np.float32), 8000, "FLAC"))
    (media / "m.mp4").write_bytes(video_bytes(np.zeros((2, 16, 16, 3), np.uint8), fps=4))
    (tmp_path / "captions.csv").write_text(
        'path,caption,label\nmedia/p.png,"a red, square",bird\nmedia/s.flac,silence,ant\nmedia/p.png,again,bird\n'
    )
    summary = write_main(["--out", str(tmp_path / "c-%06d.tar"), "table", str(tmp_path / "captions.csv")])
    assert summary["samples"] == 3 and summary["extensions"] == ["cls", "flac", "png", "txt"]
    raw = raw_members(str(tmp_path / "c-000000.tar"))
    assert sorted(raw) == ["0", "1", "2"]  # one sample per row, even for a repeated media file
    assert raw["0"]["txt"] == b"a red, square" and raw["0"]["cls"] == b"1" and raw["1"]["cls"] == b"0"
    assert raw["2"]["png"] == (media / "p.png").read_bytes()

    rows = [{"file": "media/m.mp4", "text": "a clip", "label": 4}, {"file": "media/p.png", "text": "img", "label": 2}]
    (tmp_path / "captions.JSONL").write_text("".join(json.dumps(row) + "\n" for row in rows))  # the extension in any case
    write_main(["--out", str(tmp_path / "j-%06d.tar"), "table", str(tmp_path / "captions.JSONL"),
                "--path-column", "file", "--caption-column", "text"])  # fmt: skip
    raw = raw_members(str(tmp_path / "j-000000.tar"))
    assert set(raw["0"]) >= {"mp4", "txt", "cls"} and raw["0"]["cls"] == b"4" and raw["1"]["txt"] == b"img"


def test_table_errors_name_the_row(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\nmissing.png,hello\n")
    with pytest.raises(FileNotFoundError, match="t.csv line 2: .*missing.png"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "t.csv")])
    (tmp_path / "u.csv").write_text("image,caption\nmissing.png,hello\n")
    with pytest.raises(ValueError, match=r"u.csv line 2: no column \['path'\]"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "u.csv")])
    (tmp_path / "p.png").write_bytes(image_bytes(pixels(4), "png"))
    (tmp_path / "l.csv").write_text("path,caption,label\np.png,a,3\np.png,b,\np.png,c,5\n")
    with pytest.raises(ValueError, match=r"1 of 3 rows have no 'label' \(lines 3\)"):  # not written without labels
        write_main(["--out", str(tmp_path / "y-%06d.tar"), "table", str(tmp_path / "l.csv")])
    with pytest.raises(ValueError, match="no row has a label in column 'lable'"):
        write_main(["--out", str(tmp_path / "y-%06d.tar"), "table", str(tmp_path / "l.csv"), "--label-column", "lable"])
    assert not list(tmp_path.glob("y-*.tar"))


def test_table_rows_that_do_not_fit_the_header_are_errors_naming_the_line(tmp_path):
    (tmp_path / "p.png").write_bytes(image_bytes(pixels(4), "png"))
    out = ["--out", str(tmp_path / "x-%06d.tar"), "table"]
    # An unquoted comma shifts the label column; a short row would be captioned "None".
    (tmp_path / "comma.csv").write_text("path,caption,label\np.png,a red bus,3\np.png,a big, blue bus,7\n")
    with pytest.raises(ValueError, match=r"comma.csv line 3: 4 fields where the header has 3 .*quote"):
        write_main([*out, str(tmp_path / "comma.csv")])
    (tmp_path / "short.csv").write_text("path,caption\np.png\n")
    with pytest.raises(ValueError, match=r"short.csv line 2: 1 fields where the header has 2"):
        write_main([*out, str(tmp_path / "short.csv")])
    (tmp_path / "null.jsonl").write_text('{"path": "p.png", "caption": null}\n')
    with pytest.raises(ValueError, match=r"null.jsonl line 1: caption None is not text"):
        write_main([*out, str(tmp_path / "null.jsonl")])
    (tmp_path / "bad.jsonl").write_text('{"path": "p.png", "caption": "a"}\n{"path": "p.png",\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not JSON"):
        write_main([*out, str(tmp_path / "bad.jsonl")])
    for name, labels, message in [
        ("float.jsonl", [1.5, 2], "label 1.5 is neither an integer nor a class name"),  # 1.0 reads as 1
        ("mixed.jsonl", [1, "cat"], "an integer label in a table of class names"),
        ("negative.jsonl", [0, -1], "line 2: a negative label"),
    ]:
        (tmp_path / name).write_text("".join(json.dumps({"path": "p.png", "caption": "c", "label": v}) + "\n" for v in labels))
        with pytest.raises(ValueError, match=message):
            write_main([*out, str(tmp_path / name)])
    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(ValueError, match="has no rows"):
        write_main([*out, str(tmp_path / "empty.csv")])
    assert not list(tmp_path.glob("x-*"))
    # A spreadsheet's byte-order mark is not part of the first column's name.
    (tmp_path / "bom.csv").write_bytes("path,caption,label\np.png,a,cat\np.png,b,dog\n".encode("utf-8-sig"))
    write_main(["--in-order", *out, str(tmp_path / "bom.csv")])
    assert [(raw["txt"], raw["cls"]) for raw in read_shard(str(tmp_path / "x-000000.tar"))] == [(b"a", b"0"), (b"b", b"1")]


def test_folder_reports_what_it_leaves_out_and_refuses_a_class_it_cannot_fill(tmp_path, capsys):
    root = tmp_path / "pets"
    for name in ["cat/a.png", "cat/b.png", "dog/c.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(pixels(9), "png"))
    (root / "cat" / "d.tif").write_bytes(b"tiff")
    (root / "cat" / "._a.png").write_bytes(b"macOS resource fork")  # hidden: not a sample, not counted
    (root / "cat" / "parent").symlink_to("..")  # followed, it would repeat every dog as a cat, over and over
    summary = write_main(["--out", str(tmp_path / "a-%06d.tar"), "folder", str(root)])
    assert summary["samples"] == 3
    assert "left out of" in (err := capsys.readouterr().err) and "1 .tif, 1 linked folder" in err
    raw = raw_members(str(tmp_path / "a-000000.tar"))
    assert sorted(raw) == ["cat_a_png", "cat_b_png", "dog_c_png"]

    (root / "bird").mkdir()
    (root / "bird" / "e.gif").write_bytes(b"gif")
    with pytest.raises(FileNotFoundError, match=r"class folder .*bird has no media files .*left out: 1 \.gif"):
        write_main(["--out", str(tmp_path / "b-%06d.tar"), "folder", str(root)])
    (root / "bird" / "e.gif").unlink()
    (root / "bird" / "f.png").symlink_to(root / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"bird/f.png is a link to .*gone.png.*which does not exist"):
        write_main(["--out", str(tmp_path / "b-%06d.tar"), "folder", str(root)])


def test_a_folder_it_cannot_read_is_an_error_not_a_class_or_files_left_out(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list without a word: its files were missing from the shards, and with
    --classes a whole class could be, the run ending with status 0."""
    root = tmp_path / "pets"
    for name in ["cat/a.png", "cat/locked/b.png", "dog/c.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(pixels(9), "png"))
    scandir = os.scandir

    def locked(path="."):  # as a folder of mode 000 is to a user other than root
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    with pytest.raises(OSError, match=r"cannot read the folder .*cat/locked: Permission denied"):
        write_main(["--out", str(tmp_path / "a-%06d.tar"), "folder", str(root)])
    assert not list(tmp_path.glob("a-*"))


def test_class_folders_7_and_07_are_one_number_and_refused(tmp_path):
    for name in ["1", "7", "07"]:
        (tmp_path / "n" / name).mkdir(parents=True)
        (tmp_path / "n" / name / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    with pytest.raises(ValueError, match="classes '07' and '7' are one number, 7; merge them"):
        write_main(["--out", str(tmp_path / "n-%06d.tar"), "folder", str(tmp_path / "n")])


def test_captions_in_any_case_and_without_a_byte_order_mark(tmp_path):
    """A caption `c.TXT` was neither used nor reported (the class name stood in); a byte-order mark stayed at
    the front of a caption, a text document and a --classes file's first class."""
    root = tmp_path / "pets"
    for name in ["cat/a.png", "cat/b.png", "cat/c.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(pixels(9), "png"))
    (root / "cat" / "a.TXT").write_text("an upper-case caption")
    (root / "cat" / "b.txt").write_bytes("\ufeffa caption from Notepad".encode("utf-8"))
    (tmp_path / "bom.classes.txt").write_bytes("\ufeffcat\ndog\n".encode("utf-8"))
    write_main(["--out", str(tmp_path / "a-%06d.tar"), "folder", str(root), "--classes", str(tmp_path / "bom.classes.txt")])
    raw = raw_members(str(tmp_path / "a-000000.tar"))
    assert {key: (sample["txt"], sample["cls"]) for key, sample in raw.items()} == {
        "cat_a_png": (b"an upper-case caption", b"0"), "cat_b_png": (b"a caption from Notepad", b"0"), "cat_c_png": (b"cat", b"0"),
    }  # fmt: skip
    (root / "cat" / "a.txt").write_text("a second caption")
    with pytest.raises(ValueError, match=r"a.png has 2 caption files, a.TXT, a.txt; keep one"):
        write_main(["--out", str(tmp_path / "b-%06d.tar"), "folder", str(root)])
    (tmp_path / "doc.txt").write_bytes("\ufeffhello\n".encode("utf-8"))
    write_main(["--out", str(tmp_path / "t-%06d.tar"), "text", str(tmp_path / "doc.txt")])
    assert [sample["txt"] for sample in raw_members(str(tmp_path / "t-000000.tar")).values()] == [b"hello\n"]


def labels_by_caption(pattern: str) -> dict[str, int]:
    return {raw["txt"].decode(): int(raw["cls"]) for raw in raw_members(pattern).values()}


def test_a_split_written_apart_numbers_its_classes_as_train_did(tmp_path, capsys):
    """Each run numbered the classes it found: a val split without `green` gave `red` label 1 where train
    had 2, and core.evaluate and core.finetune scored against shifted labels, silently."""
    for split, names in [("train", ["blue", "green", "red"]), ("val", ["blue", "red"])]:
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "s" / "train-%06d.tar"), "folder", str(tmp_path / "train")])
    listed = tmp_path / "s" / "train.classes.txt"
    assert listed.read_text() == "blue\ngreen\nred\n"
    assert f"write other splits with --classes {listed}" in capsys.readouterr().out
    (tmp_path / "val" / "green").mkdir()  # an empty class folder is a class this split lacks, once pinned
    write_main(["--out", str(tmp_path / "s" / "val-%06d.tar"), "folder", str(tmp_path / "val"), "--classes", str(listed)])
    assert labels_by_caption(str(tmp_path / "s" / "val-000000.tar")) == {"blue": 0, "red": 2}
    assert (tmp_path / "s" / "val.classes.txt").read_text() == listed.read_text()

    (tmp_path / "val" / "mauve").mkdir()
    (tmp_path / "val" / "mauve" / "b.png").write_bytes(image_bytes(pixels(9), "png"))
    with pytest.raises(ValueError, match=r"classes \['mauve'\] are not in --classes \(3 classes: blue, green, red\)"):
        write_main(["--out", str(tmp_path / "t" / "val-%06d.tar"), "folder", str(tmp_path / "val"), "--classes", str(listed)])

    (tmp_path / "val.csv").write_text("path,caption,label\nval/red/a.png,red,red\nval/blue/a.png,blue,blue\n")
    write_main(["--out", str(tmp_path / "c" / "val-%06d.tar"), "table", str(tmp_path / "val.csv"), "--classes", str(listed)])
    assert labels_by_caption(str(tmp_path / "c" / "val-000000.tar")) == {"blue": 0, "red": 2}
    (tmp_path / "int.csv").write_text("path,caption,label\nval/red/a.png,red,2\n")
    with pytest.raises(ValueError, match="the labels are integers already"):
        write_main(["--out", str(tmp_path / "d" / "val-%06d.tar"), "table", str(tmp_path / "int.csv"), "--classes", str(listed)])
    # --classes on input without labels (ImageNet's val is one flat folder) would write unlabelled shards
    (tmp_path / "nolabel.csv").write_text("path,caption\nval/red/a.png,red\n")
    with pytest.raises(ValueError, match="--classes given, but .*nolabel.csv has no 'label' column"):
        write_main(["--out", str(tmp_path / "e" / "val-%06d.tar"), "table", str(tmp_path / "nolabel.csv"), "--classes", str(listed)])
    with pytest.raises(ValueError, match="--classes given, but .*red has no class folders"):
        write_main(["--out", str(tmp_path / "f" / "val-%06d.tar"), "folder", str(tmp_path / "val" / "red"), "--classes", str(listed)])


def test_numbered_class_folders_take_their_numbers_and_names_are_compared_in_one_unicode_form(tmp_path, capsys):
    for name in ["0", "1", "2", "10"]:  # sorted as text, folder 10 would take label 2
        (tmp_path / "n" / name).mkdir(parents=True)
        (tmp_path / "n" / name / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "n-%06d.tar"), "folder", str(tmp_path / "n")])
    assert labels_by_caption(str(tmp_path / "n-000000.tar")) == {"0": 0, "1": 1, "2": 2, "10": 10}
    assert not (tmp_path / "n.classes.txt").exists() and "classes:" not in capsys.readouterr().out
    # The same names spelled decomposed (as folders copied from macOS are) sort and store as composed ones.
    for name in ["Zürich", "A\u0308rger", "cat"]:
        (tmp_path / "u" / name).mkdir(parents=True)
        (tmp_path / "u" / name / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "u-%06d.tar"), "folder", str(tmp_path / "u")])
    assert (tmp_path / "u.classes.txt").read_text(encoding="utf-8") == "Zürich\ncat\nÄrger\n"  # decomposed, Ärger came first
    # A --classes file and a table in the other spelling number the same classes.
    (tmp_path / "nfd.classes.txt").write_text("Zu\u0308rich\ncat\nA\u0308rger\n", encoding="utf-8")
    (tmp_path / "u.csv").write_text("path,caption,label\nu/cat/a.png,x,A\u0308rger\nu/cat/a.png,y,cat\n", encoding="utf-8")
    write_main(["--out", str(tmp_path / "t-%06d.tar"), "table", str(tmp_path / "u.csv"), "--classes", str(tmp_path / "nfd.classes.txt")])
    assert labels_by_caption(str(tmp_path / "t-000000.tar")) == {"x": 2, "y": 1}
    (tmp_path / "u" / "Ärger").mkdir()  # the composed spelling beside the decomposed one: two folders, one class
    (tmp_path / "u" / "Ärger" / "b.png").write_bytes(image_bytes(pixels(9), "png"))
    with pytest.raises(ValueError, match="one class name in two Unicode spellings"):
        write_main(["--out", str(tmp_path / "v-%06d.tar"), "folder", str(tmp_path / "u")])


def test_the_writer_tool_reports_a_bad_input_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = tool("core.data.write", "--out", str(tmp_path / "x-%06d.tar"), "folder", str(tmp_path / "empty"))
    assert result.returncode == 2 and result.stderr.startswith("error: no media files") and "Traceback" not in result.stderr
    (tmp_path / "empty" / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    for returncode in (0, 2):  # the same command again: its shards are there already
        result = tool("core.data.write", "--out", str(tmp_path / "x-%06d.tar"), "folder", str(tmp_path / "empty"))
        assert result.returncode == returncode and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: 1 shards already match")


def test_names_in_other_scripts_get_keys_of_their_own(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for name in ["猫.png", "狗.png", "café.png", "cafè.png"]:
        (root / name).write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "k-%06d.tar"), "folder", str(root)])
    assert sorted(raw_members(str(tmp_path / "k-000000.tar"))) == ["cafue8_png", "cafue9_png", "u72d7_png", "u732b_png"]
    for folder in "ab":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "doc.txt").write_text(folder)
    write_main(["--out", str(tmp_path / "t-%06d.tar"), "text", str(tmp_path / "a"), str(tmp_path / "b")])
    assert {k: v["txt"] for k, v in raw_members(str(tmp_path / "t-000000.tar")).items()} == {"0_doc_txt": b"a", "1_doc_txt": b"b"}


def test_shards_are_written_whole_or_not_at_all_and_never_over_others(tmp_path):
    def samples(n, clash_at=None):
        for i in range(n):
            yield {"__key__": "same" if i == clash_at else f"s{i}", "txt": f"sample {i}".encode()}
        if clash_at is not None:
            yield {"__key__": "same", "txt": b"again"}

    def origin(stream):
        return ({**sample, "__origin__": f"input {i}"} for i, sample in enumerate(stream))

    pattern = str(tmp_path / "w-%06d.tar")
    with pytest.raises(ValueError, match="input 6 and input 1 both get the key 'same'"):  # found in the fourth shard
        write_shards(origin(samples(6, clash_at=1)), pattern, max_count=2)
    assert os.listdir(tmp_path) == []  # no shard that looks complete, no .partial left behind
    # Through the Python API too, where the two would have been merged into one sample on reading; a sample
    # with no member was counted and not written.
    with pytest.raises(ValueError, match="sample 1 and sample 0 both get the key 'same'"):
        write_shards([{"__key__": "same", "txt": b"one"}, {"__key__": "same", "txt": b"two"}], pattern)
    with pytest.raises(ValueError, match="sample 1 .key 'b'. has no member to write"):
        write_shards([{"__key__": "a", "txt": b"one"}, {"__key__": "b"}], pattern)
    assert os.listdir(tmp_path) == []

    first = write_shards(samples(6), pattern, max_count=2)
    assert first["shards"] == 3 and first["bytes"] == sum(os.path.getsize(f) for f in first["files"])
    with pytest.raises(FileExistsError, match="3 shards already match .*overwrite"):
        write_shards(samples(2), pattern, max_count=2)
    again = write_shards(samples(6), pattern, max_count=2, overwrite=True)
    assert [open(f, "rb").read() for f in again["files"]] == [open(f, "rb").read() for f in first["files"]]  # byte-identical
    (tmp_path / "w-notes.tar").write_text("not a shard of the pattern")
    write_shards(samples(2), pattern, max_count=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["w-000000.tar", "w-notes.tar"]  # the stale shards removed, nothing else
    with pytest.raises(ValueError, match="a key is a non-empty string without a dot"):
        write_shards([{"__key__": "img.v1", "txt": b"x"}], str(tmp_path / "d-%06d.tar"))
    with pytest.raises(ValueError, match="no samples to write"):
        write_shards([], str(tmp_path / "e-%06d.tar"))
    assert not list(tmp_path.glob("[de]-*"))


def test_text_files_per_file_and_per_line(tmp_path):
    (tmp_path / "docs" / "more").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "docs" / "more" / "b.txt").write_text("only line")
    write_main(["--out", str(tmp_path / "d-%06d.tar"), "text", str(tmp_path / "docs")])
    texts = {b["__key__"][0]: b["text"][0] for b in read_batches(str(tmp_path / "d-000000.tar"), batch_size=1)}
    assert texts == {"a_txt": "first line\n\nsecond line\n", "more_b_txt": "only line"}

    write_main(["--out", str(tmp_path / "l-%06d.tar"), "--max-count", "2", "text", str(tmp_path / "docs"),
                "--per-line"])  # fmt: skip
    batches = read_batches(str(tmp_path / "l-{000000..000001}.tar"), batch_size=1)
    texts = {b["__key__"][0]: b["text"][0] for b in batches}
    assert texts == {"a_txt_0000000": "first line", "a_txt_0000002": "second line", "more_b_txt_0000000": "only line"}

    (tmp_path / "odd.txt").write_bytes("page\x0cbreak \u2028 kept\r\nsecond\r\n".encode())
    write_main(["--out", str(tmp_path / "o-%06d.tar"), "text", str(tmp_path / "odd.txt"), "--per-line"])
    assert [raw["txt"].decode() for raw in read_shard(str(tmp_path / "o-000000.tar"))] == ["page\x0cbreak \u2028 kept", "second"]


def test_max_bytes_splits_shards(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text("x" * 3000)
    summary = write_main(["--out", str(tmp_path / "b-%06d.tar"), "--max-bytes", "5000", "text", str(tmp_path / "docs")])
    # A new shard starts once the current one holds 5000 bytes or more, tar headers counted (512 bytes and
    # 3072 for each sample): here after every second sample.
    assert summary["shards"] == 3 and summary["samples"] == 6
    assert [len(raw_members(f)) for f in summary["files"]] == [2, 2, 2]


def test_write_module_runs_from_the_command_line(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    result = tool("core.data.write", "--out", str(tmp_path / "w-%06d.tar"), "text", str(tmp_path / "docs"))
    assert result.returncode == 0, result.stderr
    assert "wrote 1 samples in 1 shards" in result.stdout
    assert [raw["txt"] for raw in read_shard(str(tmp_path / "w-000000.tar"))] == [b"hello"]
    with pytest.raises(SystemExit):
        write_main(["--out", str(tmp_path / "w.tar"), "text", str(tmp_path / "docs")])
    assert "needs exactly one shard number field" in capsys.readouterr().err


def test_inspect_reports_reasons_examples_and_extensions(tmp_path, capsys):
    good = [{"__key__": f"s{i}", "npy": npy_bytes(np.zeros(2, np.float32)), "cls": b"1", "odd": b"?"} for i in range(5)]
    good[1]["npy"] = b"broken"
    good[2]["pyd"] = b"never unpickled"
    write_shards(good, str(tmp_path / "m-%06d.tar"), max_count=3)
    result = tool("core.data.inspect", str(tmp_path / "m-{000000..000001}.tar"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "shards read: 2" in out and "samples read: 3" in out and "samples skipped: 2" in out
    assert "undecodable .npy: 1" in out and f"e.g. {tmp_path}/m-000000.tar s1:" in out
    assert "refused .pyd (pickle): 1" in out and f"e.g. {tmp_path}/m-000000.tar s2:" in out
    assert "extensions seen: cls (5), npy (5), odd (5), pyd (1)" in out
    assert "decoded keys: label (3), npy (3)" in out

    assert inspect_main([str(tmp_path / "m-{000000..000001}.tar"), "--limit", "2"]) == 0
    limited = capsys.readouterr().out
    assert "shards read: 1" in limited and "samples read: 1" in limited and "samples skipped: 1" in limited
    assert inspect_main([str(tmp_path / "m-{000000..000001}.tar"), "--strict"]) == 1  # some samples skipped
    assert "--strict" in capsys.readouterr().err
    assert inspect_main([str(tmp_path / "m-{000000..000001}.tar"), "--strict", "--limit", "1"]) == 0  # the first is good


def test_inspect_exit_codes_when_nothing_is_readable(tmp_path):
    pattern = junk_shards(tmp_path)
    result = tool("core.data.inspect", pattern)
    assert result.returncode == 1
    assert "samples read: 0" in result.stdout and "unreadable shards: 1" in result.stdout
    assert "undecodable .png: 3" in result.stdout and "no sample could be read" in result.stderr
    result = tool("core.data.inspect", str(tmp_path / "absent-{0..3}.tar"))
    assert result.returncode == 2 and "absent-{0..3}.tar" in result.stderr


def test_shard_patterns_need_one_number_field_and_the_check_sees_its_width(tmp_path):
    """`%s` or a space-padded `%6d` wrote names the existing-shard check did not see, so a second run replaced
    the first's shards without --overwrite; a pattern with two fields failed in a TypeError."""
    sample = [{"__key__": "a", "txt": b"x"}]
    for pattern in ("x-%s.tar", "x-%6d.tar", "x-%06d-%d.tar", "50%-x-%06d.tar", "x.tar"):
        with pytest.raises(ValueError, match="needs exactly one shard number field"):
            write_shards(sample, str(tmp_path / pattern))
    (tmp_path / "train-2023.tar").write_bytes(b"a year, not a shard")
    write_shards(sample, str(tmp_path / "train-%06d.tar"))
    write_shards(sample, str(tmp_path / "train-%06d.tar"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-2023.tar"]  # 4 digits are not a %06d number


def test_a_pattern_spelled_with_a_double_slash_sees_and_replaces_the_shards_there(tmp_path):
    """`--out "$DIR/train-%06d.tar"` with DIR=out/: the existing-shard check saw none, so shards were replaced
    without --overwrite, and with it the stale ones were left beside the new."""
    sample = [{"__key__": "a", "txt": b"x"}]
    write_shards([*sample, *({"__key__": f"b{i}", "txt": b"y"} for i in range(3))], str(tmp_path / "w-%06d.tar"), max_count=1)
    with pytest.raises(FileExistsError, match="4 shards already match"):
        write_shards(sample, f"{tmp_path}//w-%06d.tar")
    written = write_shards(sample, f"{tmp_path}//w-%06d.tar", overwrite=True)
    assert written["files"] == [str(tmp_path / "w-000000.tar")] and sorted(os.listdir(tmp_path)) == ["w-000000.tar"]
    with pytest.raises(ValueError, match="the shard number field goes in the file name"):  # it made a folder named %03d
        write_shards(sample, str(tmp_path / "part-%03d" / "data.tar"))
    assert sorted(os.listdir(tmp_path)) == ["w-000000.tar"]


def test_gzipped_patterns_are_gzipped(tmp_path):
    import gzip

    write_shards([{"__key__": "a", "txt": b"x"}], str(tmp_path / "z-%06d.tar.gz"))
    with gzip.open(tmp_path / "z-000000.tar.gz") as f:
        assert f.read(512)[:5] == b"a.txt"  # a tar header inside the gzip stream
    assert [raw["txt"] for raw in read_shard(str(tmp_path / "z-000000.tar.gz"))] == [b"x"]


def test_float_written_integer_labels_are_integers_and_fractions_are_errors(tmp_path):
    """pandas writes an integer column that has a missing value as 2.0, 10.0: those were class names, sorted
    as text (10.0 before 2.0)."""
    from core.data.write import table_labels

    wheres = [f"t.csv line {i + 2}" for i in range(3)]
    assert table_labels(["2.0", "10.0", "1"], wheres) == ([2, 10, 1], [])
    assert table_labels([2.0, 10.0, 1], wheres) == ([2, 10, 1], [])  # the same from JSON
    assert table_labels(["1e3", "nan", "1_2"], wheres) == ([1, 2, 0], ["1_2", "1e3", "nan"])  # names, as before
    with pytest.raises(ValueError, match=r"t.csv line 3: label '2.5' is a number but not an integer"):
        table_labels(["1", "2.5", "3"], wheres)
    with pytest.raises(ValueError, match="line 2: a negative label"):
        table_labels(["-1.0", "2", "3"], wheres)
    assert table_labels(["cat", "dog", "cat"], wheres) == ([0, 1, 0], ["cat", "dog"])


def test_per_line_texts_are_shuffled_across_files(tmp_path):
    """One file per class gave one-class shards: only the files were shuffled, each file's lines in order."""
    (tmp_path / "docs").mkdir()
    for name in ("a", "b"):
        (tmp_path / "docs" / f"{name}.txt").write_text("".join(f"{name} line {i}\n" for i in range(20)))
    write_main(["--out", str(tmp_path / "l-%06d.tar"), "--max-count", "10", "text", str(tmp_path / "docs"), "--per-line"])
    shards = [[raw["txt"].decode()[0] for raw in read_shard(str(tmp_path / f"l-{i:06d}.tar"))] for i in range(4)]
    assert sorted(sum(shards, [])) == ["a"] * 20 + ["b"] * 20
    assert all(set(shard) == {"a", "b"} for shard in shards)


def test_inspect_limit_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        inspect_main([str(tmp_path / "x.tar"), "--limit", "0"])
    assert "--limit 0: must be at least 1" in capsys.readouterr().err


def test_spectrogram_pictures_scale_every_row_by_the_original():
    """Each row was min-max scaled on its own, so a flat prediction showed as full contrast."""
    from core.visualize import to_display

    original = torch.linspace(-3, 4, 64).view(1, 1, 8, 8)
    flat = torch.full_like(original, 0.5) + 0.01 * torch.randn_like(original)
    shown = to_display(flat, scale_by=original)
    assert shown.max() - shown.min() < 0.01
    assert to_display(original, scale_by=original).aminmax() == (torch.tensor(0.0), torch.tensor(1.0))


# Pinned by mutation testing of core/data/write.py and core/data/inspect.py: each test below fails on a
# mutant that the tests above let through.


def test_a_plain_d_pattern_sees_every_numbered_shard_and_only_those(tmp_path):
    """`%d` has no width: shards 10 and up are the pattern's too (a fixed width of one left them behind as
    stale shards of an overwritten set), and a name with no digits where the number goes is not one."""
    pattern = str(tmp_path / "x-%d.tar")
    (tmp_path / "x-.tar").write_bytes(b"no number: not a shard")
    write_shards(({"__key__": f"s{i}", "txt": b"t"} for i in range(12)), pattern, max_count=1)
    with pytest.raises(FileExistsError, match="12 shards already match"):
        write_shards([{"__key__": "a", "txt": b"t"}], pattern)
    write_shards([{"__key__": "a", "txt": b"t"}], pattern, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["x-.tar", "x-0.tar"]


def test_shard_limits_below_one_are_errors(tmp_path):
    for limits in ({"max_count": 0}, {"max_bytes": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            write_shards([{"__key__": "a", "txt": b"t"}], str(tmp_path / "x-%06d.tar"), **limits)
    assert os.listdir(tmp_path) == []


def test_a_shard_that_holds_exactly_max_bytes_is_full(tmp_path):
    """A 3000-byte text takes 512 (header) + 3072 (padded data) bytes: with max_bytes 3584 each shard is full after one."""
    samples = [{"__key__": f"s{i}", "txt": b"x" * 3000} for i in range(3)]
    summary = write_shards(samples, str(tmp_path / "b-%06d.tar"), max_bytes=3584)
    assert summary["shards"] == 3 and [len(raw_members(f)) for f in summary["files"]] == [1, 1, 1]


def test_tgz_patterns_are_gzipped_too(tmp_path):
    import gzip

    write_shards([{"__key__": "a", "txt": b"x"}], str(tmp_path / "z-%06d.tgz"))
    with gzip.open(tmp_path / "z-000000.tgz") as f:
        assert f.read(512)[:5] == b"a.txt"


def test_keys_are_checked_in_their_last_part_only(tmp_path):
    """Readers split at the first dot of the member's last part: a dot in a folder part is fine; an empty or
    non-string key is refused with the key named, not an AttributeError."""
    write_shards([{"__key__": "v1.2/img", "txt": b"x"}], str(tmp_path / "ok-%06d.tar"))
    assert list(raw_members(str(tmp_path / "ok-000000.tar"))) == ["v1.2/img"]
    for key in ("", 7):
        with pytest.raises(ValueError, match=f"sample key {key!r}: a key is a non-empty string"):
            write_shards([{"__key__": key, "txt": b"x"}], str(tmp_path / "bad-%06d.tar"))
    assert not list(tmp_path.glob("bad-*"))


def test_hyphens_are_kept_in_keys(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "red-bus.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "k-%06d.tar"), "folder", str(tmp_path / "flat")])
    assert list(raw_members(str(tmp_path / "k-000000.tar"))) == ["red-bus_png"]


def test_a_table_row_naming_a_file_that_is_not_media_is_an_error(tmp_path):
    (tmp_path / "notes.md").write_text("# not media")
    (tmp_path / "t.csv").write_text("path,caption\nnotes.md,a note\n")
    with pytest.raises(ValueError, match=r"notes.md: \.md is not a media extension"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "t.csv")])
    assert not list(tmp_path.glob("x-*"))


def test_hidden_folders_are_neither_classes_nor_searched(tmp_path):
    root = tmp_path / "pets"
    for name in ["cat/a.png", "cat/.thumbs/a.png", ".cache/b.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(pixels(9), "png"))
    summary = write_main(["--out", str(tmp_path / "h-%06d.tar"), "folder", str(root)])
    assert summary["samples"] == 1 and list(raw_members(str(tmp_path / "h-000000.tar"))) == ["cat_a_png"]
    assert (tmp_path / "h.classes.txt").read_text() == "cat\n"


def test_what_a_folder_leaves_out_is_counted_as_it_is(tmp_path, capsys):
    """A linked class folder is a class, not a "linked folder" left out; captions are not left out; a file
    without an extension counts as such, not under its own name."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(image_bytes(pixels(9), "png"))
    root = tmp_path / "pets"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    (root / "cat" / "a.txt").write_text("a cat")
    (root / "dog").symlink_to(tmp_path / "elsewhere")
    write_main(["--out", str(tmp_path / "a-%06d.tar"), "folder", str(root)])
    assert capsys.readouterr().err == ""
    assert {k: v["txt"] for k, v in raw_members(str(tmp_path / "a-000000.tar")).items()} == {"cat_a_png": b"a cat", "dog_b_png": b"dog"}
    (root / "cat" / "README").write_text("no extension")
    write_main(["--out", str(tmp_path / "b-%06d.tar"), "folder", str(root)])
    assert "left out of" in (err := capsys.readouterr().err) and "1 .(none)" in err and "linked" not in err


def test_class_folders_named_by_non_ascii_digits_are_names(tmp_path):
    """Only ASCII digits make integer labels: "²" is a digit to str.isdigit but not a number to int()."""
    for name in ["1", "²"]:
        (tmp_path / "n" / name).mkdir(parents=True)
        (tmp_path / "n" / name / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "n-%06d.tar"), "folder", str(tmp_path / "n")])
    assert labels_by_caption(str(tmp_path / "n-000000.tar")) == {"1": 0, "²": 1}
    assert (tmp_path / "n.classes.txt").read_text(encoding="utf-8") == "1\n²\n"


def test_class_names_that_would_break_the_class_list_are_refused(tmp_path):
    """The class list holds one name a line: a name with a line break would shift every label after it."""
    (tmp_path / "p.png").write_bytes(image_bytes(pixels(9), "png"))
    (tmp_path / "t.csv").write_text('path,caption,label\np.png,x,"red\nbus"\np.png,y,cat\n')
    with pytest.raises(ValueError, match=r"t.csv: class name 'red\\nbus' holds a line break"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "t.csv")])
    # The list is read back with str.splitlines, which also breaks at \u2028, \x85, \x0c, ...
    for brk in ["\u2028", "\x85", "\x0c", "\x1e"]:
        (tmp_path / "u.csv").write_text(f"path,caption,label\np.png,x,red{brk}bus\np.png,y,cat\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"u.csv: class name 'red\\(u2028|x85|x0c|x1e)bus' holds a line break"):
            write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "u.csv")])


def test_digits_of_other_scripts_are_class_names_in_tables_as_in_folders():
    """A table's integer labels are ASCII digits, as folder names are: "٣" (Arabic-Indic three) is a class name in
    both, not label 3."""
    from core.data.write import class_indices, table_labels

    wheres = ["t.csv line 2", "t.csv line 3"]
    assert table_labels(["٣", "one"], wheres) == ([1, 0], ["one", "٣"])
    with pytest.raises(ValueError, match="an integer label in a table of class names"):
        table_labels(["٣", "1"], wheres)
    assert class_indices(["٣", "1"], None, "f") == ({"1": 0, "٣": 1}, ["1", "٣"])


def test_a_classes_file_with_an_empty_or_repeated_line_is_refused(tmp_path):
    from core.data.write import read_classes

    (tmp_path / "ok.txt").write_bytes(b"a\r\nb\n")
    assert read_classes(str(tmp_path / "ok.txt")) == ["a", "b"]
    for name, text in [("empty.txt", "a\n\nb\n"), ("twice.txt", "a\nb\na\n"), ("none.txt", "")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"--classes .*{name}: one class name per line, none empty or repeated"):
            read_classes(str(tmp_path / name))


def test_a_pattern_in_a_folder_of_its_own_puts_the_class_list_there(tmp_path, capsys):
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    (tmp_path / "pets" / "cat" / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "train" / "%06d.tar"), "folder", str(tmp_path / "pets")])
    assert (tmp_path / "train" / "classes.txt").read_text() == "cat\n"
    assert f"class list: {tmp_path / 'train' / 'classes.txt'}" in capsys.readouterr().out


def test_a_decomposed_class_folder_is_captioned_with_its_composed_name(tmp_path):
    (tmp_path / "u" / "A\u0308rger").mkdir(parents=True)
    (tmp_path / "u" / "A\u0308rger" / "a.png").write_bytes(image_bytes(pixels(9), "png"))
    write_main(["--out", str(tmp_path / "u-%06d.tar"), "folder", str(tmp_path / "u")])
    assert [raw["txt"] for raw in raw_members(str(tmp_path / "u-000000.tar")).values()] == ["\u00c4rger".encode()]


def test_jsonl_blank_lines_are_skipped_and_a_line_must_be_an_object(tmp_path):
    (tmp_path / "p.png").write_bytes(image_bytes(pixels(9), "png"))
    (tmp_path / "t.jsonl").write_text('{"path": "p.png", "caption": "a"}\n\n  \n{"path": "p.png", "caption": "b"}\n')
    write_main(["--in-order", "--out", str(tmp_path / "t-%06d.tar"), "table", str(tmp_path / "t.jsonl")])
    assert [raw["txt"] for raw in read_shard(str(tmp_path / "t-000000.tar"))] == [b"a", b"b"]
    (tmp_path / "list.jsonl").write_text('{"path": "p.png", "caption": "a"}\n["p.png", "b"]\n')
    with pytest.raises(ValueError, match="list.jsonl line 2: a JSON object per line, not list"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "list.jsonl")])


def test_table_booleans_and_empty_paths_are_refused_naming_the_line(tmp_path):
    (tmp_path / "p.png").write_bytes(image_bytes(pixels(9), "png"))
    (tmp_path / "bool.jsonl").write_text('{"path": "p.png", "caption": "a", "label": true}\n')
    with pytest.raises(ValueError, match="bool.jsonl line 1: label True is neither an integer nor a class name"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "bool.jsonl")])
    (tmp_path / "empty.csv").write_text("path,caption\np.png,a\n,b\n")
    with pytest.raises(ValueError, match="empty.csv line 3: media path '' is not a path"):
        write_main(["--out", str(tmp_path / "x-%06d.tar"), "table", str(tmp_path / "empty.csv")])
    assert not list(tmp_path.glob("x-*"))


def test_table_keys_are_as_wide_as_the_last_row_number(tmp_path):
    (tmp_path / "p.png").write_bytes(image_bytes(pixels(9), "png"))
    for rows, keys in [(10, [str(i) for i in range(10)]), (11, [f"{i:02d}" for i in range(11)])]:
        (tmp_path / f"{rows}.csv").write_text("path,caption\n" + "p.png,c\n" * rows)
        write_main(["--out", str(tmp_path / f"k{rows}-%06d.tar"), "table", str(tmp_path / f"{rows}.csv")])
        assert sorted(raw_members(str(tmp_path / f"k{rows}-000000.tar"))) == keys


def test_text_input_without_text_is_an_error_and_whitespace_lines_are_not_documents(tmp_path):
    from core.data.write import text_samples

    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        list(text_samples([str(tmp_path / "none")]))
    (tmp_path / "a.txt").write_text("one\n   \n\t\ntwo\n")
    assert [s["txt"] for s in text_samples([str(tmp_path / "a.txt")], per_line=True)] == [b"one", b"two"]


def test_text_is_stored_with_its_own_line_ends_and_must_be_utf8(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\r\n")
    write_main(["--out", str(tmp_path / "c-%06d.tar"), "text", str(tmp_path / "crlf.txt")])
    assert [raw["txt"] for raw in read_shard(str(tmp_path / "c-000000.tar"))] == [b"a\r\nb\r\n"]
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt is not utf-8 text"):
        write_main(["--out", str(tmp_path / "l-%06d.tar"), "text", str(tmp_path / "latin.txt")])


def test_a_key_clash_between_lines_names_both_lines(tmp_path):
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "b.txt").write_text("one\n")
    (tmp_path / "docs" / "a_b.txt").write_text("two\n")
    with pytest.raises(ValueError, match=r"a_b.txt line 1 and .*a/b.txt line 1 both get the key 'a_b_txt_0000000'"):
        write_main(["--in-order", "--out", str(tmp_path / "x-%06d.tar"), "text", str(tmp_path / "docs"), "--per-line"])


def test_text_files_are_written_shuffled_unless_asked_to_keep_their_order(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(10):
        (tmp_path / "docs" / f"{i}.txt").write_text(str(i))

    def written_order(*args):
        out = tmp_path / "-".join(args or ["default"])
        write_main(["--out", str(out / "t-%06d.tar"), *args, "text", str(tmp_path / "docs")])
        return [raw["txt"] for raw in read_shard(str(out / "t-000000.tar"))]

    in_order = written_order("--in-order")
    assert in_order == [str(i).encode() for i in range(10)]
    shuffled = written_order()
    assert sorted(shuffled) == in_order and shuffled != in_order


def test_inspect_counts_skipped_samples_lists_reasons_sorted_and_three_examples_each(tmp_path, capsys):
    samples = [{"__key__": f"s{i}", "png": b"garbage"} for i in range(5)]
    samples += [{"__key__": "p", "pyd": b"never unpickled"}, {"__key__": "ok", "cls": b"1"}]
    write_shards(samples, str(tmp_path / "g-%06d.tar"))
    assert inspect_main([str(tmp_path / "g-000000.tar")]) == 0
    out = capsys.readouterr().out
    assert "samples read: 1" in out and "samples skipped: 6" in out  # samples, not reasons
    assert out.index("refused .pyd (pickle): 1") < out.index("undecodable .png: 5")
    assert [line.split(": ")[0] for line in out.splitlines() if "e.g." in line] == [
        f"    e.g. {tmp_path}/g-000000.tar {key}" for key in ("p", "s0", "s1", "s2")
    ]


def test_inspect_names_unreadable_shards_and_strict_fails_on_them(tmp_path, capsys):
    write_shards([{"__key__": "ok", "cls": b"1"}], str(tmp_path / "m-%06d.tar"))
    (tmp_path / "m-000001.tar").write_bytes(b"not a tar\n" * 300)
    pattern = str(tmp_path / "m-{000000..000001}.tar")
    assert inspect_main([pattern]) == 0
    assert f"unreadable shards: 1\n  {tmp_path}/m-000001.tar: ReadError: invalid header\n" in capsys.readouterr().out
    assert inspect_main([pattern, "--strict"]) == 1
    assert "0 samples skipped, 1 shards unreadable" in capsys.readouterr().err
    assert inspect_main([str(tmp_path / "m-000001.tar")]) == 1
    assert "extensions seen: none\ndecoded keys: none" in capsys.readouterr().out


def test_inspect_refuses_a_pattern_it_cannot_open_with_status_2(capsys):
    assert inspect_main(["s3://bucket/train-{000000..000009}.tar"]) == 2
    assert "error: shard pattern 's3://bucket/train-{000000..000009}.tar': webdataset opens no s3:// URLs" in capsys.readouterr().err
