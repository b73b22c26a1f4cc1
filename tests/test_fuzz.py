"""Property-based tests (hypothesis) of bad input (issue 15, section 2).

1. The spec loader and the `--set` parser, fed random files, assignments and values in real fields,
   either return a spec or raise SpecError with one line: never another exception.
2. The `ditlab` command, driven in-process with random bad arguments, prints one `ditlab: error:`
   line and exits 2: never a traceback, never a file written. Every generated command line holds at
   least one argument that must be refused, so none of them can start a run; runs and sweeps are
   also guarded (reaching Ray fails the test).
"""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditlab import cli
from ditlab.config import NAME_PATTERN, ExperimentSpec, SpecError, apply_override, flatten, from_dict, load
from ditlab.sweep import set_field

from conftest import ROOT

TINY = str(ROOT / "experiments" / "tiny.yaml")
TINY_SWEEP = str(ROOT / "experiments" / "sweeps" / "tiny.yaml")
LEGACY = str(ROOT / "tests" / "data" / "legacy_checkpoint")
FIELDS = sorted(flatten(ExperimentSpec().to_dict()))  # every field of a spec, dotted

# No example database: nothing written into the repository; a failure prints its example.
FEW = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# What a person can type: any character but NUL (argv cannot hold it) and lone surrogates.
typed = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | typed
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(typed, inner, max_size=3),
                      max_leaves=6)


def accepted_or_refused(make) -> None:
    """`make()` returns, or raises SpecError with a one-line message; anything else propagates."""
    try:
        make()
    except SpecError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))


def as_yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()


assignments = (typed  # anything at all
               | st.builds(lambda f, v: f"{f}={as_yaml(v)}", st.sampled_from(FIELDS), values)  # a real field
               | st.builds(lambda f, t: f"{f}={t}", st.sampled_from(FIELDS), typed))  # raw text as its value


@FEW
@given(st.lists(assignments, max_size=4))
def test_set_overrides_give_a_spec_or_one_spec_error(overrides):
    accepted_or_refused(lambda: load(TINY, overrides))


@FEW
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), st.lists(assignments, max_size=2))
def test_spec_files_with_random_values_in_real_fields_give_a_spec_or_one_spec_error(fields, overrides):
    raw: dict = {}
    for key, value in fields.items():
        try:
            set_field(raw, key, value)
        except SpecError:
            return  # two keys of which one is a section the other makes a value: not a file one can write
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        accepted_or_refused(lambda: load(path, overrides))


@FEW
@given(st.binary(max_size=300) | typed.map(str.encode))
def test_any_bytes_as_a_spec_file_give_a_spec_or_one_spec_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.yaml"
        path.write_bytes(content)
        accepted_or_refused(lambda: load(path))


@FEW
@given(st.dictionaries(typed, values, max_size=4), typed)
def test_set_on_any_raw_dict_then_validation_raise_only_spec_errors(raw, assignment):
    def apply_and_validate():
        apply_override(raw, assignment)
        from_dict(raw)

    accepted_or_refused(apply_and_validate)


# -- the CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_cwd(tmp_path_factory):
    """An empty working folder that must stay empty, with runs and sweeps guarded."""
    folder = tmp_path_factory.mktemp("fuzz-cwd")

    def started(*args, **kwargs):
        raise AssertionError("bad input reached Ray")

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr("ditlab.orchestration.train.run_experiment", started)
        mp.setattr("ditlab.orchestration.tune.run_sweep", started)
        yield folder


def option(flag: str, value=typed):
    return st.tuples(st.just(flag), value)


def flags(*choices) -> st.SearchStrategy[list[str]]:
    """Some of `choices` (each a strategy of a tuple of argv words), flattened."""
    return st.lists(st.one_of(*choices), max_size=4).map(lambda picked: [w for words in picked for w in words])


numbers = st.integers(-5, 5).map(str) | st.floats().map(str) | typed
bad_names = typed.filter(lambda name: not NAME_PATTERN.fullmatch(name))
not_here = typed.map(lambda t: f"missing-{t}")  # a path that exists nowhere in the empty folder
spec_sets = option("--set", assignments)
run_flags = flags(spec_sets, option("--name"), option("--storage"), option("--address"), option("--export"),
                  st.just(("--dry-run",)), st.just(("--json",)), st.just(("--restart-if-changed",)))
no_help = typed.filter(lambda t: not t.startswith("-h") and t != "--help")  # help is not an error
COMMANDS = {"run", "train", "tune", "submit", "jobs", "sample", "restore", "evaluate", "data"}
BAD_STEPS = ["--set", "train.steps=-1"]  # refused whatever else the command line says


@st.composite
def bad_command_lines(draw) -> list[str]:
    kind = draw(st.sampled_from(["run", "train", "tune", "submit", "sample", "restore", "evaluate", "data add",
                                 "data prepare", "unknown", "tokens"]))
    if kind in ("run", "train"):
        return [kind, draw(st.sampled_from([TINY, "missing.yaml"])), *draw(run_flags), *BAD_STEPS]
    if kind == "tune":
        sweep_flags = flags(spec_sets, option("--name"), option("--storage"), st.just(("--resume",)))
        return ["tune", TINY_SWEEP, *draw(sweep_flags), "--set", "sweep.num_samples=0"]
    if kind == "submit":
        submit_flags = flags(spec_sets, option("--name"), option("--env"), option("--address"), st.just(("--follow",)))
        return ["submit", TINY, *draw(submit_flags), *BAD_STEPS]
    if kind == "sample":
        sample_flags = flags(*(option(f, numbers) for f in ("--num", "--guidance", "--seed", "--steps")),
                             option("--labels"), option("--sampler"), option("--weights"), option("--spec"))
        return ["sample", draw(st.sampled_from([LEGACY]) | not_here), "--out", draw(typed), *draw(sample_flags),
                "--steps", str(draw(st.integers(-3, 0)))]
    if kind == "restore":
        return ["restore", draw(st.sampled_from([LEGACY]) | not_here), "--input", draw(typed), "--out", draw(typed),
                "--steps", str(draw(st.integers(-3, 0)))]
    if kind == "evaluate":
        evaluate_flags = flags(option("--real"), option("--protocol"), option("--spec"), option("--out"),
                               option("--set", assignments), st.just(("--json",)))
        return ["evaluate", "--fake", draw(not_here), *draw(evaluate_flags)]
    if kind == "data add":
        return ["data", "add", draw(typed), f"--name={draw(bad_names)}", "--root", draw(typed),
                *draw(st.sampled_from([[], ["--no-dvc"]]))]
    if kind == "data prepare":
        return ["data", "prepare", TINY, "--out", draw(typed), *draw(flags(spec_sets)), *BAD_STEPS]
    words = st.lists(no_help, max_size=5)
    if kind == "unknown":  # not a command
        return [draw(no_help.filter(lambda t: t not in COMMANDS)), *draw(words)]
    # a command that takes a spec or a checkpoint, then random words
    return [*draw(st.sampled_from([["run"], ["train"], ["sample"], ["data", "add"], ["data", "prepare"]])),
            *draw(words)]


@settings(FEW, max_examples=120)
@given(bad_command_lines())
def test_random_bad_command_lines_get_one_error_line_and_exit_2(empty_cwd, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_info:  # argparse's refusals
            code = exit_info.code
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ditlab: error: "), (json.dumps(argv), err.getvalue())
    assert out.getvalue() == "" and list(empty_cwd.iterdir()) == []
