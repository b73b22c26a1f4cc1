"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or an error mid-write leaves the previous file (or no file) in place, never a torn one.
With `fsync`, the file and then its folder are flushed to disk, so a power loss after the rename
cannot bring back the old file or an empty one. Also the file checksum the integrity checks use."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            fsync_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
        if fsync:  # the rename itself is durable only once the folder's entry is on disk
            fsync_file(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk (a folder: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder`, every folder in it, and its parent's entry for it: a copy
    made by someone else (Ray Train persisting a checkpoint) made durable."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # files before their folders
        fsync_file(path)
    fsync_file(folder)
    fsync_file(folder.parent)


def write_json(path: str | os.PathLike, payload) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(path)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
