"""Generated data for a classifier: does a class-conditional DiT's output help when real images are few?

`ditlab augment CHECKPOINT --name NAME` does two things:

1. It draws N samples per class from the checkpoint (its evaluation sampler, steps and guidance)
   and writes them as a folder dataset, data/NAME/<class>/<index>.png (the layout `ditlab data
   add` writes and `data.source: folder` reads), with synthetic.json recording where they came
   from, then tracks the folder with DVC: writing the same name again makes a new version.
2. It measures whether they help: a small classifier is trained on k real images per class of
   the checkpoint's own training split (k = 5, 10, 20 by default), once on those alone and once
   on those plus the whole synthetic set, for 5 seeds (each seed draws other real images), and
   scored on the test split. The classifier is evaluation/classifier.py's logistic regression on
   pixels: the project's own "small classifier" (about 98% on digits with the full train split),
   deterministic for a given training set, so the spread over seeds is the spread over which real
   images were drawn, and cheap (30 fits take seconds on a CPU), where a CNN's own seed noise
   would blur a difference this small. A classifier on the synthetic set alone is the reference
   line: what the generated images teach by themselves.

The table (augmentation.csv and .json) and the figure (augmentation.png: accuracy against k,
mean and standard deviation over the seeds) are written to --out and logged to MLflow.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditlab.atomic import atomic_path, file_digest
from ditlab.data import to_uint8

DEFAULT_KS = (5, 10, 20)
DEFAULT_SEEDS = 5
PROVENANCE = "synthetic.json"
ARMS = ("real", "real+synthetic")


# -- the synthetic set -----------------------------------------------------------------------------


def synthesize(ckpt, per_class: int, ev, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N*K, H, W, C], labels [N*K]): `per_class` samples of each class, drawn with the
    evaluation settings `ev` (sampler, steps, guidance, seed, batch size)."""
    from ditlab.sampling import balanced_labels, generate

    num_classes = ckpt.model.config.num_classes
    labels = balanced_labels(per_class * num_classes, num_classes)
    images = generate(ckpt, labels, ev.sampler, ev.steps, ev.guidance, ev.seed, ev.batch_size, ev.clip_x0,
                      progress=progress)
    return to_uint8(images), labels.numpy()


def class_names(num_classes: int) -> list[str]:
    """Folder names whose sorted order is the label order (a folder dataset numbers its classes
    by sorted name): zero-padded numbers, "0".."9" for digits."""
    width = len(str(max(num_classes - 1, 0)))
    return [f"{label:0{width}d}" for label in range(num_classes)]


def write_images(images: np.ndarray, labels: np.ndarray, folder: Path, provenance: dict) -> None:
    """<folder>/<class>/<index>.png for each image, and the provenance record."""
    names = class_names(int(labels.max()) + 1)
    for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        path = folder / names[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(path, format="PNG")
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def is_synthetic_dataset(folder: Path) -> bool:
    return (folder / PROVENANCE).is_file()


def save_dataset(images: np.ndarray, labels: np.ndarray, root: Path, name: str, provenance: dict,
                 track: bool) -> dict:
    """Write the set as <root>/<name> (replacing an earlier synthetic set of that name only once the
    new one is complete), then describe and version it as `ditlab data add` does."""
    from ditlab.orchestration.versioning import add_dataset

    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write_images(images, labels, staging, provenance)
        if dest.exists():
            old = root / f".{name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return add_dataset(dest, name, root, track=track)


def provenance(checkpoint: str, ckpt, ev, per_class: int) -> dict:
    from ditlab.training.checkpoint import resolve_bundle_path

    bundle = resolve_bundle_path(checkpoint)
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(bundle), "step": ckpt.step,
            "per_class": per_class, "sampler": ev.sampler, "steps": ev.steps, "guidance": ev.guidance,
            "seed": ev.seed, "weights": "ema", "data": ckpt.spec.data.model_dump(mode="json")}


# -- does it help? ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]


def few_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of `k` images of each class, drawn without replacement with `seed`."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                   for c in np.unique(labels)]))


def classifier_accuracy(train: Split, test: Split, seed: int) -> float:
    from ditlab.evaluation.classifier import PixelClassifier

    return PixelClassifier.fit(train.images, train.labels, seed).accuracy(test.images, test.labels)


