"""`ditlab tune`: a Ray Tune sweep over an experiment spec, tracked as nested MLflow runs.

    space.py       search space, scheduler (in training steps) and search algorithm
    trials.py      what runs for one trial (a TorchTrainer driver, or the loop itself under PBT)
    trial_runs.py  one nested MLflow run per trial, fed by a Tune callback
    summary.py     per-trial rows, the best trial, totals, the best spec and the comparison plot
    sweep.py       the sweep folder, the parent run, the Tuner, `run_sweep`
"""

from ditlab.orchestration.tune.space import expected_trials, make_scheduler, make_search, param_space
from ditlab.orchestration.tune.summary import best_trial, summarize, totals, trial_curve, trial_row
from ditlab.orchestration.tune.sweep import SweepFolderError, run_sweep, sweep_folder
from ditlab.orchestration.tune.trial_runs import ENDED_STATES, SweepTracking, TrialRuns, error_summary

__all__ = ["ENDED_STATES", "SweepFolderError", "SweepTracking", "TrialRuns", "best_trial", "error_summary",
           "expected_trials", "make_scheduler", "make_search", "param_space", "run_sweep", "summarize",
           "sweep_folder", "totals", "trial_curve", "trial_row"]
