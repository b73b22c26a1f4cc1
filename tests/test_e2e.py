"""End to end: `ditlab run` on a tiny spec with 2 Ray Train workers over a folder dataset, tracked on a
real MLflow server; then `ditlab sample` and `ditlab evaluate` on the checkpoint it produced."""

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ditlab import cli
from ditlab.orchestration.tracking import git_commit

from conftest import ROOT

pytestmark = pytest.mark.e2e


def write_digits_folder(root: Path) -> None:
    """scikit-learn's digits as a folder dataset: one subfolder of PNG files per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        (root / f"digit{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8")).save(root / f"digit{label}" / f"{i:04d}.png")


@pytest.fixture(scope="module")
def run_summary(ray_session, mlflow_server, tmp_path_factory):
    """The tiny spec on a folder dataset named by a path relative to the working directory: the Ray
    workers run elsewhere, so this checks that they get it as an absolute path."""
    project = tmp_path_factory.mktemp("project")
    write_digits_folder(project / "images")
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "images"], check=True)
    subprocess.run([*git, "commit", "-qm", "images"], check=True)
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.chdir(project)
        # A small test split keeps the one-off reference feature extraction short.
        code = cli.main(["run", str(ROOT / "experiments" / "tiny.yaml"), "--json", "--storage", "runs",
                         "--name", "e2e", "--no-progress", "--set", "data.test_fraction=0.05",
                         "--set", "data.source=folder", "--set", "data.path=images"])
    assert code == 0
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 1, "--json must print exactly one line on stdout"
    return json.loads(lines[0])


def test_run_reports_metrics_and_checkpoint(run_summary):
    m = run_summary["metrics"]
    for key in ("fid", "conditional_accuracy", "final_loss", "fid_num_fake", "train_seconds"):
        assert key in m
    assert m["fid"] > 0 and 0 <= m["conditional_accuracy"] <= 1
    assert (Path(run_summary["checkpoint"]) / "checkpoint.pt").is_file()
    assert Path(run_summary["checkpoint"]).name == "checkpoint_000006"
    run_dir = Path(run_summary["run_dir"])
    for name in ("spec.yaml", "metrics.json", "result.json", "samples.png", "loss_curve.png", "history.json"):
        assert (run_dir / name).is_file(), name


def test_mlflow_run_holds_params_metrics_and_artifacts(run_summary, mlflow_server):
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "6"
    assert run.data.params["resources.num_workers"] == "2"
    assert run.data.params["data.test_fraction"] == "0.05"
    assert run.data.params["data.source"] == "folder" and run.data.params["data.path"] == "images"
    # the commit of the working directory the run started in
    assert run.data.tags["mlflow.source.git.commit"] == git_commit(Path(run_summary["run_dir"]).parents[1])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 3, 4, 6]
    assert run.data.metrics["eval/fid"] == pytest.approx(run_summary["metrics"]["fid"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "metrics.json", "result.json", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/samples.png", "figures/loss_curve.png"}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_sample_command_writes_pngs(run_summary, tmp_path, capsys):
    out = tmp_path / "samples"
    code = cli.main(["sample", run_summary["checkpoint"], "--num", "6", "--out", str(out), "--labels", "3,7",
                     "--steps", "4", "--guidance", "1.5", "--json"])
    assert code == 0
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [f["label"] for f in manifest["files"]] == [3, 7, 3, 7, 3, 7]
    assert len(list(out.glob("*.png"))) == 6 and manifest["step"] == 6


def test_rerun_with_the_same_name_resumes_into_the_same_mlflow_run(run_summary, mlflow_server):
    """Job-level resume: the same --name and --storage find the run's checkpoints, start from the
    latest (here the last step, so no step is trained again) and reopen the same MLflow run."""
    project = Path(run_summary["run_dir"]).parents[1]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.chdir(project)
        code = cli.main(["run", str(ROOT / "experiments" / "tiny.yaml"), "--json", "--storage", "runs",
                         "--name", "e2e", "--no-progress", "--set", "data.test_fraction=0.05",
                         "--set", "data.source=folder", "--set", "data.path=images"])
    assert code == 0
    again = json.loads(stdout.getvalue().splitlines()[-1])
    assert again["mlflow_run_id"] == run_summary["mlflow_run_id"]
    assert Path(again["checkpoint"]).name == "checkpoint_000006"
    assert "final_loss" not in again["metrics"]  # nothing left to train
    run = MlflowClient(mlflow_server).get_run(again["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_evaluate_checkpoint_nests_an_evaluation_run_under_the_training_run(run_summary, mlflow_server, tmp_path):
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        code = cli.main(["evaluate", "--fake", run_summary["checkpoint"], "--json", "--no-progress",
                         "--out", str(tmp_path / "eval"), "--set", "num_samples=30"])
    assert code == 0
    result = json.loads(stdout.getvalue().splitlines()[-1])
    figures = result["figures"]
    assert figures["fid_num_fake"] == 30 and figures["kid"] == figures["kid"]  # not NaN
    assert {"precision", "recall", "classifier_score", "conditional_accuracy"} <= set(figures)
    assert result["source_run_id"] == run_summary["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == run_summary["mlflow_run_id"]
    assert run.data.tags["ditlab.eval.fid_resize"] == "clean"
    assert run.data.params["evaluation.num_samples"] == "30"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"evaluation.json", "figures"}
    assert (tmp_path / "eval" / "evaluation.json").is_file() and (tmp_path / "eval" / "samples.png").is_file()


def test_evaluate_rejects_a_kid_subset_larger_than_the_samples(run_summary, tmp_path, capsys):
    code = cli.main(["evaluate", "--fake", run_summary["checkpoint"], "--no-progress", "--out", str(tmp_path / "e"),
                     "--set", "num_samples=8", "--set", "kid.subset_size=50"])
    assert code == 2
    assert "kid.subset_size 50 exceeds the fake set (8 images)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
