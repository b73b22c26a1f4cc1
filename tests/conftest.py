"""Shared fixtures. Services the tests need (a Ray instance, an MLflow server) are started here
and stopped at the end of the session; nothing is left running."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# How often Ray Train's controller polls its workers (Ray's default: every 2 s). Each state change
# of a run waits for a poll, so every TorchTrainer fit of a tiny test run spent seconds asleep:
# a 2-worker fit of 3 reports took 26 s at 2 s and 17 s at 0.5 s on 2 cores. Set before any Ray
# instance starts, so that the instances tests start, the `ditlab` processes they run (which copy
# this environment) and the test clusters' nodes (ray_cluster.node_env) all poll at this interval.
# A poll that takes longer is awaited at the next one, as at 2 s: no worker is judged on it.
RAY_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
for _name, _value in RAY_TRAIN_POLL.items():
    os.environ.setdefault(_name, _value)


# Services only end-to-end tests may start: `make test-fast` (-m "not e2e") runs without Ray or
# an MLflow server, so a test that asks for one must carry the e2e marker.
SERVICE_FIXTURES = {"ray_session", "ray_head", "mlflow_server"}


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("e2e")]
    if unmarked:
        raise pytest.UsageError("tests that start Ray or an MLflow server must be marked e2e: " + ", ".join(unmarked))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Reference-feature caches go to a per-session folder, not the user's ~/.cache."""
    os.environ.setdefault("DITLAB_CACHE_DIR", str(tmp_path_factory.mktemp("ditlab-cache")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (token auth on, dashboard on 127.0.0.1) shared by every test."""
    import ray

    from ditlab.orchestration.ray_session import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (`ray start --head`, token auth with a token made here, dashboard on
    127.0.0.1) for the Ray Jobs tests, and another for the multi-node tests. At the end of the
    module it stops only its own processes, and fails if any of them is left. Module scope: while a
    second Ray instance runs on the host, Ray Train's placement-group cleaner in the session's
    local instance cannot tell which cluster is its own, and the Tune tests leak CPUs."""
    import secrets
    import shutil
    import tempfile

    from ray_cluster import RayHead

    # Short temp dirs: Ray's unix sockets live under them, and socket paths are capped at 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ditlab-ray-"))
    head = RayHead(root / "head", token=secrets.token_hex(32))
    try:
        head.wait_until_serving()
        yield head
    finally:
        left = [pid for node in [*head.workers, head] for pid in node.stop()]
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"Ray processes still running after the test cluster stopped: {left}"


class ServerURI(str):
    """The server's URI, with the folder holding its SQLite store and artifacts as `.root`."""

    def __new__(cls, uri: str, root: Path):
        self = super().__new__(cls, uri)
        self.root = root
        return self


@contextlib.contextmanager
def mlflow_web(command: str, root: Path, *extra: str, port: int | None = None) -> Iterator[str]:
    """`mlflow server` or `mlflow ui` on 127.0.0.1 (on `port`, default a free one) over the SQLite
    store and artifact folder in `root`, answering /health; yields its URL, then stops its process
    group."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "mlflow", command, "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           *extra]
    log_path = root / f"{command}.log"
    # As the README starts the dashboard (tracking.DASHBOARD_ENV): MLflow's job consumers also
    # made each start 3-6 s slower (benchmarks/dashboard_cost.py), and the tests start 5.
    from ditlab.orchestration.tracking import DASHBOARD_ENV

    env = {**os.environ, **DASHBOARD_ENV}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
        try:
            uri = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow {command} exited: {log_path.read_text()[-2000:]}")
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"mlflow {command} did not answer in 120 s") from None
                    time.sleep(0.5)
            yield uri
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow")
    with mlflow_web("server", root, "--workers", "1") as uri:
        yield ServerURI(uri, root)


# The one `ditlab run` that test_e2e.py, test_dashboard.py, test_console.py, test_security.py and
# test_readme.py share: the tiny spec with 2 Ray Train workers, run as a user runs it (the `ditlab`
# command in a process of its own, starting its own local Ray instance, progress bars on), in a
# project folder of its own (a git repository), on a dataset added with `ditlab data add` and named
# relative to that folder (workers run elsewhere: they must get it as an absolute path), tracked on
# the mlflow_server. A small test split keeps the one-off reference feature extraction short.
DITLAB = str(Path(sys.executable).parent / "ditlab")
TINY_RUN_ARGS = ["run", str(ROOT / "experiments" / "tiny.yaml"), "--json", "--storage", "runs", "--name", "e2e",
                 "--set", "data.test_fraction=0.05", "--set", "data.source=folder", "--set", "data.name=digits-png"]


def write_digits_folder(root: Path) -> None:
    """scikit-learn's digits as an image folder: one subfolder of PNG files per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        (root / f"digit{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8")).save(root / f"digit{label}" / f"{i:04d}.png")


# Secrets planted in the environment of the shared tiny run and of the submitted Ray Jobs
# (test_jobs.py); test_security.py searches everything those runs wrote for the values. One of
# each kind a user's shell holds: a tracking password, cloud keys, a token, a DITLAB_* secret.
PLANTED_SECRETS = {name: f"planted-{name.lower()}-{os.urandom(8).hex()}" for name in (
    "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "DITLAB_API_KEY")}


def _blobs(source):
    """(where, bytes) of a folder's every file (SQLite stores, artifacts, logs, JSON), of a file, or
    of a string (e.g. a JSON dump)."""
    if not isinstance(source, Path):
        return [("text", str(source).encode())]
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file() and not p.is_symlink()]
    return ((str(p), p.read_bytes()) for p in files)


def planted_secrets_in(*sources) -> list[str]:
    """`name: where` for each planted secret found in `sources` (folders, files or strings)."""
    return [f"{name}: {where}" for source in sources for where, blob in _blobs(source)
            for name, value in PLANTED_SECRETS.items() if value.encode() in blob]


def files_holding(text: str, *sources) -> list[str]:
    """Where `text` occurs in `sources`: the planted-secret searches' control that they read what
    they should (a run's id is in its store, a job's name in its logs)."""
    return [where for source in sources for where, blob in _blobs(source) if text.encode() in blob]


def run_cli_json(argv: list[str], cwd: Path, tracking_uri: str, env: dict[str, str] | None = None) -> dict:
    """`ditlab ARGV --json` in-process from `cwd` (with `env` added to the environment); the one
    JSON line it must print on stdout."""
    import contextlib
    import io
    import json

    from ditlab import cli

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        mp.chdir(cwd)
        code = cli.main(argv)
    assert code == 0, f"ditlab {' '.join(argv)} exited {code}"
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 1, "--json must print exactly one line on stdout"
    return json.loads(lines[0])


@pytest.fixture(scope="session")
def tiny_run_process(mlflow_server, tmp_path_factory) -> subprocess.CompletedProcess:
    """`ditlab run --json` of the tiny spec (TINY_RUN_ARGS) as its own process, with planted secrets
    (and MLFLOW_TRACKING_USERNAME) in its environment; stdout and stderr decoded, a bar's \r redraws
    kept as they are. Its run folder is <project>/runs/e2e."""
    project = tmp_path_factory.mktemp("project")
    write_digits_folder(project / "incoming")
    run_cli_json(["data", "add", "incoming", "--name", "digits-png", "--no-dvc", "--json"], project, mlflow_server)
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "data"], check=True)
    subprocess.run([*git, "commit", "-qm", "data"], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DITLAB_VERBOSE", "RAY_ADDRESS")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_TRACKING_USERNAME="ditlab", **PLANTED_SECRETS)
    # Bytes, decoded here: text mode would turn the bars' \r into line breaks.
    proc = subprocess.run([DITLAB, *TINY_RUN_ARGS], cwd=project, env=env, capture_output=True, timeout=600)
    stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"ditlab {' '.join(TINY_RUN_ARGS)} exited {proc.returncode}:\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def tiny_run(tiny_run_process) -> dict:
    """The summary the shared tiny run printed: exactly one JSON line on stdout."""
    import json

    lines = tiny_run_process.stdout.splitlines()
    assert len(lines) == 1, f"--json must print exactly one line on stdout, got {len(lines)}"
    return json.loads(lines[0])
