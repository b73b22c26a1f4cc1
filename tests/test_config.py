import json

import pytest
from pydantic import ValidationError

from ditlab import cli
from ditlab.config import SpecError, flatten, load

from conftest import ROOT

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def test_quickstart_loads_with_overrides():
    overrides = ["train.steps=7", "train.lr=3e-4", "train.adam_betas=[0.9, 0.95]", "model.learn_sigma=true"]
    spec = load(QUICKSTART, overrides)
    assert spec.train.steps == 7 and spec.train.lr == pytest.approx(3e-4)
    assert spec.train.adam_betas == (0.9, 0.95) and spec.model.learn_sigma is True
    assert flatten(spec.to_dict())["diffusion.prediction"] == "v"


def test_model_depth_changes_the_presets_blocks_and_the_checkpoints_config():
    from ditlab.builders import build_dit
    from ditlab.models import model_from_config
    from ditlab.training.tasks.restoration import build_restoration_dit

    spec = load(QUICKSTART)
    assert spec.model.name == "DiT-Ti/4" and spec.model.depth == 4  # the quickstart's (BENCHMARKS.md)
    model = build_dit(spec, num_classes=10)
    assert len(model.blocks) == 4 and model.config.hidden_size == 128
    assert len(model_from_config(model.config.to_dict()).blocks) == 4  # what a checkpoint rebuilds
    assert len(build_dit(load(QUICKSTART, ["model.depth=null"]), num_classes=10).blocks) == 6  # the preset's
    assert len(build_restoration_dit(load(QUICKSTART, ["model.depth=2"]), num_classes=10).blocks) == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("data.bogus.deep=1", "data.bogus: unknown key"),
        ("train.steps=many", "train.steps: Input should be a valid integer"),
        ("data.resolution=18", "data.resolution: 18 is not divisible by the patch size 4 of DiT-Ti/4"),
        ("data.source=folder", "data.path: required"),
        ("train.batch_size=7", "train.batch_size: 7 does not split evenly"),
        ("model.name=DiT-Q/2", "model.name: unknown model"),
        ("model.depth=0", "model.depth: Input should be greater than or equal to 1"),
        ("diffusion.prediction=score", "diffusion.prediction: Input should be 'eps', 'v' or 'x0'"),
        ("trainsteps", "expected KEY=VALUE"),
        ("evaluation.kid.subset_size=500", "evaluation.kid.subset_size: 500 exceeds evaluation.num_samples"),
        ("evaluation.metrics=[fid, is]", "evaluation.metrics.1: Input should be"),
    ],
)
def test_spec_errors_name_the_field(override, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        load(QUICKSTART, [override])


def test_a_missing_dataset_folder_loads_but_fails_the_preflight(tmp_path, capsys):
    """Validation is pure (a checkpoint's spec loads on any machine); `ditlab run` checks the folder
    before Ray starts: one error line, exit 2, nothing written."""
    from ditlab.config import from_dict

    missing = tmp_path / "nope"
    spec = load(QUICKSTART, ["data.source=folder", f"data.path={missing}"])
    assert from_dict(spec.to_dict()).data.path == str(missing)
    code = cli.main(["run", str(QUICKSTART), "--set", "data.source=folder", "--set", f"data.path={missing}",
                     "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"ditlab: error: data.path: dataset folder '{missing}' does not exist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_spec_is_frozen():
    spec = load(QUICKSTART)
    with pytest.raises(ValidationError, match="frozen"):
        spec.train.steps = 3


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`ditlab ARGS` in this process, in the folder `cwd`: (exit status, stdout, stderr). The
    commands below end before Ray or MLflow start, so a subprocess would add only its start-up."""

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize(
    "extra,field",
    [
        (["--set", "train.unknown=1"], "train.unknown"),
        (["--set", "train.lr=fast"], "train.lr"),
        (["--set", "data.source=folder", "--set", "data.path=/no/such/dir"], "data.path"),
        (["--set", "data.resolution=15"], "data.resolution"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(run_cli, tmp_path, extra, field):
    code, _, stderr = run_cli("run", str(QUICKSTART), *extra, cwd=tmp_path)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditlab: error:") and field in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_dry_run_prints_resolved_spec(run_cli, tmp_path):
    code, stdout, stderr = run_cli("run", str(QUICKSTART), "--set", "train.steps=11", "--dry-run", "--json",
                                   cwd=tmp_path)
    assert code == 0, stderr
    assert json.loads(stdout)["train"]["steps"] == 11
    assert list(tmp_path.iterdir()) == []


def test_cli_sample_missing_checkpoint(run_cli, tmp_path):
    code, _, stderr = run_cli("sample", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert code == 2 and "nope.pt" in stderr and "not found" in stderr
    assert not (tmp_path / "out").exists()


def test_cli_empty_dataset_folder_is_caught_before_ray(run_cli, tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    code, _, stderr = run_cli("run", str(QUICKSTART), "--set", "data.source=folder",
                              "--set", f"data.path={tmp_path / 'data'}", cwd=tmp_path)
    assert code == 2 and "data.path" in stderr and "holds no images" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
