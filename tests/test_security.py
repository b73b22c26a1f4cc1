"""Secrets stay where they are; telemetry is off; a local Ray instance authenticates.

- a tracking URI or git remote with credentials is shown, stored and logged redacted;
- `ditlab submit` forwards an explicit list of variables, the tracking URI without its login, and
  refuses `--env` values that look like credentials;
- the shared tiny run (conftest.tiny_run), run with secrets planted in its environment, wrote none
  of them anywhere (the submitted jobs' side is test_jobs.py's
  test_no_planted_secret_reaches_the_jobs_their_runs_or_the_cluster);
- Ray usage stats, MLflow telemetry and DVC analytics are off unless DITLAB_TELEMETRY=1;
- token authentication is on for the local Ray instance even when RAY_AUTH_MODE=disabled is inherited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ditlab import cli
from ditlab.orchestration import jobs
from ditlab.redact import redact_text, redact_uri

from conftest import PLANTED_SECRETS, ROOT, files_holding, planted_secrets_in

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("uri, shown", [
    (f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    (f"https://alice:{SECRET}@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
    (f"https://{SECRET}@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    (f"postgresql://db/mlflow?sslmode=require&password={SECRET}", "postgresql://db/mlflow?sslmode=require&password=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////home/me/mlflow.db", "sqlite:////home/me/mlflow.db"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
])
def test_uris_are_redacted(uri, shown):
    assert redact_uri(uri) == shown
    assert SECRET not in redact_text(f"could not connect to {uri}: refused")


def test_a_tracker_shows_records_and_matches_its_store_without_the_password(tmp_path, monkeypatch):
    """Tracker.uri feeds result.json, the sweep's summary, tracking.json and the dashboard URL."""
    from ditlab.orchestration.records import RECORD, open_recorded_run, recorded_run_id
    from ditlab.orchestration.tracking import Tracker

    uri = f"https://alice:{SECRET}@mlflow.example.com"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker, resumed = open_recorded_run(tmp_path, lambda: Tracker(None, "run-1", "7", uri))
    assert not resumed
    assert SECRET not in tracker.uri + tracker.url and tracker.url.startswith("https://alice:***@mlflow.example.com/")
    assert SECRET not in (tmp_path / RECORD).read_text()
    assert recorded_run_id(tmp_path) == "run-1"  # the redacted record still names this store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:other@mlflow.elsewhere.com")
    assert recorded_run_id(tmp_path) is None


def test_git_remote_with_a_token_is_tagged_redacted(tmp_path, monkeypatch):
    from ditlab.orchestration.tracking import source_tags

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", f"https://{SECRET}@github.com/o/r.git"],
                   check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    monkeypatch.chdir(tmp_path)
    assert source_tags("train")["mlflow.source.git.repoURL"] == "https://***@github.com/o/r.git"


def test_submit_forwards_only_the_allow_list_and_the_uri_without_its_login(monkeypatch):
    for key, value in PLANTED_SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@mlflow.example.com:5000")
    monkeypatch.setenv("DITLAB_VERBOSE", "1")
    submission = jobs.build_submission(ROOT / "experiments" / "tiny.yaml", [], "r", ROOT)
    env = submission.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com:5000"
    assert env["DITLAB_VERBOSE"] == "1"
    assert set(env) <= {*jobs.FORWARDED_ENV, *jobs.STOP_GRACE, "DITLAB_GIT_COMMIT", "DITLAB_GIT_DIRTY"}
    assert planted_secrets_in(json.dumps(submission.__dict__)) == [] and SECRET not in json.dumps(env)


@pytest.mark.parametrize("assignment", ["AWS_SECRET_ACCESS_KEY=abc", "MLFLOW_TRACKING_PASSWORD=abc", "HF_TOKEN=abc",
                                        f"DB_URL=postgresql://u:{SECRET}@db/x"])
def test_submit_refuses_a_credential_in_env(capsys, assignment):
    capsys.readouterr()
    code = cli.main(["submit", "experiments/tiny.yaml", "--env", assignment, "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ditlab: error: --env ")
    assert "credential" in err[0] and SECRET not in err[0]


@pytest.mark.e2e
def test_the_tiny_run_wrote_no_planted_secret(tiny_run, tiny_run_process, mlflow_server):
    """conftest.tiny_run ran with PLANTED_SECRETS (and MLFLOW_TRACKING_USERNAME) in its environment:
    its stdout and stderr, its project folder (run folder, result.json, tracking.json, checkpoints)
    and the MLflow store (params, tags, dataset inputs, artifacts) hold none of them."""
    project = Path(tiny_run["run_dir"]).parents[1]
    assert planted_secrets_in(tiny_run_process.stdout, tiny_run_process.stderr, project, mlflow_server.root) == []
    # The search reads what it should: the run's id is in its folder's records and in the store.
    run_id = tiny_run["mlflow_run_id"]
    assert files_holding(run_id, project / "runs" / "e2e" / "result.json") and files_holding(run_id, mlflow_server.root)


@pytest.mark.e2e  # the session's MLflow server; no Ray
def test_an_evaluation_tracked_with_a_login_in_the_uri_shows_and_stores_it_redacted(mlflow_server, tmp_path, capsys):
    """`ditlab evaluate` with MLFLOW_TRACKING_URI=http://user:password@server: the run reaches the
    server, and the password is in none of its output, evaluation.json, or the MLflow store."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("clean", "restored"):
        (tmp_path / folder).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    password = f"{SECRET}-{os.urandom(6).hex()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", f"http://ditlab:{password}@"))
        mp.chdir(tmp_path)
        capsys.readouterr()
        code = cli.main(["evaluate", "--fake", "restored", "--real", "clean", "--protocol",
                         str(ROOT / "evaluation" / "reconstruction.yaml"), "--set", "metrics=[mse,psnr]",
                         "--out", "ev", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert summary["mlflow_url"].startswith(mlflow_server.replace("http://", "http://ditlab:***@"))
    assert MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert password not in printed.out + printed.err
    assert files_holding(password, tmp_path, mlflow_server.root) == []
    assert files_holding(summary["mlflow_run_id"], tmp_path / "ev", mlflow_server.root)  # the search's control


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_telemetry_is_off_unless_the_user_opts_in():
    from ditlab.telemetry import OFF

    shell = {k: v for k, v in os.environ.items() if k not in OFF and k != "DITLAB_TELEMETRY"}
    shell["RAY_USAGE_STATS_ENABLED"] = "1"  # inherited from a shell that turned it on for something else
    show = f"import json, os, ditlab; print(json.dumps({{k: os.environ.get(k) for k in {sorted(OFF)!r}}}))"
    assert json.loads(_python(show, shell)) == OFF
    opted_in = json.loads(_python(show, {**shell, "DITLAB_TELEMETRY": "1"}))
    assert opted_in == {k: shell.get(k) for k in OFF}


def test_dvc_commands_run_in_the_repository_send_no_analytics():
    """`dvc repro` started by a user (not by ditlab) reads the repository's config."""
    from dvc.config import Config

    assert Config(dvc_dir=str(ROOT / ".dvc"), validate=True)["core"]["analytics"] is False


def test_a_local_ray_instance_uses_token_auth_even_when_the_shell_disables_it():
    code = ("from ditlab.orchestration.ray_session import force_token_auth; force_token_auth()\n"
            "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
            "print(get_authentication_mode() == AuthenticationMode.TOKEN)")
    assert _python(code, {**os.environ, "RAY_AUTH_MODE": "disabled"}) == "True"


@pytest.mark.e2e
def test_the_session_ray_dashboard_refuses_requests_without_the_token(ray_session):
    import ray

    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{url}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
