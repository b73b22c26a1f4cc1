"""DVC versioning: prepared data, `ditlab data add`, checkpoint integrity, and the shipped pipeline
(dvc.yaml + params.yaml of this repository, unchanged) under DVC in a temporary git repository:
every listed param set (no pipeline run), then one `dvc exp run` of the whole pipeline (train.steps,
the sampling budget and the test split lowered: LOWERED) that the other checks share: exp show,
MLflow tags, no-op repro, a parameter change, an unknown key, push/pull round trip to a fresh clone,
a corrupted checkpoint."""

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


@pytest.mark.e2e  # runs DVC
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
# The shipped dvc.yaml and params.yaml, unchanged, in a temporary git repository. Cheap check: DVC
# itself hashes every parameter every stage lists. End to end: one `dvc exp run` of the whole
# pipeline with only the LOWERED params changed; every later check reads that
# run, or works in its own `git clone` of it (sharing the DVC cache), so none depends on the order.

STAGES = ("prepare", "train", "sample", "evaluate")
EXPERIMENT = "shipped"
# A short run, small sample and reference sets (36 test images: the reference Inception pass over
# the 360 of the shipped split took a minute, over 90 about 20 s); KID's subsets fit the 10 samples.
# 4 sampling steps, not the shipped 20: the sample stage runs twice here (the exp run, then the
# guidance change), and at 20 steps each took about 25 s on 2 cores.
LOWERED = {"train.steps": 10, "evaluation.num_samples": 10, "evaluation.kid.subset_size": 10,
           "evaluation.steps": 4, "data.test_fraction": 0.02}
PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore")


def _env(mlflow_uri: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               GIT_AUTHOR_NAME="ditlab test", GIT_AUTHOR_EMAIL="test@ditlab.invalid",
               GIT_COMMITTER_NAME="ditlab test", GIT_COMMITTER_EMAIL="test@ditlab.invalid")
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
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

    def clone(self, dest: Path, shared_cache: bool = True) -> Repo:
        """A `git clone` of this repository; with `shared_cache`, its DVC outputs checked out (as
        copies) from this repository's cache, so nothing is recomputed or downloaded."""
        self.run("git", "clone", "-q", str(self.path), str(dest))
        clone = Repo(dest, self.env)
        if shared_cache:
            clone.dvc("cache", "dir", "--local", str(self.path / ".dvc" / "cache"))
            clone.dvc("config", "--local", "cache.type", "copy")  # a test may edit its files: never a link
            clone.dvc("checkout")
        return clone


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def _paths(entries) -> list[str]:
    """Paths of a stage's deps/outs/metrics/plots list: plain strings or {path: options}."""
    return [p for e in entries or [] for p in (e if isinstance(e, dict) else [e])]


