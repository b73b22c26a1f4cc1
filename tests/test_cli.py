"""The shape of the `ditlab` command: shared flags on every command, no abbreviated flags, dry runs
that write nothing."""

import argparse

import pytest

from ditlab import cli

from conftest import ROOT

TINY = str(ROOT / "experiments" / "tiny.yaml")


def leaf_parsers(parser: argparse.ArgumentParser, path=()):
    """(command words, parser) of every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_parsers(child, (*path, name))


def test_every_command_takes_json_and_verbose():
    commands = dict(leaf_parsers(cli.build_parser()))
    assert {c[0] for c in commands} == {"run", "train", "data", "sample", "restore", "evaluate", "inspect",
                                        "augment", "convert", "submit", "jobs", "tune"}
    for words, parser in commands.items():
        flags = {opt for action in parser._actions for opt in action.option_strings}
        assert "--verbose" in flags, words
        assert "--json" in flags or words == ("jobs", "logs"), words  # logs prints the job's own text


@pytest.mark.parametrize("argv", [["run", TINY, "--dry-ru"], ["train", TINY, "--stor", "x", "--dry-run"],
                                  ["tune", str(ROOT / "experiments" / "sweeps" / "tiny.yaml"), "--dry"]])
def test_an_abbreviated_flag_is_an_error_not_a_guess(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_data_prepare_dry_run_prints_the_spec_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["data", "prepare", TINY, "--out", str(tmp_path / "prepared"), "--dry-run"]) == 0
    assert "resolution: 8" in capsys.readouterr().out
    assert not (tmp_path / "prepared").exists()


EXIT_PROBE = """
import atexit, sys, threading, time
from ditlab.cli import exit_now
atexit.register(lambda: print("handler ran"))  # unflushed too
print("buffered", end="")  # no newline, no flush: exit_now must flush it
if sys.argv[1] == "thread":  # a non-daemon thread: a normal exit, which waits for it
    threading.Thread(target=lambda: (time.sleep(0.3), print(" thread done", end=""))).start()
exit_now(int(sys.argv[2]))
"""


@pytest.mark.parametrize("case", ["quick", "thread"])
def test_the_command_exits_with_its_code_after_the_exit_handlers_and_with_its_output_flushed(case):
    """`ditlab` ends with cli.exit_now (os._exit after the exit handlers): nothing printed may be lost,
    the handlers Ray and logging register must still run, and the code is the command's."""
    import os
    import subprocess
    import sys

    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE, case, "3"], capture_output=True, text=True, timeout=60,
                          env=buffered)
    assert done.returncode == 3, done.stderr
    expected = {"quick": "bufferedhandler ran\n", "thread": "buffered thread donehandler ran\n"}[case]
    assert done.stdout == expected, done.stdout
