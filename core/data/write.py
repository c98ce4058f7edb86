"""Write samples into WebDataset tar shards.

A sample is a dict: ``{"__key__": "000042", "jpg": b"...", "cls": b"3", "txt": b"a red circle"}``.
Each member is stored as ``<key>.<extension>``; readers pick a decoder by the extension.

As a tool, it turns folders of media, caption tables (CSV/JSONL) or text files into shards::

    python -m core.data.write --out out/train-%06d.tar folder photos/          # class sub-folders -> labels
    python -m core.data.write --out out/train-%06d.tar table captions.csv      # path,caption[,label]
    python -m core.data.write --out out/train-%06d.tar text corpus/ --per-line

Media bytes are stored as they are (no re-encoding). Keys come from the relative path (folders, text) or
the row number (tables), so they are stable across runs and unique.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
import unicodedata
from collections import Counter
from typing import Iterable, Iterator

import webdataset as wds

from core.data.decoders import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, member_extension


INTEGER_LABEL = re.compile(r"-?[0-9]+(\.0*)?")  # 3, or 3.0 as pandas writes an integer column with a gap


def shard_number_field(pattern: str) -> tuple[str, str, int]:
    """(what comes before, after, digits at least) of a pattern's one shard number field, ``%d`` or ``%0Nd``;
    any other ``%`` is an error (a ``%s`` or space-padded ``%6d`` would write names that the existing-shard
    check and the brace pattern do not see)."""
    fields = list(re.finditer(r"%(0\d+)?d", pattern))
    if len(fields) != 1 or pattern.count("%") != 1:
        raise ValueError(f"shard pattern {pattern!r} needs exactly one shard number field, %d or %0Nd (e.g. out/train-%06d.tar), and no other %")
    field = fields[0]
    if os.sep in pattern[field.end() :]:
        raise ValueError(f"shard pattern {pattern!r}: the shard number field goes in the file name, not in a folder's")
    return pattern[: field.start()], pattern[field.end() :], int(field[1]) if field[1] else 1


def existing_shards(pattern: str) -> list[str]:
    """The files a shard pattern names that exist: ``out/train-%06d.tar`` -> ``out/train-000000.tar``, ...
    (digits where the number goes, at least as many as its width; ``out/train-extra.tar`` is not one of them),
    spelled as ``pattern % n`` spells them: the folder as given, however many slashes end it."""
    folder, name = os.path.split(pattern)
    before, after, width = shard_number_field(name)
    shard = re.compile(re.escape(before) + r"\d{%d,}" % width + re.escape(after))
    if not os.path.isdir(folder or "."):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder or ".") if shard.fullmatch(f))


def write_shards(
    samples: Iterable[dict], pattern: str, max_count: int = 10_000, max_bytes: int = 1 << 30, mtime: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write ``samples`` to shards named by ``pattern`` (e.g. ``out/train-%06d.tar``).

    A new shard starts when the current one holds ``max_count`` samples or ``max_bytes`` bytes (tar headers
    included: a shard passes it by at most one sample, plus the tar's end marker padded to a 10 KiB record).
    Every member is stamped with ``mtime``, so the same samples give byte-identical shards.

    Every sample needs a key of its own, without a dot in its last part (readers split a member's name into
    key and extension at the first dot), and a member: a repeated key would merge two samples, or give one
    key to two, on reading (``__origin__``, if a sample has it, names where it came from in the error; it is
    not written).

    Nothing is half written: shards are written as ``<name>.partial`` and renamed once every sample is in,
    and an error on the way removes them. Shards that already match the pattern are an error, or with
    ``overwrite`` are replaced, those beyond the new last one removed, once the new ones are in place.
    Returns a summary: number of samples, shards, bytes and the extensions seen.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count ({max_count}) and max_bytes ({max_bytes}) must be at least 1")
    shard_number_field(pattern)  # checks the pattern
    # `out//train-%06d.tar` as `out/train-%06d.tar`: the shards written, those found and those removed spelled alike.
    pattern = os.path.join(*os.path.split(pattern))
    existing = existing_shards(pattern)
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} shards already match {pattern} (e.g. {existing[0]}); "
            "remove them or pass --overwrite (overwrite=True) to replace them"
        )
    os.makedirs(os.path.dirname(os.path.abspath(pattern)), exist_ok=True)
    files, total, in_shard, extensions, writer, seen = [], 0, 0, set(), None, {}
    try:
        try:
            for sample in samples:
                key, origin = sample.get("__key__"), sample.get("__origin__", f"sample {total}")
                if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
                    raise ValueError(f"sample key {key!r}: a key is a non-empty string without a dot in its last part")
                if key in seen:
                    raise ValueError(f"{origin} and {seen[key]} both get the key {key!r}; rename one of them")
                if all(k.startswith("_") for k in sample):  # TarWriter writes no member whose name starts with _
                    raise ValueError(f"{origin} (key {key!r}) has no member to write")
                seen[key] = origin
                if writer is None or in_shard >= max_count or writer.tarstream.offset >= max_bytes:
                    if writer is not None:
                        writer.close()
                    files.append(pattern % len(files))
                    # TarWriter picks compression from the name it writes, which ends in .partial: from the final name.
                    writer = wds.TarWriter(files[-1] + ".partial", mtime=mtime, compress=files[-1].endswith((".gz", ".tgz")))
                    in_shard = 0
                writer.write(sample)
                extensions.update(k for k in sample if not k.startswith("__"))
                in_shard, total = in_shard + 1, total + 1
        finally:
            if writer is not None:
                writer.close()
    except BaseException:
        for file in files:
            if os.path.exists(file + ".partial"):
                os.remove(file + ".partial")
        raise
    if total == 0:
        raise ValueError(f"no samples to write to {pattern}")
    for file in files:  # on disk before they get their names: a crash must not leave a complete-looking, zero-filled shard
        with open(file + ".partial", "rb") as f:
            os.fsync(f.fileno())
    for file in files:
        os.replace(file + ".partial", file)
    folder = os.open(os.path.dirname(os.path.abspath(pattern)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the renames themselves
    finally:
        os.close(folder)
    for stale in set(existing) - set(files):
        os.remove(stale)
    return {
        "samples": total,
        "shards": len(files),
        "bytes": sum(os.path.getsize(f) for f in files),
        "extensions": sorted(extensions),
        "files": files,
    }


MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | AUDIO_EXTENSIONS | VIDEO_EXTENSIONS
MEDIA_KINDS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS, "any": MEDIA_EXTENSIONS}


def sample_key(name: str) -> str:
    """A tar-safe key from a relative path: readers split members at the first dot, so only ``[A-Za-z0-9_-]``.
    Other ASCII characters become ``_``; other characters their code point (``猫.png`` -> ``u732b_png``), so
    that names in other scripts do not all collapse onto the same key."""
    return re.sub(r"[^A-Za-z0-9_-]", lambda m: "_" if m[0].isascii() else f"u{ord(m[0]):x}", name)


def media_member(path: str) -> dict[str, bytes]:
    """``{extension: file bytes}`` for a media file, stored as-is (no re-encoding)."""
    ext = member_extension(path)
    if ext not in MEDIA_EXTENSIONS:
        raise ValueError(f"{path}: .{ext} is not a media extension ({', '.join(sorted(MEDIA_EXTENSIONS))})")
    with open(path, "rb") as f:
        return {ext: f.read()}


def _files_with_extensions(folder: str, extensions: frozenset[str], recursive: bool) -> tuple[list[str], Counter]:
    """The files under ``folder`` with one of ``extensions``, sorted, and a count of the files left out by
    extension (captions aside). Hidden files and folders (``.DS_Store``, macOS's ``._photo.jpg``) are
    skipped. Linked files are taken; linked folders inside are not followed (one linking back up would
    repeat files, across classes too) but counted; a dangling link is an error."""
    def unreadable(error: OSError):  # os.walk would skip the folder and its files without a word
        raise OSError(f"cannot read the folder {error.filename}: {error.strerror}") from error

    files, left_out = [], Counter()
    walk = os.walk(folder, onerror=unreadable)
    for directory, subfolders, names in walk if recursive else [next(walk)]:
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        linked = sum(os.path.islink(os.path.join(directory, d)) for d in subfolders)
        if recursive and linked:
            left_out["linked folder"] += linked
        for name in names:
            path = os.path.join(directory, name)
            if name.startswith("."):
                continue
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is a link to {os.readlink(path)!r}, which does not exist")
            ext = member_extension(name) if "." in name else "(none)"
            if ext in extensions:
                files.append(path)
            elif ext != "txt":
                left_out[f".{ext}"] += 1
    return sorted(files), left_out


def class_name(name: str) -> str:
    """A class name as compared and stored: Unicode NFC (a folder copied from macOS spells "Ä" as "A" plus a
    combining mark, which sorts elsewhere)."""
    return unicodedata.normalize("NFC", name)


def class_indices(names: list[str], pinned: list[str] | None, where: str) -> tuple[dict[str, int], list[str]]:
    """The label of each class name, and the class list (label = index): the name's position in ``pinned``
    (a ``--classes`` file: another split's classes, so that both number them alike), else in ``names``
    sorted, or the number itself when every name is a non-negative integer (folders ``0``..``9``: label 2 for
    folder ``2``, as a table's integer labels, and no list; sorted as text, folder ``10`` would take label 2).
    A name the pinned list lacks is an error."""
    # Any break `str.splitlines` splits at (\u2028, \x85, ...): the class list is read back with it.
    broken = [name for name in names if "".join(name.splitlines()) != name]
    if broken:
        raise ValueError(f"{where}: class name {broken[0]!r} holds a line break")
    if pinned is not None:
        unknown = sorted(set(names) - set(pinned))
        if unknown:
            shown = ", ".join(pinned[:10]) + (", ..." if len(pinned) > 10 else "")
            raise ValueError(f"{where}: classes {unknown} are not in --classes ({len(pinned)} classes: {shown})")
        return {name: pinned.index(name) for name in names}, pinned
    if names and all(name.isascii() and name.isdigit() for name in names):
        numbers = {}
        for name in sorted(names):
            if int(name) in numbers:  # `7` and `07`
                raise ValueError(f"{where}: classes {numbers[int(name)]!r} and {name!r} are one number, {int(name)}; merge them")
            numbers[int(name)] = name
        return {name: int(name) for name in names}, []
    classes = sorted(set(names))
    return {name: index for index, name in enumerate(classes)}, classes


def read_classes(path: str) -> list[str]:
    """Class names from a ``--classes`` file: one per line, line i holding label i (what the tool writes)."""
    names = [class_name(line) for line in _read_text(path).splitlines()]
    if not names or "" in names or len(set(names)) != len(names):
        raise ValueError(f"--classes {path}: one class name per line, none empty or repeated")
    return names


def write_classes_file(pattern: str, classes: list[str]) -> str:
    """Write the class names of shards ``out/train-%06d.tar`` to ``out/train.classes.txt``, one a line (line i:
    label i), for the other splits' runs (``--classes``): numbered by their own folders, a split that lacks a
    class would shift every label after it. Returns the file's path."""
    before, _, _ = shard_number_field(pattern)
    stem = before.rstrip("-_.")
    path = stem + ".classes.txt" if stem and not stem.endswith(os.sep) else os.path.join(stem, "classes.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(name + "\n" for name in classes))
    return path


def shuffled_order(items: list, seed: int | None) -> list:
    """``items`` in a random order drawn from ``seed`` (``None``: as they are). Shards are written shuffled
    because readers take them in order: a stream's shuffle buffer only mixes samples a few shards apart, and
    evaluation and fine-tuning read shards front to back, so class-sorted shards give one-class batches."""
    if seed is None:
        return items
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def describe_left_out(left_out: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(left_out.items())) or "nothing"


def folder_samples(
    root: str, kind: str = "any", seed: int | None = None, pinned: list[str] | None = None
) -> tuple[Iterator[dict], list[str]]:
    """Samples from a folder of image, audio or video files, in the order ``shuffled_order(seed)`` gives,
    and the class names (label = index; ``[]`` for a flat folder or integer labels).

    Class sub-folders give ``cls`` (the label ``class_indices`` gives the folder's name; ``pinned``: another
    split's class list) and a ``txt`` caption (the class name); a flat folder gives unlabelled
    samples. A ``<name>.txt`` file next to a media file is its caption instead. The files left out (other
    extensions, linked sub-folders) are counted on stderr; a class folder with no file to take is an error,
    not a class the shards silently lack, unless ``pinned`` numbers the classes (a split may lack one).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder")
    extensions, what = MEDIA_KINDS[kind], "media" if kind == "any" else kind
    top_level, left_out = _files_with_extensions(root, extensions, recursive=False)
    folders: dict[str, str] = {}  # class name -> folder name
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        if entry.is_dir() and not entry.name.startswith("."):
            if class_name(entry.name) in folders:
                raise ValueError(f"{root}: folders {folders[class_name(entry.name)]!r} and {entry.name!r} are one class name in two Unicode spellings; merge them")
            folders[class_name(entry.name)] = entry.name
    if folders and top_level:
        raise ValueError(f"{root} has both class folders {sorted(folders)} and loose media files, e.g. {top_level[0]}")
    if pinned is not None and not folders:
        raise ValueError(f"--classes given, but {root} has no class folders: its samples would be written unlabelled")
    labels, classes = class_indices(list(folders), pinned, root)
    files = [(f, None, None) for f in top_level]
    for name in sorted(folders):
        found, class_left_out = _files_with_extensions(os.path.join(root, folders[name]), extensions, recursive=True)
        if not found and pinned is None:
            raise FileNotFoundError(
                f"class folder {os.path.join(root, folders[name])} has no {what} files ({', '.join(sorted(extensions))}); "
                f"left out: {describe_left_out(class_left_out)}"
            )
        files += [(f, labels[name], name) for f in found]
        left_out += class_left_out
    if not files:
        raise FileNotFoundError(f"no {what} files ({', '.join(sorted(extensions))}) in {root}; left out: {describe_left_out(left_out)}")
    if left_out:
        print(f"left out of {root}: {describe_left_out(left_out)} (not {what} files)", file=sys.stderr)

    captions: dict[str, dict[str, list[str]]] = {}  # folder -> {stem: its caption files' names}

    def caption_file(path: str) -> str | None:
        """``a.txt`` (or ``a.TXT``: any case, as the media files' extensions) beside ``a.jpg``, if there is one."""
        folder, name = os.path.split(path)
        if folder not in captions:
            captions[folder] = {}
            for other in os.listdir(folder):
                stem, ext = os.path.splitext(other)
                if ext.lower() == ".txt":
                    captions[folder].setdefault(stem, []).append(other)
        found = sorted(captions[folder].get(os.path.splitext(name)[0], []))
        if len(found) > 1:
            raise ValueError(f"{path} has {len(found)} caption files, {', '.join(found)}; keep one")
        return os.path.join(folder, found[0]) if found else None

    def samples() -> Iterator[dict]:
        for path, label, name in shuffled_order(files, seed):
            relative = os.path.relpath(path, root)
            sample = {"__key__": sample_key(relative), "__origin__": path, **media_member(path)}
            caption = caption_file(path)
            if caption is not None:
                sample["txt"] = _read_text(caption).strip().encode("utf-8")
            elif label is not None:
                sample["txt"] = name.encode("utf-8")
            if label is not None:
                sample["cls"] = str(label).encode("ascii")
            yield sample

    return samples(), classes


def _read_text(path: str) -> str:
    try:
        # -sig: a byte-order mark (Notepad writes one) is not text; line ends as they are.
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not utf-8 text: {error}") from error


def table_rows(path: str) -> list[tuple[str, dict]]:
    """(where, row) for each row of a CSV (with a header line) or JSONL (one object per line) file, ``where``
    naming the file and line. A CSV row with more or fewer fields than the header is an error (an unquoted
    comma in a caption would shift the label column)."""
    if path.lower().endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path} line {number}: not JSON: {error}") from error
                    if not isinstance(row, dict):
                        raise ValueError(f"{path} line {number}: a JSON object per line, not {type(row).__name__}")
                    rows.append((f"{path} line {number}", row))
        return rows
    if path.lower().endswith(".csv"):
        rows = []
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row or None in row.values():
                    got = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                    raise ValueError(
                        f"{where}: {got} fields where the header has {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); "
                        "quote a field that holds a comma"
                    )
                rows.append((where, row))
        return rows
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def table_labels(values: list, wheres: list[str], classes: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Integer labels (0 and up) as they are, or class names mapped to their sorted index (their index in
    ``classes``, another split's list, when given); not a mix. Returns (labels, class names)."""
    # "2.0": how pandas writes an integer column that has a missing value (CSV and JSON alike).
    values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    for value, where in zip(values, wheres):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: label {value!r} is neither an integer nor a class name")
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+\.[0-9]*", value.strip()) and not INTEGER_LABEL.fullmatch(value.strip()):
            raise ValueError(f"{where}: label {value!r} is a number but not an integer")
    numbers = [isinstance(v, int) or INTEGER_LABEL.fullmatch(v.strip()) is not None for v in values]
    if all(numbers):
        if classes is not None:
            raise ValueError(f"{wheres[0]}: the labels are integers already; --classes numbers class names")
        labels = [v if isinstance(v, int) else int(v.strip().split(".")[0]) for v in values]
        negative = [where for label, where in zip(labels, wheres) if label < 0]
        if negative:
            raise ValueError(f"{negative[0]}: a negative label; class indices start at 0 (leave unlabelled rows out of a labelled table)")
        return labels, []
    if any(numbers):
        where = wheres[numbers.index(True)]
        raise ValueError(f"{where}: an integer label in a table of class names ({values[numbers.index(False)]!r}, ...): use one kind")
    values = [class_name(v) for v in values]
    labels, classes = class_indices(values, classes, wheres[0].rsplit(" line ", 1)[0])
    return [labels[v] for v in values], classes


def table_samples(
    path: str, path_column: str = "path", caption_column: str = "caption", label_column: str | None = None,
    seed: int | None = None, classes: list[str] | None = None,
) -> tuple[Iterator[dict], list[str]]:
    """Samples from a CSV/JSONL of (media path, caption[, label]), in the order ``shuffled_order(seed)`` gives;
    media paths are relative to the table. Keys are row numbers.

    ``label_column`` names the labels' column; by default a column ``label`` is used when the table has one.
    Every row has a label or none does: a table labelled in part, or a named label column that no row
    fills, is refused rather than written without its labels.
    ``classes`` (another split's class names) numbers names as that split did.
    Returns the samples and the class names when labels are names rather than integers.
    """
    numbered = table_rows(path)
    if not numbered:
        raise ValueError(f"{path} has no rows")
    wheres, rows = [where for where, _ in numbered], [row for _, row in numbered]
    for where, row in numbered:
        missing = [c for c in (path_column, caption_column) if c not in row]
        if missing:
            raise ValueError(f"{where}: no column {missing} (has {sorted(row)})")
        if not isinstance(row[caption_column], str):
            raise ValueError(f"{where}: caption {row[caption_column]!r} is not text")
        if not isinstance(row[path_column], str) or not row[path_column]:
            raise ValueError(f"{where}: media path {row[path_column]!r} is not a path")
    column = label_column or "label"
    unlabelled = [number for number, row in enumerate(rows) if row.get(column) in (None, "")]
    if label_column is not None and rows and len(unlabelled) == len(rows):
        raise ValueError(f"{path}: no row has a label in column {label_column!r} (columns: {sorted(rows[0])})")
    if 0 < len(unlabelled) < len(rows):
        listed = ", ".join(wheres[number].rsplit(" ", 1)[-1] for number in unlabelled[:10]) + (", ..." if len(unlabelled) > 10 else "")
        raise ValueError(f"{path}: {len(unlabelled)} of {len(rows)} rows have no {column!r} (lines {listed}): label every row or none")
    has_labels = bool(rows) and not unlabelled
    if classes is not None and not has_labels:
        raise ValueError(f"--classes given, but {path} has no {column!r} column: its samples would be written unlabelled")
    labels, classes = table_labels([row[column] for row in rows], wheres, classes) if has_labels else ([None] * len(rows), [])
    width = len(str(max(len(rows) - 1, 0)))

    def samples() -> Iterator[dict]:
        for number, row, label in shuffled_order(list(zip(range(len(rows)), rows, labels)), seed):
            media = os.path.join(os.path.dirname(path), row[path_column])
            if not os.path.isfile(media):
                raise FileNotFoundError(f"{wheres[number]}: media file {media} does not exist")
            sample = {"__key__": f"{number:0{width}d}", "__origin__": wheres[number], **media_member(media)}
            sample["txt"] = row[caption_column].encode("utf-8")
            if label is not None:
                sample["cls"] = str(label).encode("ascii")
            yield sample

    return samples(), classes


def text_samples(paths: list[str], per_line: bool = False, seed: int | None = None) -> Iterator[dict]:
    """Samples of ``txt`` from text files (folders are searched for ``*.txt``): one per file, or one per
    non-empty line (``\\n`` or ``\\r\\n`` ends a line) with ``per_line``. ``seed`` shuffles the files, or with
    ``per_line`` the lines of all files together (held in memory; without a seed they stream). With several
    paths, a key starts with the path's position (``1_doc_txt``), so that ``a/doc.txt`` and ``b/doc.txt`` do
    not clash."""
    files = []  # (file, its name relative to the path given)
    for number, path in enumerate(paths):
        prefix = f"{number}/" if len(paths) > 1 else ""
        if os.path.isdir(path):
            found, left_out = _files_with_extensions(path, frozenset({"txt"}), recursive=True)
            if left_out:
                print(f"left out of {path}: {describe_left_out(left_out)} (not .txt files)", file=sys.stderr)
            files += [(f, prefix + os.path.relpath(f, path)) for f in found]
        else:
            files.append((path, prefix + os.path.basename(path)))
    if not files:
        raise FileNotFoundError(f"no .txt files in {paths}")
    if not per_line:
        for file, name in shuffled_order(files, seed):
            yield {"__key__": sample_key(name), "__origin__": file, "txt": _read_text(file).encode("utf-8")}
        return

    def lines_of(file: str, name: str) -> Iterator[dict]:
        key = sample_key(name)
        for number, line in enumerate(_read_text(file).split("\n")):  # not splitlines: it also splits at \x0c, \u2028, ...
            line = line.removesuffix("\r")
            if line.strip():
                yield {"__key__": f"{key}_{number:07d}", "__origin__": f"{file} line {number + 1}", "txt": line.encode("utf-8")}

    if seed is None:  # in order: streamed file by file
        for file, name in files:
            yield from lines_of(file, name)
        return
    # Every file's lines at once, so that the shuffle mixes files: one file per class would give one-class shards.
    yield from shuffled_order([line for file, name in files for line in lines_of(file, name)], seed)


def brace_pattern(pattern: str, shards: int) -> str:
    """The brace pattern naming the written shards: ``out/train-%06d.tar`` -> ``out/train-{000000..000002}.tar``."""
    before, after, width = shard_number_field(pattern)
    return before + "{" + f"{0:0{width}d}..{shards - 1:0{width}d}" + "}" + after


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m core.data.write", description="Write media, captions or text into WebDataset tar shards."
    )
    parser.add_argument("--out", required=True, help="shard name pattern, e.g. out/train-%%06d.tar")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard, at most")
    parser.add_argument("--max-bytes", type=int, default=1 << 30, help="start a new shard once one holds this many bytes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order")
    parser.add_argument("--in-order", action="store_true", help="keep the input order (sorted files, table rows) instead")
    parser.add_argument("--overwrite", action="store_true", help="replace shards that already match --out")
    inputs = parser.add_subparsers(dest="input", required=True)
    folder = inputs.add_parser("folder", help="image/audio/video files, flat or in class sub-folders")
    folder.add_argument("root")
    folder.add_argument("--media", choices=sorted(MEDIA_KINDS), default="any", help="which files to take")
    table = inputs.add_parser("table", help="CSV or JSONL of (media path, caption[, label])")
    table.add_argument("file")
    table.add_argument("--path-column", default="path")
    table.add_argument("--caption-column", default="caption")
    table.add_argument("--label-column", default=None, help="the labels' column (default: label, when the table has one)")
    for labelled in (folder, table):
        labelled.add_argument(
            "--classes", default=None,
            help="number the classes as another split's shards did: the .classes.txt written beside them",
        )  # fmt: skip
    text = inputs.add_parser("text", help="text files: one document per file, or per line")
    text.add_argument("paths", nargs="+", help=".txt files or folders of them")
    text.add_argument("--per-line", action="store_true", help="one document per non-empty line")
    args = parser.parse_args(argv)
    try:
        shard_number_field(args.out)
    except ValueError as error:
        parser.error(f"--out: {error}")

    classes: list[str] = []
    seed = None if args.in_order else args.seed
    pinned = read_classes(args.classes) if getattr(args, "classes", None) else None
    if args.input == "folder":
        samples, classes = folder_samples(args.root, args.media, seed, pinned)
    elif args.input == "table":
        samples, classes = table_samples(args.file, args.path_column, args.caption_column, args.label_column, seed, pinned)
    else:
        samples = text_samples(args.paths, args.per_line, seed)
    summary = write_shards(samples, args.out, args.max_count, args.max_bytes, overwrite=args.overwrite)
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards, {summary['bytes']:,} bytes")
    print(f"shards: {brace_pattern(args.out, summary['shards'])}")
    print(f"extensions: {', '.join(summary['extensions'])}")
    if classes:
        path = write_classes_file(args.out, classes)
        print("classes: " + ", ".join(f"{i}={name}" for i, name in enumerate(classes)))
        print(f"class list: {path}" + ("" if pinned else f" (write other splits with --classes {path})"))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:  # the input's fault (a missing or unreadable file too): a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