def shipped_pipeline(dest: Path) -> dict:
    """Copy the pipeline as shipped (dvc.yaml, params.yaml, DVC config and every dependency that
    is in the repository, not made by a stage) to `dest`; returns dvc.yaml's stages."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    made = {p for s in stages.values() for key in ("outs", "metrics", "plots") for p in _paths(s.get(key))}
    sources = set(PIPELINE_FILES)
    for stage in stages.values():
        sources |= {p for p in _paths(stage.get("deps")) if p not in made}
        sources |= {f for p in stage.get("params") or [] if isinstance(p, dict) for f in p}  # other params files
    for name in sorted(sources):
        src, dst = ROOT / name, dest / name
        assert src.exists(), f"dvc.yaml depends on {name}, which is not in the repository"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        else:
            shutil.copy(src, dst)
    return stages


def _git_repo(path: Path, env: dict[str, str], message: str) -> Repo:
    repo = Repo(path, env)
    repo.git("init", "-q")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", message)
    return repo


def _with_placeholder_outputs(path: Path) -> tuple[Repo, dict]:
    """The shipped pipeline in a git repository at `path`, every output (and every dependency a
    stage makes) a placeholder, committed to DVC with `dvc commit --force`."""
    stages = shipped_pipeline(path)
    repo = _git_repo(path, _env(), "shipped pipeline")
    for stage in stages.values():
        for name in _paths(stage.get("deps")) + [p for k in ("outs", "metrics", "plots")
                                                 for p in _paths(stage.get(k))]:
            target = path / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.suffix:
                    target.write_text("{}\n")
                else:
                    target.mkdir()
                    (target / "placeholder").write_text("")
    repo.dvc("commit", "--force")
    return repo, stages


@pytest.mark.e2e  # runs DVC
def test_every_param_a_stage_lists_is_in_the_shipped_params_yaml(tmp_path):
    """`dvc repro` hashes a stage's params only after running it, so a missing one fails the stage
    after all its work (issue 10). `dvc status` cannot tell before: without a dvc.lock it calls
    params.yaml 'new', and `dvc params diff` lists only keys that exist. `dvc commit --force`
    hashes every stage's params the way repro does; placeholder outputs stand in for the results."""
    path = tmp_path / "repo"
    repo, stages = _with_placeholder_outputs(path)
    assert UP_TO_DATE in repo.dvc("status"), "dvc.lock records every param every stage lists"

    # The check itself: a listed key taken out of params.yaml fails it, naming the key.
    listed = [p for stage in stages.values() for p in stage.get("params") or [] if isinstance(p, str)]
    key = next((p for p in listed if "." in p), listed[0])
    raw = yaml.safe_load((path / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = repo.dvc("commit", "--force", check=False)
    assert f"Parameters '{key}' are missing from 'params.yaml'" in out, out


@pytest.mark.e2e  # runs DVC
def test_python_bytecode_in_a_source_dependency_changes_no_stage(tmp_path):
    """Importing ditlab writes __pycache__/ into the source folders the stages list (unless
    PYTHONDONTWRITEBYTECODE is set, as on the test machine), so without an ignore rule a second
    `dvc repro` reruns every stage."""
    repo, stages = _with_placeholder_outputs(tmp_path / "repo")
    folders = {p for stage in stages.values() for p in _paths(stage.get("deps"))
               if p.startswith("src/") and (repo.path / p).is_dir()}
    assert folders
    for folder in folders:
        (repo.path / folder / "__pycache__").mkdir(exist_ok=True)
        (repo.path / folder / "__pycache__" / "probe.cpython-311.pyc").write_bytes(b"\x00")
    out = repo.dvc("status")
    assert UP_TO_DATE in out, out


@pytest.fixture(scope="module")
def shipped(mlflow_server, tmp_path_factory):
    """The shipped pipeline in a fresh git + DVC repository, run once as `dvc exp run` with only
    the LOWERED params changed, then its results committed (as the README says). Tests only read
    it; tests that change anything work in a `clone`."""
    base = tmp_path_factory.mktemp("dvc")
    shipped_pipeline(base / "repo")
    repo = _git_repo(base / "repo", _env(mlflow_server), "shipped pipeline")
    repo.dvc("remote", "modify", "local", "url", str(base / "remote"))  # the project's default remote, moved
    repo.git("commit", "-q", "-am", "remote for the test")
    repo.baseline = repo.git("rev-parse", "HEAD").strip()
    repo.exp_run = repo.dvc("exp", "run", "-n", EXPERIMENT, *(f"-S{k}={v}" for k, v in LOWERED.items()))
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "pipeline results")
    return repo


@pytest.mark.e2e
def test_exp_run_of_the_shipped_pipeline_runs_every_stage_and_exp_show_lists_it(shipped):
    assert ran(shipped.exp_run) == set(STAGES), shipped.exp_run
    metrics = json.loads((shipped.path / "pipeline" / "evaluation" / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["fid_num_fake"] == LOWERED["evaluation.num_samples"]
    history = json.loads((shipped.path / "pipeline" / "train" / "history.json").read_text())["history"]
    assert history[-1]["step"] == LOWERED["train.steps"]
    assert "fid" in json.dumps(json.loads(shipped.dvc("metrics", "show", "--json")))

    shown = json.loads(shipped.dvc("exp", "show", "--json", "--rev", shipped.baseline))
    named = [e for entry in shown for e in entry.get("experiments") or [] if e.get("name") == EXPERIMENT]
    assert named, shown
    data = named[0]["revs"][0]["data"]
    expected = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in (f"{k}={v}" for k, v in LOWERED.items()):
        apply_override(expected, assignment)
    assert data["params"]["params.yaml"]["data"] == expected, "the shipped params, only LOWERED changed"
    assert data["metrics"]["pipeline/evaluation/metrics.json"]["data"]["fid"] == pytest.approx(metrics["fid"])


@pytest.mark.e2e
def test_the_train_and_evaluate_stages_are_tagged_mlflow_runs(shipped, mlflow_server):
    lock = yaml.safe_load((shipped.path / "dvc.lock").read_text())
    data_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "pipeline/data")
    client = MlflowClient(mlflow_server)
    experiment = yaml.safe_load((ROOT / "params.yaml").read_text())["tracking"]["experiment"]
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"tags.`ditlab.dvc.experiment` = '{EXPERIMENT}'")
    assert sorted(r.data.tags.get("ditlab.dvc.stage") for r in runs) == ["evaluate", "train"]
    train_id = json.loads((shipped.path / "pipeline" / "runs" / "train" / "tracking.json").read_text())["run_id"]
    train = client.get_run(train_id)
    assert train.info.run_name == EXPERIMENT and train.data.tags["ditlab.dvc.stage"] == "train"
    assert train.data.tags["ditlab.data.dvc_md5"] == data_md5
    assert train.data.tags["mlflow.source.git.commit"] == shipped.baseline
    assert train.data.params["data.prepared"] == "pipeline/data"
    assert train.data.params["train.steps"] == str(LOWERED["train.steps"])
    evaluation = client.get_run(json.loads(
        (shipped.path / "pipeline" / "evaluation" / "evaluation.json").read_text())["mlflow_run_id"])
    assert evaluation.data.tags["mlflow.parentRunId"] == train_id, "the evaluate stage nests under the train run"
    assert evaluation.data.tags["ditlab.data.dvc_md5"] == data_md5
    assert evaluation.data.tags["ditlab.dvc.experiment"] == EXPERIMENT
    metrics = json.loads((shipped.path / "pipeline" / "evaluation" / "metrics.json").read_text())
    assert evaluation.data.metrics["eval/fid"] == pytest.approx(metrics["fid"])


@pytest.mark.e2e
def test_second_repro_does_nothing(shipped):
    out = shipped.dvc("repro")
    assert UP_TO_DATE in out and not ran(out)


@pytest.mark.e2e
def test_a_parameter_change_reruns_only_the_stages_that_use_it(shipped, tmp_path):
    clone = shipped.clone(tmp_path / "clone")
    guidance = yaml.safe_load((clone.path / "params.yaml").read_text())["evaluation"]["guidance"] + 1.0
    clone.set_params(f"evaluation.guidance={guidance}")  # a scale the shipped params do not hold
    out = clone.dvc("repro")
    assert ran(out) == {"sample", "evaluate"}, out
    samples = json.loads((clone.path / "pipeline" / "samples" / "samples.json").read_text())
    assert samples["guidance"] == guidance
    assert UP_TO_DATE in clone.dvc("repro")


@pytest.mark.e2e
def test_an_unknown_key_in_params_fails_the_stage_naming_it(shipped, tmp_path):
    clone = shipped.clone(tmp_path / "clone")
    original = (clone.path / "params.yaml").read_text()
    clone.set_params("train.warmup_stpes=3")
    out = clone.dvc("repro", check=False)
    assert "train.warmup_stpes" in out and "failed to reproduce 'train'" in out, out
    (clone.path / "params.yaml").write_text(original)
    assert UP_TO_DATE in clone.dvc("repro"), "the failed stage left the last results in place"


@pytest.mark.e2e
def test_push_then_pull_into_a_fresh_clone_restores_everything(shipped, tmp_path):
    shipped.dvc("push")
    clone = shipped.clone(tmp_path / "clone", shared_cache=False)
    assert not (clone.path / "pipeline" / "runs").exists(), "checkpoints come from the DVC remote, not git"
    clone.dvc("pull")

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "pipeline").rglob("*"))
                if p.is_file()}

    original, restored = files(shipped.path), files(clone.path)
    assert restored.keys() == original.keys()
    assert [k for k in original if original[k] != restored[k]] == []
    assert any(k.endswith("checkpoint.pt") for k in restored)
    out = clone.dvc("repro")
    assert UP_TO_DATE in out and not ran(out)


@pytest.mark.e2e
def test_a_corrupted_checkpoint_stops_the_train_stage_before_resuming(shipped, tmp_path):
    clone = shipped.clone(tmp_path / "clone")
    checkpoint = sorted((clone.path / "pipeline" / "runs" / "train").glob("checkpoint_*/checkpoint.pt"))[-1]
    raw = bytearray(checkpoint.read_bytes())
    raw[-20] ^= 0xFF
    checkpoint.write_bytes(bytes(raw))
    out = clone.dvc("repro", check=False)
    assert "failed to reproduce 'train'" in out and "is corrupt" in out and checkpoint.parent.name in out, out
