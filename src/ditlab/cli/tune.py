"""`ditlab tune SWEEP`: a Ray Tune sweep, one nested MLflow run per trial."""

from __future__ import annotations

from pathlib import Path

from ditlab.cli.common import (EXIT_INTERRUPTED, BadInput, emit, preflight_or_bad_input, print_spec, safe_name,
                               stdout_for, writable_folder)


def register(sub, shared) -> None:
    tune = sub.add_parser("tune", parents=[*shared.ray, *shared.output],
                          help="search hyperparameters with Ray Tune; one nested MLflow run per trial")
    tune.add_argument("sweep", help="sweep spec (YAML), e.g. experiments/sweeps/quickstart.yaml")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field of the base experiment (train.steps=50) or, prefixed with sweep., "
                           "of the sweep spec (sweep.num_samples=4) (repeatable)")
    tune.add_argument("--storage", default="sweeps", help="where sweeps are kept (default: ./sweeps)")
    tune.add_argument("--name", help="sweep folder name (default: <sweep name>-<time>)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep (--name, default: the "
                                                            "latest of this sweep); finished trials are not rerun")
    tune.add_argument("--dry-run", action="store_true",
                      help="check the sweep, print it, its base spec and the number of trials it asks for, exit")
    tune.set_defaults(handler=cmd_tune)


def cmd_tune(args) -> int:
    from ditlab.sweep import load_sweep

    safe_name("--name", args.name)
    writable_folder("--storage", args.storage)
    sweep = load_sweep(args.sweep, args.overrides)  # every check that needs no Ray, before any trial
    if args.dry_run:
        from ditlab.orchestration.tune.space import expected_trials

        print_spec(args, {"sweep": sweep.to_dict(), "base": sweep.base_spec.to_dict(),
                          "trials": expected_trials(sweep)})
        return 0
    preflight_or_bad_input(sweep.base_spec)
    from ditlab.orchestration.tune import SweepFolderError, run_sweep

    try:
        with stdout_for(args):
            summary = run_sweep(sweep, address=args.address, storage_path=args.storage, name=args.name,
                                resume=args.resume, progress=not args.no_progress)
    except SweepFolderError as err:
        raise BadInput(str(err)) from None
    resume_hint = f"ditlab tune {args.sweep} --resume --name {Path(summary['sweep_dir']).name}"
    emit(args, {**summary, "resume_command": resume_hint} if summary["interrupted"] else summary,
         sweep_text(summary, resume_hint))
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def sweep_text(summary: dict, resume_hint: str) -> str:
    metric = summary["metric"]
    lines = [f"sweep:      {summary['sweep']}  ({summary['sweep_dir']})"]
    for t in summary["trials"]:
        value = t.get(metric)
        shown = f"{value:.5f}" if isinstance(value, float) else "-"
        config = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        lines.append(f"  {t['trial_id']}  {t['state']:13s} step {t['last_step']:5d}  {metric} {shown}  {config}")
    best = summary["best"]
    if best:
        lines.append(f"best:       {best['trial_id']}  {metric}={best[metric]:.5f}")
        lines.append(f"best spec:  {summary['best_spec']}  (ditlab run {summary['best_spec']})")
    lines.append(f"compute:    {summary['worker_seconds']:.0f} worker-seconds, "
                 f"{summary['steps_trained']} steps trained")
    lines.append(f"mlflow run: {summary['mlflow_run_id']}")
    lines.append(f"dashboard:  {summary['mlflow_url']}")
    if summary["interrupted"]:
        lines.append(f"interrupted: resume with  {resume_hint}")
    return "\n".join(lines)
