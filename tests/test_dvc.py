"""DVC versioning: prepared data, `ditlab data add`, checkpoint integrity, and the real pipeline
(dvc.yaml + params.yaml of this repository) run by DVC in a temporary git repository: repro,
no-op repro, a parameter change, an unknown key, push/pull round trip to a fresh clone, and
`dvc exp run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from ditlab import cli
from ditlab.config import DataSpec, apply_override, load
from ditlab.data import load_dataset
from ditlab.data.prepared import PreparedDataError, check_prepared, save_prepared
from ditlab.orchestration.train import RunFolderError, prepare_run_dir
from ditlab.orchestration.versioning import dvc_md5
from ditlab.training.checkpoint import CheckpointError, load_bundle, save_bundle, verify_bundle

from conftest import ROOT

UP_TO_DATE = "Data and pipelines are up to date."


# -- prepared data ------------------------------------------------------------------------------

def test_prepared_data_equals_its_source_and_is_byte_stable(tmp_path):
    spec = DataSpec(resolution=8)
    first = save_prepared(spec, tmp_path / "a")
    second = save_prepared(spec, tmp_path / "b")
    assert first["sha256"] == second["sha256"], "preparing twice must give the same bytes (same DVC hash)"
    prepared = spec.model_copy(update={"prepared": str(tmp_path / "a")})
    for split in ("train", "test"):
        source, copy = load_dataset(spec, split), load_dataset(prepared, split)
        assert torch.equal(source.images, copy.images) and torch.equal(source.labels, copy.labels)
    assert first["counts"] == {"train": 1437, "test": 360}


def test_prepared_data_for_another_spec_or_changed_is_an_error(tmp_path):
    save_prepared(DataSpec(resolution=8), tmp_path)
    with pytest.raises(PreparedDataError, match="data.resolution: prepared 8, spec 16"):
        load_dataset(DataSpec(resolution=16, prepared=str(tmp_path)), "train")
    images = tmp_path / "test_images.npy"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF
    images.write_bytes(bytes(raw))
    with pytest.raises(PreparedDataError, match="test_images.npy"):
        check_prepared(DataSpec(resolution=8, prepared=str(tmp_path)), verify_checksums=True)


# -- checkpoint integrity and run folders -------------------------------------------------------

def _bundle(spec_dict: dict) -> dict:
    return {"step": 3, "model": {"w": torch.ones(4)}, "ema": {}, "optimizer": {}, "rng": {},
            "spec": spec_dict, "model_config": {}}


def test_a_changed_checkpoint_fails_its_integrity_check(tmp_path):
    path = save_bundle(tmp_path / "checkpoint_000003" / "checkpoint.pt", _bundle({}))
    assert load_bundle(path)["step"] == 3
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF  # one flipped byte still unpickles; only the checksum notices
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_bundle(path)
    with pytest.raises(RunFolderError, match="checkpoint_000003"):
        prepare_run_dir(load(ROOT / "experiments" / "tiny.yaml"), tmp_path, restart_if_changed=False)


def test_run_folder_of_another_spec_errors_or_restarts(tmp_path):
    spec = load(ROOT / "experiments" / "tiny.yaml")
    run_dir = tmp_path / "run"
    save_bundle(run_dir / "checkpoint_000003" / "checkpoint.pt", _bundle(spec.to_dict()))
    (run_dir / "spec.yaml").write_text(spec.to_yaml())
    prepare_run_dir(spec, run_dir, restart_if_changed=False)  # same spec: resumable
    other = load(ROOT / "experiments" / "tiny.yaml", ["train.lr=0.01"])
    evaluated_differently = load(ROOT / "experiments" / "tiny.yaml", ["evaluation.guidance=3"])
    prepare_run_dir(evaluated_differently, run_dir, restart_if_changed=False)  # evaluation is not training
    with pytest.raises(RunFolderError, match="train.lr"):
        prepare_run_dir(other, run_dir, restart_if_changed=False)
    prepare_run_dir(other, run_dir, restart_if_changed=True)
    assert not run_dir.exists(), "a changed spec with --restart-if-changed starts the run folder over"


# -- ditlab data add ----------------------------------------------------------------------------

def _image_folder(root: Path, per_class: int = 3, size=(12, 10)) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_data_add_validates_copies_and_tracks_with_dvc(tmp_path, monkeypatch, capsys):
    src = _image_folder(tmp_path / "incoming")
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    monkeypatch.chdir(project)
    code, out, err = _run_cli(["data", "add", str(src), "--name", "pets", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == 6 and result["classes"] == {"cats": 3, "dogs": 3}
    assert result["image_size"] == {"min": [12, 10], "max": [12, 10]}
    manifest = json.loads((project / "data" / "pets" / "manifest.json").read_text())
    assert manifest["sha256"] == result["sha256"] and manifest["name"] == "pets"
    assert (project / "data" / "pets.dvc").is_file()
    assert result["dvc_md5"] == dvc_md5(project / "data" / "pets") and result["dvc_md5"].endswith(".dir")
    # The name is what a spec uses; the images load as a folder dataset.
    spec = DataSpec(source="folder", name="pets", resolution=8, channels=3)
    assert spec.path == "data/pets"
    assert len(load_dataset(spec, "all")) == 6

    # A new version under the same name: a changed image changes the checksum and the DVC hash.
    Image.new("RGB", (12, 10), "white").save(src / "dogs" / "0.png")
    code, out, _ = _run_cli(["data", "add", str(src), "--name", "pets", "--json"], capsys)
    assert code == 0
    second = json.loads(out)
    assert second["sha256"] != result["sha256"] and second["dvc_md5"] != result["dvc_md5"]


def test_data_add_bad_input_names_the_problem_and_keeps_the_old_version(tmp_path, monkeypatch, capsys):
    src = _image_folder(tmp_path / "incoming")
    monkeypatch.chdir(tmp_path)
    assert _run_cli(["data", "add", str(src), "--name", "pets", "--no-dvc"], capsys)[0] == 0
    before = (tmp_path / "data" / "pets" / "manifest.json").read_text()
    (src / "cats" / "broken.png").write_bytes(b"not a png")
    code, _, err = _run_cli(["data", "add", str(src), "--name", "pets", "--no-dvc"], capsys)
    assert code == 2 and "broken.png" in err
    assert (tmp_path / "data" / "pets" / "manifest.json").read_text() == before
    code, _, err = _run_cli(["data", "add", str(src), "--name", "../escape", "--no-dvc"], capsys)
    assert code == 2 and "--name" in err
    code, _, err = _run_cli(["data", "add", str(tmp_path / "missing"), "--name", "x", "--no-dvc"], capsys)
    assert code == 2 and "missing" in err
    code, _, err = _run_cli(["data", "add", str(src), "--name", "pets"], capsys)
    assert code == 2 and "dvc init" in err, "without a DVC repository the error says how to make one"


# -- the pipeline under DVC ---------------------------------------------------------------------

def _env(mlflow_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=mlflow_uri, GIT_AUTHOR_NAME="ditlab test", GIT_AUTHOR_EMAIL="test@ditlab.invalid",
               GIT_COMMITTER_NAME="ditlab test", GIT_COMMITTER_EMAIL="test@ditlab.invalid")
    return env


class Repo:
    def __init__(self, path: Path, env: dict[str, str]):
        self.path, self.env = path, env

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), cwd=self.path, env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def dvc(self, *argv: str, check: bool = True) -> str:
        proc = self.run(sys.executable, "-m", "dvc", *argv, check=check)
        return proc.stdout + proc.stderr

    def git(self, *argv: str) -> str:
        return self.run("git", *argv).stdout

    def set_params(self, *overrides: str) -> None:
        raw = yaml.safe_load((self.path / "params.yaml").read_text())
        for assignment in overrides:
            apply_override(raw, assignment)
        (self.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def ran(output: str) -> set[str]:
    return {stage for stage in ("prepare", "train", "sample", "evaluate") if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def pipeline(mlflow_server, tmp_path_factory):
    """This repository's pipeline in a fresh git + DVC repository, on the tiny spec, reproduced once."""
    base = tmp_path_factory.mktemp("dvc")
    repo = Repo(base / "repo", _env(mlflow_server))
    repo.path.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "src"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, repo.path / name)
    (repo.path / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, repo.path / ".dvc" / name)
    spec = load(ROOT / "experiments" / "tiny.yaml", ["data.test_fraction=0.05", "resources.num_workers=1"])
    (repo.path / "params.yaml").write_text(spec.to_yaml())
    repo.git("init", "-q")
    repo.dvc("remote", "modify", "local", "url", str(base / "remote"))  # the project's default remote, moved
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "pipeline")
    repo.first_repro = repo.dvc("repro")
    return repo


