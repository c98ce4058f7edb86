"""Demo text set: two clearly different domains for continual pretraining, from text that ships with Python.

* ``prose``: English from the Python documentation's topic pages (``pydoc_data.topics``) and the docstrings
  of the standard library's top-level modules.
* ``code``: the source of the standard library's top-level modules (``Lib/*.py``).

Documents are cut into chunks at blank lines; train/val is decided per source (a module or a topic) by a hash
of its name, so no source contributes to both splits.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sysconfig
import tokenize

from pydoc_data.topics import topics

MIN_CHARS, MAX_CHARS = 512, 2000
VAL_FRACTION = 0.1


def stdlib_modules() -> list[str]:
    """Paths of the running interpreter's top-level standard-library modules (``Lib/*.py``), sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def read_source(path: str) -> str:
    with tokenize.open(path) as f:  # honours the file's coding cookie
        return f.read()


def docstrings(source: str) -> str:
    """The module, class and function docstrings of ``source``, in order, separated by blank lines."""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(n) for n in ast.walk(ast.parse(source)) if isinstance(n, nodes))
    return "\n\n".join(d for d in found if d)


def prose_documents() -> list[tuple[str, str]]:
    """(source, text) pairs of English prose: documentation topics, then each module's docstrings."""
    docs = [(f"pydoc_data.topics:{name}", topics[name]) for name in sorted(topics)]
    for path in stdlib_modules():
        docs.append((f"docstrings:Lib/{os.path.basename(path)}", docstrings(read_source(path))))
    return docs


def code_documents() -> list[tuple[str, str]]:
    """(source, text) pairs of Python source code, one per standard-library module."""
    return [(f"Lib/{os.path.basename(path)}", read_source(path)) for path in stdlib_modules()]


def split_long(block: str, max_chars: int) -> list[str]:
    """Cut a block longer than ``max_chars`` at line ends, and lines longer than that anywhere."""
    pieces, current = [], ""
    for line in block.splitlines(keepends=True):
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    return pieces + [current] if current else pieces


def chunk_text(text: str, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Greedily pack the blank-line-separated blocks of ``text`` into chunks of at most ``max_chars``.

    A short last chunk joins the one before it; a document shorter than ``min_chars`` yields no chunk.
    """
    blocks = [p for b in text.split("\n\n") if b.strip() for p in split_long(b.strip("\n"), max_chars)]
    chunks, current = [], ""
    for block in blocks:
        if current and len(current) + 2 + len(block) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        if chunks and len(current) < min_chars:
            chunks[-1] = f"{chunks[-1]}\n\n{current}"
        else:
            chunks.append(current)
    return [c for c in chunks if len(c) >= min_chars]


def source_split(source: str) -> str:
    """``"val"`` for about VAL_FRACTION of sources, chosen by a hash of the source name; else ``"train"``."""
    bucket = int(hashlib.sha1(source.encode()).hexdigest(), 16) % 1000
    return "val" if bucket < VAL_FRACTION * 1000 else "train"


def text_samples(domain: str, documents: list[tuple[str, str]]) -> dict[str, list[dict]]:
    """Chunk ``documents`` into samples (``txt``, ``json`` with the source) grouped by split, in source order."""
    splits = {"train": [], "val": []}
    for source, text in documents:
        for i, chunk in enumerate(chunk_text(text)):
            key = hashlib.sha1(f"{source}#{i}".encode()).hexdigest()[:16]
            meta = {"domain": domain, "source": source, "chunk": i, "chars": len(chunk)}
            splits[source_split(source)].append({"__key__": f"{domain}-{key}", "txt": chunk, "json": meta})
    return splits
