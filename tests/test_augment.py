"""Generated-data augmentation (augment.py, `ditlab augment`): the comparison tells help from harm,
the synthetic set is a versioned folder dataset that specs can read, the table and figure reach
MLflow, and bad input is one line that writes nothing. On the committed tiny checkpoint (DiT-N/2
on 8x8 digits)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from ditlab import augment, cli
from ditlab.atomic import file_digest
from ditlab.config import DataSpec
from ditlab.data import load_dataset
from ditlab.training.checkpoint import load_bundle, save_bundle

from conftest import ROOT, run_cli_json

TINY_CHECKPOINT = ROOT / "tests" / "data" / "legacy_checkpoint"  # a real generation checkpoint


def digits_split(start: int, stop: int) -> augment.Split:
    digits = load_digits()
    images = np.round(digits.images[start:stop] * 255 / 16).astype(np.uint8)[..., None]
    return augment.Split(images, digits.target[start:stop].astype(np.int64))


def test_k_per_class_are_distinct_images_of_each_class_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    picked = augment.few_per_class(labels, 4, seed=1)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 4] and len(set(picked)) == 12
    assert np.array_equal(picked, augment.few_per_class(labels, 4, seed=1))
    assert not np.array_equal(picked, augment.few_per_class(labels, 4, seed=2))


def test_the_comparison_tells_help_from_harm():
    """More correctly labelled images must raise the accuracy; the same images with shuffled
    labels must lower it: the comparison can show either outcome."""
    real, test, extra = digits_split(0, 900), digits_split(1400, 1797), digits_split(900, 1400)
    shuffled = augment.Split(extra.images, np.random.default_rng(0).permutation(extra.labels))
    for synthetic, helps in ((extra, True), (shuffled, False)):
        table = augment.summarize(augment.compare(real, test, synthetic, (2,), seeds=2))
        row = next(t for t in table if t["arm"] == "real+synthetic")
        assert row["seeds"] == 2 and row["std"] >= 0 and row["min"] <= row["mean"] <= row["max"]
        real_mean = next(t["mean"] for t in table if t["arm"] == "real")
        assert row["gain"] == pytest.approx(row["mean"] - real_mean)
        assert (row["gain"] > 0.1) if helps else (row["gain"] < -0.1), table


@pytest.mark.e2e
def test_augment_writes_a_versioned_dataset_and_logs_the_table(tmp_path, mlflow_server):
    import subprocess
    import sys

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    argv = ["augment", str(TINY_CHECKPOINT), "--name", "synth", "--per-class", "3", "--k", "1,2", "--seeds", "2",
            "--no-progress", "--json"]
    first = run_cli_json([*argv, "--out", "report"], tmp_path, mlflow_server)
    dataset = first["dataset"]
    assert dataset["count"] == 30 and dataset["classes"] == {str(c): 3 for c in range(10)}
    assert (tmp_path / dataset["dvc_file"]).is_file() and dataset["dvc_md5"]
    provenance = json.loads((tmp_path / "data/synth/synthetic.json").read_text())
    assert provenance["checkpoint_sha256"] == file_digest(TINY_CHECKPOINT / "checkpoint.pt")
    # a folder dataset a spec reads: each image under its class's folder, labelled as sampled
    synth = load_dataset(DataSpec(source="folder", path=str(tmp_path / "data/synth"), resolution=8), "all")
    assert synth.num_classes == 10 and torch.bincount(synth.labels).tolist() == [3] * 10
    assert {(r["arm"], r["k"]) for r in first["table"]} == {("synthetic", 0), ("real", 1), ("real", 2),
                                                            ("real+synthetic", 1), ("real+synthetic", 2)}
    run = MlflowClient(mlflow_server).get_run(first["mlflow_run_id"])
    assert run.data.metrics["accuracy/with_synthetic/k2"] == pytest.approx(first["table"][-1]["mean"])
    figures = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/augmentation.png"}
    assert (tmp_path / "report/augmentation.csv").read_text().startswith("arm,k,seeds,mean,std,min,max,gain")


def test_the_same_name_again_replaces_the_set_with_a_new_version(tmp_path):
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    first = augment.save_dataset(images, np.array([0, 0, 1, 1]), tmp_path, "synth", {"run": 1}, track=False)
    second = augment.save_dataset(images[:2] + 9, np.array([0, 1]), tmp_path, "synth", {"run": 2}, track=False)
    assert (first["count"], second["count"]) == (4, 2) and first["sha256"] != second["sha256"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "synth", "synth/0", "synth/0/00000.png", "synth/1", "synth/1/00001.png", "synth/manifest.json",
        "synth/synthetic.json"]
    assert json.loads((tmp_path / "synth/synthetic.json").read_text()) == {"run": 2}


def _restoration_checkpoint(folder: Path) -> Path:
    bundle = load_bundle(TINY_CHECKPOINT)
    bundle.pop("format")
    bundle["spec"]["task"] = "restoration"
    return save_bundle(folder / "checkpoint.pt", bundle).parent


@pytest.mark.parametrize("case,expected", [
    ("missing checkpoint", "not found"), ("restoration checkpoint", "not a generation checkpoint"),
    ("k above the smallest class", "--k: 500 real images per class"), ("a real dataset's name", "--name:"),
    ("out is a file", "is a file"), ("no DVC repository", "no DVC repository"), ("per-class 0", "--per-class"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint, extra = str(TINY_CHECKPOINT), ["--no-dvc"]
    if case == "missing checkpoint":
        checkpoint = "nowhere"
    elif case == "restoration checkpoint":
        checkpoint = str(_restoration_checkpoint(tmp_path / "restore"))
    elif case == "k above the smallest class":
        extra += ["--k", "5,500"]
    elif case == "a real dataset's name":
        Path("data/synth").mkdir(parents=True)
        Path("data/synth/manifest.json").write_text("{}")
    elif case == "out is a file":
        Path("report").write_text("x")
    elif case == "no DVC repository":
        extra = []
    else:
        extra += ["--per-class", "0"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = cli.main(["augment", checkpoint, "--name", "synth", "--out", "report", *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ditlab: error: "), captured.err
    assert captured.out == "" and expected in lines[0], lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
