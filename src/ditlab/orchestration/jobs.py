"""Ray Jobs: submit `ditlab run` to a Ray cluster; follow, list, inspect and stop its jobs.

The client talks to the cluster's dashboard (http://HEAD:8265) through Ray's JobSubmissionClient.
Token authentication follows Ray's own rules: with RAY_AUTH_MODE=token the client sends the token
from $RAY_AUTH_TOKEN, else the file named by $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
Every failure to reach or authenticate with the cluster becomes one ClusterError line that names
the address and what to set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

# Never shipped to the cluster: environments, run outputs, local tracking stores, caches. Patterns
# are .gitignore syntax relative to the working directory (Ray also honours .gitignore itself).
EXCLUDES = [
    "/.venv", "venv/", ".git", "/.dvc/cache", "/.dvc/tmp", "/runs", "/mlruns", "/mlartifacts", "/mlflow.db",
    "/evaluations", "/samples", "/sweeps", "/cache", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
]
# The only variables of the submitting shell that the job gets too: an explicit list, because
# whatever the job gets is stored in Ray's job info, which anyone holding the dashboard's token
# reads. Credentials are the cluster's own (MLFLOW_TRACKING_USERNAME/PASSWORD from a Kubernetes
# Secret, k8s/README.md); a tracking URI goes without the user and password it may hold.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DITLAB_INCEPTION_WEIGHTS", "DITLAB_VERBOSE",
                 "DITLAB_TELEMETRY", "DITLAB_KEEP_FREED_MEMORY", "DITLAB_SHARED_MEMORY_ALLREDUCE",
                 "DITLAB_CPU_KERNELS")
# What `--env` refuses: a name like these, or a value holding `scheme://user:password@`.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|(^|_)(API_)?KEY($|_)|ACCESS_KEY",
                         re.IGNORECASE)
TOKEN_PLACES = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
# On `jobs stop` Ray sends SIGTERM and, by default 3 s later, SIGKILL: too soon, under load, for the
# driver to end its MLflow run (KILLED) and release its Train workers. The job supervisor reads
# this from the job's env_vars.
STOP_GRACE = {"RAY_JOB_STOP_WAIT_TIME_S": "30"}


class ClusterError(Exception):
    """The cluster could not be reached or refused us; the message is one line for the user."""


class _DefaultExcludeNotice(logging.Filter):
    """Drops Ray's notice that .git and .venv are now left out by default: EXCLUDES leaves them out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in record.getMessage()


@cache
def _quiet_sdk_logs() -> None:
    """The SDK logs each ignore file and upload step at INFO; keep its warnings only."""
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
                 "ray._private.runtime_env.working_dir", "ray._private.runtime_env.py_modules"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.addFilter(_DefaultExcludeNotice())


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is an http(s) URL
    (inside a Ray job $RAY_ADDRESS is the GCS address, which the Jobs API does not serve)."""
    if address is None:
        address = os.environ.get("RAY_API_SERVER_ADDRESS")
    if address is None and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise ClusterError("no Ray cluster given: pass --address http://HEAD:8265 (the head's dashboard) "
                           "or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address: expected the dashboard URL of the head, http://HEAD:8265, got {address!r}")
    return address.rstrip("/")


def token_source() -> str | None:
    """Where Ray's client takes the auth token from, in its order; None without one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file {os.environ['RAY_AUTH_TOKEN_PATH']} ($RAY_AUTH_TOKEN_PATH)"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _auth_problem(address: str, token_refused: bool) -> str:
    """What to tell the user after a 401 (no token sent), a 403 (`token_refused`), or the SDK's
    own complaint that token mode is on but no token is to be found."""
    source = token_source()
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (f"the Ray cluster at {address} requires an auth token: set RAY_AUTH_MODE=token and put "
                f"the cluster's token in {TOKEN_PLACES}")
    if token_refused and source:
        return (f"the Ray cluster at {address} rejected the auth token from {source}: "
                f"set the cluster's token in {TOKEN_PLACES}")
    return f"the Ray cluster at {address} requires an auth token and none was found: set {TOKEN_PLACES}"


@contextmanager
def cluster_errors(address: str) -> Iterator[None]:
    """Turns the SDK's connection, authentication and request errors into one ClusterError line."""
    try:
        yield
    except AuthenticationError as err:  # "Authentication failed" is the SDK's wording for a 403
        raise ClusterError(_auth_problem(address, err.message.startswith("Authentication failed"))) from None
    except aiohttp.ClientResponseError as err:  # the log stream's websocket handshake
        if err.status in (401, 403):
            raise ClusterError(_auth_problem(address, err.status == 403)) from None
        raise ClusterError(f"{address}: HTTP {err.status} {err.message}") from None
    except OSError as err:  # requests' and aiohttp's connection errors are OSErrors
        raise ClusterError(f"cannot reach the Ray dashboard at {address} ({type(err).__name__}): check --address "
                           "(the head's dashboard, port 8265 by default) and that the cluster is up") from None
    except RuntimeError as err:  # the SDK's "Request failed with status code ..."
        raise ClusterError(f"{address}: {' '.join(str(err).split())}") from None


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@dataclass(frozen=True)
class Submission:
    """What `ditlab submit` sends: the entrypoint command and its runtime environment."""

    entrypoint: str
    runtime_env: dict
    run_name: str
    metadata: dict[str, str]


