"""The `ditlab` command: one way in. One module per command; the flags they share are declared once
in common.py.

    ditlab run SPEC [--set a.b=c ...] [--address ADDR] [--name NAME] [--dry-run] [--json] [--verbose]
    ditlab train SPEC [...as run] [--restart-if-changed] [--export DIR]     (no final evaluation)
    ditlab sample CHECKPOINT|RUN --out DIR [--num N] [--spec SPEC] [--labels 0,1,2] [--sampler ddim] [--guidance W]
    ditlab restore CHECKPOINT|RUN --input DIR --out DIR [--sampler ddim] [--steps N] [--json]
    ditlab evaluate --fake DIR|CHECKPOINT [--real DIR|DATASET|PREPARED] [--protocol P | --spec SPEC] [--json]
    ditlab inspect CHECKPOINT|RUN --out DIR [--num N] [--labels 0,1,2] [--steps N] [--json]
    ditlab augment CHECKPOINT|RUN --name NAME --out DIR [--per-class N] [--k 5,10,20] [--seeds 5] [--no-dvc] [--json]
    ditlab data prepare SPEC --out DIR | ditlab data add DIR --name NAME [--no-dvc]
    ditlab submit SPEC --address http://HEAD:8265 [--set a.b=c ...] [--name NAME] [--follow] [--json]
    ditlab jobs list|status ID|logs ID [--follow]|stop ID --address http://HEAD:8265
    ditlab tune SWEEP [--set a.b=c | --set sweep.num_samples=N ...] [--address ADDR] [--name NAME] [--resume] [--json]

Bad input (a spec error, a missing checkpoint) prints one `ditlab: error: ...` line and exits 2.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from types import SimpleNamespace

from ditlab.allocator import keep_freed_memory
from ditlab.cli import augment, cluster, convert, data, evaluate, inspect, restore, run, sample, tune
from ditlab.cli.common import (EXIT_BAD_INPUT, BadInput, address_flag, dry_run_flag, json_flag, overrides_flag,
                               parent, progress_flag, verbose_flag)
from ditlab.config import SpecError, printable
from ditlab.orchestration.console import configure_console

COMMAND_MODULES = (run, data, sample, restore, evaluate, inspect, augment, convert, cluster, tune)


def _spec_positional(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="experiment spec (YAML), e.g. experiments/quickstart.yaml")


def shared_parents() -> SimpleNamespace:
    """Parent parsers, one per group of shared flags; commands pick the groups they take."""
    output = parent(json_flag, verbose_flag)
    spec_flags = parent(_spec_positional, overrides_flag, dry_run_flag, json_flag, verbose_flag)
    ray = parent(address_flag, progress_flag)
    return SimpleNamespace(
        output=[output],
        verbose=[parent(verbose_flag)],
        overrides=[parent(overrides_flag)],
        ray=[ray],
        spec_command=[spec_flags, ray],
        evaluate=[parent(lambda p: overrides_flag(p, "a protocol field, e.g. --set kid.subset_size=50"),
                         progress_flag), output],
    )


class Parser(argparse.ArgumentParser):
    """No abbreviated flags: a typo such as `--storag` is an error, not a silent `--storage`.
    A usage error is one `ditlab: error:` line, as every other bad input. Subcommand parsers are made
    with the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.removeprefix("ditlab").strip()
        self.exit(EXIT_BAD_INPUT, error_line(f"{f'{command}: ' if command else ''}{message} (see {self.prog} --help)"))


def error_line(message: str) -> str:
    """The one line a refusal prints: control characters inside a value it quotes (a line break in a
    file name, an escape sequence) are shown escaped, as \\n or \\x1b."""
    return f"ditlab: error: {printable(message)}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ditlab", description="Train, sample and evaluate diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = shared_parents()
    for module in COMMAND_MODULES:
        module.register(sub, shared)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_console(getattr(args, "verbose", False))  # before Ray starts: what reaches stderr
    try:
        return args.handler(args)
    except (SpecError, BadInput) as err:
        sys.stderr.write(error_line(str(err)))
        return EXIT_BAD_INPUT


def console() -> None:
    """The `ditlab` executable (and `python -m ditlab.cli`): `main`, then `exit_now` with its code.
    First the process is set to keep the memory it frees (ditlab/allocator.py): not in `main`,
    which tests call in their own process."""
    keep_freed_memory()
    exit_now(main())


def exit_now(code: int | None) -> None:
    """Ends the process after a command that returned, without the interpreter's teardown.

    The exit handlers run as in a normal exit (Ray's shutdown of the instance this process started,
    logging's flush, temporary folders), and stdout and stderr are flushed; then `os._exit`. What
    is skipped is Python freeing every loaded module's objects one by one: 2.1 s after a `ditlab
    run` (torch, Ray, MLflow and the evaluation suite loaded; 0.1 s with this), about 1 s after
    any command that imports torch and MLflow (BENCHMARKS.md, "The run's two ends"). A command
    that raised does not come here, and while a thread other than a daemon is alive (a normal exit
    would wait for it) this is a normal exit."""
    code = 0 if code is None else int(code)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own call at exit; the handlers are removed as they run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`ditlab ... | head`): Python exits 120 then too
            code = code or 120
    os._exit(code)


__all__ = ["BadInput", "build_parser", "console", "exit_now", "main"]
