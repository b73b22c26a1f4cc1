"""The evaluation suite against the reference tools (clean-fid, torchmetrics, torch-fidelity) on
the same images and the same Inception weights, plus its handling of bad input."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.config import EvaluationSpec
from ditlab.evaluation import features as feats
from ditlab.evaluation import generative, reconstruction, stats
from ditlab.evaluation.images import ImageSetError, load_image_folder
from ditlab.evaluation.suite import Reference, evaluate_sets


def digit_images(n: int, seed: int, shift: int = 0) -> np.ndarray:
    """n digits from scikit-learn at 16x16 (uint8, 1 channel), optionally shifted sideways."""
    from ditlab.data.digits import load_digits_arrays, resize_to

    raw, _ = load_digits_arrays()
    idx = np.random.default_rng(seed).choice(len(raw), n, replace=False)
    x = ((resize_to(raw[idx], 16, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.roll(x.permute(0, 2, 3, 1).numpy(), shift, axis=2)


def write_folder(path, images: np.ndarray, rgb: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = np.repeat(img, 3, axis=-1) if rgb and img.shape[-1] == 1 else img[:, :, 0]
        Image.fromarray(arr).save(path / f"{i:04d}.png")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    fake = write_folder(root / "fake", digit_images(40, seed=1, shift=1))
    real = write_folder(root / "real", digit_images(40, seed=2))
    return fake, real


@pytest.fixture(scope="module")
def images_of(folders):
    return tuple(load_image_folder(f) for f in folders)


@pytest.fixture(scope="module")
def features_of(images_of):
    """The one Inception pass of these tests: our features of the fake and the real folder. The real
    side goes through the reference cache, as `evaluate_sets` and `ditlab evaluate` take it, so the
    tests below that evaluate these folders extract only their fake side."""
    fake, real = images_of
    return feats.inception_features(fake), stats.reference_features(real, "clean", describe="real folder")


@pytest.fixture(scope="module")
def our_fid(features_of):
    """Our FID of the two folders, computed once: a 2048x2048 matrix square root costs tens of
    seconds on 2 cores, and the parity tests compare one value with each tool."""
    return generative.fid(*features_of)


class Replay(torch.nn.Module):
    """A reference tool's feature extractor that answers from the shared pass instead of running
    Inception again: given a batch the tool prepared, it finds each image among `inputs` (what our
    pipeline feeds the network for the same images), checks that the two inputs agree, and returns
    our features of that image. The tools' own statistics (FID, KID) then run on the same features."""

    num_features = 2048  # torchmetrics would otherwise probe the module with a random image

    def __init__(self, inputs: torch.Tensor, features: np.ndarray, atol: float):
        super().__init__()
        self.inputs, self.features, self.atol = inputs.double().flatten(1), torch.from_numpy(features), atol

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.double().flatten(1)
        index = torch.cdist(flat, self.inputs).argmin(dim=1)
        gap = float((flat - self.inputs[index]).abs().max())
        assert gap <= self.atol, f"the tool fed the network other pixels than ours (max difference {gap})"
        return self.features[index]


@pytest.fixture(scope="module")
def replay(images_of, features_of):
    """Replay of the shared pass for clean-resized batches (those our features come from)."""
    both = np.concatenate(images_of)
    return Replay(torch.from_numpy(feats.clean_resize(both)), np.concatenate(features_of), atol=1e-3)


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_fid_equals_clean_fid(folders, our_fid, replay):
    """clean-fid's whole `compute_fid` on the two folders: its file reading and clean resize (checked
    against ours pixel by pixel by the replay), then its statistics on the same features."""
    from cleanfid import fid as cleanfid

    theirs = cleanfid.compute_fid(str(folders[0]), str(folders[1]), mode="clean", custom_feat_extractor=replay,
                                  device=torch.device("cpu"), num_workers=0, batch_size=20, verbose=False)
    assert our_fid == pytest.approx(theirs, rel=1e-3)


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_the_network_alone_gives_the_batched_features(images_of, features_of):
    """What the replay stands in for: the network called on a clean-resized batch, as clean-fid and
    torchmetrics call it, gives the features of our batched pipeline."""
    x = torch.from_numpy(feats.clean_resize(images_of[0][:2]))
    assert np.allclose(feats.load_inception()(x).numpy(), features_of[0][:2], atol=1e-4)


