"""`ditlab evaluate`: figures for a checkpoint or a folder of images, tracked in MLflow.

A checkpoint's evaluation becomes an MLflow run nested under (and tagged with) the training run
that produced it, when its run folder records one; a folder's evaluation is a run of its own."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ditlab.atomic import write_json
from ditlab.config import DataSpec, EvaluationSpec, flatten
from ditlab.evaluation.images import load_image_folder
from ditlab.data.prepared import FORMAT as PREPARED_FORMAT
from ditlab.data.prepared import MANIFEST, read_manifest
from ditlab.evaluation.plots import save_sample_grid
from ditlab.evaluation.suite import Reference, Report, dataset_reference, evaluate_checkpoint, evaluate_sets
from ditlab.orchestration.tracking import Tracker, experiment_of_run, tracking_uri
from ditlab.orchestration.versioning import data_tags, experiment_tags
from ditlab.training.checkpoint import BUNDLE_NAME, checkpoint_dirs

DATASETS = ("digits",)
LABEL_IN_NAME = re.compile(r"_class(\d+)\.[A-Za-z]+$")  # as `ditlab sample` names its files


def is_checkpoint(path: str) -> bool:
    """A bundle file, a checkpoint folder, or a run folder holding checkpoint folders."""
    p = Path(path)
    return p.is_file() and p.suffix == ".pt" or (p / BUNDLE_NAME).is_file() or bool(checkpoint_dirs(p))


def parse_dataset(text: str) -> tuple[str, str] | None:
    """'digits' or 'digits:train' -> (name, split); None if `text` names no known dataset."""
    name, _, split = text.partition(":")
    if name not in DATASETS:
        return None
    split = split or "test"
    if split not in ("train", "test", "all"):
        raise ValueError(f"--real: unknown split {split!r} (train, test or all)")
    return name, split


def prepared_folder(real: str) -> tuple[str, str | None] | None:
    """('DIR', split or None) when `real` is 'DIR' or 'DIR:split' and DIR was written by
    `ditlab data prepare`; else None."""
    root, sep, split = real.rpartition(":")
    if not sep or split not in ("train", "test", "all"):
        root, split = real, None
    manifest = Path(root) / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("format") == PREPARED_FORMAT:
        return root, split
    return None


def reference_for(real, image_size: int, split: str = "test") -> Reference:
    """`real`: a spec's data section (at `split`), a folder written by `ditlab data prepare`
    ('DIR[:split]'), a dataset name ('digits[:split]'), or a folder of images."""
    data, named_split = real_data_spec(real)
    if data is not None:
        return dataset_reference(data, named_split or split)
    dataset = parse_dataset(real)
    if dataset is not None:
        name, split = dataset
        return dataset_reference(DataSpec(source=name, resolution=image_size), split)
    return Reference(load_image_folder(real), f"folder {real}")


def labels_from_names(folder: str) -> list[int] | None:
    from ditlab.evaluation.images import list_images

    found = [LABEL_IN_NAME.search(p.name) for p in list_images(folder)]
    return [int(m.group(1)) for m in found] if all(found) else None


def evaluate_folder(fake: str, real, ev: EvaluationSpec, progress: bool) -> Report:
    import numpy as np

    images = load_image_folder(fake)
    reference = reference_for(real, images.shape[1], ev.reference_split)
    labels = labels_from_names(fake)
    return evaluate_sets(images, reference, ev, fake_labels=None if labels is None else np.asarray(labels),
                         progress=progress)


def source_run_id(checkpoint: str) -> str | None:
    """The MLflow run that trained this checkpoint (a bundle, checkpoint folder or run folder), from
    its run folder's tracking.json."""
    p = Path(checkpoint).resolve()
    for folder in (p, p.parent, p.parent.parent):
        record = folder / "tracking.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("tracking_uri") == tracking_uri():
                return saved["run_id"]
    return None


def samples_source(folder: str) -> str | None:
    """The checkpoint a `ditlab sample` folder was drawn from (its samples.json), if recorded."""
    record = Path(folder) / "samples.json"
    return json.loads(record.read_text()).get("checkpoint") if record.is_file() else None


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


def run_evaluation(fake: str, real, ev: EvaluationSpec | None, out_dir: str | Path,
                   experiment: str = "ditlab-evaluation", progress: bool = True) -> dict:
    """Evaluate, write evaluation.json, metrics.json (the figures alone, for DVC) and samples.png
    to `out_dir`, log it all to MLflow. `real` is what `reference_for` takes, or None for a
    checkpoint's own dataset."""
    started = time.perf_counter()
    if is_checkpoint(fake):
        split = (ev.reference_split if ev else "test")
        reference = None if real is None else reference_for(real, _checkpoint_resolution(fake), split)
        report = evaluate_checkpoint(fake, ev, progress=progress, reference=reference)
        source = source_run_id(fake)
    else:
        if real is None:
            raise ValueError("--real: required when --fake is a folder of images")
        report = evaluate_folder(fake, real, ev or EvaluationSpec(), progress)
        checkpoint = samples_source(fake)
        source = source_run_id(checkpoint) if checkpoint and Path(checkpoint).exists() else None
    report.figures["eval_seconds"] = time.perf_counter() - started
    out_dir = Path(out_dir)
    data, _ = real_data_spec(real)
    real = real if data is None else (data.prepared or data.source)
    tracker = _open_tracker(fake, real, source, experiment)
    tracker.set_tags({**(data_tags(data) if data is not None else {}), **experiment_tags()})
    tracker.log_params(flatten({"evaluation": report.settings}))
    tracker.log_metrics(report.figures)
    tracker.set_tags({f"ditlab.eval.{k}": v for k, v in report.notes.items()})
    if report.samples is not None and len(report.samples):
        grid = save_sample_grid(report.samples, out_dir / "samples.png",
                                title=f"evaluated images ({len(report.samples)} in all)")
        tracker.log_artifact(grid, "figures")
    summary = {"fake": fake, "real": real, "mlflow_run_id": tracker.run_id, "source_run_id": source,
               "mlflow_url": tracker.url, **report.to_dict()}
    write_json(out_dir / "evaluation.json", summary)
    write_json(out_dir / "metrics.json", report.figures)
    tracker.log_artifact(out_dir / "evaluation.json")
    tracker.end("FINISHED")
    return summary


def _checkpoint_resolution(checkpoint: str) -> int:
    from ditlab.training.checkpoint import load_bundle

    return int(load_bundle(checkpoint)["model_config"]["input_size"])


def _open_tracker(fake: str, real: str | None, source: str | None, experiment: str) -> Tracker:
    tags = {"ditlab.kind": "evaluation", "ditlab.fake": str(fake), "ditlab.real": str(real)}
    if source is not None:
        # Nest under the training run, in its experiment, so the dashboard shows them together.
        tags.update({"ditlab.source_run_id": source, "mlflow.parentRunId": source})
        experiment = experiment_of_run(source)
    return Tracker.create(experiment, f"evaluate-{Path(fake).name}", tags)
