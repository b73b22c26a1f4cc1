"""The sweep spec: a base experiment, a search space over its fields, and how to search it.

    name: tiny-asha
    base: ../tiny.yaml              # an experiment spec, relative to this file (or its sections inline)
    set: {resources.num_workers: 1} # fixed overrides of the base, for every trial
    space:                          # dotted spec fields -> one distribution each
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      diffusion.schedule: {choice: [linear, cosine]}
    metric: val_loss
    mode: min
    scheduler: {type: asha, grace_period: 4}
    search: {type: random, seed: 0}
    num_samples: 4

Everything is checked before any trial starts: every field in the space must exist in the
experiment spec, and every value a distribution can produce (each choice, both ends of a range)
must pass the spec's own validation with the base, so a typo or a bad bound is a SpecError that
names the field, not a failed trial an hour later. This module imports no Ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ditlab.config import ExperimentSpec, SpecError, apply_override, check_name, from_dict, read_yaml

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Distribution(_Strict):
    """One search dimension, written `{kind: args}`: `{choice: [a, b]}`, `{grid: [a, b]}` (every
    value, crossed with the other grid dimensions), `{uniform: [low, high]}`, `{loguniform: [low,
    high]}` (low > 0), `{randint: [low, high]}` (integers, high exclusive, as in Tune)."""

    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in KINDS:
            kind, args = next(iter(raw.items()))
            if kind in ("choice", "grid"):
                if not isinstance(args, list):
                    raise ValueError(f"{kind} expects a list of values, got {args!r}")
                return {"kind": kind, "values": args}
            if not (isinstance(args, list) and len(args) == 2):
                raise ValueError(f"{kind} expects [low, high], got {args!r}")
            return {"kind": kind, "low": args[0], "high": args[1]}
        if isinstance(raw, dict) and "kind" in raw:
            return raw
        raise ValueError(f"expected one of {', '.join('{' + k + ': ...}' for k in KINDS)}, got {raw!r}")

    @model_serializer
    def _to_short_form(self) -> dict[str, Any]:
        if self.kind in ("choice", "grid"):
            return {self.kind: list(self.values)}
        low, high = (int(self.low), int(self.high)) if self.kind == "randint" else (self.low, self.high)
        return {self.kind: [low, high]}

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.kind} needs at least one value")
            return self
        low, high = self.low, self.high
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{self.kind} bounds must be finite numbers")
        if low >= high:
            raise ValueError(f"{self.kind} low ({low:g}) must be below high ({high:g})")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform low must be above 0, got {low:g}")
        if self.kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"randint bounds must be integers, got [{low:g}, {high:g}]")
        return self

    def extremes(self) -> list[Any]:
        """The values to check against the spec: each listed value, or both ends of the range
        (the largest value below `high`, since Tune samples the half-open [low, high))."""
        return [value for value, _ in self.checked_values()]

    def checked_values(self) -> list[tuple[Any, str]]:
        """(value, how an error names it) for each value `extremes` checks."""
        if self.kind in ("choice", "grid"):
            return [(v, f"value {v!r}") for v in self.values]
        if self.kind == "randint":
            return [(int(self.low), f"low {int(self.low)}"), (int(self.high) - 1, f"high-1 {int(self.high) - 1}")]
        return [(self.low, f"low {self.low:g}"), (math.nextafter(self.high, self.low), f"high {self.high:g}")]

    def bounds(self) -> tuple[float, float] | None:
        """Numeric (min, max) of the values it produces, where that makes sense."""
        values = self.extremes()
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return min(values), max(values)
        return None


class AshaSettings(_Strict):
    """Asynchronous successive halving: at each rung (grace_period * reduction_factor**k steps)
    only the best 1/reduction_factor of the trials that reached it continue."""

    type: Literal["asha"] = "asha"
    grace_period: int | None = Field(None, ge=1, description="steps before the first cut; default: steps // 8")
    reduction_factor: float = Field(3, gt=1)


class PbtSettings(_Strict):
    """Population based training: every `perturbation_interval` steps the bottom `quantile_fraction`
    of the trials copy a top trial's checkpoint and perturb (or resample) its hyperparameters."""

    type: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(..., ge=1, description="steps between exploit/explore decisions")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    mutate: tuple[str, ...] | None = Field(None, description="space fields PBT may change; default: all")


