"""`ditlab data prepare SPEC --out DIR`, `ditlab data add DIR --name NAME` and `ditlab data encode
SPEC`; each writes a JSON record of its result (manifest.json; the latent cache's manifest.json)."""

from __future__ import annotations

from ditlab.cli.common import BadInput, emit, load_spec, preflight_or_bad_input, writable_folder


def register(sub, shared) -> None:
    data = sub.add_parser("data", help="datasets: materialize a spec's data, add and version an image folder")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", parents=shared.spec_command[:1],
                                  help="write a spec's train/test splits as arrays + manifest "
                                       "(the DVC pipeline's prepare stage)")
    prepare.add_argument("--out", required=True, help="output folder, e.g. pipeline/data")
    prepare.set_defaults(handler=cmd_prepare)
    add = data_sub.add_parser("add", parents=shared.output,
                              help="validate an image folder (one subfolder per class), copy it to "
                                   "data/NAME with a manifest and track it with DVC")
    add.add_argument("folder", help="image folder: one subfolder per class")
    add.add_argument("--name", required=True, help="dataset name; specs use it as data.name")
    add.add_argument("--root", default="data", help="where named datasets live (default: ./data)")
    add.add_argument("--no-dvc", action="store_true", help="write the folder and manifest, skip `dvc add`")
    add.add_argument("--format", choices=("images", "shards"), default="images",
                     help="images: copy the folder as it is; shards: split, resize and write it as uint8 .npz "
                          "shards with a manifest, for data.format: shards (streamed through Ray Data)")
    shard = add.add_argument_group("--format shards")
    shard.add_argument("--resolution", type=int, default=16, help="image side after crop and resize (default 16)")
    shard.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 (grey) or 3 (RGB); default 1")
    shard.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    shard.add_argument("--test-fraction", type=float, default=0.2, help="held-out test split (default 0.2)")
    shard.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split (default 0)")
    add.set_defaults(handler=cmd_add)
    encode = data_sub.add_parser("encode", parents=shared.spec_command[:1],
                                 help="encode a latent spec's dataset with its latent.autoencoder into the latent "
                                      "cache, or find it there (the latent pipeline's encode stage)")
    encode.set_defaults(handler=cmd_encode)


def cmd_prepare(args) -> int:
    from ditlab.data.prepared import save_prepared

    writable_folder("--out", args.out)
    spec = load_spec(args)
    if spec is None:  # --dry-run
        return 0
    # The source data alone: a latent spec's autoencoder (a later stage's output) is not needed here.
    preflight_or_bad_input(spec.model_copy(update={"data": spec.data.model_copy(update={"prepared": None})}),
                           task_checks=False)
    result = {"out": args.out, **save_prepared(spec.data, args.out)}
    emit(args, result, f"prepared {spec.data.source} data in {args.out}: {result['counts']['train']} train, "
                       f"{result['counts']['test']} test images of {result['image_shape']}")
    return 0


def cmd_add(args) -> int:
    from ditlab.orchestration.versioning import VersioningError, add_dataset

    writable_folder("--root", args.root)
    shards = shard_options(args) if args.format == "shards" else None
    try:
        result = add_dataset(args.folder, args.name, args.root, track=not args.no_dvc, shards=shards)
    except VersioningError as err:
        raise BadInput(str(err)) from None
    if shards is not None:
        return report_shards(args, result)
    size = result["image_size"]
    message = (f"added {result['count']} images in {len(result['classes'])} classes to {result['path']} "
               f"(sizes {size['min']}..{size['max']}, sha256 {result['sha256'][:12]})")
    if "dvc_file" in result:
        message += (f"\ntracked by DVC as {result['dvc_file']} (md5 {result['dvc_md5']}); commit it with "
                    f"`git add {result['dvc_file']}` and use it in a spec as data.source=folder, "
                    f"data.name={args.name}")
    emit(args, result, message)
    return 0


def shard_options(args) -> dict:
    """The --format shards flags, checked as a spec's data section checks them."""
    from pydantic import ValidationError

    from ditlab.config import DataSpec

    if args.shard_size < 1:
        raise BadInput(f"--shard-size: {args.shard_size} must be at least 1")
    try:
        DataSpec(resolution=args.resolution, channels=args.channels, test_fraction=args.test_fraction,
                 split_seed=args.split_seed)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadInput(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    return {"resolution": args.resolution, "channels": args.channels, "shard_size": args.shard_size,
            "test_fraction": args.test_fraction, "split_seed": args.split_seed}


def report_shards(args, result: dict) -> int:
    shape = "x".join(str(d) for d in result["image_shape"])
    message = (f"wrote {result['counts']['train']} train and {result['counts']['test']} test images of {shape} in "
               f"{len(result['classes'])} classes as {sum(len(v) for v in result['shards'].values())} shards to "
               f"{result['path']}")
    if "dvc_file" in result:
        message += (f"\ntracked by DVC as {result['dvc_file']} (md5 {result['dvc_md5']}); commit it with "
                    f"`git add {result['dvc_file']}` and use it in a spec as data.format=shards, data.name={args.name}")
    emit(args, result, message)
    return 0


def cmd_encode(args) -> int:
    from ditlab.latents import LatentError, ensure_latent_cache

    spec = load_spec(args)
    if spec is None:  # --dry-run
        return 0
    if not spec.latent.autoencoder:
        raise BadInput(f"latent.autoencoder: {args.spec} names no autoencoder checkpoint to encode with")
    preflight_or_bad_input(spec)
    try:
        folder, meta, reused = ensure_latent_cache(spec)
    except LatentError as err:
        raise BadInput(str(err)) from None
    shape = "x".join(str(d) for d in meta["latent_shape"])
    emit(args, {"cache": str(folder), "reused": reused, **meta},
         f"{'reused' if reused else 'wrote'} {folder}: {meta['counts']['train']} train, {meta['counts']['test']} "
         f"test latents of {shape}, scale factor {meta['scale_factor']:.4g} (autoencoder "
         f"{meta['autoencoder_sha256'][:12]}, dataset {meta['dataset_sha256'][:12]})")
    return 0
