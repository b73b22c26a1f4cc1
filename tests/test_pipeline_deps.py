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

# Every shipped pipeline: the root one and those under pipelines/ (stage paths are relative to
# the folder of their dvc.yaml).
PIPELINES = [ROOT / "dvc.yaml", *sorted(ROOT.glob("pipelines/*/dvc.yaml"))]
STAGES = {(p, name): stage for p in PIPELINES for name, stage in yaml.safe_load(p.read_text())["stages"].items()}


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


@pytest.mark.parametrize("pipeline, stage", sorted(STAGES), ids=[f"{p.parent.relative_to(ROOT)}:{s}".lstrip(".:")
                                                                for p, s in sorted(STAGES)])
def test_every_source_file_a_stage_imports_is_one_of_its_deps(pipeline, stage):
    entry = stage_entry(" ".join(STAGES[pipeline, stage]["cmd"].split()))
    deps = [(pipeline.parent / d).resolve() for d in STAGES[pipeline, stage].get("deps", [])]
    missing = sorted(str(f.relative_to(ROOT)) for f in source_closure(entry)
                     if not any(f == d or d in f.parents for d in deps))
    name = pipeline.relative_to(ROOT)
    assert not missing, f"{name} stage {stage!r} runs {entry} but does not list {missing}"
    sources = [d for d in deps if (ROOT / "src") in d.parents]
    assert all(d.exists() for d in sources), f"{name} stage {stage!r}: a listed source file does not exist"


def test_the_closure_follows_lazy_imports():
    closure = source_closure("ditlab.cli.evaluate")
    assert SRC / "ditlab" / "orchestration" / "evaluate.py" in closure  # imported inside cmd_evaluate
    assert SRC / "ditlab" / "orchestration" / "jobs.py" not in closure  # another command's code


def _has_key(raw, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


@pytest.mark.parametrize("pipeline, stage", sorted(STAGES), ids=[f"{p.parent.relative_to(ROOT)}:{s}".lstrip(".:")
                                                                for p, s in sorted(STAGES)])
def test_every_param_a_stage_lists_is_spelled_out_in_its_params_file(pipeline, stage):
    """DVC fails a stage whose listed param is absent from its file, and only after the stages before
    it ran (found running pipelines/latent: `loss`, then `evaluation.seed`). test_dvc checks the root
    pipeline under DVC itself; this reads every pipeline's files."""
    for entry in STAGES[pipeline, stage].get("params") or []:
        files = entry if isinstance(entry, dict) else {"params.yaml": [entry]}
        for name, keys in files.items():
            raw = yaml.safe_load((pipeline.parent / name).read_text())
            missing = [k for k in keys if not _has_key(raw, k)]
            assert not missing, f"{pipeline.relative_to(ROOT)} stage {stage!r}: {missing} not in {name}"
