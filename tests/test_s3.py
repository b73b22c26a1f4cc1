"""Object storage end to end (issue 19 §4), against a real S3-API server on 127.0.0.1: moto's
server, one per module, with authentication on (an IAM user whose key pair is the only one it
takes), so wrong credentials are refused as a real bucket would refuse them.

Covered: `ditlab train --storage s3://` (one short Ray run, interrupted by a worker crash and resumed
from the checkpoint on s3://, tracked on an `mlflow server --artifacts-destination s3://`), the DVC
remote on s3:// (push, a fresh clone, pull, a repro with nothing to do), a missing bucket and wrong
credentials (one error line naming the URL, exit 2, before Ray starts). Endpoint and keys come
from the standard variables only, and the secret key is searched for in everything the run wrote:
the bucket, the MLflow store, the run's output and Ray's logs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, mlflow_web, run_cli_json
from test_bad_input import no_ray, refused  # noqa: F401 (no_ray is a fixture)

BUCKET = "ditlab"
TINY = ROOT / "experiments" / "tiny.yaml"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server (its own process) with one IAM user allowed s3:* and a bucket; yields the
    standard variables that point at it with that user's keys."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # The first three requests (the IAM user, its policy, its key) go unauthenticated; every later
    # one must be signed with that key.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="ditlab")
        iam.put_user_policy(UserName="ditlab", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ditlab")["AccessKey"]
        variables = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                     "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
        client(variables).create_bucket(Bucket=BUCKET)
        yield variables
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def client(variables: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=variables["AWS_ENDPOINT_URL"], region_name=variables["AWS_DEFAULT_REGION"],
                        aws_access_key_id=variables["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=variables["AWS_SECRET_ACCESS_KEY"])


def keys(s3, prefix: str) -> list[str]:
    """The keys of every object under `prefix` in the bucket, through the client `s3`."""
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]


def objects(variables: dict[str, str], prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` in the bucket: key -> content."""
    s3 = client(variables)
    return {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys(s3, prefix)}


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing bucket", "wrong secret key", "unknown key id"])
def test_unusable_storage_is_one_error_line_naming_the_url_before_anything_starts(s3, case, monkeypatch, tmp_path,
                                                                                  no_ray):  # noqa: F811
    from ditlab import cli

    url = "s3://no-such-bucket/runs" if case == "missing bucket" else f"s3://{BUCKET}/runs"
    bad = {"wrong secret key": {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
           "unknown key id": {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN00000000"}}.get(case, {})
    for name, value in {**s3, **bad}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(["train", str(TINY), "--storage", url, "--name", "bad", "--no-progress"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out.getvalue(), err.getvalue()
    assert lines[0].startswith(f"ditlab: error: --storage: {url}: ")
    assert ("does not exist" if case == "missing bucket" else "credentials are refused") in lines[0]
    assert s3["AWS_SECRET_ACCESS_KEY"] not in lines[0] and "not-the-secret" not in lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing written, the tracking store included"
    assert not objects(s3, "runs/"), "nothing written to the bucket"


@pytest.mark.parametrize("argv", [["tune", str(ROOT / "experiments" / "sweeps" / "quickstart.yaml"), "--storage"],
                                  ["train", str(TINY), "--export"]])
def test_options_that_take_a_local_folder_refuse_an_s3_url(argv, tmp_path, monkeypatch, capsys, no_ray):  # noqa: F811
    """Only run/train --storage take object storage; elsewhere s3://... would become a local folder 's3:'."""
    monkeypatch.chdir(tmp_path)
    line = refused([*argv, f"s3://{BUCKET}/x"], capsys)
    assert f"{argv[-1]}: 's3://{BUCKET}/x' is a URL; this option takes a local folder" in line
    assert list(tmp_path.iterdir()) == []


# -- data shards ---------------------------------------------------------------------------------------

def test_a_shard_set_on_s3_is_checked_and_read_as_the_local_one(s3, tmp_path, monkeypatch, capsys, no_ray):  # noqa: F811
    """The same shard set on disk and in the bucket: the checks before a run and the reader give the
    same manifest and arrays. A shard changed in the bucket, a missing bucket and wrong credentials
    are each one error line naming the s3:// URL, before Ray."""
    import numpy as np
    from pyarrow import fs
    from test_shards import digit_shards

    from ditlab.config import DataSpec
    from ditlab.data.shards import check_shard_set, read_manifest, read_split
    from ditlab.storage import filesystem

    local = digit_shards(tmp_path / "shards")
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    url = f"s3://{BUCKET}/shards/digits"
    bucket, path = filesystem(url)
    fs.copy_files(str(local), path, destination_filesystem=bucket)
    assert check_shard_set(DataSpec(format="shards", path=url, resolution=8)) == read_manifest(str(local))
    for split in ("train", "test"):
        (images, labels, _), (want_images, want_labels, _) = read_split(url, split), read_split(str(local), split)
        assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels)

    def run_on(location: str) -> list[str]:
        return ["run", str(TINY), "--set", "data.format=shards", "--set", f"data.path={location}",
                "--set", "data.resolution=8"]

    shard = bytearray((local / "test" / "00000.npz").read_bytes())
    shard[len(shard) // 2] ^= 0xFF  # same size, another checksum
    with bucket.open_output_stream(f"{path}/test/00000.npz") as out:
        out.write(bytes(shard))
    assert f"shard '{url}/test/00000.npz' does not match its checksum" in refused(run_on(url), capsys)
    assert "data.path: s3://no-such-bucket/shards: bucket 'no-such-bucket' does not exist" in refused(
        run_on("s3://no-such-bucket/shards"), capsys)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert f"data.path: {url}: the credentials are refused" in refused(run_on(url), capsys)
    assert not (tmp_path / "runs").exists()


# -- the DVC remote -----------------------------------------------------------------------------------

@pytest.mark.e2e  # runs DVC
def test_dvc_remote_on_s3_push_clone_pull_and_nothing_to_repro(s3, tmp_path):
    """The shipped pipeline (its outputs placeholders committed to DVC, as in test_dvc.py) with its
    remote on s3:// (endpointurl in the local config, keys from the environment): push, a fresh
    clone pulls every output back byte for byte, and its `dvc repro` has nothing to do."""
    from test_dvc import UP_TO_DATE, _env, _with_placeholder_outputs

    def endpoint(repo) -> None:  # what `dvc remote modify --local s3 endpointurl URL` writes (git ignores it)
        (repo.path / ".dvc" / "config.local").write_text(f'[remote "s3"]\n    endpointurl = {s3["AWS_ENDPOINT_URL"]}\n')

    repo, _ = _with_placeholder_outputs(tmp_path / "repo")
    repo.env = {**_env(), **s3}
    repo.dvc("remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "outputs in dvc.lock, remote on s3")
    endpoint(repo)
    repo.dvc("push")
    assert objects(s3, "dvc/"), "the cache is in the bucket"

    clone = repo.clone(tmp_path / "clone", shared_cache=False)
    endpoint(clone)
    assert not (clone.path / "pipeline" / "runs").exists(), "outputs come from the remote, not git"
    clone.dvc("pull")

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "pipeline").rglob("*"))
                if p.is_file()}

    assert files(clone.path) == files(repo.path)
    assert UP_TO_DATE in clone.dvc("repro")
    tracked = [p for p in clone.path.rglob("*") if p.is_file() and ".git" not in p.parts and "cache" not in p.parts]
    assert not [str(p) for p in tracked if s3["AWS_SECRET_ACCESS_KEY"].encode() in p.read_bytes()]


# -- Ray Train checkpoints and MLflow artifacts --------------------------------------------------------

@pytest.mark.e2e
def test_a_run_on_s3_interrupted_and_resumed_keeps_every_file_there_and_no_secret_anywhere(
        s3, ray_session, tmp_path, monkeypatch):
    """`ditlab train --storage s3://ditlab/runs` on a shard set in s3://ditlab/data, streamed
    through Ray Data, tracked on an MLflow server whose artifacts go to s3://ditlab/mlartifacts.
    This session's Ray was started before the S3 variables were set: its workers and read tasks
    reach the bucket only through the filesystems the driver hands them. The driver (a process
    joined to this session's Ray) is killed with SIGKILL once Ray Train has recorded a checkpoint on
    s3://: nothing of the run is on this machine. The same command again, with steps 1-2 now
    poisoned (NaN), resumes from the checkpoint on s3:// (no step skipped: 1-2 were not trained
    again) into the same MLflow run, and ends with every file of the run folder and every MLflow
    artifact in the bucket."""
    from mlflow.tracking import MlflowClient
    from pyarrow import fs
    from test_shards import digit_shards

    from ditlab.storage import filesystem

    for name, value in s3.items():  # this process's, the MLflow server's and the killed driver's
        monkeypatch.setenv(name, value)
    with tempfile.TemporaryDirectory() as local:
        bucket, path = filesystem(f"s3://{BUCKET}/data/digits")
        fs.copy_files(str(digit_shards(Path(local) / "digits")), path, destination_filesystem=bucket)
    root = tmp_path / "mlflow"
    root.mkdir()
    args = ["train", str(TINY), "--storage", f"s3://{BUCKET}/runs", "--name", "resumed", "--no-progress",
            "--json", "--set", "train.steps=6", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
            "--set", "resources.num_workers=1", "--set", "data.format=shards",
            "--set", f"data.path=s3://{BUCKET}/data/digits"]
    with mlflow_web("server", root, "--workers", "1", "--artifacts-destination", f"s3://{BUCKET}/mlartifacts") as uri:
        env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
               "MLFLOW_TRACKING_URI": uri, "DITLAB_FAULT_STEP_SECONDS": "1"}
        driver = subprocess.Popen([str(Path(sys.executable).parent / "ditlab"), *args], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # Listing only (one client): reading every object's body on each poll took CPU from the driver.
            listing, deadline = client(s3), time.monotonic() + 180
            while "runs/resumed/checkpoint_manager_snapshot.json" not in keys(listing, "runs/resumed/"):
                if driver.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            driver.kill()
            first_output = driver.communicate()[1]
        stored = objects(s3, "runs/resumed/")
        snapshot = "runs/resumed/checkpoint_manager_snapshot.json"
        assert snapshot in stored, f"no checkpoint recorded:\n{first_output[-3000:]}"
        assert "runs/resumed/tracking.json" in stored and "runs/resumed/result.json" not in stored, first_output
        run_id = json.loads(stored["runs/resumed/tracking.json"])["run_id"]

        summary = run_cli_json(args, tmp_path, uri, env={"DITLAB_FAULT_NAN_AT_STEPS": "1-2"})
        assert summary["mlflow_run_id"] == run_id
        assert summary["run_dir"] == f"s3://{BUCKET}/runs/resumed"
        assert summary["checkpoint"] == f"s3://{BUCKET}/runs/resumed/checkpoint_000006"
        mlflow = MlflowClient(tracking_uri=uri)
        assert mlflow.get_run(run_id).info.status == "FINISHED"
        assert sorted(m.step for m in mlflow.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
        assert not mlflow.get_metric_history(run_id, "train/skipped_steps"), "steps 1-2 were trained again"

    stored = objects(s3, "")
    for name in ("spec.yaml", "tracking.json", "result.json", "checkpoint_000006/checkpoint.pt"):
        assert f"runs/resumed/{name}" in stored, name
    artifacts = [k for k in stored if k.startswith("mlartifacts/")]
    assert any(k.endswith(f"{run_id}/artifacts/result.json") for k in artifacts), artifacts
    assert any(k.endswith("figures/loss_curve.png") for k in artifacts), artifacts
    assert not (root / "artifacts").exists(), "MLflow's artifacts went to the bucket"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow"], "no run folder here"

    secret = s3["AWS_SECRET_ACCESS_KEY"].encode()
    ray_logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    places = {f"s3://{k}": v for k, v in stored.items()}
    places["ditlab output"] = (first_output + json.dumps(summary)).encode()
    for folder in (root, ray_logs):  # the MLflow store and its log, Ray's logs
        places.update({str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()})
    assert any(run_id.encode() in blob for where, blob in places.items() if "mlflow.db" in where), "store read"
    assert [where for where, blob in places.items() if secret in blob] == []
