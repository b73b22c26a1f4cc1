"""Sharded datasets: a dataset too large for one worker's memory, kept as uint8 shards plus a manifest.

Layout of a shard set (written by `ditlab data add DIR --name NAME --format shards`):

    manifest.json          format, dtype, layout, image shape, classes, split, and per shard: file, count,
                           offset, bytes, sha256
    train/00000.npz ...    uncompressed npz: "images" uint8 [n, R, R, C], "labels" int64 [n]
    test/00000.npz ...

The latent cache (ditlab/latents.py) is a shard set of the same format: "images" are float16
latents [n, H, W, C], and its manifest adds the scale factor they are multiplied by on the batch
(`to_float`). A manifest without "dtype" (sets written before it was recorded) is uint8.

Why npz of uint8 and not Parquet: images and labels of a shard travel together under one checksum,
reading one needs numpy only (no per-image decode, no tensor extension types), and an uncompressed
npz is its raw bytes: a 10k-image 32x32x3 shard is 30 MB read straight into the array.

Every path here is a URI read through pyarrow.fs: a local folder or `s3://bucket/prefix` (credentials
and endpoint from the standard AWS variables), so the same code runs on a laptop and a cluster.

Checksums: a shard's bytes must hash to the manifest's sha256. Checking every shard on every start
would read the whole set (1.5 GB for 500k CIFAR-size images), so `check_shard_set` compares sizes
always (one listing) and hashes a shard only when its (URI, size, mtime) has not been verified
before on this machine (a small JSON cache under $DITLAB_CACHE_DIR; a file modified less than 2 s
before its check is not cached, since S3 keeps mtimes to the second). Each worker also hashes every
shard it reads (the bytes are in memory then; about 1 s per GB), so a shard changed behind the
cache's back fails its reader rather than training on wrong data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from ditlab.atomic import write_json

MANIFEST = "manifest.json"
FORMAT = "ditlab-shards/1"
SPLITS = ("train", "test")
DEFAULT_SHARD_SIZE = 10_000


class ShardError(ValueError):
    """A shard set that cannot be used; the message names the shard or manifest at fault."""


# -- locations ---------------------------------------------------------------------------------


def is_uri(location: str) -> bool:
    return "://" in str(location)


def normalize(location: str | os.PathLike) -> str:
    """A URI unchanged, a local path made absolute (what pyarrow.fs and remote workers need)."""
    return str(location) if is_uri(str(location)) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


# Object-storage filesystems this process was handed by its driver (`use_filesystems`), by the
# location they serve. A Ray worker on a node without the AWS variables reads s3:// through the
# driver's filesystem object, which carries the endpoint and credentials (as Ray Train's
# storage_filesystem does for checkpoints: storage.py); they never travel as text or environment.
_HANDED: dict[str, object] = {}


def filesystem(location: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI: an s3:// URI through the
    handed filesystem that serves it, else one configured from the standard AWS variables."""
    location = normalize(location)
    if is_uri(location):
        from ditlab.storage import SCHEME, filesystem as s3_filesystem

        for prefix, fsys in _HANDED.items():
            if location == prefix or location.startswith(prefix.rstrip("/") + "/"):
                return fsys, location[len(SCHEME):].strip("/")
        if location.startswith(SCHEME):
            return s3_filesystem(location)
    from pyarrow import fs

    return fs.FileSystem.from_uri(location)


def handed_filesystems(location: str) -> dict[str, object]:
    """What a driver hands its workers (`use_filesystems`) so that they read `location` as it does:
    its object-storage filesystem; nothing for a local path (a cluster shares those by mount)."""
    location = normalize(location)
    return {location: filesystem(location)[0]} if is_uri(location) else {}


def use_filesystems(handed: dict[str, object]) -> None:
    """Read the locations in `handed` through their filesystems in this process (a worker)."""
    _HANDED.update(handed)


def read_bytes(location: str) -> bytes:
    fsys, path = filesystem(location)
    with fsys.open_input_stream(path) as f:
        return f.read()


# -- writing -----------------------------------------------------------------------------------


