"""The quality figures `ditlab run` reports at the end: FID of EMA samples against the test split,
and conditional accuracy judged by a classifier trained on the train split."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ditlab.data import load_dataset, to_uint8
from ditlab.evaluation.classifier import PixelClassifier
from ditlab.evaluation.features import inception_features
from ditlab.evaluation.fid import fid_from_features
from ditlab.evaluation.stats import RESIZE_MODE, reference_features
from ditlab.sampling import balanced_labels, generate, load_for_sampling


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    samples: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray
    info: dict[str, str] = field(default_factory=dict)  # non-numeric facts: resize mode, weights


def evaluate_checkpoint(checkpoint: str | Path, evaluation=None, progress: bool = False) -> EvaluationResult:
    """Sample from the checkpoint's EMA weights with the evaluation settings (the spec's own when
    `evaluation` is None) and compute the figures it asks for."""
    ckpt = load_for_sampling(checkpoint, "ema")
    ev = evaluation or ckpt.spec.evaluation
    num_classes = ckpt.model.config.num_classes
    labels = balanced_labels(ev.num_samples, num_classes)
    tic = time.perf_counter()
    images = generate(ckpt, labels, ev.sampler, ev.steps, ev.guidance, ev.seed, ev.batch_size, ev.clip_x0,
                      progress=progress)
    metrics: dict[str, float] = {"eval_num_samples": float(len(labels)),
                                 "eval_sampling_seconds": time.perf_counter() - tic}
    info: dict[str, str] = {}
    samples = to_uint8(images)
    if len(labels) == 0:
        return EvaluationResult(metrics, samples, labels.numpy(), info)
    test = load_dataset(ckpt.spec.data, "test")
    if ev.conditional_accuracy:
        train = load_dataset(ckpt.spec.data, "train")
        clf = PixelClassifier.fit(train.to_uint8(), train.labels.numpy(), seed=ev.seed)
        metrics["classifier_test_accuracy"] = clf.accuracy(test.to_uint8(), test.labels.numpy())
        metrics["conditional_accuracy"] = clf.accuracy(samples, labels.numpy())
    if ev.fid:
        tic = time.perf_counter()
        real = reference_features(test.to_uint8(), progress=progress)
        fake = inception_features(samples, progress=progress)
        metrics["fid"] = fid_from_features(fake, real)
        metrics["fid_num_fake"] = float(len(fake))
        metrics["fid_num_real"] = float(len(real))
        metrics["eval_fid_seconds"] = time.perf_counter() - tic
        info["fid_resize"] = RESIZE_MODE
        info["fid_reference"] = f"{ckpt.spec.data.source} test split ({len(real)} images)"
    return EvaluationResult(metrics, samples, labels.numpy(), info)
