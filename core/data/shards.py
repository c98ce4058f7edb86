"""Find and read tar shards: brace patterns, globs, ``pipe:`` commands and URLs, opened by webdataset's ``gopen``."""

from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Iterator
from urllib.parse import urlparse

import braceexpand
import webdataset as wds
from webdataset.gopen import gopen_schemes, rewrite_url
from webdataset.tariterators import base_plus_ext

# Members webdataset keeps for itself (``__index__`` ...) are not sample data; its tar_file_iterator skips them too.
META_MEMBER = re.compile(r"__[^/]*__($|/)")
OPENED = ["file", *(scheme for scheme in gopen_schemes if scheme != "__default__")]


def listing(urls: list[str], limit: int = 8) -> str:
    """The first ``limit`` URLs, comma-separated, and how many there are in all."""
    shown = ", ".join(urls[:limit])
    return shown + (f", ... ({len(urls)} in all)" if len(urls) > limit else "")


def local_files(pattern: str) -> list[str]:
    """Files named by a local brace pattern and/or glob; raises ``FileNotFoundError`` naming the pattern, and
    the shards or globs of it that name no file (``{train,extra}/*.tar`` with ``extra/`` empty)."""

    def files_of(path: str) -> list[str]:
        # A file named as given first: `run[1]/train-000000.tar` is that file, not a glob matching `run1/...`.
        found = sorted(glob.glob(path)) if glob.has_magic(path) and not os.path.isfile(path) else [path]
        # A file a glob finds named `pipe:...` or `http:...` would be run or fetched by webdataset's gopen.
        return [os.path.join(".", file) if urlparse(file).scheme else file for file in found if os.path.isfile(file)]

    expanded = list(braceexpand.braceexpand(pattern))
    matches = {path: files_of(path) for path in expanded}
    files = [file for found in matches.values() for file in found]
    if not files:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
    missing = [path for path, found in matches.items() if not found]
    if missing:
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(missing)} of {len(expanded)} shards or globs name no file: {listing(missing)}"
        )
    return files


def expand_urls(patterns: str | list[str]) -> list[str]:
    """Shard URLs from brace patterns (``train-{000000..000099}.tar``), globs, ``pipe:`` commands or URLs.

    Local patterns must name existing files. ``pipe:`` commands and URLs (``https://``, ``gs://``) are only
    brace-expanded; webdataset's ``gopen`` opens them when they are read. A scheme ``gopen`` has no handler
    for (``s3://``) is refused here, not at every shard as the run reads it.
    """
    urls = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        scheme = urlparse(rewrite_url(pattern)).scheme  # as gopen will see it (GOPEN_REWRITE)
        if scheme and scheme != "file" and scheme not in gopen_schemes:
            raise ValueError(
                f"shard pattern {pattern!r}: webdataset opens no {scheme}:// URLs (it opens {', '.join(OPENED)}); "
                f"read them through a command, e.g. 'pipe:aws s3 cp {pattern} -'"
            )
        if scheme == "file":  # a local path all the same: checked and globbed as one
            urls += local_files(pattern.removeprefix("file://") if pattern.startswith("file://") else pattern[5:])
        else:
            urls += list(braceexpand.braceexpand(pattern)) if scheme else local_files(pattern)
    if not urls:
        raise ValueError(f"no shard pattern given: {patterns!r}")
    return urls


