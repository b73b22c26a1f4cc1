"""`ditlab evaluate --fake DIR|CHECKPOINT`: the evaluation suite's figures, written and tracked."""

from __future__ import annotations

import time
from pathlib import Path

from ditlab.cli.common import BadInput, emit, stdout_for, writable_folder
from ditlab.config import load


def register(sub, shared) -> None:
    ev = sub.add_parser("evaluate", parents=shared.evaluate,
                        help="FID, KID, precision/recall, IS or classifier score of images or a checkpoint")
    ev.add_argument("--fake", required=True, help="folder of PNG/JPEG images, or a checkpoint to sample from")
    ev.add_argument("--real", help="folder of images, or a dataset: digits[:train|test|all] "
                                   "(default for a checkpoint: its own dataset's split)")
    ev.add_argument("--protocol", help="evaluation protocol (YAML), e.g. evaluation/digits.yaml "
                                       "(default: a checkpoint's own evaluation settings)")
    ev.add_argument("--spec", help="an experiment spec (e.g. params.yaml): its evaluation section is the protocol, "
                                   "its data (at evaluation.reference_split) the default --real, its "
                                   "tracking.experiment the MLflow experiment")
    ev.add_argument("--out", help="where evaluation.json and samples.png go (default: evaluations/<time>)")
    ev.add_argument("--experiment", default="ditlab-evaluation", help="MLflow experiment for folder evaluations")
    ev.set_defaults(handler=cmd_evaluate)


def protocol(args):
    """The protocol file with --set applied; with --set alone, a checkpoint's own settings with it."""
    from ditlab.config import EvaluationSpec, apply_override, from_dict
    from ditlab.training.checkpoint import is_checkpoint, load_bundle

    if args.protocol is not None:
        return load(args.protocol, args.overrides, EvaluationSpec)
    if args.spec is not None:
        return load(args.spec, args.overrides).evaluation
    if not args.overrides:
        return None
    raw = dict(load_bundle(args.fake)["spec"]["evaluation"]) if is_checkpoint(args.fake) else {}
    for assignment in args.overrides:
        apply_override(raw, assignment)
    return from_dict(raw, "--set", EvaluationSpec)


def cmd_evaluate(args) -> int:
    from ditlab.evaluation.features import WeightsNotFound
    from ditlab.evaluation.images import ImageSetError
    from ditlab.training.checkpoint import CheckpointError

    if not Path(args.fake).exists():
        raise BadInput(f"--fake: {args.fake!r} does not exist")
    if args.protocol and args.spec:
        raise BadInput("--protocol and --spec: give one of them")
    if args.out:
        writable_folder("--out", args.out)
    try:
        ev = protocol(args)
    except CheckpointError as err:  # --set alone reads the checkpoint's own settings
        raise BadInput(str(err)) from None
    from ditlab.orchestration.evaluate import run_evaluation

    out = args.out or f"evaluations/{time.strftime('%Y%m%d-%H%M%S')}"
    real, experiment = args.real, args.experiment
    if args.spec:
        spec = load(args.spec, args.overrides)
        real = real or spec.data
        experiment = spec.tracking.experiment
    try:
        with stdout_for(args):
            summary = run_evaluation(args.fake, real, ev, out, experiment, not args.no_progress)
    except (ImageSetError, CheckpointError, WeightsNotFound, ValueError) as err:
        raise BadInput(str(err)) from None
    emit(args, summary, report_text(summary, out))
    return 0


def report_text(summary: dict, out: str) -> str:
    lines = [f"  {key:28s} {value:.6g}" for key, value in sorted(summary["figures"].items())]
    lines += [f"  {key:28s} {value}" for key, value in sorted(summary["notes"].items())]
    lines.append(f"wrote {Path(out) / 'evaluation.json'}; mlflow run {summary['mlflow_run_id']}")
    return "\n".join(lines)
