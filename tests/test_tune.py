"""End to end: `ditlab tune` on the tiny sweep with real Ray Tune, Ray Train and an MLflow server.

One ASHA sweep of 3 trials of 6 steps carries most checks, to keep within the time budget (each
TorchTrainer start costs tens of seconds on 2 cores). The trials run one at a time, so that ASHA's
decisions do not hang on which trial reports first: trial 0 (lr 3e-3) runs to the end; trial 1
(lr 1e-6, which learns nothing) is stopped early at the first rung; the sweep is then interrupted
(SIGINT, as Ctrl-C) and resumed with --resume, which must not rerun those two; trial 2 diverges
(lr 1e30) and must be recorded as failed while the sweep ends normally."""

import contextlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ditlab import cli
from ditlab.cli.common import EXIT_INTERRUPTED
from ditlab.config import load

from conftest import ROOT

pytestmark = pytest.mark.e2e

TINY_SWEEP = ROOT / "experiments" / "sweeps" / "tiny.yaml"
TERMINAL = {"finished", "stopped_early", "failed"}
# One diffusion schedule, so that the trials' val_loss compare (see the README). Six steps with a
# report every two: ASHA's rungs at steps 2 and 4, below the last report.
ASHA_SET = ["--set", "sweep.num_samples=1", "--set", "sweep.max_concurrent=1",
            "--set", "sweep.space.train.lr={grid: [3.0e-3, 1.0e-6, 1.0e+30]}",
            "--set", "sweep.space.diffusion.schedule={choice: [cosine]}", "--set", "sweep.set.train.steps=6",
            "--set", "sweep.set.train.max_bad_steps=1"]  # the lr-1e30 trial fails at its first NaN step


def tune(*args, env_uri: str) -> tuple[int, dict]:
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("MLFLOW_TRACKING_URI", env_uri)
        code = cli.main(["tune", *map(str, args), "--json", "--no-progress"])
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 1, "--json must print exactly one line on stdout"
    return code, json.loads(lines[0])


def interrupt_when(records: Path, ended: int, stop: threading.Event) -> threading.Thread:
    """Send SIGINT to this process (Tune's Ctrl-C handling) once `ended` trials have ended."""

    def watch():
        while not stop.wait(0.3):
            try:
                states = [r.get("state") for r in json.loads(records.read_text()).values()]
            except (OSError, ValueError):
                continue
            if sum(s in TERMINAL for s in states) >= ended:
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def trial_files(sweep_dir: Path, trial_id: str) -> dict[str, object]:
    """What a trial wrote: its Tune results (content: Tune rewrites the files on restore) and its
    Train run (modification times: nothing else touches it)."""
    tune_dir = sweep_dir / "tune" / f"trial_{trial_id}"
    files: dict[str, object] = {p.name: p.read_text() for p in tune_dir.glob("*.json")}
    train_dir = sweep_dir / "train" / trial_id
    for path in train_dir.rglob("*") if train_dir.is_dir() else ():
        if path.is_file():
            files[str(path)] = path.stat().st_mtime
    return files