def tar_members(url: str, stream) -> Iterator[dict]:
    """The regular files of a tar stream as ``{"fname", "data", "__url__"}``, in order, and its links as
    ``{"fname", "link": (target, "hard" or "symbolic"), "__url__"}``, which ``samples_of`` lists in their sample.

    Raises ``tarfile.ReadError`` when the archive stops without its end-of-archive marker (zero blocks to the
    end): Python's tarfile, and so webdataset, reads a cut-off or corrupt header after the first member as the
    end of the archive, which would drop the rest of the shard without a word."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        members = 0
        for info in tar:
            if info.isreg() and not META_MEMBER.match(info.name):
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            elif (info.issym() or info.islnk()) and not META_MEMBER.match(info.name):
                yield {"fname": info.name, "link": (info.linkname, "hard" if info.islnk() else "symbolic"), "__url__": url}
            tar.members = []  # forget the headers read: constant memory however long the shard
            members += 1
        # tarfile stopped at a header it could not read; a real end is a zero block followed by zeros only.
        end, rest = tar.offset, b""
        while chunk := tar.fileobj.read(1 << 20):
            rest = chunk
            if chunk.count(0) != len(chunk):
                break
        if not rest or rest.count(0) != len(rest):
            raise tarfile.ReadError(
                f"the tar stops at byte {end}, after {members} members, without its end-of-archive marker: "
                "the shard is cut short or a header is corrupt"
            )


def samples_of(members: Iterator[dict]) -> Iterator[dict]:
    """Group consecutive tar members into samples by key (the name up to its first dot), extensions
    lowercased, as webdataset's ``group_by_keys``. A member whose extension its sample already has
    (``a.txt`` next to ``a.TXT``, or a member added twice) marks the sample ``__duplicate__`` for the decoder to
    skip, where ``group_by_keys`` raises and so loses the rest of the shard. Link members (a shard made by
    ``tar`` from a folder of links) are listed in ``__links__`` as (name, target, kind), for the decoder to
    skip the sample, where dropping them would lose a member without a word. When reading fails, the sample
    being grouped is given before the error marked ``__partial__``, for the decoder to skip and count: whether
    it lost a member cannot be told (a shard written image-first and cut before its ``.cls`` would otherwise
    pass an unlabelled sample on to a batch of labelled ones). A member whose extension starts with ``__``
    is dropped, as one of an unknown extension is later."""
    sample = None
    try:
        for member in members:
            key, ext = base_plus_ext(member["fname"])
            if key is None:
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": member["__url__"]}
            ext = ext.lower()
            if ext.startswith("__"):  # `a.__links__`: the sample's own entries go by such names; no decoder reads one
                continue
            if "link" in member:
                sample.setdefault("__links__", []).append((member["fname"], *member["link"]))
            elif ext in sample:
                sample.setdefault("__duplicate__", member["fname"])
            else:
                sample[ext] = member["data"]
    except Exception:
        if sample is not None:
            yield {**sample, "__partial__": True}
        raise
    if sample is not None:
        yield sample


def failed_command(stream) -> str | None:
    """For a ``pipe:`` stream whose command failed, "command '...' exited with status N" (webdataset's own
    message is its Popen arguments' repr); None otherwise."""
    proc = getattr(stream, "proc", None)  # webdataset's Pipe
    if proc is None or proc.poll() in (None, *getattr(stream, "ignore_status", [0])):
        return None
    return f"command {proc.args!r} exited with status {proc.returncode}"


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one tar shard (``{"__key__", "__url__", "<ext>": bytes}``), in file order.

    The URL is opened by webdataset's ``gopen``: a local path, ``pipe:<command>`` or http(s)/gs/... URLs.
    Raises on a missing shard, a corrupt tar or a pipe command that exits with an error.
    """
    stream = wds.gopen(url)
    try:
        yield from samples_of(tar_members(url, stream))
    except Exception as error:
        try:
            stream.close()
        except Exception as closing:  # a failed command's exit status says more than the tar it left behind
            raise OSError(failed_command(stream) or f"{type(error).__name__}: {error}; then, closing the stream: {closing}") from error
        raise
    except GeneratorExit:  # stopped early: a killed pipe's exit status means nothing
        try:
            stream.close()
        except Exception:
            pass
        raise
    try:
        stream.close()  # a pipe command's exit status is checked here
    except Exception as error:  # the command failed after its tar ended: named as above
        raise OSError(failed_command(stream) or f"{type(error).__name__}: {error}") from error
