"""The `ditlab` command: one way in.

    ditlab run SPEC [--set a.b=c ...] [--address ADDR] [--name NAME] [--dry-run] [--json]
    ditlab sample CHECKPOINT --num N --out DIR [--labels 0,1,2] [--sampler ddim] [--steps S] [--guidance W]

Bad input (a spec error, a missing checkpoint) prints one `ditlab: error: ...` line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from ditlab.config import SpecError, load

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    pass


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="experiment spec (YAML), e.g. experiments/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditlab", description="Train, sample and evaluate diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a spec on Ray, evaluate it, log everything to MLflow")
    _add_spec_args(run)
    run.add_argument("--address", help="Ray cluster to join (ray://head:10001 or auto); default: start a local one")
    run.add_argument("--storage", default="runs", help="where runs and checkpoints are kept (default: ./runs)")
    run.add_argument("--name", help="run name; rerunning with the same name resumes from its last checkpoint")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sample = sub.add_parser("sample", help="draw class-conditional samples from a checkpoint as PNG files")
    sample.add_argument("checkpoint", help="checkpoint.pt or a checkpoint folder holding it")
    sample.add_argument("--num", type=int, default=100, help="number of images (default 100)")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--labels", help="comma-separated class labels, cycled to --num (default: all classes in turn)")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], help="default: the spec's evaluation.sampler")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the spec's evaluation.steps)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--weights", choices=["ema", "model"], default="ema")
    sample.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")

    ev = sub.add_parser("evaluate", help="FID, KID, precision/recall, IS or classifier score of images or a checkpoint")
    ev.add_argument("--fake", required=True, help="folder of PNG/JPEG images, or a checkpoint to sample from")
    ev.add_argument("--real", help="folder of images, or a dataset: digits[:train|test|all] "
                                   "(default for a checkpoint: its own dataset's split)")
    ev.add_argument("--protocol", help="evaluation protocol (YAML), e.g. evaluation/digits.yaml "
                                       "(default: a checkpoint's own evaluation settings)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a protocol field, e.g. --set kid.subset_size=50")
    ev.add_argument("--out", help="where evaluation.json and samples.png go (default: evaluations/<time>)")
    ev.add_argument("--experiment", default="ditlab-evaluation", help="MLflow experiment for folder evaluations")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return parser


def _print_summary(summary: dict) -> None:
    print(f"run:        {summary['run_name']}  ({summary['run_dir']})")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"mlflow run: {summary['mlflow_run_id']}")
    print(f"dashboard:  {summary['mlflow_url']}")
    for key, value in sorted(summary["metrics"].items()):
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")


def preflight(spec) -> None:
    """Checks that would otherwise fail inside the Ray workers, after the run folder exists."""
    if spec.data.source == "folder":
        from ditlab.data.folder import scan_image_folder

        try:
            scan_image_folder(spec.data.path)
        except (OSError, ValueError) as err:
            raise BadInput(f"data.path: {err}") from None


def cmd_run(args) -> int:
    spec = load(args.spec, args.overrides)
    if args.dry_run:
        sys.stdout.write(json.dumps(spec.to_dict(), indent=2) + "\n" if args.json else spec.to_yaml())
        return 0
    preflight(spec)
    from ditlab.orchestration.train import run_experiment  # heavy imports only when needed

    # With --json, stdout carries exactly one JSON object: everything else goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = run_experiment(spec, address=args.address, storage_path=args.storage,
                                 run_name=args.name, progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)
    return 0


def _parse_labels(text: str | None, num_classes: int) -> list[int] | None:
    if text is None:
        return None
    try:
        labels = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BadInput(f"--labels: expected comma-separated integers, got {text!r}") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not labels or bad:
        raise BadInput(f"--labels: each label must be in [0, {num_classes - 1}], got {text!r}")
    return labels


def cmd_sample(args) -> int:
    import torch

    from ditlab.atomic import write_json
    from ditlab.sampling import balanced_labels, generate, load_for_sampling, save_pngs
    from ditlab.training.checkpoint import CheckpointError

    if args.num < 1:
        raise BadInput(f"--num: must be at least 1, got {args.num}")
    try:
        ckpt = load_for_sampling(args.checkpoint, args.weights)
    except CheckpointError as err:
        raise BadInput(str(err)) from None
    ev = ckpt.spec.evaluation
    num_classes = ckpt.model.config.num_classes
    chosen = _parse_labels(args.labels, num_classes)
    if chosen:
        labels = torch.tensor(chosen)[torch.arange(args.num) % len(chosen)]
    else:
        labels = balanced_labels(args.num, num_classes)
    settings = {"sampler": args.sampler or ev.sampler, "steps": args.steps or ev.steps,
                "guidance": ev.guidance if args.guidance is None else args.guidance, "seed": args.seed}
    try:
        images = generate(ckpt, labels, settings["sampler"], settings["steps"], settings["guidance"],
                          args.seed, ev.batch_size, ev.clip_x0, progress=True)
    except ValueError as err:
        raise BadInput(str(err)) from None
    paths = save_pngs(images, labels, args.out)
    manifest = {"checkpoint": str(args.checkpoint), "step": ckpt.step, "weights": args.weights, **settings,
                "files": [{"path": str(p), "label": int(y)} for p, y in zip(paths, labels.tolist(), strict=True)]}
    write_json(Path(args.out) / "samples.json", manifest)
    if args.json:
        print(json.dumps(manifest))
    else:
        print(f"wrote {len(paths)} images to {args.out} (manifest: {Path(args.out) / 'samples.json'})")
    return 0


def _protocol(args):
    """The protocol file with --set applied; with --set alone, a checkpoint's own settings with it."""
    from ditlab.config import EvaluationSpec, apply_override, from_dict
    from ditlab.orchestration.evaluate import is_checkpoint
    from ditlab.training.checkpoint import load_bundle

    if args.protocol is not None:
        return load(args.protocol, args.overrides, EvaluationSpec)
    if not args.overrides:
        return None
    raw = dict(load_bundle(args.fake)["spec"]["evaluation"]) if is_checkpoint(args.fake) else {}
    for assignment in args.overrides:
        apply_override(raw, assignment)
    return from_dict(raw, "--set", EvaluationSpec)


def cmd_evaluate(args) -> int:
    import time

    from ditlab.evaluation.features import WeightsNotFound
    from ditlab.evaluation.images import ImageSetError
    from ditlab.training.checkpoint import CheckpointError

    if not Path(args.fake).exists():
        raise BadInput(f"--fake: {args.fake!r} does not exist")
    protocol = _protocol(args)
    from ditlab.orchestration.evaluate import run_evaluation

    out = args.out or f"evaluations/{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            summary = run_evaluation(args.fake, args.real, protocol, out, args.experiment, not args.no_progress)
    except (ImageSetError, CheckpointError, WeightsNotFound, ValueError) as err:
        raise BadInput(str(err)) from None
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        for key, value in sorted(summary["figures"].items()):
            print(f"  {key:28s} {value:.6g}")
        for key, value in sorted(summary["notes"].items()):
            print(f"  {key:28s} {value}")
        print(f"wrote {Path(out) / 'evaluation.json'}; mlflow run {summary['mlflow_run_id']}")
    return 0


COMMANDS = {"run": cmd_run, "sample": cmd_sample, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SpecError, BadInput) as err:
        print(f"ditlab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
