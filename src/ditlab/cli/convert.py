"""`ditlab convert SOURCE --to LAYOUT --out PATH`: a DiT's weights in the layouts users already hold.

SOURCE is a ditlab checkpoint (its EMA weights), a facebookresearch/DiT state dict
(`DiT-XL-2-256x256.pt`) or a diffusers `DiTTransformer2DModel` folder; LAYOUT is `facebook` (a .pt
state dict) or `diffusers` (a save_pretrained folder). models/convert.py does the mapping; the
converted model computes what the source computes (tests/test_convert.py)."""

from __future__ import annotations

from pathlib import Path

from ditlab.cli.common import BadInput, emit


def register(sub, shared) -> None:
    convert = sub.add_parser("convert", parents=shared.output,
                             help="write a DiT's weights in facebookresearch/DiT's or diffusers' layout")
    convert.add_argument("source", help="a ditlab checkpoint (file, checkpoint folder or run folder), a "
                                        "facebookresearch/DiT .pt, or a diffusers model folder")
    convert.add_argument("--to", required=True, choices=["facebook", "diffusers"], help="the layout to write")
    convert.add_argument("--out", required=True, help="the .pt file (facebook) or folder (diffusers) to write; "
                                                      "must not exist")
    convert.add_argument("--num-heads", type=int, help="heads of a facebook-layout source whose width is not a "
                                                       "DiT paper size (the weights do not say)")
    convert.set_defaults(handler=cmd_convert)


def read_source(source: str, num_heads: int | None):
    """(model, layout) of SOURCE; anything unreadable is BadInput naming it."""
    from ditlab.models.convert import ConversionError, detect_layout, from_ditlab, load_dit
    from ditlab.training.checkpoint import CheckpointError, is_checkpoint, load_bundle

    path = Path(source)
    try:
        if path.is_dir():
            if (path / "config.json").is_file():
                return load_dit(path, "diffusers"), "diffusers"
            if is_checkpoint(path):
                return from_ditlab(load_bundle(path)), "ditlab"
            raise BadInput(f"{source}: neither a diffusers model folder (config.json) nor a ditlab checkpoint folder")
        if not path.is_file():
            raise BadInput(f"{source}: no such file or folder")
        if detect_layout(path) == "ditlab":
            return from_ditlab(load_bundle(path)), "ditlab"
        return load_dit(path, "facebook", num_heads), "facebook"
    except (ConversionError, CheckpointError) as err:
        raise BadInput(f"{source}: {err}") from None


def cmd_convert(args) -> int:
    from ditlab.models.convert import ConversionError, save_dit

    out = Path(args.out)
    if out.exists():
        raise BadInput(f"--out: {args.out!r} exists; converting writes a new file or folder")
    if not out.parent.is_dir():
        raise BadInput(f"--out: the folder {str(out.parent)!r} does not exist")
    model, layout = read_source(args.source, args.num_heads)
    try:
        save_dit(model, out, args.to)
    except ConversionError as err:
        raise BadInput(f"--to {args.to}: {err}") from None
    result = {"source": args.source, "source_layout": layout, "to": args.to, "out": str(out),
              "config": model.config.to_dict(), "parameters": sum(p.numel() for p in model.parameters())}
    emit(args, result, f"wrote {args.source} ({layout}) as {args.to} to {out}: "
                       f"{result['parameters']:,} parameters")
    return 0
