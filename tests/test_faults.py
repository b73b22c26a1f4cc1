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
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port, mlflow_web, run_cli_json
from ddp import guard_on_two_ranks, same_parameters
from ditlab.atomic import atomic_path
from ditlab.config import load
from ditlab.orchestration.train import RunFolderError, lost_peer_error, prepare_run_dir
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


def test_the_gradient_check_finds_any_nan_or_infinity_and_only_those():
    from ditlab.training.loop import grads_finite

    grads = [torch.randn(64, 64), torch.randn(7), torch.full((100_000,), 1000.0, dtype=torch.float16)]
    assert grads_finite(grads) and grads_finite([]), "a half-precision gradient summing past 65504 is finite"
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(3):
            broken = [g.clone() for g in grads]
            broken[i].view(-1)[5] = bad
            assert not grads_finite(broken), (bad, i)


def test_ranks_agree_on_a_nan_on_one_rank_with_a_collective_only_for_gradients_outside_ddp(tmp_path):
    """Two gloo ranks; at the first step rank 1 alone has NaN in its input and in a parameter's
    gradient that DDP does not average. Both ranks skip both optimizers' steps, then both step at
    the second. The DDP model's optimizer decides without a collective (its averaged gradients are
    the same on every rank); the other optimizer all-reduces its verdict, once a step."""
    ranks = guard_on_two_ranks(tmp_path)
    assert [r["skipped"] for r in ranks] == [2, 2]
    assert [r["collectives"] for r in ranks] == [2, 2]
    first, second = ranks[0]["weights"]
    assert ranks[1]["weights"] == ranks[0]["weights"], "the ranks' weights split"
    assert first[1] == 0.0 and second[1] != 0.0, "the extra parameter stepped at the bad step, or not at the good"


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

