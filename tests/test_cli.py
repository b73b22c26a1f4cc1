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
