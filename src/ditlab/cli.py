"""The `ditlab` command: one way in.

    ditlab run SPEC [--set a.b=c ...] [--address ADDR] [--name NAME] [--dry-run] [--json]
    ditlab train SPEC [...as run] [--restart-if-changed] [--export DIR]     (no final evaluation)
    ditlab sample CHECKPOINT|RUN --out DIR [--num N] [--spec SPEC] [--labels 0,1,2] [--sampler ddim] [--guidance W]
    ditlab evaluate --fake DIR|CHECKPOINT [--real DIR|DATASET|PREPARED] [--protocol P | --spec SPEC] [--json]
    ditlab data prepare SPEC --out DIR | ditlab data add DIR --name NAME [--no-dvc]
    ditlab submit SPEC --address http://HEAD:8265 [--set a.b=c ...] [--name NAME] [--follow] [--json]
    ditlab jobs list|status ID|logs ID [--follow]|stop ID --address http://HEAD:8265
    ditlab tune SWEEP [--set a.b=c | --set sweep.num_samples=N ...] [--address ADDR] [--name NAME] [--resume] [--json]

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
    train = sub.add_parser("train", help="as run, without the final evaluation (the DVC pipeline's train stage)")
    for p in (run, train):
        _add_spec_args(p)
        p.add_argument("--address", help="Ray cluster to join (ray://head:10001 or auto); default: start a local one")
        p.add_argument("--storage", default="runs", help="where runs and checkpoints are kept (default: ./runs)")
        p.add_argument("--name", help="run name; rerunning with the same name resumes from its last checkpoint")
        p.add_argument("--restart-if-changed", action="store_true",
                       help="if the run folder --name holds a run of another spec, start it over (default: error)")
        p.add_argument("--export", metavar="DIR", help="also copy metrics.json, history.json, loss_curve.png and "
                                                       "result.json to DIR")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    data = sub.add_parser("data", help="datasets: materialize a spec's data, add and version an image folder")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="write a spec's train/test splits as arrays + manifest "
                                                  "(the DVC pipeline's prepare stage)")
    _add_spec_args(prepare)
    prepare.add_argument("--out", required=True, help="output folder, e.g. pipeline/data")
    add = data_sub.add_parser("add", help="validate an image folder (one subfolder per class), copy it to "
                                          "data/NAME with a manifest and track it with DVC")
    add.add_argument("folder", help="image folder: one subfolder per class")
    add.add_argument("--name", required=True, help="dataset name; specs use it as data.name")
    add.add_argument("--root", default="data", help="where named datasets live (default: ./data)")
    add.add_argument("--no-dvc", action="store_true", help="write the folder and manifest, skip `dvc add`")
    add.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")

    sample = sub.add_parser("sample", help="draw class-conditional samples from a checkpoint as PNG files")
    sample.add_argument("checkpoint", help="checkpoint.pt or a checkpoint folder holding it")
    sample.add_argument("--num", type=int, help="number of images (default: the --spec's evaluation.num_samples, "
                                                "else 100)")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--labels", help="comma-separated class labels, cycled to --num (default: all classes in turn)")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], help="default: the spec's evaluation.sampler")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the spec's evaluation.steps)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    sample.add_argument("--seed", type=int, help="default: the spec's evaluation.seed")
    sample.add_argument("--weights", choices=["ema", "model"], default="ema")
    sample.add_argument("--spec", help="take the sampling settings (evaluation.num_samples, sampler, steps, "
                                       "guidance, seed) from this experiment spec, e.g. params.yaml")
    sample.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")

    ev = sub.add_parser("evaluate", help="FID, KID, precision/recall, IS or classifier score of images or a checkpoint")
    ev.add_argument("--fake", required=True, help="folder of PNG/JPEG images, or a checkpoint to sample from")
    ev.add_argument("--real", help="folder of images, or a dataset: digits[:train|test|all] "
                                   "(default for a checkpoint: its own dataset's split)")
    ev.add_argument("--protocol", help="evaluation protocol (YAML), e.g. evaluation/digits.yaml "
                                       "(default: a checkpoint's own evaluation settings)")
    ev.add_argument("--spec", help="an experiment spec (e.g. params.yaml): its evaluation section is the protocol, "
                                   "its data (at evaluation.reference_split) the default --real, its "
                                   "tracking.experiment the MLflow experiment")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a protocol field, e.g. --set kid.subset_size=50")
    ev.add_argument("--out", help="where evaluation.json and samples.png go (default: evaluations/<time>)")
    ev.add_argument("--experiment", default="ditlab-evaluation", help="MLflow experiment for folder evaluations")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    _add_cluster_commands(sub)
    _add_tune_command(sub)
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
    if spec.data.prepared:
        from ditlab.data.prepared import PreparedDataError, check_prepared

        try:
            check_prepared(spec.data, verify_checksums=True)
        except PreparedDataError as err:
            raise BadInput(str(err)) from None
    elif spec.data.source == "folder":
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
    from ditlab.orchestration.train import RunFolderError, run_experiment  # heavy imports only when needed

    # With --json, stdout carries exactly one JSON object: everything else goes to stderr.
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            summary = run_experiment(spec, address=args.address, storage_path=args.storage,
                                     run_name=args.name, progress=not args.no_progress,
                                     evaluate=args.command == "run", restart_if_changed=args.restart_if_changed,
                                     export_dir=args.export)
    except RunFolderError as err:
        raise BadInput(str(err)) from None
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

    try:
        ckpt = load_for_sampling(args.checkpoint, args.weights)
    except CheckpointError as err:
        raise BadInput(str(err)) from None
    ev = load(args.spec).evaluation if args.spec else ckpt.spec.evaluation
    if args.num is None:
        args.num = ev.num_samples if args.spec else 100
    if args.num < 1:
        raise BadInput(f"--num: must be at least 1, got {args.num}")
    num_classes = ckpt.model.config.num_classes
    chosen = _parse_labels(args.labels, num_classes)
    if chosen:
        labels = torch.tensor(chosen)[torch.arange(args.num) % len(chosen)]
    else:
        labels = balanced_labels(args.num, num_classes)
    seed = ev.seed if args.seed is None else args.seed
    settings = {"sampler": args.sampler or ev.sampler, "steps": args.steps or ev.steps,
                "guidance": ev.guidance if args.guidance is None else args.guidance, "seed": seed}
    try:
        images = generate(ckpt, labels, settings["sampler"], settings["steps"], settings["guidance"],
                          seed, ev.batch_size, ev.clip_x0, progress=True)
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
    if args.spec is not None:
        return load(args.spec, args.overrides).evaluation
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
    if args.protocol and args.spec:
        raise BadInput("--protocol and --spec: give one of them")
    protocol = _protocol(args)
    from ditlab.orchestration.evaluate import run_evaluation

    out = args.out or f"evaluations/{time.strftime('%Y%m%d-%H%M%S')}"
    real, experiment = args.real, args.experiment
    if args.spec:
        spec = load(args.spec, args.overrides)
        real = real or spec.data
        experiment = spec.tracking.experiment
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            summary = run_evaluation(args.fake, real, protocol, out, experiment, not args.no_progress)
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


def cmd_data(args) -> int:
    """`data prepare` and `data add`; each writes its manifest.json, the JSON record of the result."""
    if args.data_command == "prepare":
        from ditlab.data.prepared import save_prepared

        spec = load(args.spec, args.overrides)
        preflight(spec.model_copy(update={"data": spec.data.model_copy(update={"prepared": None})}))
        result = {"out": args.out, **save_prepared(spec.data, args.out)}
        message = (f"prepared {spec.data.source} data in {args.out}: {result['counts']['train']} train, "
                   f"{result['counts']['test']} test images of {result['image_shape']}")
    else:
        from ditlab.orchestration.versioning import VersioningError, add_dataset

        try:
            result = add_dataset(args.folder, args.name, args.root, track=not args.no_dvc)
        except VersioningError as err:
            raise BadInput(str(err)) from None
        size = result["image_size"]
        message = (f"added {result['count']} images in {len(result['classes'])} classes to {result['path']} "
                   f"(sizes {size['min']}..{size['max']}, sha256 {result['sha256'][:12]})")
        if "dvc_file" in result:
            message += (f"\ntracked by DVC as {result['dvc_file']} (md5 {result['dvc_md5']}); commit it with "
                        f"`git add {result['dvc_file']}` and use it in a spec as data.source=folder, "
                        f"data.name={args.name}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(message)
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_run, "sample": cmd_sample, "evaluate": cmd_evaluate, "data": cmd_data}


def _add_cluster_commands(sub) -> None:
    """`submit` and `jobs`: Ray Jobs on a cluster, through its head's dashboard."""
    address_help = ("the head's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS "
                    "when it is an http URL). A cluster with token auth needs RAY_AUTH_MODE=token and the token "
                    "in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    submit = sub.add_parser("submit", help="run a spec as a Ray Job on a cluster (`ditlab run` there)")
    submit.add_argument("spec", help="experiment spec (YAML) inside the working directory")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.steps=500 (repeatable)")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--name", help="run name (default: <spec name>-<time>); an existing run of that name resumes")
    submit.add_argument("--storage", help="where the job keeps runs and checkpoints, a path on the cluster "
                                          "(default: runs/ in the job's working directory)")
    submit.add_argument("--working-dir", default=".", help="folder shipped to the cluster as the job's working "
                                                           "directory; must hold the spec (default: .)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job (repeatable); MLFLOW_TRACKING_URI and "
                             "DITLAB_* variables are passed on already")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; "
                                                              "exit 0 if it succeeded, 1 otherwise")
    submit.add_argument("--json", action="store_true", help="print the job as one JSON object on stdout")

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs on a cluster")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("list", "the cluster's submitted jobs"), ("status", "a job's status"),
                       ("logs", "a job's logs"), ("stop", "stop a job and wait until it has ended")):
        p = jobs_sub.add_parser(name, help=text)
        if name != "list":
            p.add_argument("job_id", help="the job's id (raysubmit_...)")
        p.add_argument("--address", help=address_help)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        else:
            p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")