@pytest.mark.e2e
def test_repro_runs_every_stage_and_tags_mlflow_runs(pipeline, mlflow_server):
    assert ran(pipeline.first_repro) == {"prepare", "train", "sample", "evaluate"}
    metrics = json.loads((pipeline.path / "pipeline" / "evaluation" / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["fid_num_fake"] == 20
    history = json.loads((pipeline.path / "pipeline" / "train" / "history.json").read_text())["history"]
    assert [h["step"] for h in history][-1] == 6
    shown = json.loads(pipeline.dvc("metrics", "show", "--json"))
    assert "fid" in json.dumps(shown)

    lock = yaml.safe_load((pipeline.path / "dvc.lock").read_text())
    data_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "pipeline/data")
    head = pipeline.git("rev-parse", "HEAD").strip()
    client = MlflowClient(mlflow_server)
    train_id = json.loads((pipeline.path / "pipeline" / "runs" / "train" / "tracking.json").read_text())["run_id"]
    train = client.get_run(train_id)
    assert train.data.tags["ditlab.data.dvc_md5"] == data_md5
    assert train.data.tags["mlflow.source.git.commit"] == head
    assert train.data.tags["ditlab.dvc.stage"] == "train"
    assert train.data.params["data.prepared"] == "pipeline/data"
    evaluation = client.get_run(json.loads(
        (pipeline.path / "pipeline" / "evaluation" / "evaluation.json").read_text())["mlflow_run_id"])
    assert evaluation.data.tags["mlflow.parentRunId"] == train_id, "the evaluate stage nests under the train run"
    assert evaluation.data.tags["ditlab.data.dvc_md5"] == data_md5
    assert evaluation.data.metrics["eval/fid"] == pytest.approx(metrics["fid"])


@pytest.mark.e2e
def test_second_repro_does_nothing(pipeline):
    out = pipeline.dvc("repro")
    assert UP_TO_DATE in out and not ran(out)


@pytest.mark.e2e
def test_a_parameter_change_reruns_only_the_stages_that_use_it(pipeline):
    pipeline.set_params("evaluation.guidance=1.5")
    out = pipeline.dvc("repro")
    assert ran(out) == {"sample", "evaluate"}, out
    samples = json.loads((pipeline.path / "pipeline" / "samples" / "samples.json").read_text())
    assert samples["guidance"] == 1.5
    assert UP_TO_DATE in pipeline.dvc("repro")


@pytest.mark.e2e
def test_an_unknown_key_in_params_fails_the_stage_naming_it(pipeline):
    original = (pipeline.path / "params.yaml").read_text()
    try:
        pipeline.set_params("train.warmup_stpes=3")
        out = pipeline.dvc("repro", check=False)
        assert "train.warmup_stpes" in out and "failed to reproduce 'train'" in out, out
    finally:
        (pipeline.path / "params.yaml").write_text(original)
    assert UP_TO_DATE in pipeline.dvc("repro")


@pytest.mark.e2e
def test_push_then_pull_into_a_fresh_clone_restores_everything(pipeline, tmp_path):
    pipeline.git("add", "-A")
    pipeline.git("commit", "-q", "-m", "pipeline results")
    pipeline.dvc("push")
    clone = Repo(tmp_path / "clone", pipeline.env)
    pipeline.run("git", "clone", "-q", str(pipeline.path), str(clone.path))
    assert not (clone.path / "pipeline" / "runs").exists(), "checkpoints come from the DVC remote, not git"
    clone.dvc("pull")

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "pipeline").rglob("*"))
                if p.is_file()}

    original, restored = files(pipeline.path), files(clone.path)
    assert restored.keys() == original.keys()
    assert [k for k in original if original[k] != restored[k]] == []
    assert any(k.endswith("checkpoint.pt") for k in restored)
    out = clone.dvc("repro")
    assert UP_TO_DATE in out and not ran(out)


