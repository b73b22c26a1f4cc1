"""`ditlab restore CHECKPOINT --input DIR --out DIR`: a restoration model applied to a folder of
degraded images (low-resolution ones for super-resolution, noisy ones for denoising), written as PNG
files of the same names plus restore.json. Every input is checked before anything is written."""

from __future__ import annotations

from pathlib import Path

from ditlab.cli.common import BadInput, emit, fresh_output_folder, progress_flag

MANIFEST = "restore.json"


def register(sub, shared) -> None:
    p = sub.add_parser("restore", parents=shared.output,
                       help="restore a folder of degraded images with a `task: restoration` checkpoint")
    p.add_argument("checkpoint", help="checkpoint.pt, a checkpoint folder holding it, or a run folder (its latest "
                                      "checkpoint)")
    p.add_argument("--input", required=True, help="folder of degraded images (PNG, JPEG, BMP, WebP), at the size "
                                                  "the model takes: R/factor for super-resolution, R for denoising")
    p.add_argument("--out", required=True, help="output folder: one PNG per input, same name, plus restore.json")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="default: the checkpoint's evaluation.sampler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's evaluation.steps)")
    p.add_argument("--seed", type=int, help="default: the checkpoint's evaluation.seed")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--batch-size", type=int, default=100)
    progress_flag(p)
    p.set_defaults(handler=cmd_restore)


def load_restoration_checkpoint(path: str, weights: str):
    from ditlab.sampling import from_bundle
    from ditlab.training.checkpoint import CheckpointError, load_bundle, resolve_bundle_path

    try:
        bundle_path = resolve_bundle_path(path)
        bundle = load_bundle(bundle_path)
    except CheckpointError as err:
        raise BadInput(str(err)) from None
    task = bundle["spec"].get("task", "generation")
    if task != "restoration":
        raise BadInput(f"checkpoint {str(bundle_path)!r} is a `task: {task}` checkpoint; ditlab restore needs a "
                       "`task: restoration` one (see experiments/sr-x2.yaml, experiments/denoise.yaml)")
    try:
        return from_bundle(bundle, str(bundle_path), weights)
    except CheckpointError as err:  # a model_config that does not fit its weights
        raise BadInput(str(err)) from None


def read_inputs(folder: str, size: int, channels: int, describe: str):
    """(files, images [N, C, size, size] in [-1, 1]); a folder without images, an unreadable image or
    one of another size is a BadInput naming it."""
    import numpy as np
    import torch
    from PIL import Image

    from ditlab.data.folder import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"--input: folder {folder!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"--input: folder {folder!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    stems = [f.stem for f in files]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        raise BadInput(f"--input: two images named {clash!r} (different suffixes) would write one {clash}.png")
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                if img.size != (size, size):
                    raise BadInput(f"--input: {str(f)!r} is {img.size[0]}x{img.size[1]}; this model ({describe}) "
                                   f"takes {size}x{size} images")
                arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        except OSError as err:
            raise BadInput(f"--input: cannot read image {str(f)!r}: {err}") from None
        x = torch.from_numpy(arr.copy()).float()
        images.append((x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)) / 127.5 - 1.0)
    return files, torch.stack(images)


def cmd_restore(args) -> int:
    import torch
    from PIL import Image

    from ditlab.atomic import atomic_path, write_json
    from ditlab.data import to_uint8
    from ditlab.degradations import Degradation
    from ditlab.training.tasks.restoration import model_labels, restore

    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps: must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise BadInput(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise BadInput(f"--seed: must be in [0, 2**32), got {args.seed}")
    fresh_output_folder("--out", args.out, MANIFEST)
    ckpt = load_restoration_checkpoint(args.checkpoint, args.weights)
    spec, ev = ckpt.spec, ckpt.spec.evaluation
    degradation = Degradation.from_spec(spec)
    files, observations = read_inputs(args.input, degradation.observed_size, spec.data.channels,
                                      degradation.describe())
    if spec.restoration.class_conditional and ckpt.model.config.class_dropout_prob == 0:
        raise BadInput(f"checkpoint {args.checkpoint!r} is class-conditional without a null class; it cannot "
                       "restore unlabelled images")
    settings = {"sampler": args.sampler or ev.sampler, "steps": args.steps or ev.steps,
                "seed": ev.seed if args.seed is None else args.seed}
    labels = model_labels(ckpt.model, torch.zeros(len(files), dtype=torch.long), False)
    restored = restore(ckpt.model, ckpt.diffusion, degradation.condition(observations), labels,
                       settings["sampler"], settings["steps"], settings["seed"], args.batch_size, ev.clip_x0,
                       progress=not args.no_progress, residual=spec.restoration.residual)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f, img in zip(files, to_uint8(restored), strict=True):
        path = out / f"{f.stem}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
        written.append({"input": str(f), "output": str(path)})
    manifest = {"checkpoint": str(args.checkpoint), "step": ckpt.step, "weights": args.weights,
                "degradation": degradation.describe(), **settings, "files": written}
    write_json(out / MANIFEST, manifest)
    emit(args, manifest, f"restored {len(written)} images into {args.out} (manifest: {out / MANIFEST})")
    return 0
