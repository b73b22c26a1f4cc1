"""Running a sweep: its folder, its parent MLflow run, the Tuner, and the end (or an interrupt).

The sweep folder (<storage>/<name>) holds Tune's experiment (tune/), the trials' Train runs (train/),
and our records: the parent run id, trial runs, the best spec, the result. Ours stay outside tune/
because a restored Tune run uploads its local copy of that folder over the stored one when it ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ditlab.atomic import atomic_path, write_json
from ditlab.config import flatten
from ditlab.orchestration.ray_session import ensure_ray
from ditlab.orchestration.records import open_recorded_run
from ditlab.orchestration.tracking import Tracker
from ditlab.orchestration.tune.space import make_scheduler, make_search, param_space
from ditlab.orchestration.tune.summary import summarize
from ditlab.orchestration.tune.trial_runs import SweepTracking
from ditlab.orchestration.tune.trials import make_trainable, trial_dirname
from ditlab.sweep import PbtSettings, Sweep

# Tune checkpoints kept per trial under PBT: the latest is what another trial copies, and Tune
# warns that 2 or fewer can be deleted before the copy is made.
PBT_CHECKPOINTS_KEPT = 4
TUNE_DIR = "tune"  # Tune's experiment folder inside the sweep folder


class SweepFolderError(ValueError):
    """A sweep folder that cannot be started or resumed as asked."""


def sweep_folder(sweep: Sweep, storage: Path, name: str | None, resume: bool) -> Path:
    """The folder to run in: a new <storage>/<name> or, with `resume`, an existing one (the latest
    of this sweep when no name is given) whose recorded sweep spec equals this one."""
    if resume:
        if name is None:
            candidates = sorted(storage.glob(f"{sweep.spec.name}-*/sweep.yaml"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise SweepFolderError(f"--resume: no sweep named {sweep.spec.name}-* under {storage}")
            folder = candidates[-1].parent
        else:
            folder = storage / name
        if not (folder / TUNE_DIR / "tuner.pkl").is_file():
            raise SweepFolderError(f"--resume: {folder} holds no sweep to resume")
        recorded = yaml.safe_load((folder / "sweep.yaml").read_text())
        changed = sorted(k for k, v in flatten(sweep_record(sweep)).items() if flatten(recorded).get(k) != v)
        if changed:
            raise SweepFolderError(f"--resume: the sweep spec differs from the one {folder.name} started with "
                                   f"({', '.join(changed[:5])}); resume with the original or start a new --name")
        return folder
    folder = storage / (name or f"{sweep.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if folder.exists():
        raise SweepFolderError(f"sweep folder {folder} exists: pass --resume to continue it, or another --name")
    return folder


def sweep_record(sweep: Sweep) -> dict[str, Any]:
    return {"sweep": sweep.to_dict(), "base": sweep.base_raw}


def open_parent(sweep: Sweep, sweep_dir: Path) -> Tracker:
    """The sweep's parent MLflow run: reopened when the folder records one (`--resume`), else new."""
    tracker, resumed = open_recorded_run(sweep_dir, lambda: create_parent(sweep, sweep_dir))
    if resumed:
        tracker.set_tags({"ditlab.sweep_state": "running"})
    return tracker


def create_parent(sweep: Sweep, sweep_dir: Path) -> Tracker:
    tracker = Tracker.create(sweep.experiment, sweep_dir.name, tags={
        "ditlab.sweep": sweep.spec.name, "ditlab.kind": "sweep", "ditlab.sweep_dir": str(sweep_dir),
        "ditlab.sweep_state": "running"})
    s = sweep.spec
    tracker.log_params({"sweep.metric": s.metric, "sweep.mode": s.mode, "sweep.scheduler": s.scheduler.type,
                        "sweep.search": s.search.type, "sweep.num_samples": s.num_samples,
                        "sweep.max_concurrent": s.max_concurrent, "sweep.space": ", ".join(s.space),
                        **{f"scheduler.{k}": v for k, v in s.scheduler.model_dump().items() if k != "type"}})
    tracker.log_text(yaml.safe_dump(sweep_record(sweep), sort_keys=False), "sweep.yaml")
    return tracker


def build_tuner(sweep: Sweep, sweep_dir: Path, parent: Tracker, progress: bool, resume: bool) -> tune.Tuner:
    trainable = make_trainable(sweep, sweep_dir)
    if resume:
        # Finished and failed trials stay as they are; unfinished ones continue (see train_trial).
        return tune.Tuner.restore(str(sweep_dir / TUNE_DIR), trainable, resume_unfinished=True)
    s = sweep.spec
    pbt = isinstance(s.scheduler, PbtSettings)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=make_scheduler(sweep),
                                    search_alg=make_search(sweep), num_samples=s.num_samples,
                                    trial_dirname_creator=trial_dirname,
                                    # PBT restarts trials with another's checkpoint: keep the process.
                                    reuse_actors=pbt),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep_dir),
            callbacks=[SweepTracking(sweep, parent.run_id, sweep_dir)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS_KEPT if pbt else None),
            verbose=1 if progress else 0,
        ),
    )


def run_sweep(sweep: Sweep, *, address: str | None = None, storage_path: str | Path = "sweeps",
              name: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a sweep. Returns the summary also written to <sweep dir>/result.json."""
    storage = Path(storage_path).resolve()
    sweep_dir = sweep_folder(sweep, storage, name, resume)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        with atomic_path(sweep_dir / "sweep.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(sweep_record(sweep), sort_keys=False))
    ensure_ray(address)
    parent = open_parent(sweep, sweep_dir)
    try:
        results = build_tuner(sweep, sweep_dir, parent, progress, resume).fit()
        summary = summarize(sweep, sweep_dir, results, parent)
    except BaseException as err:
        stopped = isinstance(err, KeyboardInterrupt)  # a second Ctrl-C: Tune's state is saved all the same
        parent.set_tags({"ditlab.sweep_state": "interrupted" if stopped else "failed"})
        parent.end("KILLED" if stopped else "FAILED")
        raise
    write_json(sweep_dir / "result.json", summary)
    parent.log_artifact(sweep_dir / "result.json")
    parent.set_tags({"ditlab.sweep_state": "interrupted" if summary["interrupted"] else "finished"})
    parent.end("KILLED" if summary["interrupted"] else "FINISHED")
    return summary