@pytest.fixture(scope="module")
def asha(ray_session, mlflow_server, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweeps")
    sweep_dir = storage / "asha"
    stop = threading.Event()
    watcher = interrupt_when(sweep_dir / "trial_runs.json", ended=2, stop=stop)
    started = time.monotonic()
    try:
        first_code, first = tune(TINY_SWEEP, "--storage", storage, "--name", "asha", *ASHA_SET, env_uri=mlflow_server)
    finally:
        stop.set()
        watcher.join()
    records = json.loads((sweep_dir / "trial_runs.json").read_text())
    ended_before = {t: r for t, r in records.items() if r.get("state") in TERMINAL}
    files_before = {t: trial_files(sweep_dir, t) for t in ended_before}
    code, summary = tune(TINY_SWEEP, "--storage", storage, "--name", "asha", "--resume", *ASHA_SET,
                         env_uri=mlflow_server)
    print(f"ASHA sweep, interrupted and resumed: {time.monotonic() - started:.0f} s")
    return {"first_code": first_code, "first": first, "code": code, "summary": summary, "sweep_dir": sweep_dir,
            "ended_before": ended_before, "files_before": files_before, "storage": storage}


def test_interrupted_sweep_says_how_to_resume(asha):
    first = asha["first"]
    assert asha["first_code"] == EXIT_INTERRUPTED and first["interrupted"]
    assert first["resume_command"].endswith("--resume --name asha")
    assert len(asha["ended_before"]) >= 2


def test_resumed_sweep_runs_every_trial_once(asha):
    summary = asha["summary"]
    assert asha["code"] == 0 and not summary["interrupted"]
    assert summary["num_trials"] == 3 and summary["expected_trials"] == 3
    assert all(t["state"] in TERMINAL for t in summary["trials"])
    states = {t["config"]["train.lr"]: t["state"] for t in summary["trials"]}
    assert states == {3e-3: "finished", 1e-6: "stopped_early", 1e30: "failed"}


def test_resume_does_not_rerun_ended_trials(asha, mlflow_server):
    client = MlflowClient(mlflow_server)
    records = json.loads((asha["sweep_dir"] / "trial_runs.json").read_text())
    for trial_id, before in asha["ended_before"].items():
        assert records[trial_id] == before  # same MLflow run, same end state
        assert trial_files(asha["sweep_dir"], trial_id) == asha["files_before"][trial_id]  # nothing rewritten
        steps = [m.step for m in client.get_metric_history(before["run_id"], "val/loss")]
        assert len(steps) == len(set(steps))


def test_diverging_trial_is_recorded_as_failed_and_the_sweep_goes_on(asha, mlflow_server):
    trials = {t["config"]["train.lr"]: t for t in asha["summary"]["trials"]}
    failed = trials[1e30]
    assert failed["state"] == "failed" and "training loss is" in failed["error"]
    assert [t["state"] for t in trials.values()].count("failed") == 1
    client = MlflowClient(mlflow_server)
    run = client.get_run(failed["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["ditlab.trial_state"] == "failed"
    assert "training loss is" in run.data.tags["ditlab.error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_each_trial_is_a_nested_mlflow_run_with_its_end_state(asha, mlflow_server):
    summary = asha["summary"]
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    by_id = {c.info.run_id: c for c in children}
    planned = load(summary["best_spec"]).train.steps
    for trial in summary["trials"]:
        child = by_id[trial["mlflow_run_id"]]
        expected = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}[trial["state"]]
        assert child.info.status == expected and child.data.tags["ditlab.trial_state"] == trial["state"]
        assert float(child.data.params["train.lr"]) == trial["config"]["train.lr"]
        assert child.data.params["diffusion.schedule"] == trial["config"]["diffusion.schedule"]
        if trial["state"] == "finished":
            assert trial["last_step"] == planned
            history = client.get_metric_history(child.info.run_id, "val/loss")
            assert sorted({m.step for m in history}) == [2, 4, 6]  # a resumed trial repeats none but may re-log one
        if trial["state"] == "stopped_early":
            assert trial["last_step"] < planned


def test_parent_run_holds_best_config_value_and_comparison_plot(asha, mlflow_server):
    summary = asha["summary"]
    best = summary["best"]
    ranked = [t for t in summary["trials"] if t["state"] != "failed"]
    assert best["val_loss"] == min(t["val_loss"] for t in ranked)
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ditlab.sweep_state"] == "finished"
    assert parent.data.metrics["sweep/best_val_loss"] == pytest.approx(best["val_loss"])
    assert float(parent.data.params["best.train.lr"]) == best["config"]["train.lr"]
    assert parent.data.tags["ditlab.best_trial"] == best["trial_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_spec.yaml", "sweep.yaml", "result.json", "figures"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "figures")} == {"figures/trials.png"}
    assert (Path(summary["sweep_dir"]) / "trials.png").stat().st_size > 1000
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_exported_best_spec_loads_and_runs_as_is(asha):
    best = asha["summary"]["best"]
    spec = load(asha["summary"]["best_spec"])
    assert spec.train.lr == best["config"]["train.lr"]
    assert spec.diffusion.schedule == best["config"]["diffusion.schedule"]
    assert spec.train.warmup_steps == best["config"]["train.warmup_steps"]
    assert cli.main(["run", asha["summary"]["best_spec"], "--dry-run"]) == 0


def test_resume_refuses_a_changed_sweep(asha, capsys):
    code = cli.main(["tune", str(TINY_SWEEP), "--storage", str(asha["storage"]), "--name", "asha", "--resume",
                     "--set", "sweep.num_samples=2"])
    assert code == 2
    assert "differs from the one asha started with" in capsys.readouterr().err


def test_pbt_smoke(ray_session, mlflow_server, tmp_path):
    code, summary = tune(ROOT / "experiments" / "sweeps" / "tiny-pbt.yaml", "--storage", tmp_path, "--name", "pbt",
                         env_uri=mlflow_server)
    assert code == 0 and summary["scheduler"] == "pbt"
    assert [t["state"] for t in summary["trials"]] == ["finished", "finished"]
    assert all(t["last_step"] == 8 and t["val_loss"] > 0 for t in summary["trials"])
    # PBT works on Tune checkpoints: every trial reported its bundle.
    for trial in summary["trials"]:
        assert list((tmp_path / "pbt" / "tune" / f"trial_{trial['trial_id']}").glob("checkpoint_*/checkpoint.pt"))
    client = MlflowClient(mlflow_server)
    for trial in summary["trials"]:
        lr = client.get_metric_history(trial["mlflow_run_id"], "config/train.lr")
        assert [m.step for m in lr] == [2, 4, 6, 8]
    assert load(summary["best_spec"]).train.lr == summary["best"]["config"]["train.lr"]


@pytest.mark.parametrize("override, message", [
    ("sweep.space.train.lrr={uniform: [0.1, 0.2]}", "space.train.lrr: not a field of the experiment spec"),
    ("sweep.space.train.lr={loguniform: [0, 0.1]}", "space.train.lr: loguniform low must be above 0"),
    ("sweep.space.train.lr={uniform: [0.2, 0.1]}", "space.train.lr: uniform low (0.2) must be below high (0.1)"),
])
def test_bad_sweep_fails_before_any_trial(tmp_path, capsys, override, message):
    code = cli.main(["tune", str(TINY_SWEEP), "--storage", str(tmp_path / "s"), "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ditlab: error:") and message in err[0]
    assert not (tmp_path / "s").exists()
