"""Sweep specs without Ray: parsing, the checks that run before any trial, the exported best spec."""

import json

import pytest
import yaml

from ditlab import cli
from ditlab.config import SpecError, load
from ditlab.sweep import best_spec_yaml, load_sweep

from conftest import ROOT

SWEEPS = ROOT / "experiments" / "sweeps"
TINY = SWEEPS / "tiny.yaml"


def write_sweep(tmp_path, **fields):
    raw = {"name": "t", "base": str(ROOT / "experiments" / "tiny.yaml"),
           "space": {"train.lr": {"uniform": [1e-4, 1e-3]}}}
    raw.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name, metric", [("tiny.yaml", "val_loss"), ("tiny-pbt.yaml", "val_loss"),
                                          ("quickstart.yaml", "fid")])
def test_shipped_sweeps_load(name, metric):
    sweep = load_sweep(SWEEPS / name)
    assert sweep.spec.space and sweep.spec.metric == metric
    assert sweep.base_spec.train.val_images > 0


def test_the_quickstart_sweep_searches_the_diffusion_process_judged_by_fid_at_every_rung():
    """val_loss does not compare across schedules and prediction targets; FID does. Trials report it
    every train.eval_every steps, so each ASHA rung (grace_period * reduction_factor**k) must be one
    of those steps, or the rung would judge a stale figure."""
    sweep = load_sweep(SWEEPS / "quickstart.yaml")
    assert {"diffusion.schedule", "diffusion.prediction", "loss.adversarial_weight"} <= set(sweep.spec.space)
    assert 0.0 in sweep.spec.space["loss.adversarial_weight"].values  # the term's absence is a candidate
    every, asha = sweep.base_spec.train.eval_every, sweep.spec.scheduler
    rungs, rung = [], asha.grace_period
    while rung < sweep.max_steps():
        rungs.append(rung)
        rung *= asha.reduction_factor
    assert every and rungs and all(r % every == 0 for r in rungs)


def test_base_is_relative_to_the_sweep_file_and_set_applies():
    sweep = load_sweep(TINY)
    base = sweep.base_spec
    assert base.name == "tiny" and base.train.steps == 8 and base.resources.num_workers == 1


def test_set_routes_sweep_fields_and_base_fields():
    sweep = load_sweep(TINY, ["sweep.num_samples=2", "train.steps=6", "sweep.space.train.lr={grid: [0.001, 0.002]}"])
    assert sweep.spec.num_samples == 2
    assert sweep.base_spec.train.steps == 6
    assert sweep.spec.space["train.lr"].kind == "grid" and sweep.spec.space["train.lr"].values == (0.001, 0.002)
    assert set(sweep.spec.space) == {"train.lr", "train.warmup_steps", "diffusion.schedule"}


def test_inline_base(tmp_path):
    path = write_sweep(tmp_path, base={"model": {"name": "DiT-N/2"}, "data": {"resolution": 8}})
    sweep = load_sweep(path)
    assert sweep.base_spec.model.name == "DiT-N/2" and sweep.base_spec.data.resolution == 8


def test_trial_spec_applies_sampled_values():
    sweep = load_sweep(TINY)
    spec = sweep.trial_spec({"train.lr": 0.0042, "diffusion.schedule": "linear", "train.warmup_steps": 1})
    assert (spec.train.lr, spec.diffusion.schedule, spec.train.warmup_steps) == (0.0042, "linear", 1)
    assert spec.train.steps == 8  # from `set`


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"uniform": [0.1, 0.2]}}, "space.train.lrr: not a field of the experiment spec"),
    ({"optim.lr": {"choice": [1, 2]}}, "space.optim.lr: not a field of the experiment spec"),
    ({"train.lr": {"uniform": [0.2, 0.1]}}, "space.train.lr: uniform low (0.2) must be below high (0.1)"),
    ({"train.lr": {"loguniform": [0.0, 0.1]}}, "space.train.lr: loguniform low must be above 0"),
    ({"train.lr": {"loguniform": [1e-3, 1e-3]}}, "space.train.lr: loguniform low (0.001) must be below high"),
    ({"model.name": {"choice": []}}, "space.model.name: choice needs at least one value"),
    ({"train.steps": {"randint": [1.5, 4]}}, "space.train.steps: randint bounds must be integers"),
    ({"train.lr": {"uniform": [0.1]}}, "space.train.lr: uniform expects [low, high]"),
    ({"train.lr": [0.1, 0.2]}, "space.train.lr: expected one of {choice: ...}"),
    ({"train.ema_decay": {"uniform": [0.9, 1.5]}}, "space.train.ema_decay: uniform high 1.5 is not valid"),
    ({"model.name": {"choice": ["DiT-N/2", "DiT-Q/9"]}}, "space.model.name: choice value 'DiT-Q/9' is not valid"),
    ({"train.batch_size": {"grid": [16, 15]}}, "space.train.batch_size: grid value 15 is not valid"),
])
def test_bad_space_is_an_error_naming_the_field(tmp_path, space, message):
    base = {"resources.num_workers": 2}  # so that an odd batch size cannot split over the workers
    with pytest.raises(SpecError) as err:
        load_sweep(write_sweep(tmp_path, space=space, set=base))
    assert message in str(err.value)


@pytest.mark.parametrize("fields, message", [
    ({"space": {}}, "space: needs at least one field"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 2}}, "scheduler pbt runs each trial in one process"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.pbt.perturbation_interval: Field required"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler"),
    ({"search": {"type": "optuna"}, "space": {"train.lr": {"grid": [0.1, 0.2]}}}, "grid does not combine with"),
    ({"scheduler": {"type": "asha", "grace_period": 6}}, "scheduler.grace_period: 6 must be below train.steps (6)"),
    ({"num_samples": 0}, "num_samples"),
    ({"metrik": "val_loss"}, "metrik: unknown key"),
    ({"set": {"train.val_images": 0}}, "metric val_loss needs train.val_images > 0"),
    ({"metric": "fid"}, "metric fid needs train.eval_every in the base"),
    ({"base": "missing.yaml"}, "base: experiment spec 'missing.yaml' not found"),
])
def test_bad_sweep_settings(tmp_path, fields, message):
    fields.setdefault("set", {})
    if "pbt" in json.dumps(fields.get("scheduler", {})) and "perturbation_interval" in json.dumps(fields):
        fields["set"]["resources.num_workers"] = 2
    with pytest.raises(SpecError) as err:
        load_sweep(write_sweep(tmp_path, **fields))
    assert message in str(err.value)


def test_max_steps_follows_a_searched_step_count(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, space={"train.steps": {"randint": [4, 12]}}))
    assert sweep.max_steps() == 11


def test_best_spec_is_a_ready_experiment_spec(tmp_path):
    sweep = load_sweep(TINY)
    text = best_spec_yaml(sweep, {"train.lr": 0.0031, "diffusion.schedule": "linear"}, "tiny-best")
    path = tmp_path / "best.yaml"
    path.write_text(text)
    spec = load(path)
    assert spec.name == "tiny-best" and spec.train.lr == 0.0031 and spec.diffusion.schedule == "linear"
    assert spec.train.steps == 8 and spec.resources.num_workers == 1
    assert cli.main(["run", str(path), "--dry-run"]) == 0


def test_cli_dry_run_prints_sweep_and_base(capsys):
    assert cli.main(["tune", str(TINY), "--dry-run", "--json", "--set", "sweep.num_samples=3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sweep"]["num_samples"] == 3
    assert record["sweep"]["space"]["train.lr"] == {"loguniform": [1e-4, 1e-2]}
    assert record["base"]["train"]["steps"] == 8