def _env_assignments(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def cmd_submit(args) -> int:
    import time

    spec = load(args.spec, args.overrides)  # a bad spec fails here, before anything reaches the cluster
    extra_env = _env_assignments(args.env)
    from ditlab.orchestration import jobs

    run_name = args.name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        address = jobs.resolve_address(args.address)
        submission = jobs.build_submission(args.spec, args.overrides, run_name, args.working_dir, args.storage,
                                           extra_env)
        client = jobs.JobsClient(address)
        job_id = client.submit(submission)
        record = {"job_id": job_id, "address": address, "run_name": run_name}
        # With --json, stdout carries exactly one JSON object: the job's logs go to stderr.
        log = sys.stderr if args.json else sys.stdout
        if not args.json:
            print(f"submitted {job_id} to {address} (run {run_name})", flush=True)
        if args.follow:
            record["status"] = _follow(client, job_id, log)
            print(f"job {job_id} {record['status']}", file=log)
    except jobs.ClusterError as err:
        raise BadInput(str(err)) from None
    if args.json:
        print(json.dumps(record, sort_keys=True))
    elif not args.follow:
        print(f"follow it with: ditlab jobs logs {job_id} --follow --address {address}")
    return 0 if record.get("status", "SUCCEEDED") == "SUCCEEDED" else 1


def _follow(client, job_id: str, out) -> str:
    """Streams the job's logs to `out` until it ends; its final status."""
    try:
        return str(client.follow(job_id, out))
    except KeyboardInterrupt:
        raise BadInput(f"stopped following {job_id}; it keeps running (stop it with "
                       f"`ditlab jobs stop {job_id} --address {client.address}`)") from None


def _jobs_list(client, args) -> int:
    from ditlab.orchestration.jobs import describe

    found = [describe(j) for j in client.list_jobs()]
    if args.json:
        print(json.dumps(found, sort_keys=True))
        return 0
    for job in found:
        print(f"{job['job_id']:28s} {job['status']:10s} {job['run_name'] or '-':24s} {job['entrypoint']}")
    return 0


def _jobs_status(client, args) -> int:
    from ditlab.orchestration.jobs import describe

    job = describe(client.info(args.job_id))
    print(json.dumps(job, sort_keys=True) if args.json else f"{job['job_id']} {job['status']}: {job['message']}")
    return 0


def _jobs_logs(client, args) -> int:
    if args.follow:
        return 0 if _follow(client, args.job_id, sys.stdout) == "SUCCEEDED" else 1
    sys.stdout.write(client.logs(args.job_id))
    return 0


def _jobs_stop(client, args) -> int:
    status = str(client.stop(args.job_id, wait=not args.no_wait))
    print(json.dumps({"job_id": args.job_id, "status": status}) if args.json else f"job {args.job_id} {status}")
    return 0


def cmd_jobs(args) -> int:
    from ditlab.orchestration import jobs

    commands = {"list": _jobs_list, "status": _jobs_status, "logs": _jobs_logs, "stop": _jobs_stop}
    try:
        return commands[args.jobs_command](jobs.JobsClient(jobs.resolve_address(args.address)), args)
    except jobs.ClusterError as err:
        raise BadInput(str(err)) from None


COMMANDS.update(submit=cmd_submit, jobs=cmd_jobs)


def _add_tune_command(sub) -> None:
    tune = sub.add_parser("tune", help="search hyperparameters with Ray Tune; one nested MLflow run per trial")
    tune.add_argument("sweep", help="sweep spec (YAML), e.g. experiments/sweeps/quickstart.yaml")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field of the base experiment (train.steps=50) or, prefixed with sweep., "
                           "of the sweep spec (sweep.num_samples=4) (repeatable)")
    tune.add_argument("--address", help="Ray cluster to join (ray://head:10001 or auto); default: start a local one")
    tune.add_argument("--storage", default="sweeps", help="where sweeps are kept (default: ./sweeps)")
    tune.add_argument("--name", help="sweep folder name (default: <sweep name>-<time>)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep (--name, default: the "
                                                            "latest of this sweep); finished trials are not rerun")
    tune.add_argument("--dry-run", action="store_true", help="check the sweep, print it and the trial count, exit")
    tune.add_argument("--no-progress", action="store_true", help="hide Tune's trial table")
    tune.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