def write_shards(out_dir: str | Path, splits: dict[str, Iterable[tuple[np.ndarray, np.ndarray]]],
                 classes: list[str], extra: dict | Callable[[], dict] | None = None, dtype: str = "uint8") -> dict:
    """Write each split's chunks of (images [n, R, R, C] of `dtype`, int64 labels [n]) as one shard
    per chunk under out_dir/<split>/, then the manifest (last: a folder without one is no shard set).
    `extra`: more manifest fields, or a function giving them once every shard is written (fields
    computed from the data as it streams by: a latent cache's scale factor). Returns the manifest."""
    out_dir = Path(out_dir)
    shards: dict[str, list[dict]] = {}
    shape = None
    for split, chunks in splits.items():
        shards[split], offset = [], 0
        for i, (images, labels) in enumerate(chunks):
            if images.dtype != np.dtype(dtype) or images.ndim != 4 or len(images) != len(labels):
                raise ShardError(f"shard {split}/{i}: want {dtype} [n, R, R, C] images and n labels")
            if shape is None:
                shape = list(images.shape[1:])
            elif list(images.shape[1:]) != shape:
                raise ShardError(f"shard {split}/{i}: images of {list(images.shape[1:])}, the set's are {shape}")
            shards[split].append(_write_shard(out_dir, split, i, images, labels, offset))
            offset += len(images)
    counts = {split: sum(s["count"] for s in entries) for split, entries in shards.items()}
    fields = extra() if callable(extra) else extra or {}
    manifest = {"format": FORMAT, "dtype": dtype, "layout": "NHWC", "image_shape": shape, "classes": classes,
                "num_classes": len(classes), "counts": counts, "shards": shards, **fields}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _write_shard(out_dir: Path, split: str, index: int, images: np.ndarray, labels: np.ndarray,
                 offset: int) -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.ascontiguousarray(images), labels=np.asarray(labels, dtype=np.int64))
    data = buffer.getvalue()
    name = f"{split}/{index:05d}.npz"
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_bytes(data)
    return {"file": name, "count": int(len(images)), "offset": offset, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def shards_from_folder(src: str | Path, out_dir: str | Path, resolution: int, channels: int, shard_size: int,
                       test_fraction: float, split_seed: int, extra: dict | None = None) -> dict:
    """An image folder (one subfolder per class) as a shard set: the stratified split of
    `ditlab.data.stratified_split` (the train split in a seeded random order), images center-cropped
    and resized as training would, decoded one shard at a time (memory: one shard, not the folder)."""
    import torch

    from ditlab.data import stratified_split, to_uint8
    from ditlab.data.folder import load_image, scan_image_folder

    files, labels, classes = scan_image_folder(src)
    train, test = stratified_split(labels, test_fraction, split_seed)
    # The folder lists images class by class; the stream shuffles whole shards, so each shard must
    # already be a random mix of the classes (else a batch would hold one or two classes).
    train = np.random.default_rng([split_seed, 1]).permutation(train)

    def chunks(indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(indices), shard_size):
            part = indices[start:start + shard_size]
            images = torch.stack([load_image(files[i], resolution, channels) for i in part])
            yield to_uint8(images), labels[part]

    fields = {"resolution": resolution, "channels": channels, "test_fraction": test_fraction,
              "split_seed": split_seed, "shard_size": shard_size, **(extra or {})}
    return write_shards(out_dir, {"train": chunks(train), "test": chunks(test)}, classes, fields)


def chunked(images: np.ndarray, labels: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(images), size):
        yield images[start:start + size], labels[start:start + size]


# -- reading -----------------------------------------------------------------------------------


def read_manifest(location: str) -> dict:
    """The manifest of the shard set at `location` (path or URI), checked for its fields."""
    where = join(normalize(location), MANIFEST)
    try:
        manifest = json.loads(read_bytes(where))
    except FileNotFoundError:
        raise ShardError(f"data.path: {where!r} does not exist; write a shard set with "
                         "`ditlab data add DIR --name NAME --format shards`") from None
    except ValueError as err:
        raise ShardError(f"data.path: {where!r} is corrupt, not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"data.path: {where!r} is not a {FORMAT} manifest")
    shards = manifest.get("shards")
    if not (isinstance(shards, dict) and all(isinstance(shards.get(s), list) for s in SPLITS)
            and isinstance(manifest.get("image_shape"), list) and isinstance(manifest.get("num_classes"), int)):
        raise ShardError(f"data.path: {where!r} is corrupt: shards, image_shape or num_classes missing")
    return manifest


def load_shard(location: str, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8, labels int64) of one shard, after checking its bytes against the manifest."""
    where = join(location, entry["file"])
    data = read_bytes(where)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"shard {where!r} does not match its checksum in the manifest")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["images"], npz["labels"]


def read_split(location: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A whole split in memory as stored: (images [N, R, R, C], labels, manifest); for the test split
    and for sets small enough to hold (`data.stream: false`). With `limit`, its first `limit` images
    only, reading no shard past them (a train split is stored in seeded random order, so its head
    is a random sample of it)."""
    location = normalize(location)
    manifest = read_manifest(location)
    parts, held = [], 0
    for entry in (e for s in (SPLITS if split == "all" else (split,)) for e in manifest["shards"][s]):
        if limit is not None and held >= limit:
            break
        parts.append(load_shard(location, entry))
        held += len(parts[-1][1])
    if limit is not None and held > limit:
        parts[-1] = (parts[-1][0][: limit - held], parts[-1][1][: limit - held])
    empty = np.zeros((0, *manifest["image_shape"]), manifest.get("dtype", "uint8"))
    images = np.concatenate([p[0] for p in parts]) if parts else empty
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return images, labels, manifest


def to_float(images: np.ndarray, manifest: dict):
    """Stored images [n, R, R, C] -> the float32 [n, C, R, R] tensor training sees: uint8 pixels to
    [-1, 1], float16 latents to float32 times the manifest's scale factor. Always a copy (Ray hands
    out read-only arrays, which torch will not wrap), scaled in place: one float32 array at the peak."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32))
    if manifest.get("dtype", "uint8") == "uint8":
        return x.div_(127.5).sub_(1.0)
    return x.mul_(float(manifest["scale_factor"]))


def load_float_split(location: str, split: str):
    """(float32 images [N, C, R, R] as training sees them, labels int64 tensor, manifest) of a split."""
    import torch

    images, labels, manifest = read_split(location, split)
    return to_float(images, manifest), torch.as_tensor(labels), manifest


# -- checks before a run -------------------------------------------------------------------------


def check_shard_set(data_spec) -> dict:
    """The manifest, after checking the set fits the spec (image shape, split) and every shard is
    there with its recorded size and checksum (sha256 only for shards not verified before)."""
    location = normalize(data_spec.path)
    manifest = read_manifest(location)
    if manifest.get("dtype", "uint8") != "uint8":
        raise ShardError(f"data.path: {location!r} holds {manifest['dtype']} arrays (a latent cache?), "
                         "not uint8 images")
    want = [data_spec.resolution, data_spec.resolution, data_spec.channels]
    if manifest["image_shape"] != want:
        got = "x".join(map(str, manifest["image_shape"]))
        raise ShardError(f"data.path: shard set {location!r} holds {got} images; the spec wants "
                         f"{'x'.join(map(str, want))} (data.resolution={data_spec.resolution}, "
                         f"data.channels={data_spec.channels})")
    for key in ("test_fraction", "split_seed"):
        if key in manifest and manifest[key] != getattr(data_spec, key):
            raise ShardError(f"data.{key}: shard set {location!r} was split with {key}={manifest[key]}, the spec "
                             f"says {getattr(data_spec, key)}")
    return verify_shards(location, manifest)


def verify_shards(location: str, manifest: dict) -> dict:
    """Every shard of the set at `location` is there with the manifest's size and checksum (sha256
    only for shards not verified before on this machine); returns the manifest."""
    cache = _VerifiedCache()
    for split in SPLITS:
        for entry in manifest["shards"][split]:
            _check_entry(location, entry, cache)
    cache.save()
    return manifest


RACY_NS = 2_000_000_000  # files modified this recently are hashed again at the next check


def _check_entry(location: str, entry: dict, cache: _VerifiedCache) -> None:
    from pyarrow import fs

    where = join(location, entry["file"])
    fsys, path = filesystem(where)
    info = fsys.get_file_info(path)
    if info.type != fs.FileType.File:
        raise ShardError(f"shard {where!r} is missing")
    if info.size != entry["bytes"]:
        raise ShardError(f"shard {where!r} does not match the manifest: {info.size} bytes, manifest {entry['bytes']}")
    key = f"{where}\0{info.size}\0{info.mtime_ns}\0{entry['sha256']}"
    if not cache.has(key):
        if hashlib.sha256(read_bytes(where)).hexdigest() != entry["sha256"]:
            raise ShardError(f"shard {where!r} does not match its checksum in the manifest")
        # A shard rewritten within its store's mtime resolution (a second on S3) after this check would
        # keep its key: trust the hash only for files older than that ("racily clean", as git does).
        if time.time_ns() - info.mtime_ns > RACY_NS:
            cache.add(key)


class _VerifiedCache:
    """Shards already hashed on this machine, keyed by URI, size, mtime and expected sha256."""

    def __init__(self):
        root = Path(os.environ.get("DITLAB_CACHE_DIR", Path.home() / ".cache" / "ditlab"))
        self.path = root / "verified-shards.json"
        try:
            self.keys = set(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            self.keys = set()
        self.dirty = False

    def has(self, key: str) -> bool:
        return hashlib.sha256(key.encode()).hexdigest() in self.keys

    def add(self, key: str) -> None:
        self.keys.add(hashlib.sha256(key.encode()).hexdigest())
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            try:
                write_json(self.path, sorted(self.keys))
            except OSError:  # a read-only home: the check still ran, only the shortcut is lost
                pass
