"""Faults survived, nothing lost (issue 15, section 1). Each fault is injected for real: a NaN batch,
a worker process that exits mid-run, a driver killed with SIGKILL, a checkpoint with a flipped byte,
a tracking server that is not there or is stopped mid-run. The hooks are in training/faults.py.

The Ray runs are tiny (DiT-N/2 on 8x8 digits, a few steps); `ditlab train` (no final evaluation)
where the evaluation is not what is tested."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port, mlflow_web, run_cli_json
from ddp import run_then_resume_on_two_ranks, same_parameters
from ditlab.atomic import atomic_path
from ditlab.config import load
from ditlab.orchestration.train import RunFolderError, prepare_run_dir
from ditlab.training import LocalReporter, TrainingDiverged, load_bundle, save_bundle, train

TINY = ROOT / "experiments" / "tiny.yaml"
DITLAB = Path(sys.executable).parent / "ditlab"


def tiny(*overrides):
    return load(TINY, ["resources.num_workers=1", "train.log_every=1", *overrides])


# -- numerical faults ------------------------------------------------------------------------------

def test_a_nan_batch_skips_its_step_and_counts_it(monkeypatch):
    """Step 2's batch is NaN: its update never reaches the weights (they equal a run that stopped
    at step 1), the report of step 2 has no loss but skipped_steps 1, and the run goes on."""
    one = train(tiny("train.steps=1"), LocalReporter())
    monkeypatch.setenv("DITLAB_FAULT_NAN_AT_STEPS", "2")
    reporter = LocalReporter()
    two = train(tiny("train.steps=2"), reporter)
    assert same_parameters(one.model, two.model) and same_parameters(one.ema.model, two.ema.model)
    assert "loss" not in reporter.history[1] and reporter.history[1]["skipped_steps"] == 1
    go_on = LocalReporter()
    train(tiny("train.steps=3"), go_on)
    assert [h.get("skipped_steps") for h in go_on.history] == [None, 1, 1]
    assert torch.isfinite(torch.tensor(go_on.history[2]["loss"]))


def test_bad_steps_in_a_row_stop_the_run_keeping_the_good_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("DITLAB_FAULT_NAN_AT_STEPS", "2-6")
    reporter = LocalReporter(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"at step 4: 3 steps in a row .*train.max_bad_steps=3"):
        train(tiny("train.steps=6", "train.max_bad_steps=3", "train.checkpoint_every=1"), reporter)
    first, last = (load_bundle(c) for c in (reporter.checkpoints[0], reporter.checkpoints[-1]))
    assert last["step"] == 3 and last["skipped_steps"] == 2
    assert all(torch.equal(first["model"][k], last["model"][k]) for k in first["model"]), \
        "the checkpoints after step 1 hold step 1's weights: no bad step changed them"


def _ranks_after_a_nan_on_rank_1(rank, spec, full, end_full, resumed, end_resumed) -> dict:
    return {"skipped": [h.get("skipped_steps") for h in full.history],
            "resumed_skipped": [h.get("skipped_steps") for h in resumed.history],
            "model": [t.sum().item() for t in end_full.model.state_dict().values()],
            "ema": [t.sum().item() for t in end_full.ema.model.state_dict().values()],
            "finite": all(torch.isfinite(t).all().item() for t in end_full.model.state_dict().values())}


def test_ranks_agree_to_skip_a_step_only_one_of_them_saw_go_bad(monkeypatch, tmp_path):
    """Under DDP (two gloo ranks) rank 1 alone gets a NaN batch at step 2: both ranks skip it (an
    all-reduced flag), so they end with the same weights and EMA, and count it the same way, in
    the run and after a resume from its step-3 checkpoint."""
    monkeypatch.setenv("DITLAB_FAULT_NAN_AT_STEPS", "2")
    monkeypatch.setenv("DITLAB_FAULT_RANK", "1")
    spec = load(TINY, ["train.steps=4", "train.log_every=1", "train.checkpoint_every=3"])
    rank0, rank1 = run_then_resume_on_two_ranks(spec, tmp_path, _ranks_after_a_nan_on_rank_1)
    assert rank0 == rank1
    assert rank0["finite"] and rank0["skipped"] == [None, 1, 1, 1] and rank0["resumed_skipped"] == [1]


# -- checkpoints -----------------------------------------------------------------------------------

def _bundle(step: int, spec_dict: dict) -> dict:
    return {"step": step, "model": {"w": torch.ones(4)}, "ema": {}, "optimizer": {}, "rng": {},
            "spec": spec_dict, "model_config": {}}


def test_bundle_sidecar_and_their_folder_are_fsynced(monkeypatch, tmp_path):
    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    path = save_bundle(tmp_path / "checkpoint_000003" / "checkpoint.pt", _bundle(3, {}))
    names = [Path(p).name for p in synced]
    assert any(n.startswith(".checkpoint.pt.") for n in names), "the bundle before its rename"
    assert any(n.startswith(".checkpoint.pt.sha256.") for n in names), "the sidecar before its rename"
    assert names.count(path.parent.name) >= 2, "the folder after each rename"
    with atomic_path(tmp_path / "plain.txt") as tmp:  # results that are not checkpoints: no fsync
        tmp.write_text("x")
    assert len(synced) == len(names)


def test_a_corrupt_latest_checkpoint_is_refused_by_name_or_set_aside_with_the_flag(tmp_path, capsys):
    spec = load(TINY)
    run_dir = tmp_path / "run"
    (run_dir / "spec.yaml").parent.mkdir()
    (run_dir / "spec.yaml").write_text(spec.to_yaml())
    for step in (3, 6):
        save_bundle(run_dir / f"checkpoint_{step:06d}" / "checkpoint.pt", _bundle(step, spec.to_dict()))
    latest = run_dir / "checkpoint_000006" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:-100])  # cut short, as by a full disk or a bad copy
    with pytest.raises(RunFolderError, match=r"checkpoint_000006.*is corrupt.*--skip-corrupt-checkpoints to set "
                                             r"it aside and resume from checkpoint_000003"):
        prepare_run_dir(spec, run_dir, restart_if_changed=False)
    assert latest.exists(), "refusing changes nothing"
    assert prepare_run_dir(spec, run_dir, restart_if_changed=False, skip_corrupt=True)
    warning = capsys.readouterr().err
    assert warning.startswith("ditlab: warning: checkpoint") and "checkpoint_000006" in warning
    assert "resume from checkpoint_000003" in warning and warning.count("\n") == 1
    assert [p.name for p in run_dir.glob("checkpoint_*")] == ["checkpoint_000003"]
    assert (run_dir / "corrupt" / "0" / "checkpoint_000006" / "checkpoint.pt").is_file(), "kept, not deleted"


# -- the tracking server ---------------------------------------------------------------------------

def test_an_unreachable_tracking_server_is_an_error_before_anything_starts(monkeypatch, tmp_path):
    from ditlab import cli

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", str(TINY), "--name", "x", "--no-progress"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith(f"ditlab: error: MLflow tracking server {uri}") and "does not answer" in lines[0]
    assert time.monotonic() - started < 30 and not (tmp_path / "runs").exists()


# -- Ray: worker crash, driver crash, tracking server stopped mid-run --------------------------------

def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.e2e
def test_a_worker_crash_and_a_nan_step_lose_and_repeat_nothing(ray_session, mlflow_server, tmp_path,
                                                               monkeypatch):
    """Rank 1 exits (os._exit) after step 5; Ray Train restarts both workers from the step-3
    checkpoint (resources.max_failures=1) and they reach step 7. Step 2's batch is NaN on rank 0.
    In the one MLflow run each step's loss appears once, steps 4 and 5 (trained twice) included,
    and step 2, skipped, is counted in train/skipped_steps."""
    from mlflow.tracking import MlflowClient

    marker = tmp_path / "crashed"
    for key, value in {"EXIT_AT_STEP": "5", "RANK": "1", "MARKER": str(marker), "NAN_AT_STEPS": "2"}.items():
        monkeypatch.setenv(f"DITLAB_FAULT_{key}", value)
    summary = run_cli_json(["train", str(TINY), "--json", "--no-progress", "--storage", "runs", "--name", "crash",
                            "--set", "train.steps=7", "--set", "train.log_every=1", "--set",
                            "train.checkpoint_every=3", "--set", "resources.max_failures=1"], tmp_path, mlflow_server)
    assert marker.exists(), "the worker did not crash"
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert metric_steps(client, run_id, "train/loss") == [1, 3, 4, 5, 6, 7]
    assert metric_steps(client, run_id, "train/lr") == [1, 3, 4, 5, 6, 7]
    skipped = client.get_metric_history(run_id, "train/skipped_steps")
    assert sorted(m.step for m in skipped) == [2, 3, 4, 5, 6, 7] and {m.value for m in skipped} == {1}
    assert summary["checkpoint"].endswith("checkpoint_000007")


def ditlab_process(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(DITLAB), *args], cwd=cwd, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def joined(ray_session) -> dict[str, str]:
    """What a `ditlab` subprocess needs to join the test session's Ray instance."""
    return {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}


