"""A dataset materialized for one `data` section: the train and test splits as uint8 arrays, as the
spec resolves them (resolution, channels, split), plus a manifest.

`ditlab data prepare` writes it (the pipeline's `prepare` stage); setting `data.prepared` to its
folder makes training, sampling and evaluation read it instead of the source. The files are plain
`.npy` arrays, whose bytes depend only on the images, so preparing the same data twice gives the
same DVC hash and the stages after it are not rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ditlab.atomic import atomic_path, file_digest, write_json

MANIFEST = "manifest.json"
FORMAT = "ditlab-prepared/1"
# The fields of a data section that decide what the prepared arrays hold.
DEFINING_FIELDS = ("source", "name", "path", "resolution", "channels", "test_fraction", "split_seed")
ARRAY_FILES = tuple(f"{split}_{kind}.npy" for split in ("train", "test") for kind in ("images", "labels"))


class PreparedDataError(ValueError):
    pass



def defining_fields(data_spec) -> dict:
    return {k: getattr(data_spec, k) for k in DEFINING_FIELDS}


def save_prepared(data_spec, out_dir: str | Path) -> dict:
    """Write <out>/{train,test}_{images,labels}.npy and manifest.json; returns the manifest."""
    from ditlab.data import load_dataset

    source_spec = data_spec.model_copy(update={"prepared": None})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts, num_classes = {}, {}, 0
    for split in ("train", "test"):
        ds = load_dataset(source_spec, split)
        num_classes = ds.num_classes
        counts[split] = len(ds)
        for kind, array in (("images", ds.to_uint8()), ("labels", ds.labels.numpy().astype(np.int64))):
            path = out_dir / f"{split}_{kind}.npy"
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            files[path.name] = file_digest(path)
    manifest = {
        "format": FORMAT,
        "data": defining_fields(source_spec),
        "source_manifest": _source_manifest(source_spec),
        "num_classes": num_classes,
        "counts": counts,
        "image_shape": [data_spec.resolution, data_spec.resolution, data_spec.channels],
        "sha256": files,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _source_manifest(data_spec) -> dict | None:
    """The manifest `ditlab data add` wrote for a named folder dataset, if there is one."""
    if data_spec.source != "folder" or not data_spec.path:
        return None
    path = Path(data_spec.path) / MANIFEST
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return {k: saved.get(k) for k in ("name", "count", "sha256")}


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PreparedDataError(f"data.prepared: {str(folder)!r} holds no {MANIFEST}; "
                                "write it with `ditlab data prepare SPEC --out DIR`")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:  # not JSON, or not UTF-8
        raise PreparedDataError(f"data.prepared: {str(path)!r} is corrupt, not JSON ({err}); "
                                "rerun `ditlab data prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PreparedDataError(f"data.prepared: {str(path)!r} is not a {FORMAT} manifest")
    fields = {"data": dict, "num_classes": int, "counts": dict, "sha256": dict}
    wrong = next((k for k, kind in fields.items() if not isinstance(manifest.get(k), kind)), None)
    if wrong is None and set(manifest["sha256"]) != set(ARRAY_FILES):
        wrong = "sha256"
    if wrong is not None:
        raise PreparedDataError(f"data.prepared: {str(path)!r} is corrupt: its {wrong!r} field is missing or "
                                "malformed; rerun `ditlab data prepare`")
    return manifest


def check_prepared(data_spec, verify_checksums: bool = False) -> dict:
    """The manifest, after checking it was prepared for this data section (and, optionally, that
    every file still has the checksum the manifest recorded)."""
    folder = Path(data_spec.prepared)
    manifest = read_manifest(folder)
    wanted = defining_fields(data_spec.model_copy(update={"prepared": None}))
    differ = [k for k in DEFINING_FIELDS if manifest["data"].get(k) != wanted[k]]
    if differ:
        detail = ", ".join(f"data.{k}: prepared {manifest['data'].get(k)!r}, spec {wanted[k]!r}" for k in differ)
        raise PreparedDataError(f"data.prepared: {str(folder)!r} was prepared for other data ({detail}); "
                                "rerun `ditlab data prepare`")
    if verify_checksums:
        for name, digest in manifest["sha256"].items():
            if not (folder / name).is_file() or file_digest(folder / name) != digest:
                raise PreparedDataError(f"data.prepared: {str(folder / name)!r} is missing or does not match "
                                        "its checksum in the manifest")
    return manifest


def load_prepared(data_spec, split: str):
    """(images float [N, C, R, R] in [-1, 1], labels int64 [N], num_classes) of one split."""
    manifest = check_prepared(data_spec)
    folder = Path(data_spec.prepared)
    splits = ("train", "test") if split == "all" else (split,)
    images = np.concatenate([np.load(folder / f"{s}_images.npy", allow_pickle=False) for s in splits])
    labels = np.concatenate([np.load(folder / f"{s}_labels.npy", allow_pickle=False) for s in splits])
    # Transposed and converted in numpy: with one channel, a permuted tensor is both contiguous and
    # channels-last, torch's conversions keep the channels-last strides, convolutions then run
    # channels-last and DDP warns about gradient strides on 1x1 convolutions.
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)) / 127.5 - 1.0
    return x, labels, int(manifest["num_classes"])
