"""Ray Jobs: `ditlab submit` and `ditlab jobs`.

End to end against a real head (`ray start --head`, token auth on, dashboard on 127.0.0.1), each
command run as a user runs it, in a subprocess with the cluster's token in its environment (Ray's
client reads the auth settings once per process). The checks that end before any cluster is
contacted call the CLI in this process."""

import json
import secrets
import shlex
import subprocess
import time
import urllib.request
import zipfile

import pytest
from mlflow.tracking import MlflowClient

from ditlab import cli
from ditlab.orchestration import jobs
from ditlab.orchestration.tracking import git_commit

from conftest import PLANTED_SECRETS, ROOT, files_holding, free_port, planted_secrets_in
from ray_cluster import VENV_BIN, node_env

TINY = "experiments/tiny.yaml"
# One Train worker, a small test split and no Inception pass keep the submitted run short.
QUICK = ["--set", "resources.num_workers=1", "--set", "data.test_fraction=0.05",
         "--set", "evaluation.metrics=[conditional_accuracy]"]
# The followed job: the tiny spec's 6 steps cut to 4 (still a checkpoint, at step 3, and the last).
SHORT = ["--set", "train.steps=4"]


def ditlab(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ditlab"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `ditlab: error:` line a failed command must print, and nothing else."""
    return _one_error_line(proc.returncode, proc.stderr)


def _one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditlab: error: "), stderr
    return lines[0]


def in_process(capsys, *args: str) -> str:
    """`ditlab ARGS` in this process, for commands that fail before contacting any cluster: its one
    error line."""
    capsys.readouterr()
    code = cli.main(list(args))
    return _one_error_line(code, capsys.readouterr().err)


# ---- without a cluster ----------------------------------------------------------------------

def test_submission_runs_the_spec_from_the_shipped_working_directory(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("DITLAB_INCEPTION_WEIGHTS", "/weights/inception.pt")
    monkeypatch.setenv("DITLAB_CACHE_DIR", "/cache/ditlab")  # a path of this machine: not on the list
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    sub = jobs.build_submission(ROOT / TINY, ["train.steps=9", "tracking.experiment=a b"], "my-run", ROOT,
                                storage="/shared/runs", extra_env={"EXTRA": "1"})
    assert shlex.split(sub.entrypoint) == [
        "python", "-m", "ditlab.cli", "run", TINY, "--name", "my-run", "--no-progress",
        "--set", "train.steps=9", "--set", "tracking.experiment=a b", "--storage", "/shared/runs"]
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["DITLAB_INCEPTION_WEIGHTS"] == "/weights/inception.pt" and "DITLAB_CACHE_DIR" not in env
    assert env["EXTRA"] == "1" and "UNRELATED_SECRET" not in env
    assert env.get("DITLAB_GIT_COMMIT") == git_commit(ROOT)
    assert sub.runtime_env["working_dir"] == str(ROOT)
    assert sub.runtime_env["py_modules"] == [str(ROOT / "src" / "ditlab")]
    assert sub.metadata == {"ditlab_run": "my-run", "ditlab_spec": TINY}


def test_a_spec_outside_the_working_directory_is_refused(tmp_path):
    spec = tmp_path / "elsewhere.yaml"
    spec.write_text((ROOT / TINY).read_text())
    with pytest.raises(jobs.ClusterError, match="outside the working directory"):
        jobs.build_submission(spec, [], "r", ROOT)


def test_the_package_leaves_environments_runs_and_caches_behind(tmp_path):
    """Our excludes as Ray's own packager applies them to the working directory."""
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for name in (".venv/bin/python", ".git/HEAD", ".dvc/cache/ab/cdef", "runs/r/checkpoint.pt", "mlruns/0/x",
                 "mlartifacts/a", "mlflow.db", "src/ditlab/__pycache__/cli.cpython-311.pyc", "evaluations/e.json",
                 ".dvc/config", "src/ditlab/cli.py", "experiments/tiny.yaml", "dvc.yaml", "data/digits.dvc"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    create_package(str(project), tmp_path / "pkg.zip", include_gitignore=True, excludes=jobs.EXCLUDES)
    files = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert files == {".dvc/config", "src/ditlab/cli.py", "experiments/tiny.yaml", "dvc.yaml", "data/digits.dvc"}


def test_address_comes_from_the_flag_then_ray_api_server_address_then_an_http_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, as inside a Ray job: not ours
    with pytest.raises(jobs.ClusterError, match="pass --address"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://ray-head:8265")
    assert jobs.resolve_address(None) == "http://ray-head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example/")
    assert jobs.resolve_address(None) == "https://ray.example"
    assert jobs.resolve_address("http://10.0.0.2:8265") == "http://10.0.0.2:8265"
    with pytest.raises(jobs.ClusterError, match="expected the dashboard URL"):
        jobs.resolve_address("10.0.0.2:6379")


def test_a_bad_spec_fails_before_the_cluster_is_contacted(capsys, monkeypatch):
    """Nothing listens at the address: the spec error shows that validation came first."""
    monkeypatch.chdir(ROOT)
    line = in_process(capsys, "submit", TINY, "--set", "train.steps=-1", "--address",
                      f"http://127.0.0.1:{free_port()}")
    assert "train.steps" in line


def test_an_unreachable_cluster_is_one_line_naming_the_address(capsys):
    address = f"http://127.0.0.1:{free_port()}"
    line = in_process(capsys, "jobs", "list", "--address", address)
    assert f"cannot reach the Ray dashboard at {address}" in line and "--address" in line


# ---- against a real head ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def client_env(ray_head, mlflow_server):
    """A user's shell for the test head: its token, the test MLflow server (named with a user and
    password, which the job must not get), and the secrets planted in every shell of the tests."""
    with_login = mlflow_server.replace("http://", f"http://ditlab:{PLANTED_SECRETS['MLFLOW_TRACKING_PASSWORD']}@")
    return {**node_env(ray_head.token), **PLANTED_SECRETS, "MLFLOW_TRACKING_URI": with_login}


def find_run(mlflow_server: str, name: str):
    runs = MlflowClient(mlflow_server).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_server).search_experiments()],
        filter_string=f"attributes.run_name = '{name}'")
    return runs[0] if runs else None