class NoScheduler(_Strict):
    type: Literal["none"] = "none"


Scheduler = Annotated[AshaSettings | PbtSettings | NoScheduler, Field(discriminator="type")]


class SearchSettings(_Strict):
    type: Literal["random", "optuna"] = "random"  # random also expands grid dimensions
    seed: int = 0


class TrialResources(_Strict):
    """Ray resources of a trial's driver: the function that runs a TorchTrainer (whose workers take
    `resources.*` of the experiment spec) or, under PBT, the training loop itself."""

    driver_cpus: float = Field(0.5, gt=0)


class SweepSpec(_Strict):
    name: str = "sweep"
    base: str | dict[str, Any] = Field(..., description="experiment spec path (relative to the sweep file) "
                                                        "or the experiment's sections inline")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted fields fixed for every trial")
    space: dict[str, Distribution]
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Scheduler = AshaSettings()
    search: SearchSettings = SearchSettings()
    num_samples: int = Field(8, ge=1, description="trials to sample (times the grid size, with grid)")
    max_concurrent: int = Field(2, ge=1)
    resources: TrialResources = TrialResources()
    experiment: str | None = Field(None, description="MLflow experiment; default: the base spec's")
    evaluate_best: bool = Field(False, description="give the best trial's last checkpoint its task's evaluation "
                                                   "(e.g. an autoencoder's rFID), logged on the parent run as "
                                                   "best_<figure>")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_name(name)  # sweep folders are named after it

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if not self.space:
            raise ValueError("space: needs at least one field to search")
        has_grid = [k for k, d in self.space.items() if d.kind == "grid"]
        if self.search.type == "optuna" and has_grid:
            raise ValueError(f"space.{has_grid[0]}: grid does not combine with search.type optuna; use choice")
        if isinstance(self.scheduler, PbtSettings):
            unknown = [k for k in self.scheduler.mutate or () if k not in self.space]
            if unknown:
                raise ValueError(f"scheduler.mutate: {unknown[0]!r} is not a field of the space")
        return self


class Sweep:
    """A validated sweep: the spec, the base experiment as a raw dict (overrides applied) and where
    it came from. `trial_spec(config)` is what every trial trains."""

    def __init__(self, spec: SweepSpec, base_raw: dict[str, Any], source: str):
        self.spec, self.base_raw, self.source = spec, base_raw, source

    def trial_spec(self, config: dict[str, Any], source: str = "trial") -> ExperimentSpec:
        raw = _deep_copy(self.base_raw)
        for key, value in config.items():
            set_field(raw, key, value)
        return from_dict(raw, source)

    @property
    def base_spec(self) -> ExperimentSpec:
        return from_dict(_deep_copy(self.base_raw), f"{self.source}: base")

    @property
    def experiment(self) -> str:
        return self.spec.experiment or self.base_spec.tracking.experiment

    def max_steps(self) -> int:
        """The most steps any trial trains (train.steps may itself be searched)."""
        steps = self.base_spec.train.steps
        dist = self.spec.space.get("train.steps")
        bounds = dist.bounds() if dist else None
        return int(max(steps, bounds[1])) if bounds else steps

    def to_dict(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(raw))