def build_submission(spec_path: str | Path, overrides: list[str], run_name: str, working_dir: str | Path = ".",
                     storage: str | None = None, extra_env: dict[str, str] | None = None) -> Submission:
    """`python -m ditlab.cli run SPEC` with the working directory shipped as the job's cwd.

    The package source in the working directory (src/ditlab), if there is one, is shipped too and
    comes first on the job's PYTHONPATH, so the job runs the code that was submitted; without it
    the cluster's installed ditlab runs. `python -m` rather than the `ditlab` script because the
    shipped source needs no installation."""
    root = Path(working_dir).resolve()
    spec = Path(spec_path).resolve()
    if not spec.is_relative_to(root):
        raise ClusterError(f"the spec {spec_path} lies outside the working directory {root}, "
                           "which is what the cluster receives: run from the project or pass --working-dir")
    command = ["python", "-m", "ditlab.cli", "run", spec.relative_to(root).as_posix(), "--name", run_name,
               "--no-progress"]
    for assignment in overrides:
        command += ["--set", assignment]
    if storage:
        command += ["--storage", storage]
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": job_env(root, extra_env)}
    package = root / "src" / "ditlab"
    if (package / "__init__.py").is_file():
        runtime_env["py_modules"] = [str(package)]
    metadata = {"ditlab_run": run_name, "ditlab_spec": spec.relative_to(root).as_posix()}
    return Submission(shlex.join(command), runtime_env, run_name, metadata)


def without_credentials(uri: str) -> str:
    """`uri` without the user and password in its network location (the job logs in with the
    cluster's MLFLOW_TRACKING_USERNAME/PASSWORD instead)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_extra_env(extra: dict[str, str]) -> None:
    """`--env` takes settings, not secrets: those would be readable in Ray's job info."""
    from ditlab.redact import USERINFO

    for key, value in extra.items():
        if SECRET_NAME.search(key) or USERINFO.search(value):
            raise ClusterError(f"--env {key}: looks like a credential, and a job's variables are readable by anyone "
                               "with the cluster's dashboard: give the cluster its credentials instead (a "
                               "Kubernetes Secret, k8s/README.md; or the environment of its `ray start`)")


def job_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment variables: the stop grace period, the variables of this shell named
    in FORWARDED_ENV (the tracking URI without credentials), the git commit being submitted (the
    shipped folder has no .git), then `extra` (`--env`, refused if it looks like a credential)."""
    from ditlab.orchestration.tracking import git_commit, git_dirty  # imports mlflow: only when submitting

    check_extra_env(extra or {})
    env = dict(STOP_GRACE)
    env.update((k, os.environ[k]) for k in FORWARDED_ENV if k in os.environ)
    if "MLFLOW_TRACKING_URI" in env:
        env["MLFLOW_TRACKING_URI"] = without_credentials(env["MLFLOW_TRACKING_URI"])
    commit = git_commit(root)
    if commit:
        env["DITLAB_GIT_COMMIT"] = commit
        env["DITLAB_GIT_DIRTY"] = str(git_dirty(root))
    env.update(extra or {})
    return env


class JobsClient:
    """A Ray cluster's Jobs API with errors as ClusterError."""

    def __init__(self, address: str):
        self.address = address
        _quiet_sdk_logs()
        # The SDK lets $RAY_API_SERVER_ADDRESS and $RAY_ADDRESS override its address argument (inside
        # a Ray job $RAY_ADDRESS is a GCS address); the address resolved here must win.
        with cluster_errors(address), _environ("RAY_API_SERVER_ADDRESS", address):
            self._client = JobSubmissionClient(address)

    def submit(self, submission: Submission) -> str:
        with cluster_errors(self.address):
            return self._client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                                           metadata=submission.metadata)

    def info(self, job_id: str) -> JobDetails:
        with cluster_errors(self.address):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> JobStatus:
        with cluster_errors(self.address):
            return self._client.get_job_status(job_id)

    def logs(self, job_id: str) -> str:
        with cluster_errors(self.address):
            return self._client.get_job_logs(job_id)

    def list_jobs(self) -> list[JobDetails]:
        """Submitted jobs (not bare drivers), oldest first."""
        with cluster_errors(self.address):
            jobs = [j for j in self._client.list_jobs() if j.submission_id]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def follow(self, job_id: str, out: TextIO) -> JobStatus:
        """Streams the job's logs to `out` until it ends; returns its final status."""

        async def stream() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with cluster_errors(self.address):
            asyncio.run(stream())
        return self.wait(job_id)

    def stop(self, job_id: str, wait: bool = True) -> JobStatus:
        """Asks the job to stop (Ray sends SIGTERM, then SIGKILL); with `wait`, until it has ended."""
        with cluster_errors(self.address):
            self._client.stop_job(job_id)
        return self.wait(job_id) if wait else self.status(job_id)

    def wait(self, job_id: str, poll_seconds: float = 1.0) -> JobStatus:
        """The job's status once it is terminal (the log stream can close a moment before)."""
        while not (status := self.status(job_id)).is_terminal():
            time.sleep(poll_seconds)
        return status


def describe(job: JobDetails) -> dict:
    """The fields `ditlab jobs` prints."""
    def seconds(ms: int | None) -> float | None:
        return ms / 1000 if ms else None

    return {"job_id": job.submission_id, "status": str(job.status), "run_name": (job.metadata or {}).get("ditlab_run"),
            "entrypoint": job.entrypoint, "message": job.message, "start_time": seconds(job.start_time),
            "end_time": seconds(job.end_time), "driver_exit_code": job.driver_exit_code}