EXIT_INTERRUPTED = 130


def cmd_tune(args) -> int:
    import yaml

    from ditlab.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.overrides)  # every check that needs no Ray, before any trial
    if args.dry_run:
        record = {"sweep": sweep.to_dict(), "base": sweep.base_spec.to_dict()}
        sys.stdout.write(json.dumps(record, indent=2) + "\n" if args.json else yaml.safe_dump(record, sort_keys=False))
        return 0
    preflight(sweep.base_spec)
    from ditlab.orchestration.tune import SweepFolderError, run_sweep

    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            summary = run_sweep(sweep, address=args.address, storage_path=args.storage, name=args.name,
                                resume=args.resume, progress=not args.no_progress)
    except SweepFolderError as err:
        raise BadInput(str(err)) from None
    resume_hint = f"ditlab tune {args.sweep} --resume --name {Path(summary['sweep_dir']).name}"
    if args.json:
        print(json.dumps({**summary, "resume_command": resume_hint} if summary["interrupted"] else summary,
                         sort_keys=True))
    else:
        _print_sweep(summary, resume_hint)
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def _print_sweep(summary: dict, resume_hint: str) -> None:
    metric = summary["metric"]
    print(f"sweep:      {summary['sweep']}  ({summary['sweep_dir']})")
    for t in summary["trials"]:
        value = t.get(metric)
        shown = f"{value:.5f}" if isinstance(value, float) else "-"
        config = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        print(f"  {t['trial_id']}  {t['state']:13s} step {t['last_step']:5d}  {metric} {shown}  {config}")
    best = summary["best"]
    if best:
        print(f"best:       {best['trial_id']}  {metric}={best[metric]:.5f}")
        print(f"best spec:  {summary['best_spec']}  (ditlab run {summary['best_spec']})")
    print(f"compute:    {summary['worker_seconds']:.0f} worker-seconds, {summary['steps_trained']} steps trained")
    print(f"mlflow run: {summary['mlflow_run_id']}")
    print(f"dashboard:  {summary['mlflow_url']}")
    if summary["interrupted"]:
        print(f"interrupted: resume with  {resume_hint}")


COMMANDS.update(tune=cmd_tune)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SpecError, BadInput) as err:
        print(f"ditlab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