def compare(real: Split, test: Split, synthetic: Split, ks: tuple[int, ...], seeds: int,
            progress: bool = False) -> list[dict]:
    """One row per (arm, k, seed): the test accuracy of a classifier on k real images per class,
    alone ("real") or with the synthetic set ("real+synthetic"); plus one "synthetic" row (k 0)."""
    from tqdm.auto import tqdm

    rows = [{"arm": "synthetic", "k": 0, "seed": 0, "accuracy": classifier_accuracy(synthetic, test, 0)}]
    runs = [(k, seed) for k in ks for seed in range(seeds)]
    for k, seed in tqdm(runs, desc="classifiers (k, seed)", disable=not progress):
        picked = few_per_class(real.labels, k, seed)
        few = Split(real.images[picked], real.labels[picked])
        both = Split(np.concatenate([few.images, synthetic.images]), np.concatenate([few.labels, synthetic.labels]))
        for arm, train in zip(ARMS, (few, both), strict=True):
            rows.append({"arm": arm, "k": k, "seed": seed, "accuracy": classifier_accuracy(train, test, seed)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation (over seeds), min and max per (arm, k), and each k's gain: the mean
    with the synthetic set minus the mean without."""
    table = []
    for arm, k in dict.fromkeys((r["arm"], r["k"]) for r in rows):
        acc = np.array([r["accuracy"] for r in rows if r["arm"] == arm and r["k"] == k])
        table.append({"arm": arm, "k": k, "seeds": len(acc), "mean": float(acc.mean()),
                      "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                      "min": float(acc.min()), "max": float(acc.max())})
    means = {(t["arm"], t["k"]): t["mean"] for t in table}
    for t in table:
        if t["arm"] == "real+synthetic":
            t["gain"] = t["mean"] - means[("real", t["k"])]
    return table


def metric_name(row: dict) -> str:
    """The MLflow name of a table row's mean accuracy (MLflow names take no '+')."""
    if row["arm"] == "synthetic":
        return "accuracy/synthetic_only"
    return f"accuracy/{'real' if row['arm'] == 'real' else 'with_synthetic'}/k{row['k']}"


# -- the figure and the table ---------------------------------------------------------------------


def save_csv(table: list[dict], path: Path) -> Path:
    fields = ["arm", "k", "seeds", "mean", "std", "min", "max", "gain"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in table:
                writer.writerow({k: row.get(k, "") for k in fields})
    return path


def save_figure(rows: list[dict], table: list[dict], path: Path, title: str) -> Path:
    """Test accuracy against k: each arm's seeds as dots, its mean with a +-1 std bar; the
    synthetic-only classifier as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, colour, shift in (("real", "tab:blue", -0.15), ("real+synthetic", "tab:orange", 0.15)):
        summary = [t for t in table if t["arm"] == arm]
        ks = np.array([t["k"] for t in summary], dtype=float)
        ax.errorbar(ks + shift, [t["mean"] for t in summary], yerr=[t["std"] for t in summary], color=colour,
                    marker="o", capsize=4, label=f"{arm} (mean +- std)")
        dots = [r for r in rows if r["arm"] == arm]
        ax.scatter([r["k"] + shift for r in dots], [r["accuracy"] for r in dots], color=colour, s=9, alpha=0.4)
    alone = next(t["mean"] for t in table if t["arm"] == "synthetic")
    ax.axhline(alone, color="gray", linestyle="--", label=f"synthetic only ({alone:.3f})")
    ax.set_xticks(sorted({t["k"] for t in table if t["k"]}))
    ax.set_xlabel("real training images per class (k)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def real_splits(data_spec) -> tuple[Split, Split]:
    """The train and test splits of the checkpoint's own data, as uint8 images."""
    from ditlab.data import load_dataset

    train, test = load_dataset(data_spec, "train"), load_dataset(data_spec, "test")
    return (Split(train.to_uint8(), train.labels.numpy()), Split(test.to_uint8(), test.labels.numpy()))


def smallest_class(labels: np.ndarray | torch.Tensor) -> int:
    return int(np.bincount(np.asarray(labels)).min())


def log_to_mlflow(checkpoint: str, result: dict, files: dict[str, Path]) -> dict:
    """An MLflow run holding the table's means as metrics and the figure, table and summary as
    artifacts; nested under the run that trained the checkpoint when its run folder names one."""
    from ditlab.config import flatten
    from ditlab.orchestration.records import source_run_id
    from ditlab.orchestration.tracking import Tracker, experiment_of_run

    tags = {"ditlab.kind": "augment", "ditlab.checkpoint": str(checkpoint),
            "ditlab.dataset": result["dataset"]["path"], "ditlab.dataset_sha256": result["dataset"]["sha256"]}
    experiment, source = "ditlab-augment", source_run_id(checkpoint)
    if source is not None:
        tags.update({"ditlab.source_run_id": source, "mlflow.parentRunId": source})
        experiment = experiment_of_run(source)
    tracker = Tracker.create(experiment, f"augment-{result['dataset']['name']}", tags)
    tracker.log_params(flatten({"augment": result["settings"]}))
    tracker.log_metrics({metric_name(row): row["mean"] for row in result["table"]})
    for path in files.values():
        tracker.log_artifact(path, "figures" if path.suffix == ".png" else None)
    tracker.end("FINISHED")
    return {"mlflow_run_id": tracker.run_id, "mlflow_url": tracker.url, "source_run_id": source}