def test_a_surviving_ranks_error_counts_as_a_lost_peer_and_an_ordinary_failure_does_not():
    """Which failures make the driver wait for Ray to declare a node dead (and then name it). The gloo
    line is what CI's node-loss test once got first, before Ray's own word on the node."""
    assert lost_peer_error("RuntimeError: [gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                           "[127.0.0.1]:410. This is typically caused by a remote worker crashing.")
    assert lost_peer_error("recvmsg:Connection reset by peer rpc_code: 14. The task may or may not have "
                           "been executed on the actor.")
    assert lost_peer_error("ray.exceptions.ActorDiedError: The actor died because its node has died.")
    assert not lost_peer_error("ValueError: data.image_size 30 is not divisible by model.patch_size 4")
    assert not lost_peer_error("TrainingDiverged: 3 steps in a row had a non-finite loss or gradient")


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


# -- Ray: worker crash, tracking server stopped mid-run, driver crash --------------------------------

def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def in_thread(target) -> tuple[threading.Thread, dict]:
    """`target()` on a thread of its own; its result or error lands in the returned dict."""
    out: dict = {}

    def run():
        try:
            out["result"] = target()
        except BaseException as err:  # re-raised by the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.e2e
def test_worker_crash_nan_step_and_tracking_outage_lose_and_repeat_nothing(ray_session, tmp_path, monkeypatch,
                                                                           capsys):
    """One run, three faults. Step 2's batch is NaN on rank 1 alone: both ranks skip it (had they
    disagreed, their collectives would no longer match) and count it. Rank 1 exits (os._exit) after
    step 5: Ray Train restarts both workers from the step-3 checkpoint (resources.max_failures=1)
    and they reach step 8. The MLflow server (this test's own) is stopped once step 1 is logged and
    started again at once, same port and store: while it starts up training goes on, and the
    reports MLflow refused meanwhile are sent when it answers. In the one MLflow run each step's
    figures appear once, steps 4 and 5 (trained twice) included."""
    from mlflow.tracking import MlflowClient

    marker = tmp_path / "crashed"
    for key, value in {"EXIT_AT_STEP": "5", "RANK": "1", "MARKER": str(marker), "NAN_AT_STEPS": "2",
                       "STEP_SECONDS": "0.3"}.items():
        monkeypatch.setenv(f"DITLAB_FAULT_{key}", value)
    # MLflow's client would retry each call for minutes: fail fast, so ditlab's buffer is what keeps them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    run_dir = tmp_path / "runs" / "faults"
    args = ["train", str(TINY), "--json", "--no-progress", "--storage", "runs", "--name", "faults",
            "--set", "train.steps=8", "--set", "train.log_every=1", "--set", "train.checkpoint_every=3",
            "--set", "resources.max_failures=1"]
    with mlflow_web("server", root, "--workers", "1", port=port) as uri:
        client = MlflowClient(tracking_uri=uri)
        thread, out = in_thread(lambda: run_cli_json(args, tmp_path, uri))
        wait_for(lambda: (run_dir / "tracking.json").exists() or not thread.is_alive(), 120, "the MLflow run")
        run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
        wait_for(lambda: metric_steps(client, run_id, "train/loss") or not thread.is_alive(), 120, "step 1")
    with mlflow_web("server", root, "--workers", "1", port=port):
        thread.join(timeout=300)
        assert "error" not in out, out.get("error")
        assert marker.exists(), "the worker did not crash"
        assert "ditlab: warning: MLflow did not take step" in capsys.readouterr().err
        assert client.get_run(run_id).info.status == "FINISHED"
        assert metric_steps(client, run_id, "train/loss") == [1, 3, 4, 5, 6, 7, 8]
        assert metric_steps(client, run_id, "train/lr") == [1, 3, 4, 5, 6, 7, 8]
        skipped = client.get_metric_history(run_id, "train/skipped_steps")
        assert sorted(m.step for m in skipped) == [2, 3, 4, 5, 6, 7, 8] and {m.value for m in skipped} == {1}
    assert out["result"]["checkpoint"].endswith("checkpoint_000008")


@pytest.mark.e2e
def test_a_killed_driver_resumes_into_the_same_run_past_a_corrupt_checkpoint(ray_session, mlflow_server, tmp_path,
                                                                            monkeypatch):
    """SIGKILL a `ditlab train --verbose` process (joined to this session's Ray) once its step-4
    checkpoint is written (--verbose: Ray Train's line per report, hidden by default, reached its
    stderr by then), and flip a byte of that checkpoint. The same command refuses, naming it; with
    --skip-corrupt-checkpoints it resumes from step 2 into the same MLflow run, which ends FINISHED
    with each step logged once."""
    from ditlab import cli
    from mlflow.tracking import MlflowClient

    # One Train worker: what is tested is the driver and the checkpoint (a second worker cost about 4 s of the test).
    args = ["train", str(TINY), "--storage", "runs", "--name", "killed", "--no-progress", "--json",
            "--set", "train.steps=6", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
            "--set", "resources.num_workers=1"]
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "MLFLOW_TRACKING_URI": mlflow_server, "DITLAB_FAULT_STEP_SECONDS": "0.5"}
    run_dir = tmp_path / "runs" / "killed"
    driver = subprocess.Popen([str(DITLAB), *args, "--verbose"], cwd=tmp_path, env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "checkpoint_000004" / "checkpoint.pt.sha256").exists() or driver.poll() is not None,
                 120, "checkpoint 4")
    finally:
        driver.send_signal(signal.SIGKILL)
        _, driver_err = driver.communicate()
    assert driver.returncode == -signal.SIGKILL, driver_err[-3000:]
    assert "Reporting training result" in driver_err, driver_err[-3000:]
    bundle = run_dir / "checkpoint_000004" / "checkpoint.pt"
    raw = bytearray(bundle.read_bytes())
    raw[-20] ^= 0xFF
    bundle.write_bytes(bytes(raw))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(args) == 2
    assert "checkpoint_000004" in err.getvalue() and "--skip-corrupt-checkpoints" in err.getvalue()
    summary = run_cli_json([*args, "--skip-corrupt-checkpoints"], tmp_path, mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert summary["mlflow_run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert metric_steps(client, run_id, "train/loss") == list(range(1, 7))
    assert (run_dir / "corrupt" / "0" / "checkpoint_000004").is_dir()


def test_reports_a_dead_server_never_took_are_spooled_and_sent_by_the_rerun(monkeypatch, tmp_path, capsys):
    """The tracking server is gone for good: the consumer keeps what MLflow refused, and at the end
    writes it to the run folder's spool instead of dropping it; the rerun sends it first."""
    import queue

    from mlflow.tracking import MlflowClient

    from ditlab.orchestration.tracking import Tracker
    from ditlab.orchestration.train import UNSENT, MetricsConsumer, replay_unsent

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead_uri = f"http://127.0.0.1:{free_port()}"
    dead = Tracker(MlflowClient(tracking_uri=dead_uri), "0" * 32, "0", dead_uri)
    reports: queue.Queue = queue.Queue()
    consumer = MetricsConsumer(reports, dead, 3, progress=False, last_step=1, spool=tmp_path / UNSENT,
                               flush_seconds=0).start()
    for step in (1, 2, 3):  # step 1 was logged before a restart: dropped
        reports.put({"step": step, "loss": 0.5 / step})
    with pytest.raises(RuntimeError, match=rf"none of 2 reports .* kept in {tmp_path / UNSENT}"):
        consumer.stop()
    assert "ditlab: warning: MLflow did not take step 2" in capsys.readouterr().err

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker.create("faults", "spooled")
    replay_unsent(tmp_path, tracker)
    assert metric_steps(tracker.client, tracker.run_id, "train/loss") == [2, 3]
    assert not (tmp_path / UNSENT).exists()


class ReplayingReporter(LocalReporter):
    replays_reports = True  # as Ray Train's reporter (orchestration/trainer.py)


def test_a_resumed_run_reports_again_what_came_before_its_checkpoint(tmp_path):
    """A driver killed after Ray Train recorded the step-4 checkpoint but before it logged the
    reports up to it would lose them: the resumed workers report the steps since the checkpoint
    before (their values as first reported), and the driver logs those it lacks."""
    spec = tiny("train.steps=6", "train.checkpoint_every=2")
    full = LocalReporter(tmp_path / "full")
    train(spec, full)
    resumed = ReplayingReporter()
    train(spec, resumed, resume_from=str(tmp_path / "full" / "checkpoint_000004"))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_reports_reach_the_driver_from_rank_zero_and_only_checkpoint_steps_go_through_ray_train(monkeypatch):
    """Ray Train's controller takes a worker's report only on its 2 s poll, holding one: reports
    sent more often wait (BENCHMARKS.md, "Reports that wait for Ray Train's poll"). Under `ditlab
    run` and `ditlab train`, rank 0 puts every report's metrics in the driver's queue, and every
    rank calls ray.train.report (a collective: all ranks or none) at checkpoint steps only."""
    import queue

    import ray.train

    from ditlab.orchestration.trainer import RayReporter

    through_ray_train = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, checkpoint_dir_name=None:
                        through_ray_train.append((int(metrics["step"]), checkpoint is not None, checkpoint_dir_name)))
    relay = queue.Queue()
    train(tiny("train.steps=6", "train.checkpoint_every=4"), RayReporter(relay, rank=0))
    assert [relay.get_nowait()["step"] for _ in range(relay.qsize())] == [1, 2, 3, 4, 5, 6]
    assert through_ray_train == [(4, True, "checkpoint_000004"), (6, True, "checkpoint_000006")]

    through_ray_train.clear()
    other_rank = RayReporter(relay, rank=1)
    other_rank.report({"step": 7, "loss": 1.0})
    other_rank.report({"step": 8, "loss": 1.0}, None, checkpoint_step=True)
    assert relay.empty() and through_ray_train == [(8, False, None)]
    RayReporter(None, rank=0).report({"step": 9, "loss": 1.0})  # a Tune trial's: every report to Ray Train
    assert through_ray_train == [(8, False, None), (9, False, None)]
