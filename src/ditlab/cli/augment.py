"""`ditlab augment CHECKPOINT --name NAME --out DIR`: a labelled synthetic set as a DVC-tracked dataset,
and whether it helps a classifier that has few real images (augment.py)."""

from __future__ import annotations

from pathlib import Path

from ditlab.cli.common import BadInput, emit, fresh_output_folder, safe_name, stdout_for, writable_folder

MANIFEST = "augment.json"


def register(sub, shared) -> None:
    augment = sub.add_parser("augment", parents=shared.output,
                             help="write N samples per class of a generation checkpoint as a dataset "
                                  "(data/NAME, tracked by DVC) and measure whether they help a classifier "
                                  "trained on k real images per class")
    augment.add_argument("checkpoint", help="checkpoint.pt, a checkpoint folder holding it, or a run folder "
                                            "(its latest checkpoint)")
    augment.add_argument("--name", required=True, help="dataset name: the set is written to ROOT/NAME; "
                                                       "specs use it as data.name")
    augment.add_argument("--out", required=True, help="folder for the figure and the table (augmentation.png, "
                                                      "augmentation.csv, augment.json)")
    augment.add_argument("--per-class", type=int, default=100, help="samples per class (default: 100)")
    augment.add_argument("--k", default="5,10,20",
                         help="real training images per class, comma-separated (default: 5,10,20)")
    augment.add_argument("--seeds", type=int, default=5, help="draws of the real images for each k (default: 5)")
    augment.add_argument("--root", default="data", help="where named datasets live (default: ./data)")
    augment.add_argument("--no-dvc", action="store_true", help="write the dataset, skip `dvc add`")
    augment.add_argument("--no-progress", action="store_true", help="hide progress bars")
    augment.set_defaults(handler=cmd_augment)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(v) for v in text.replace(" ", "").split(",") if v}))
    except ValueError:
        raise BadInput(f"--k: expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise BadInput(f"--k: each k must be at least 1, got {text!r}")
    return ks


def check_flags(args) -> tuple[int, ...]:
    """The flags that need no checkpoint, checked before anything loads or is written; the k's."""
    from ditlab.augment import is_synthetic_dataset
    from ditlab.orchestration.versioning import dvc_root

    if args.per_class < 1:
        raise BadInput(f"--per-class: must be at least 1, got {args.per_class}")
    if not 1 <= args.seeds <= 100:
        raise BadInput(f"--seeds: must be in [1, 100], got {args.seeds}")
    ks = parse_ks(args.k)
    safe_name("--name", args.name)
    root = writable_folder("--root", args.root)
    fresh_output_folder("--out", args.out, MANIFEST)
    dest = root / args.name
    if dest.exists() and not is_synthetic_dataset(dest):
        raise BadInput(f"--name: {str(dest)!r} is a dataset that ditlab augment did not write; pick another "
                       "--name (a synthetic set of the same name is replaced by a new version)")
    if not args.no_dvc and dvc_root(root if root.exists() else Path.cwd()) is None:
        raise BadInput(f"no DVC repository at or above {str(root.resolve())!r}: run `dvc init` there "
                       "(or pass --no-dvc)")
    return ks


def real_data(ckpt, ks: tuple[int, ...]):
    """The checkpoint's real train and test splits; a missing dataset or a k larger than the
    smallest class of the train split is BadInput."""
    from ditlab.augment import real_splits, smallest_class

    try:
        real, test = real_splits(ckpt.spec.data)
    except (OSError, ValueError) as err:
        raise BadInput(f"the checkpoint's data ({ckpt.spec.data.source} {ckpt.spec.data.path or ''}".rstrip()
                       + f") cannot be read: {err}") from None
    fewest = smallest_class(real.labels)
    if ks[-1] > fewest:
        raise BadInput(f"--k: {ks[-1]} real images per class, but the smallest class of the training split "
                       f"has {fewest}")
    return real, test


def cmd_augment(args) -> int:
    from ditlab import augment
    from ditlab.atomic import write_json
    from ditlab.cli.inspect import open_generation_checkpoint
    from ditlab.orchestration.versioning import VersioningError

    ks = check_flags(args)
    ckpt = open_generation_checkpoint(args.checkpoint)
    if ckpt.model.config.num_classes < 2:
        raise BadInput(f"{args.checkpoint}: a model of {ckpt.model.config.num_classes} class(es); a labelled "
                       "synthetic set needs a class-conditional model")
    real, test = real_data(ckpt, ks)
    ev, progress = ckpt.spec.evaluation, not args.no_progress
    with stdout_for(args):
        images, labels = augment.synthesize(ckpt, args.per_class, ev, progress)
        try:
            dataset = augment.save_dataset(images, labels, Path(args.root), args.name,
                                           augment.provenance(args.checkpoint, ckpt, ev, args.per_class),
                                           track=not args.no_dvc)
        except VersioningError as err:
            raise BadInput(str(err)) from None
        rows = augment.compare(real, test, augment.Split(images, labels), ks, args.seeds, progress)
    table = augment.summarize(rows)
    out = Path(args.out)
    title = (f"logistic regression on pixels, {len(test.labels)} test images; +{len(labels)} synthetic "
             f"({args.per_class}/class)")
    files = {"figure": augment.save_figure(rows, table, out / "augmentation.png", title),
             "table": augment.save_csv(table, out / "augmentation.csv")}
    result = {"checkpoint": str(args.checkpoint), "dataset": dataset,
              "settings": {"per_class": args.per_class, "ks": ",".join(map(str, ks)), "seeds": args.seeds,
                           "classifier": "logistic regression on pixels (evaluation/classifier.py)",
                           "test_images": len(test.labels)},
              "table": table, "rows": rows}
    files["summary"] = write_json(out / MANIFEST, result)
    result.update(augment.log_to_mlflow(args.checkpoint, result, files))
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json(out / MANIFEST, result)
    emit(args, result, _text(result))
    return 0


def _text(result: dict) -> str:
    lines = [f"wrote {result['dataset']['count']} synthetic images to {result['dataset']['path']}"
             + (f" (tracked by DVC as {result['dataset']['dvc_file']})" if "dvc_file" in result["dataset"] else ""),
             "test accuracy, mean +- std over seeds:"]
    for row in result["table"]:
        gain = f"  gain {row['gain']:+.3f}" if "gain" in row else ""
        lines.append(f"  {row['arm']:>15} k={row['k']:<3} {row['mean']:.3f} +- {row['std']:.3f}{gain}")
    lines.append(f"figure and table: {result['files']['figure']}, {result['files']['table']}; MLflow run "
                 f"{result['mlflow_run_id']}")
    return "\n".join(lines)