@pytest.fixture(scope="module")
def long_job(ray_head, client_env):
    """A run of 100000 steps, there to be stopped. Submitted before the followed job, so that it
    is training by the time the stop test runs (the two fit in the head's 2 CPUs)."""
    name = f"stopped-{secrets.token_hex(3)}"
    endless = ["--set", "train.steps=100000", "--set", "train.log_every=50", "--set", "train.checkpoint_every=100000"]
    proc = ditlab("submit", TINY, "--address", ray_head.dashboard, "--name", name, "--json", *QUICK, *endless,
                  env=client_env)
    assert proc.returncode == 0, proc.stderr
    return name, json.loads(proc.stdout)["job_id"]


@pytest.fixture(scope="module")
def following(long_job, ray_head, client_env):
    """`ditlab submit --follow`, started and left running: the stop test works on the long job
    meanwhile (stopping it early also frees its CPU for this job); `followed_job` waits for it."""
    name = f"submitted-{secrets.token_hex(3)}"
    proc = subprocess.Popen([str(VENV_BIN / "ditlab"), "submit", TINY, "--address", ray_head.dashboard,
                             "--name", name, "--follow", "--json", *QUICK, *SHORT],
                            env=client_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield name, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def followed_job(following):
    name, proc = following
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return name, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _dashboard_get(ray_head, path: str):
    request = urllib.request.Request(f"{ray_head.dashboard}{path}",
                                     headers={"Authorization": f"Bearer {ray_head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def alive_train_workers(ray_head, submission_id: str) -> list[dict]:
    """The Ray Train worker actors of one job alive on the test cluster, from the dashboard's state
    API (the followed job may be training beside it)."""
    ray_job_id = _dashboard_get(ray_head, f"/api/jobs/{submission_id}")["job_id"]
    actors = _dashboard_get(ray_head, "/api/v0/actors?limit=1000&filter_keys=state&filter_predicates=%3D"
                                      "&filter_values=ALIVE")["data"]["result"]["result"]
    return [a for a in actors if a["class_name"] == "RayTrainWorker" and a.get("job_id") == ray_job_id]


@pytest.mark.e2e
def test_a_stopped_job_ends_stopped_and_its_training_stops(long_job, following, ray_head, client_env,
                                                          mlflow_server):
    """Runs while the followed job (`following`) is under way."""
    name, job_id = long_job
    # Stop it mid-training: once its MLflow run has a loss logged. Meanwhile the job must stay
    # pending or running: asked of the dashboard's Jobs API on each poll (a `ditlab jobs status`
    # process every 2 s took CPU from the two jobs on the head's 2 cores), and of `ditlab jobs
    # status` once it trains.
    deadline = time.monotonic() + 300
    while (run := find_run(mlflow_server, name)) is None or "train/loss" not in run.data.metrics:
        info = _dashboard_get(ray_head, f"/api/jobs/{job_id}")
        assert info["status"] in ("PENDING", "RUNNING"), info
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.5)
    status = ditlab("jobs", "status", job_id, "--address", ray_head.dashboard, "--json", env=client_env)
    assert json.loads(status.stdout)["status"] in ("PENDING", "RUNNING"), status.stdout
    assert alive_train_workers(ray_head, job_id)

    stopped = ditlab("jobs", "stop", job_id, "--address", ray_head.dashboard, "--json", env=client_env)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) == {"job_id": job_id, "status": "STOPPED"}
    status = ditlab("jobs", "status", job_id, "--address", ray_head.dashboard, "--json", env=client_env)
    assert json.loads(status.stdout)["status"] == "STOPPED"
    # The driver ended its MLflow run on the way out (after SIGTERM Ray waits RAY_JOB_STOP_WAIT_TIME_S
    # before SIGKILL: 30 s, as `ditlab jobs stop` sets it; Ray's default is 3 s).
    assert find_run(mlflow_server, name).info.status == "KILLED"
    # The job's Train worker goes with it (Ray reaps a dead driver's actors shortly after).
    deadline = time.monotonic() + 120
    while alive_train_workers(ray_head, job_id):
        assert time.monotonic() < deadline, "Train workers outlived the stopped job"
        time.sleep(1)


@pytest.mark.e2e
def test_submit_follow_ends_succeeded(followed_job):
    name, proc = followed_job
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, "--json must print exactly one line on stdout"
    record = json.loads(lines[0])
    assert record["status"] == "SUCCEEDED" and record["run_name"] == name
    assert record["job_id"].startswith("raysubmit_")
    assert "mlflow run:" in proc.stderr  # the job's own log, streamed by --follow


@pytest.mark.e2e
def test_the_submitted_run_is_tracked_on_the_mlflow_server(followed_job, mlflow_server):
    name, _ = followed_job
    run = find_run(mlflow_server, name)
    assert run is not None, f"no MLflow run named {name}"
    assert run.info.status == "FINISHED"
    assert run.data.params["resources.num_workers"] == "1"
    assert "eval/conditional_accuracy" in run.data.metrics
    # The job ran from an unpacked folder without .git; the commit came with `ditlab submit`.
    assert run.data.tags.get("mlflow.source.git.commit") == git_commit(ROOT)


@pytest.mark.e2e
def test_jobs_status_list_and_logs_show_the_job(followed_job, ray_head, client_env):
    name, proc = followed_job
    job_id = json.loads(proc.stdout)["job_id"]
    status = json.loads(ditlab("jobs", "status", job_id, "--address", ray_head.dashboard, "--json",
                               env=client_env).stdout)
    assert status["status"] == "SUCCEEDED" and status["run_name"] == name and status["driver_exit_code"] == 0
    # The address from $RAY_API_SERVER_ADDRESS, as Ray's own CLI takes it.
    listed = ditlab("jobs", "list", "--json", env={**client_env, "RAY_API_SERVER_ADDRESS": ray_head.dashboard})
    assert job_id in {j["job_id"] for j in json.loads(listed.stdout)}
    logs = ditlab("jobs", "logs", job_id, "--address", ray_head.dashboard, env=client_env)
    assert logs.returncode == 0 and "mlflow run:" in logs.stdout


@pytest.mark.e2e
def test_no_planted_secret_reaches_the_jobs_their_runs_or_the_cluster(followed_job, long_job, ray_head,
                                                                      mlflow_server):
    """The secrets in the submitting shell (conftest.PLANTED_SECRETS, and the password in its
    MLFLOW_TRACKING_URI) appear nowhere: not in Ray's job info, not in any file on the head (job
    folders, logs, runs), not in the MLflow store (params, tags, artifacts)."""
    name, proc = followed_job
    assert proc.returncode == 0, proc.stderr[-4000:]
    infos = [_dashboard_get(ray_head, f"/api/jobs/{json.loads(proc.stdout)['job_id']}"),
             _dashboard_get(ray_head, f"/api/jobs/{long_job[1]}")]
    env = infos[0]["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == mlflow_server, "the URI goes without its user and password"
    assert planted_secrets_in(json.dumps(infos), ray_head.temp_dir, mlflow_server.root) == []
    # The search reads what it should: the job's driver log on the head and its run in the store.
    run_id = find_run(mlflow_server, name).info.run_id
    assert files_holding(name, ray_head.temp_dir) and files_holding(run_id, mlflow_server.root)


@pytest.mark.e2e
def test_a_wrong_or_missing_token_is_one_clear_line(ray_head, client_env, tmp_path):
    wrong = ditlab("jobs", "list", "--address", ray_head.dashboard, env={**client_env, "RAY_AUTH_TOKEN": "not-it"})
    line = one_error_line(wrong)
    assert f"the Ray cluster at {ray_head.dashboard} rejected the auth token from $RAY_AUTH_TOKEN" in line

    # No token mode and no token anywhere (HOME without ~/.ray/auth_token).
    bare = {k: v for k, v in client_env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    missing = ditlab("submit", TINY, "--address", ray_head.dashboard, *QUICK, env={**bare, "HOME": str(tmp_path)})
    line = one_error_line(missing)
    assert f"the Ray cluster at {ray_head.dashboard} requires an auth token" in line
    assert "RAY_AUTH_MODE=token" in line

    token_file = tmp_path / "token"
    token_file.write_text(ray_head.token)
    from_file = {**bare, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    by_path = ditlab("jobs", "list", "--address", ray_head.dashboard, env=from_file)
    assert by_path.returncode == 0, by_path.stderr
