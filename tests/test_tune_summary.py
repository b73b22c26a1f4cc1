"""The pure parts of a sweep's summary (orchestration/tune/summary.py), without Ray: each trial's row
and curve from what Tune's Result holds, the best trial, the totals and when a sweep counts as
interrupted. Tune's Result is stood in for by a dataclass with the fields the summary reads."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from ditlab.orchestration.tune.summary import best_trial, recorded_config, totals, trial_curve, trial_id_of, trial_row


@dataclass
class FakeResult:
    path: str
    metrics: dict | None = None
    config: dict | None = None
    error: Exception | None = None
    metrics_dataframe: pd.DataFrame | None = field(default=None)


def test_a_finished_trial_row_carries_its_config_metric_compute_and_run():
    result = FakeResult("/s/tune/trial_a1", {"trial_id": "a1", "step": 8, "val_loss": 0.25, "time_total_s": 10.0,
                                              "checkpoint_path": "/c"}, {"train.lr": 0.01})
    row = trial_row(result, {"state": "finished", "run_id": "r1"}, {"train.lr": 0.01}, "val_loss", workers=2)
    assert row == {"trial_id": "a1", "state": "finished", "config": {"train.lr": 0.01}, "last_step": 8,
                   "val_loss": 0.25, "worker_seconds": 20.0, "mlflow_run_id": "r1", "checkpoint": "/c"}


def test_a_failed_trial_without_a_record_is_failed_with_the_exception_line():
    error = RuntimeError("Traceback ...\nditlab.training.loop.TrainingDiverged: training loss is nan at step 3")
    result = FakeResult("/s/tune/trial_b2", {}, {}, error)
    row = trial_row(result, {}, {}, "val_loss", workers=1)
    assert row["trial_id"] == "b2" and row["state"] == "failed" and row["val_loss"] is None
    assert row["error"] == "ditlab.training.loop.TrainingDiverged: training loss is nan at step 3"
    assert trial_row(FakeResult("/s/tune/trial_c3"), {}, {}, "val_loss", 1)["state"] == "pending"


def test_trial_id_comes_from_the_metrics_else_from_the_folder():
    assert trial_id_of(FakeResult("/x/trial_q9", {"trial_id": "z1"})) == "z1"
    assert trial_id_of(FakeResult("/x/trial_q9", None)) == "q9"


def test_a_curve_holds_the_metric_over_the_steps_without_gaps():
    frame = pd.DataFrame({"step": [2, 3, 4, 6], "val_loss": [0.5, None, 0.4, 0.3]})
    curve = trial_curve(FakeResult("/p", metrics_dataframe=frame), "a1", "stopped_early", "val_loss")
    assert curve == {"label": "a1", "state": "stopped early", "steps": [2, 4, 6], "values": [0.5, 0.4, 0.3]}
    empty = trial_curve(FakeResult("/p"), "b2", "failed", "val_loss")
    assert empty["steps"] == [] and empty["values"] == []


def rows(*specs):
    return [{"trial_id": t, "state": s, "val_loss": v, "worker_seconds": w, "last_step": n}
            for t, s, v, w, n in specs]


def test_the_best_trial_skips_failed_and_metricless_ones_and_follows_the_mode():
    trials = rows(("a", "finished", 0.3, 1, 8), ("b", "failed", 0.1, 1, 2), ("c", "stopped_early", 0.2, 1, 4),
                  ("d", "finished", None, 1, 8))
    assert best_trial(trials, "val_loss", "min")["trial_id"] == "c"
    assert best_trial(trials, "val_loss", "max")["trial_id"] == "a"
    assert best_trial(rows(("b", "failed", 0.1, 1, 2)), "val_loss", "min") is None


@pytest.mark.parametrize("states,expected,interrupted", [
    (("finished", "stopped_early", "failed"), 3, False),
    (("finished", "interrupted", "finished"), 3, True),   # a trial Ctrl-C stopped
    (("finished", "finished"), 3, True),                  # a trial never started
])
def test_totals_count_states_and_compute_and_tell_an_interrupted_sweep(states, expected, interrupted):
    trials = rows(*[(str(i), s, 0.1, 10.0, 4) for i, s in enumerate(states)])
    result = totals(trials, expected)
    assert result["interrupted"] is interrupted
    assert result["worker_seconds"] == 10.0 * len(states) and result["steps_trained"] == 4 * len(states)
    assert sum(result["states"].values()) == len(states) == result["num_trials"]


def test_a_restored_trial_that_never_reported_takes_its_config_from_params_json(tmp_path: Path):
    (tmp_path / "params.json").write_text(json.dumps({"train.lr": 0.003}))
    assert recorded_config(tmp_path) == {"train.lr": 0.003}
    assert recorded_config(tmp_path / "missing") == {}
