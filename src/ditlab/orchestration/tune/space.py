"""The search space, the scheduler and the search algorithm of a sweep, from its spec.

Schedulers count time in training steps (the `step` of each report), not in reports, and leave a
trial's last report alone (see StepASHA)."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from ditlab.sweep import AshaSettings, Distribution, PbtSettings, Sweep


def to_domain(dist: Distribution):
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    if dist.kind == "grid":
        return tune.grid_search(list(dist.values))
    if dist.kind == "uniform":
        return tune.uniform(dist.low, dist.high)
    if dist.kind == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    return tune.randint(int(dist.low), int(dist.high))


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Flat dotted keys, as `--set` and MLflow params write them."""
    return {key: to_domain(dist) for key, dist in sweep.spec.space.items()}


def expected_trials(sweep: Sweep) -> int:
    grid = 1
    for dist in sweep.spec.space.values():
        if dist.kind == "grid":
            grid *= len(dist.values)
    return sweep.spec.num_samples * grid


class StepASHA(ASHAScheduler):
    """ASHA in training steps that lets a trial's last report end the trial by itself.

    Stopping a trial at its final report (at max_t, or at a rung on the last step) kills its
    driver while the TorchTrainer is already shutting down; seen here, that left the worker
    group's placement group held and the next trials timed out waiting for CPUs."""

    def __init__(self, base_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.base_steps = base_steps

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        planned = int(trial.config.get("train.steps", self.base_steps))
        if decision == self.STOP and result.get("step", 0) >= planned:
            return self.CONTINUE
        return decision


class StepPBT(PopulationBasedTraining):
    """PBT in training steps that leaves a trial's last report alone: exploiting there would
    restart the trial from another's final checkpoint only to end it again."""

    def __init__(self, base_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.base_steps = base_steps

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) >= int(trial.config.get("train.steps", self.base_steps)):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(sweep: Sweep):
    """Schedulers count time in training steps (the `step` of each report), not in reports."""
    settings = sweep.spec.scheduler
    if isinstance(settings, AshaSettings):
        steps = sweep.max_steps()
        return StepASHA(sweep.base_spec.train.steps, time_attr="step", max_t=steps + 1,
                        grace_period=settings.grace_period or max(1, steps // 8),
                        reduction_factor=settings.reduction_factor)
    if isinstance(settings, PbtSettings):
        keys = settings.mutate or tuple(k for k, d in sweep.spec.space.items() if d.kind != "grid")
        mutations = {k: _mutation(sweep.spec.space[k]) for k in keys}
        return StepPBT(sweep.base_spec.train.steps, time_attr="step",
                       perturbation_interval=settings.perturbation_interval, hyperparam_mutations=mutations,
                       quantile_fraction=settings.quantile_fraction,
                       resample_probability=settings.resample_probability)
    return FIFOScheduler()


def _mutation(dist: Distribution):
    # PBT moves a listed value to a neighbour and scales a continuous one by 0.8 or 1.2.
    return list(dist.values) if dist.kind in ("choice", "grid") else to_domain(dist)


def make_search(sweep: Sweep):
    """Both limit concurrency themselves: TuneConfig's max_concurrent_trials is ignored with a
    BasicVariantGenerator instance (which we need for its seed), and it wraps Optuna the same way."""
    settings = sweep.spec.search
    if settings.type == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # TPE; metric and mode come from TuneConfig.
        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=sweep.spec.max_concurrent)
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=sweep.spec.max_concurrent)