def _torchmetrics_update(metric, images_of):
    for images, real in ((images_of[0], False), (images_of[1], True)):
        metric.update(torch.from_numpy(feats.clean_resize(images)), real=real)


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_fid_equals_torchmetrics_with_the_same_feature_module(images_of, our_fid, replay):
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=replay, normalize=False)
    _torchmetrics_update(metric, images_of)
    assert our_fid == pytest.approx(float(metric.compute()), rel=1e-3)


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_kid_equals_clean_fid_on_the_same_subsets(features_of):
    from cleanfid.fid import kernel_distance

    fake, real = features_of
    np.random.seed(7)
    theirs = kernel_distance(fake, real, num_subsets=20, max_subset_size=25)
    ours, _ = generative.kid(fake, real, num_subsets=20, subset_size=25, seed=7)
    assert ours == pytest.approx(theirs, abs=1e-6)


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_kid_equals_torchmetrics_on_the_whole_sets(images_of, features_of, replay):
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(feature=replay, subsets=1, subset_size=40)
    _torchmetrics_update(metric, images_of)
    theirs, _ = metric.compute()
    ours, _ = generative.kid(*features_of, num_subsets=1, subset_size=40)  # one subset = all: no randomness
    assert ours == pytest.approx(float(theirs), abs=1e-6)


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_precision_recall_equals_torch_fidelity(features_of):
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    fake, real = features_of
    theirs = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), 3)
    assert generative.precision_recall(fake, real, k=3) == pytest.approx(theirs, abs=1e-6)  # theirs averages in float32


def test_score_formula_equals_torch_fidelity_inception_score():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    ours = generative.score_from_probabilities(logits.softmax(1).numpy(), splits=10)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-6, abs=1e-9)


def test_legacy_tensorflow_resize_equals_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    img = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(img).permute(0, 3, 1, 2).float(),
                                                       size=(299, 299), align_corners=False)
    assert np.allclose(feats.legacy_tensorflow_resize(img), theirs.numpy(), atol=1e-3)


def test_psnr_and_ssim_equal_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64)
    pred = (target + 0.05 * torch.randn(target.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    theirs_psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3))
    theirs_ssim = structural_similarity_index_measure(pred, target, data_range=1.0)
    assert reconstruction.psnr(pred, target) == pytest.approx(float(theirs_psnr), abs=1e-5)
    assert reconstruction.ssim(pred, target) == pytest.approx(float(theirs_ssim), abs=1e-5)
    figures, notes = reconstruction.reconstruction_metrics(pred, target)
    assert figures["mse"] == pytest.approx(float(((pred - target) ** 2).mean()))
    assert "lpips" in figures or notes["lpips"].startswith("skipped")


def test_reference_features_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path))
    calls = []
    real_extract = stats.inception_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(stats, "inception_features", counting)
    real = digit_images(3, seed=3)
    first = stats.reference_features(real, "clean", describe="three digits")
    second = stats.reference_features(real, "clean")
    assert len(calls) == 1 and np.array_equal(first, second)
    stats.reference_features(real, "legacy_tensorflow")  # another resize mode is another entry
    stats.reference_features(real[:2], "clean")  # so is another sample count
    assert len(calls) == 3
    assert len(list(tmp_path.glob("reference/*.json"))) == 3


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_evaluation_makes_no_network_call(folders, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    feats.load_inception.cache_clear()
    ev = EvaluationSpec(metrics=("fid", "kid", "precision_recall"), kid={"num_subsets": 5, "subset_size": 20})
    fake, real = (load_image_folder(f) for f in folders)
    report = evaluate_sets(fake, Reference(real, "real folder"), ev)
    assert report.figures["fid"] > 0 and report.notes["fid_resize"] == "clean"


def test_inception_score_is_skipped_with_pool3_only_weights(folders):
    ev = EvaluationSpec(metrics=("inception_score", "classifier_score"))
    fake, real = (load_image_folder(f) for f in folders)
    report = evaluate_sets(fake, Reference(real, "real"), ev)
    if feats.load_inception().full is None:
        assert "no logits layer" in report.notes["inception_score"]
    assert "inception_score" not in report.figures or report.figures["inception_score"] >= 1
    assert "skipped" in report.notes["classifier_score"]  # never reported as IS, and needs labels


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_grayscale_is_compared_as_rgb(features_of, folders, tmp_path):
    gray_folder = write_folder(tmp_path / "gray", load_image_folder(folders[0])[:, :, :, :1], rgb=False)
    gray = load_image_folder(gray_folder)
    assert gray.shape[-1] == 3  # documented conversion: gray replicated to RGB
    assert np.allclose(feats.inception_features(gray[:4]), features_of[0][:4], atol=1e-6)


def test_bad_image_sets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSetError, match="holds no images"):
        load_image_folder(tmp_path / "empty")
    broken = write_folder(tmp_path / "broken", digit_images(2, seed=0))
    (broken / "0001.png").write_bytes(b"garbage")
    with pytest.raises(ImageSetError, match="cannot read image .*0001.png"):
        load_image_folder(broken)
    mixed = write_folder(tmp_path / "mixed", digit_images(2, seed=0))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(mixed / "big.png")
    with pytest.raises(ImageSetError, match="differ in size"):
        load_image_folder(mixed)


