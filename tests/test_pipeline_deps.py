"""The shipped dvc.yaml lists, for each stage, every source file the stage's `ditlab` command can
import, so editing code a stage runs reruns it. The import graph is read from the source (every
`import ditlab...` / `from ditlab... import`, also those inside functions, which over-approximates
what one run imports: a stage may rerun for nothing, never miss a change)."""

import shlex
from pathlib import Path

import pytest
import yaml

from ditlab.cli import build_parser

from conftest import ROOT
from import_graph import SRC, imported_names, module_file

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def source_closure(entry: str) -> set[Path]:
    """Files of every ditlab module reachable from `entry` and the packages above each. The `ditlab.cli`
    package imports every command module, but a stage runs one command: of those, only the entry's
    imports are followed."""
    seen: set[Path] = set()
    todo = [entry, "ditlab.cli.common", "ditlab.cli"]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        found = imported_names(path)
        if name == "ditlab.cli":
            found = {n for n in found if not n.startswith("ditlab.cli.")}
        todo += found
    return seen


def stage_entry(cmd: str) -> str:
    argv = shlex.split(cmd)
    assert argv[0] == "ditlab", cmd
    return build_parser().parse_args(argv[1:]).handler.__module__


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_source_file_a_stage_imports_is_one_of_its_deps(stage):
    entry = stage_entry(" ".join(STAGES[stage]["cmd"].split()))
    deps = [ROOT / d for d in STAGES[stage].get("deps", [])]
    missing = sorted(str(f.relative_to(ROOT)) for f in source_closure(entry)
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {entry} but does not list {missing}"
    assert all(d.exists() for d in deps if "pipeline" not in d.parts), "a listed dep does not exist"


def test_the_closure_follows_lazy_imports():
    closure = source_closure("ditlab.cli.evaluate")
    assert SRC / "ditlab" / "orchestration" / "evaluate.py" in closure  # imported inside cmd_evaluate
    assert SRC / "ditlab" / "orchestration" / "jobs.py" not in closure  # another command's code
