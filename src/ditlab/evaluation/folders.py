"""Folder in, metrics out: what `ditlab evaluate --fake DIR` computes, without MLflow or Ray.

The real side can be a spec's data section, a folder written by `ditlab data prepare` ('DIR' or
'DIR:split'), a named dataset ('digits' or 'digits:split'), or a plain folder of images. Fake images
named as `ditlab sample` names them (`00000_class3.png`) carry their class label, which enables
conditional accuracy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ditlab.config import RECONSTRUCTION_METRICS, DataSpec, EvaluationSpec
from ditlab.data.prepared import FORMAT as PREPARED_FORMAT
from ditlab.data.prepared import MANIFEST, read_manifest
from ditlab.evaluation.images import list_images, load_image_folder, read_rgb
from ditlab.evaluation.suite import Reference, Report, dataset_reference, evaluate_pairs, evaluate_sets

DATASETS = ("digits",)
SPLITS = ("train", "test", "all")
LABEL_IN_NAME = re.compile(r"_class(\d+)\.[A-Za-z]+$")  # as `ditlab sample` names its files


def parse_dataset(text: str) -> tuple[str, str] | None:
    """'digits' or 'digits:train' -> (name, split); None if `text` names no known dataset."""
    name, _, split = text.partition(":")
    if name not in DATASETS:
        return None
    split = split or "test"
    if split not in SPLITS:
        raise ValueError(f"--real: unknown split {split!r} (train, test or all)")
    return name, split


def prepared_folder(real: str) -> tuple[str, str | None] | None:
    """('DIR', split or None) when `real` is 'DIR' or 'DIR:split' and DIR was written by
    `ditlab data prepare`; else None."""
    root, sep, split = real.rpartition(":")
    if not sep or split not in SPLITS:
        root, split = real, None
    manifest = Path(root) / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("format") == PREPARED_FORMAT:
        return root, split
    return None


def real_data_spec(real) -> tuple[DataSpec | None, str | None]:
    """(the data section behind `real`, the split it names), when `real` is a spec's data section
    or a prepared folder ('DIR[:split]'); else (None, None)."""
    if isinstance(real, DataSpec):
        return real, None
    prepared = prepared_folder(real) if isinstance(real, str) else None
    if prepared is None:
        return None, None
    root, split = prepared
    return DataSpec(**read_manifest(root)["data"], prepared=root), split


def reference_for(real, image_size: int, split: str = "test") -> Reference:
    """The real side of an evaluation: see the module docstring for what `real` may be."""
    data, named_split = real_data_spec(real)
    if data is not None:
        return dataset_reference(data, named_split or split)
    dataset = parse_dataset(real)
    if dataset is not None:
        name, split = dataset
        return dataset_reference(DataSpec(source=name, resolution=image_size), split)
    return Reference(load_image_folder(real), f"folder {real}")


def labels_from_names(folder: str) -> list[int] | None:
    found = [LABEL_IN_NAME.search(p.name) for p in list_images(folder)]
    return [int(m.group(1)) for m in found] if all(found) else None


def samples_source(folder: str) -> str | None:
    """The checkpoint a `ditlab sample` folder was drawn from (its samples.json), if recorded."""
    record = Path(folder) / "samples.json"
    return json.loads(record.read_text()).get("checkpoint") if record.is_file() else None


def evaluate_folder(fake: str, real, ev: EvaluationSpec, progress: bool = False) -> Report:
    """Figures for a folder of images against `real`; with reconstruction metrics in `ev`, `real`
    must be a folder holding the same file names (each fake image is scored against its namesake)."""
    if any(m in RECONSTRUCTION_METRICS for m in ev.metrics):
        pred, target = paired_folders(fake, real)
        return evaluate_pairs(pred, target, ev, name=f"folder {real} (paired by file name)", progress=progress)
    images = load_image_folder(fake)
    reference = reference_for(real, images.shape[1], ev.reference_split)
    labels = labels_from_names(fake)
    return evaluate_sets(images, reference, ev, fake_labels=None if labels is None else np.asarray(labels),
                         progress=progress)


def paired_folders(fake: str, real) -> tuple[np.ndarray, np.ndarray]:
    """Both folders' images as uint8 [N, H, W, 3], matched by path relative to each folder."""
    if not isinstance(real, str) or not Path(real).is_dir():
        raise ValueError(f"--real: reconstruction metrics (mse, psnr, ssim, lpips) need a folder of ground-truth "
                         f"images with the same file names as --fake, got {real!r}")
    fake_files = {p.relative_to(fake).as_posix(): p for p in list_images(fake)}
    real_files = {p.relative_to(real).as_posix(): p for p in list_images(real)}
    missing = sorted(set(fake_files) - set(real_files))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"--real: {real!r} has no ground truth for {shown} (paired by file name)")
    pairs = [(name, read_rgb(fake_files[name]), read_rgb(real_files[name])) for name in sorted(fake_files)]
    size = pairs[0][1].shape
    for name, pred, target in pairs:
        if pred.shape != size or target.shape != size:
            raise ValueError(f"{name}: {pred.shape[1]}x{pred.shape[0]} in --fake, {target.shape[1]}x{target.shape[0]} "
                             f"in --real; paired metrics need every image at one size ({size[1]}x{size[0]})")
    return np.stack([p for _, p, _ in pairs]), np.stack([t for _, _, t in pairs])
