"""`ditlab sample CHECKPOINT --out DIR`: class-conditional samples (a text model: samples of --prompt captions)
as PNG files plus samples.json."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from ditlab.cli.common import BadInput, check_sampling_flags, emit, fresh_output_folder
from ditlab.config import SAMPLING_TASKS, SamplerName, load


def register(sub, shared) -> None:
    sample = sub.add_parser("sample", parents=shared.output,
                            help="draw class-conditional samples from a checkpoint as PNG files")
    sample.add_argument("checkpoint", help="checkpoint.pt, a checkpoint folder holding it, or a run folder "
                                           "(its latest checkpoint)")
    sample.add_argument("--num", type=int, help="number of images (default: the --spec's evaluation.num_samples, "
                                                "else 100)")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--labels", help="comma-separated class labels, cycled to --num (default: all classes in turn)")
    sample.add_argument("--prompt", action="append", help="a caption to draw from (text-conditioned checkpoints; "
                                                          "repeatable, cycled to --num; default: captions of "
                                                          "--labels in phrasings training never saw)")
    sample.add_argument("--sampler", choices=get_args(SamplerName),
                        help="default: the checkpoint's (or --spec's) evaluation.sampler")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's or --spec's "
                                                "evaluation.steps; a student: its own)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    sample.add_argument("--seed", type=int, help="default: the spec's evaluation.seed")
    sample.add_argument("--weights", choices=["ema", "model"], default="ema")
    sample.add_argument("--spec", help="take the sampling settings (evaluation.num_samples, sampler, steps, "
                                       "guidance, seed) from this experiment spec, e.g. params.yaml")
    sample.set_defaults(handler=cmd_sample)


def parse_labels(text: str | None, num_classes: int) -> list[int] | None:
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


def check_flags(args) -> None:
    """The flags that need no checkpoint, checked before anything loads or is written."""
    if args.num is not None and args.num < 1:
        raise BadInput(f"--num: must be at least 1, got {args.num}")
    check_sampling_flags(args)
    if args.prompt and not all(p.strip() for p in args.prompt):
        raise BadInput("--prompt: empty caption")
    if args.prompt and args.labels:
        raise BadInput("--prompt and --labels: give one of them (a text model draws --labels' classes in "
                       "captions it never saw in training)")
    fresh_output_folder("--out", args.out, "samples.json")


def cmd_sample(args) -> int:
    import torch

    from ditlab.atomic import write_json
    from ditlab.sampling import balanced_labels, from_bundle, generate, save_pngs
    from ditlab.training.checkpoint import CheckpointError, load_bundle

    check_flags(args)
    try:
        bundle = load_bundle(args.checkpoint)
    except CheckpointError as err:
        raise BadInput(str(err)) from None
    task = bundle["spec"].get("task", "generation")
    if task not in SAMPLING_TASKS:
        raise BadInput(f"{args.checkpoint}: not a generation checkpoint (task {task!r}); ditlab sample draws "
                       f"from generation and distillation checkpoints, ditlab evaluate --fake scores any checkpoint")
    if task == "distillation" and args.guidance not in (None, 1.0):
        raise BadInput(f"--guidance: {args.guidance}, but {args.checkpoint} is a distilled student with its "
                       f"guidance built in (distillation.guidance); it samples with 1")
    conditioning = bundle.get("model_config", {}).get("conditioning", "class")
    if args.prompt and conditioning != "text":
        raise BadInput(f"--prompt: {args.checkpoint} is a class-conditional checkpoint (model.conditioning: "
                       f"{conditioning}); give --labels instead")
    try:
        ckpt = from_bundle(bundle, str(args.checkpoint), args.weights)
    except ValueError as err:  # a latent model whose autoencoder is missing or another one
        raise BadInput(str(err)) from None
    ev = load(args.spec).evaluation if args.spec else ckpt.spec.evaluation
    num = args.num if args.num is not None else ev.num_samples if args.spec else 100
    if num < 1:
        raise BadInput(f"--num: must be at least 1, got {num}")
    num_classes = ckpt.model.config.num_classes
    chosen = parse_labels(args.labels, num_classes)
    labels = torch.tensor(chosen)[torch.arange(num) % len(chosen)] if chosen else balanced_labels(num, num_classes)
    captions = [args.prompt[i % len(args.prompt)] for i in range(num)] if args.prompt else None
    settings = {"sampler": args.sampler or ev.sampler, "steps": args.steps or ev.steps,
                "guidance": ev.guidance if args.guidance is None else args.guidance,
                "seed": ev.seed if args.seed is None else args.seed}
    try:
        images = generate(ckpt, labels, settings["sampler"], settings["steps"], settings["guidance"],
                          settings["seed"], ev.batch_size, ev.clip_x0, progress=True, captions=captions)
    except ValueError as err:
        raise BadInput(str(err)) from None
    if captions:  # files named by prompt index: a prompt has no class
        labels = torch.arange(num) % len(args.prompt)
    paths = save_pngs(images, labels, args.out, "prompt" if captions else "class")
    files = [{"path": str(p), "prompt" if captions else "label": captions[i] if captions else int(y)}
             for i, (p, y) in enumerate(zip(paths, labels.tolist(), strict=True))]
    manifest = {"checkpoint": str(args.checkpoint), "step": ckpt.step, "weights": args.weights, **settings,
                "files": files}
    write_json(Path(args.out) / "samples.json", manifest)
    emit(args, manifest, f"wrote {len(paths)} images to {args.out} (manifest: {Path(args.out) / 'samples.json'})")
    return 0
