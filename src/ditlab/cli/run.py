"""`ditlab run SPEC` (train, evaluate, track) and `ditlab train SPEC` (the same without the evaluation)."""

from __future__ import annotations

from ditlab.cli.common import (BadInput, emit, load_spec, preflight_or_bad_input, safe_name, stdout_for,
                               writable_folder)
from ditlab.storage import StorageError, check_storage, is_remote


def register(sub, shared) -> None:
    run = sub.add_parser("run", parents=shared.spec_command,
                         help="train a spec on Ray, evaluate it, log everything to MLflow")
    train = sub.add_parser("train", parents=shared.spec_command,
                           help="as run, without the final evaluation (the DVC pipeline's train stage)")
    for p in (run, train):
        p.add_argument("--storage", default="runs", help="where runs and checkpoints are kept: a folder, or object "
                                                         "storage as s3://BUCKET/PREFIX (default: ./runs)")
        p.add_argument("--name", help="run name; rerunning with the same name resumes from its last checkpoint")
        p.add_argument("--restart-if-changed", action="store_true",
                       help="if the run folder --name holds a run of another spec, start it over (default: error)")
        p.add_argument("--skip-corrupt-checkpoints", action="store_true",
                       help="resume from the newest checkpoint that passes its integrity check, setting corrupt "
                            "ones aside in <run>/corrupt/ (default: a corrupt checkpoint is an error)")
        p.add_argument("--export", metavar="DIR", help="also copy metrics.json, history.json and loss_curve.png "
                                                       "to DIR")
        p.set_defaults(handler=cmd_run)


def check_folders(args) -> None:
    """--name is one folder inside --storage, which is a folder; a run folder that is a link is
    refused (--restart-if-changed removes run folders). An s3:// --storage: its bucket exists and
    takes the credentials, checked before Ray starts."""
    safe_name("--name", args.name)
    if args.export:
        writable_folder("--export", args.export)
    if is_remote(args.storage):
        try:
            check_storage("--storage", args.storage)
        except StorageError as err:
            raise BadInput(str(err)) from None
        return
    storage = writable_folder("--storage", args.storage)
    if args.name and (storage / args.name).is_symlink():
        raise BadInput(f"--name: {str(storage / args.name)!r} is a symbolic link; a run folder must be a folder "
                       "inside --storage")


def cmd_run(args) -> int:
    check_folders(args)
    spec = load_spec(args)
    if spec is None:  # --dry-run
        return 0
    preflight_or_bad_input(spec)
    from ditlab.orchestration.tracking import TrackingUnavailable  # heavy imports only when needed
    from ditlab.orchestration.train import NodeLost, RunFolderError, run_experiment

    try:
        with stdout_for(args):
            summary = run_experiment(spec, address=args.address, storage_path=args.storage,
                                     run_name=args.name, progress=not args.no_progress,
                                     evaluate=args.command == "run", restart_if_changed=args.restart_if_changed,
                                     export_dir=args.export, skip_corrupt_checkpoints=args.skip_corrupt_checkpoints)
    except (RunFolderError, TrackingUnavailable) as err:
        raise BadInput(str(err)) from None
    except NodeLost as err:  # not bad input, but as plain: one line, exit 1
        import sys

        from ditlab.cli import error_line

        sys.stderr.write(error_line(str(err)))
        return 1
    emit(args, summary, summary_text(summary))
    return 0


def summary_text(summary: dict) -> str:
    lines = [f"run:        {summary['run_name']}  ({summary['run_dir']})",
             f"checkpoint: {summary['checkpoint']}",
             f"mlflow run: {summary['mlflow_run_id']}",
             f"dashboard:  {summary['mlflow_url']}"]
    for key, value in sorted(summary["metrics"].items()):
        lines.append(f"  {key:28s} {value:.6g}" if isinstance(value, float) else f"  {key:28s} {value}")
    return "\n".join(lines)