PACED = ["--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--no-progress", "--json"]


@pytest.mark.e2e
def test_a_killed_driver_resumes_into_the_same_run_past_a_corrupt_checkpoint(ray_session, mlflow_server, tmp_path):
    """SIGKILL `ditlab train` once its step-4 checkpoint is written; flip a byte of that checkpoint.
    The same command refuses, naming it; with --skip-corrupt-checkpoints it resumes from step 2
    into the same MLflow run, which ends FINISHED with each step logged once."""
    from mlflow.tracking import MlflowClient

    args = ["train", str(TINY), "--storage", "runs", "--name", "killed", "--set", "train.steps=8", *PACED]
    env = {**joined(ray_session), "MLFLOW_TRACKING_URI": mlflow_server, "DITLAB_FAULT_STEP_SECONDS": "0.5"}
    run_dir = tmp_path / "runs" / "killed"
    first = ditlab_process(args, tmp_path, env)
    try:
        wait_for(lambda: (run_dir / "checkpoint_000004" / "checkpoint.pt.sha256").exists(), 120, "checkpoint 4")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    bundle = run_dir / "checkpoint_000004" / "checkpoint.pt"
    raw = bytearray(bundle.read_bytes())
    raw[-20] ^= 0xFF
    bundle.write_bytes(bytes(raw))
    refused = subprocess.run([str(DITLAB), *args], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "checkpoint_000004" in refused.stderr, refused.stderr
    assert "--skip-corrupt-checkpoints" in refused.stderr
    second = ditlab_process([*args, "--skip-corrupt-checkpoints"], tmp_path, {**env, "DITLAB_FAULT_STEP_SECONDS": "0"})
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert "ditlab: warning: checkpoint" in err and "resume from checkpoint_000002" in err
    summary = json.loads(out)
    client = MlflowClient(tracking_uri=mlflow_server)
    record = json.loads((run_dir / "tracking.json").read_text())
    assert summary["mlflow_run_id"] == record["run_id"]
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert metric_steps(client, record["run_id"], "train/loss") == list(range(1, 9))


@pytest.mark.e2e
def test_a_tracking_server_stopped_mid_run_loses_no_metric(ray_session, tmp_path):
    """A server of this test's own, stopped after step 2 is logged and started again (same port,
    same store) once the run has trained past step 5: training goes on meanwhile, the reports
    MLflow refused are kept and sent when it answers, and every step is logged once."""
    from mlflow.tracking import MlflowClient

    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    args = ["train", str(TINY), "--storage", "runs", "--name", "offline", "--set", "train.steps=10", *PACED]
    env = {**joined(ray_session), "DITLAB_FAULT_STEP_SECONDS": "0.4",
           # MLflow's client would retry each call for minutes: fail fast, so ditlab's buffer is what keeps them
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    run_dir = tmp_path / "runs" / "offline"
    with mlflow_web("server", root, "--workers", "1", port=port) as uri:
        proc = ditlab_process(args, tmp_path, {**env, "MLFLOW_TRACKING_URI": uri})
        client = MlflowClient(tracking_uri=uri)
        wait_for(lambda: (run_dir / "tracking.json").exists(), 120, "the MLflow run")
        run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
        wait_for(lambda: 2 in metric_steps(client, run_id, "train/loss"), 120, "step 2 in MLflow")
    try:
        wait_for(lambda: (run_dir / "checkpoint_000006").is_dir(), 120, "training past the outage")
        with mlflow_web("server", root, "--workers", "1", port=port):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            assert "ditlab: warning: MLflow did not take step" in err
            assert metric_steps(client, run_id, "train/loss") == list(range(1, 11))
            assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if proc.poll() is None:
            proc.kill()