def test_bad_features_and_subset_sizes():
    good = np.random.default_rng(0).normal(size=(30, 8))
    with pytest.raises(ValueError, match="subset_size 50 exceeds the smaller set"):
        generative.kid(good, good, subset_size=50)
    bad = good.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        generative.fid(bad, good)
    with pytest.raises(ValueError, match="NaN or Inf"):
        generative.precision_recall(good, np.where(np.isfinite(bad), bad, np.inf))


@pytest.mark.e2e  # Inception over the 80 images of `folders`
def test_cli_evaluate_two_folders(folders, tmp_path, monkeypatch, capsys):
    import json

    from mlflow.tracking import MlflowClient

    from conftest import ROOT
    from ditlab import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder, ./mlruns, lands here, not in the repo
    code = cli.main(["evaluate", "--fake", str(folders[0]), "--real", str(folders[1]), "--json", "--no-progress",
                     "--protocol", str(ROOT / "evaluation" / "folders.yaml"), "--set", "kid.subset_size=20",
                     "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["figures"]["fid_num_fake"] == 40 and result["notes"]["fid_resize"] == "clean"
    assert "classifier_score" not in result["figures"]
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["figures"] == result["figures"]
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.metrics["eval/fid"] == pytest.approx(result["figures"]["fid"])
    assert run.data.params["evaluation.kid.subset_size"] == "20"


def _write_pngs(folder, images, names):
    folder.mkdir()
    for img, name in zip(images, names, strict=True):
        Image.fromarray(img).save(folder / name)


def test_paired_folders_are_scored_by_the_reconstruction_protocol(tmp_path, capsys):
    """`ditlab evaluate --fake RESTORED --real CLEAN --protocol evaluation/reconstruction.yaml`:
    each image against its namesake; the figures equal the metrics on the arrays themselves."""
    from ditlab import cli
    from conftest import ROOT, run_cli_json

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    names = [f"{i:03d}.png" for i in range(12)]
    _write_pngs(tmp_path / "clean", clean, names)
    _write_pngs(tmp_path / "restored", noisy[::-1], names[::-1])  # written in another order: paired by name
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    protocol = str(ROOT / "evaluation" / "reconstruction.yaml")
    out = run_cli_json(["evaluate", "--fake", "restored", "--real", "clean", "--protocol", protocol,
                        "--no-progress", "--json"], tmp_path, uri)
    figures = out["figures"]
    assert figures["psnr"] == pytest.approx(reconstruction.psnr(noisy, clean), abs=1e-9)
    assert figures["ssim"] == pytest.approx(reconstruction.ssim(noisy, clean), abs=1e-9)
    assert figures["mse"] == pytest.approx(reconstruction.mse(noisy, clean), abs=1e-12)
    assert figures["fid"] > 0 and ("lpips" in figures or out["notes"]["lpips"].startswith("skipped"))

    (tmp_path / "clean" / names[3]).unlink()
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert cli.main(["evaluate", "--fake", "restored", "--real", "clean", "--protocol", protocol,
                         "--out", "bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ditlab: error: --real: 'clean' has no ground truth for {names[3]} (paired by file name)"]
    assert not (tmp_path / "bad").exists()