@pytest.mark.e2e
def test_exp_run_sets_a_parameter_and_exp_show_lists_its_metrics(pipeline, mlflow_server):
    out = pipeline.dvc("exp", "run", "-S", "train.lr=0.003", "-n", "lr-3e-3")
    assert ran(out) == {"train", "sample", "evaluate"}, out
    shown = json.loads(pipeline.dvc("exp", "show", "--json"))
    experiments = [exp for entry in shown for exp in (entry.get("experiments") or [])]
    named = [e for e in experiments if e.get("name") == "lr-3e-3"]
    assert named, shown
    revs = named[0]["revs"][0]["data"]
    assert revs["params"]["params.yaml"]["data"]["train"]["lr"] == 0.003
    assert revs["metrics"]["pipeline/evaluation/metrics.json"]["data"]["fid"] > 0
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ditlab-tiny").experiment_id],
                              filter_string="tags.`ditlab.dvc.experiment` = 'lr-3e-3'")
    stages = sorted(r.data.tags.get("ditlab.dvc.stage") for r in runs)
    assert stages == ["evaluate", "train"]
    train = next(r for r in runs if r.data.tags["ditlab.dvc.stage"] == "train")
    assert train.data.params["train.lr"] == "0.003" and train.info.run_name == "lr-3e-3"


@pytest.mark.e2e
def test_a_corrupted_checkpoint_stops_the_train_stage_before_resuming(pipeline):
    checkpoint = sorted((pipeline.path / "pipeline" / "runs" / "train").glob("checkpoint_*/checkpoint.pt"))[-1]
    raw = bytearray(checkpoint.read_bytes())
    raw[-20] ^= 0xFF
    checkpoint.write_bytes(bytes(raw))
    out = pipeline.dvc("repro", check=False)
    assert "failed to reproduce 'train'" in out and "is corrupt" in out and checkpoint.parent.name in out, out
