"""End to end: `ditlab run` on a tiny spec with 2 Ray Train workers over a dataset added with `ditlab data
add` (conftest.tiny_run), tracked on a real MLflow server; then `ditlab sample`, `ditlab evaluate` and a
rerun on the checkpoint it produced."""

import contextlib
import io
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ditlab import cli
from ditlab.orchestration.tracking import git_commit

from conftest import TINY_RUN_ARGS, run_cli_json

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run_summary(tiny_run):
    return tiny_run


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
    assert run.data.params["data.source"] == "folder" and run.data.params["data.path"] == "data/digits-png"
    # the commit of the working directory the run started in
    assert run.data.tags["mlflow.source.git.commit"] == git_commit(Path(run_summary["run_dir"]).parents[1])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 3, 4, 6]
    assert run.data.metrics["eval/fid"] == pytest.approx(run_summary["metrics"]["fid"])
    assert run.data.metrics["train/final_loss"] == pytest.approx(run_summary["metrics"]["final_loss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "metrics.json", "result.json", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    # the interpretability figures (interpret.py) of every generation run's evaluation
    assert figures == {"figures/samples.png", "figures/loss_curve.png", "figures/attention_maps.png",
                       "figures/attention_timesteps.png", "figures/denoising_trajectory.png"}
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
    """Job-level resume: the same --name and --storage find the run's folder and reopen the same
    MLflow run; the run already reached its last step, so nothing is trained (no workers start) and
    its last checkpoint is evaluated again."""
    again = run_cli_json(TINY_RUN_ARGS, Path(run_summary["run_dir"]).parents[1], mlflow_server)
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
