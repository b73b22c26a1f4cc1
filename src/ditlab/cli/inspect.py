"""`ditlab inspect CHECKPOINT --out DIR`: what a generation model attends to, as PNG files.

Writes the figures a generation run logs to MLflow at its end (interpret.py: self-attention maps
per layer and head, averaged over the sampling steps and at chosen timesteps, and the denoising
trajectory), the recorded maps as attention.npz, and inspect.json describing them."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from ditlab.cli.common import BadInput, check_sampling_flags, emit, fresh_output_folder
from ditlab.config import SAMPLING_TASKS, SamplerName

MANIFEST = "inspect.json"


def register(sub, shared) -> None:
    inspect = sub.add_parser("inspect", parents=shared.output,
                             help="attention maps per layer and head and the denoising trajectory of a "
                                  "generation checkpoint, as PNG files")
    inspect.add_argument("checkpoint", help="checkpoint.pt, a checkpoint folder holding it, or a run folder "
                                            "(its latest checkpoint)")
    inspect.add_argument("--out", required=True, help="output folder (new, or without earlier output)")
    inspect.add_argument("--num", type=int, default=3, help="samples traced (default: 3)")
    inspect.add_argument("--labels", help="comma-separated class labels, one a sample (default: spread over "
                                          "the classes)")
    inspect.add_argument("--sampler", choices=get_args(SamplerName),
                         help="default: the checkpoint's evaluation.sampler")
    inspect.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's evaluation.steps)")
    inspect.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the "
                                                        "checkpoint's evaluation.guidance)")
    inspect.add_argument("--seed", type=int, help="default: the checkpoint's evaluation.seed")
    inspect.add_argument("--weights", choices=["ema", "model"], default="ema")
    inspect.set_defaults(handler=cmd_inspect)


def open_generation_checkpoint(path: str, weights: str = "ema"):
    """A sampling.LoadedCheckpoint of a generation or distillation checkpoint; anything else (a
    missing file, another task's checkpoint, a latent model without its autoencoder) is BadInput."""
    from ditlab.sampling import from_bundle
    from ditlab.training.checkpoint import CheckpointError, load_bundle

    try:
        bundle = load_bundle(path)
    except CheckpointError as err:
        raise BadInput(str(err)) from None
    task = bundle["spec"].get("task", "generation")
    if task not in SAMPLING_TASKS:
        raise BadInput(f"{path}: not a generation checkpoint (task {task!r}); this command takes generation "
                       "and distillation checkpoints")
    try:
        return from_bundle(bundle, str(path), weights)
    except ValueError as err:  # CheckpointError, or a latent model whose autoencoder is missing
        raise BadInput(str(err)) from None


def check_flags(args) -> None:
    """The flags that need no checkpoint, checked before anything loads or is written."""
    if not 1 <= args.num <= 16:
        raise BadInput(f"--num: must be in [1, 16] (a few samples to look at), got {args.num}")
    check_sampling_flags(args)
    fresh_output_folder("--out", args.out, MANIFEST)


def settings(args, ckpt):
    """The checkpoint's evaluation settings with the flags given applied."""
    ev = ckpt.spec.evaluation
    changes = {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    ev = ev.model_copy(update={k: v for k, v in changes.items() if v is not None})
    if ckpt.spec.task == "distillation" and ev.guidance != 1.0:
        raise BadInput(f"--guidance: {ev.guidance}, but {args.checkpoint} is a distilled student with its "
                       "guidance built in; it samples with 1")
    if ev.guidance != 1.0 and ckpt.model.config.class_dropout_prob == 0:
        raise BadInput(f"--guidance: {ev.guidance} needs a model trained with label dropout "
                       "(model.class_dropout_prob > 0); pass --guidance 1")
    return ev


def cmd_inspect(args) -> int:
    import numpy as np
    import torch

    from ditlab import interpret
    from ditlab.atomic import atomic_path, write_json
    from ditlab.cli.sample import parse_labels

    check_flags(args)
    ckpt = open_generation_checkpoint(args.checkpoint, args.weights)
    ev = settings(args, ckpt)
    chosen = parse_labels(args.labels, max(ckpt.model.config.num_classes, 1))
    labels = torch.tensor(chosen)[torch.arange(args.num) % len(chosen)] if chosen else None
    tr = interpret.trace_checkpoint(ckpt, ev, args.num, labels)
    out = Path(args.out)
    files = {stem: str(path) for stem, path in interpret.write_figures(tr, ckpt.model, out).items()}
    with atomic_path(out / "attention.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, timesteps=np.asarray(tr.timesteps), labels=np.asarray(tr.labels),
                     **{f"{name}_attention": w.numpy() for name, w in tr.probes.items()})
    files["attention"] = str(out / "attention.npz")
    result = {"checkpoint": str(args.checkpoint), "step": ckpt.step, "weights": args.weights,
              "sampler": ev.sampler, "steps": ev.steps, "guidance": ev.guidance, "seed": ev.seed,
              "labels": tr.labels, "timesteps": tr.timesteps, "grid_size": tr.grid_size,
              "layers": len(ckpt.model.blocks), "heads": ckpt.model.config.num_heads, "files": files}
    write_json(out / MANIFEST, result)
    emit(args, result, f"wrote {len(files) - 1} figures for {len(tr.labels)} samples to {args.out} "
                       f"({', '.join(Path(p).name for p in files.values())}; manifest: {out / MANIFEST})")
    return 0
