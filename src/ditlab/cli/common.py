"""What every `ditlab` command shares: the flags declared once, the bad-input error, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """Input that cannot be used: printed as one `ditlab: error: ...` line, exit status 2."""


def parent(*adders) -> argparse.ArgumentParser:
    """A parent parser holding the flags that `adders` declare, for `parents=[...]`."""
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def overrides_flag(p: argparse.ArgumentParser, what: str = "a spec field, e.g. --set train.steps=500") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override {what} (repeatable)")


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def dry_run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec and exit")


def progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and torch's informational lines (hidden by default)")


def address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (ray://head:10001 or auto); default: start a local one")


def name_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--name", help=help_text)


def safe_name(flag: str, name: str | None) -> str | None:
    """A name that becomes a folder (--name): one path component of a safe charset, so it can never
    point outside its parent folder (`../x`)."""
    from ditlab.config import check_name

    try:
        return None if name is None else check_name(name)
    except ValueError as err:
        raise BadInput(f"{flag}: {err}") from None


def writable_folder(flag: str, path: str) -> Path:
    """`path` as a folder to create or write into: a file in its place, or in place of one of its
    parents, is refused by name before anything is written; so is a URL (only `ditlab run` and
    `ditlab train` take object storage: their --storage s3://...)."""
    if "://" in str(path):
        raise BadInput(f"{flag}: {path!r} is a URL; this option takes a local folder (object storage is for "
                       "`ditlab run` and `ditlab train --storage s3://...`)")
    p = Path(path)
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BadInput(f"{flag}: {str(existing)!r} is a file, not a folder; name a folder")
    return p


def fresh_output_folder(flag: str, path: str, manifest: str) -> Path:
    """An output folder that is new or holds no images and no `manifest`: images left there by an
    earlier command would later be read (`ditlab evaluate --fake DIR`) as if this one wrote them."""
    from ditlab.evaluation.images import IMAGE_SUFFIXES

    p = writable_folder(flag, path)
    if not p.is_dir():
        return p
    old = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES or f.name == manifest)
    if old:
        raise BadInput(f"{flag}: {path!r} already holds the output of an earlier command ({len(old)} file(s), e.g. "
                       f"{old[0].name}); write to a new folder, or delete them first")
    return p


@contextlib.contextmanager
def stdout_for(args) -> Iterator[None]:
    """With --json, stdout carries exactly one JSON object: everything else printed meanwhile goes
    to stderr."""
    with contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext():
        yield


def check_sampling_flags(args) -> None:
    """--steps, --guidance and --seed of the commands that sample (sample, inspect)."""
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps: must be at least 1, got {args.steps}")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise BadInput(f"--guidance: must be a finite number >= 0, got {args.guidance}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise BadInput(f"--seed: must be in [0, 2**32), got {args.seed}")


def emit(args, result, text: str) -> None:
    """The command's result: JSON on stdout with --json, else `text`."""
    print(json.dumps(result, sort_keys=True) if args.json else text)


def print_spec(args, record: dict) -> None:
    """--dry-run: the resolved spec as YAML, or as indented JSON with --json."""
    import yaml

    sys.stdout.write(json.dumps(record, indent=2) + "\n" if args.json else yaml.safe_dump(record, sort_keys=False))


def load_spec(args):
    """The command's spec with --set applied; with --dry-run it is printed and None returned."""
    from ditlab.config import load

    spec = load(args.spec, args.overrides)
    if args.dry_run:
        print_spec(args, spec.to_dict())
        return None
    return spec


def preflight_or_bad_input(spec, task_checks: bool = True) -> None:
    """The checks that touch the disk, before Ray starts: a failure is one error line."""
    from ditlab.orchestration.preflight import PreflightError, preflight

    try:
        preflight(spec, task_checks)
    except PreflightError as err:
        raise BadInput(str(err)) from None