def set_field(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """raw['a']['b'] = value for 'a.b', creating sections on the way; validation comes after."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{'.'.join(parts[: i + 1])} is not a section")
    node[parts[-1]] = value


def _load_base(spec: SweepSpec, sweep_dir: Path, source: str, overrides: list[str]) -> dict[str, Any]:
    if isinstance(spec.base, str):
        path = (sweep_dir / spec.base).resolve()
        if not path.is_file():
            raise SpecError(f"{source}: base: experiment spec {spec.base!r} not found (looked at {path})")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: base: {path} is not a mapping of sections")
    else:
        raw = _deep_copy(spec.base)
    for key, value in spec.set.items():
        set_field(raw, key, value)
    for assignment in overrides:
        apply_override(raw, assignment)
    from_dict(_deep_copy(raw), f"{source}: base")  # the base alone must be a valid experiment
    return raw


def check_space(sweep: Sweep) -> None:
    """Every field of the space exists and every value its distribution can produce validates."""
    for key, dist in sweep.spec.space.items():
        for value, shown in dist.checked_values():
            try:
                sweep.trial_spec({key: value}, "")
            except SpecError as err:
                detail = str(err).removeprefix(": ")
                if "unknown key" in detail:
                    raise SpecError(f"{sweep.source}: space.{key}: not a field of the experiment spec") from None
                raise SpecError(f"{sweep.source}: space.{key}: {dist.kind} {shown} is not valid ({detail})") from None
            except (TypeError, ValueError) as err:  # set_field on something that is not a section
                raise SpecError(f"{sweep.source}: space.{key}: {err}") from None
    # One full combination as well: fields that depend on each other (batch size and workers).
    sweep.trial_spec({key: dist.extremes()[0] for key, dist in sweep.spec.space.items()}, f"{sweep.source}: space")


def check_scheduler(sweep: Sweep) -> None:
    """Settings that only make sense against the base experiment."""
    base, scheduler = sweep.base_spec, sweep.spec.scheduler
    metric = sweep.spec.metric
    # Figures a trial reports only when the base asks for them: without them Tune gets nothing to judge.
    if base.train.val_images == 0 and metric.startswith("val_"):
        raise SpecError(f"{sweep.source}: metric {metric} needs train.val_images > 0 in the base")
    if metric in ("fid", "kid") and base.train.eval_every is None:
        raise SpecError(f"{sweep.source}: metric {metric} needs train.eval_every in the base (FID and KID "
                        "during training)")
    if isinstance(scheduler, PbtSettings):
        workers = {sweep.trial_spec({k: v}, "").resources.num_workers
                   for k, d in sweep.spec.space.items() for v in d.extremes()} | {base.resources.num_workers}
        if workers != {1}:
            raise SpecError(f"{sweep.source}: scheduler pbt runs each trial in one process (PBT needs Tune "
                            "checkpoints); set resources.num_workers: 1 in `set`")
    if isinstance(scheduler, AshaSettings) and scheduler.grace_period and scheduler.grace_period >= sweep.max_steps():
        raise SpecError(f"{sweep.source}: scheduler.grace_period: {scheduler.grace_period} must be below "
                        f"train.steps ({sweep.max_steps()})")


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Load and check a sweep spec. `overrides` are `--set` assignments: `sweep.KEY=VALUE` changes
    the sweep spec itself (sweep.num_samples=2), anything else the base experiment (train.steps=50)."""
    source = str(path)
    p = Path(path)
    raw = read_yaml(p, "sweep spec") or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: top level must be a mapping")
    sweep_overrides = [o.removeprefix("sweep.") for o in overrides if o.startswith("sweep.")]
    for assignment in sweep_overrides:
        apply_override(raw, assignment)
    spec = from_dict(_with_flat_keys(raw), source, SweepSpec)
    base_raw = _load_base(spec, p.parent, source, [o for o in overrides if not o.startswith("sweep.")])
    sweep = Sweep(spec, base_raw, source)
    check_space(sweep)
    check_scheduler(sweep)
    return sweep


def _with_flat_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """`space` and `set` are keyed by dotted field names; `--set sweep.space.train.lr=...` arrives
    as nested dicts, so flatten those two mappings back to dotted keys (distributions stay whole)."""
    out = dict(raw)
    for section in ("space", "set"):
        if isinstance(raw.get(section), dict):
            out[section] = _flatten_until(raw[section], stop=section == "space")
    return out


def _flatten_until(d: dict[str, Any], stop: bool, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        is_distribution = isinstance(value, dict) and (set(value) & {*KINDS, "kind"})
        if isinstance(value, dict) and value and not (stop and is_distribution):
            flat.update(_flatten_until(value, stop, path + "."))
        else:
            flat[path] = value
    return flat


def best_spec_yaml(sweep: Sweep, config: dict[str, Any], name: str) -> str:
    """The base experiment with a trial's values applied, validated, as a ready spec file."""
    spec = sweep.trial_spec(config, f"{sweep.source}: best config")
    spec = spec.model_copy(update={"name": name})
    header = f"# Best trial of sweep {sweep.spec.name!r} ({sweep.source}): {sweep.spec.metric} ({sweep.spec.mode}).\n"
    return header + spec.to_yaml()
