"""The READMEs followed as written (issue 18): README.md, platform/README.md and k8s/README.md.

Every `ditlab ...` line in their code blocks (continuations joined, comments, pipes and
redirections cut off) must parse with the CLI's own argparse parser, and runs as far as it cheaply
can, in README order:

- `run`, `train`, `tune`, `data prepare`: their `--dry-run` form, from an empty folder that sees the
  repository's experiments/, evaluation/ and params.yaml; nothing may appear in it;
- `submit`, `jobs`: against an address where nothing listens (for `--address` and
  RAY_API_SERVER_ADDRESS): each must get past its local checks (spec, overrides, working
  directory) and fail only on the one-line "cannot reach" error naming that address;
- `sample` and `evaluate` of image folders (e2e, `test_examples_run_in_readme_order`): for real,
  one after the other, so an evaluation sees exactly what the README's sampling wrote; `inspect`
  too (a few samples of the tiny run's checkpoint);
- `evaluate` of a checkpoint and `restore`: parsed and checked statically (below); running them
  samples hundreds of images (test_e2e.py runs that path on the tiny run).

Substitution rules for what a README names but a test cannot have:
- `/home/ray/ditlab/` (the image's copy of the repository, platform/Dockerfile) is the repository;
- a run folder `runs/NAME[/checkpoint_STEP]` must be a run an earlier command of the same README
  starts with `--name NAME`, and STEP a checkpoint that run keeps (every `train.checkpoint_every`
  steps and the last, the last `checkpoints_kept` of them, as orchestration/trainer.py keeps them).
  In the e2e test the run folder is the session's tiny run (conftest.tiny_run) and a checkpoint its
  checkpoint of the same rank from the end;
- the folders of the paired-folder example (`restored/`, `ground_truth/`) are made by the test:
  digits as ground truth and the same digits with noise as the restored images, same file names;
- in the e2e test the reference `digits:test` (360 images) is a folder of 40 digits: an Inception
  pass over 360 images costs minutes of CPU, and what the test is after (each evaluation fits the
  images sampled before it and runs end to end) does not depend on the reference's size. The
  static check of sample sizes below runs against the README's own arguments;
- a job id (`raysubmit_...`) and the cluster's paths (`/mnt/ditlab/...`) are used as they are.

Beyond the commands: every repository path a README names exists (globs match something),
every `make` target exists, every number in the README's Benchmarks section comes from a committed
file under benchmarks/results/, the working-directory outputs of "Where things go" are git-ignored
and never shipped by `ditlab submit`, and MLflow artifacts of the default SQLite store land beside
it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "platform/README.md", "k8s/README.md")
IMAGE_ROOT = "/home/ray/ditlab/"
RUN_PATH = re.compile(r"^runs/([^/]+)(?:/checkpoint_(\d+))?/?$")
# Folders the paired-folder example names; the test makes them (see make_paired_folders).
PAIRED_FOLDERS = ("restored/", "ground_truth/")
# What each command gets here: see the module docstring.
DRY_RUN = {"run", "train", "tune", "data prepare", "data encode"}
CLUSTER = {"submit", "jobs"}
RUN_IN_E2E = {"sample", "evaluate", "inspect"}
STATIC_ONLY = {"restore": "needs a restoration checkpoint, which no shared fixture trains",
               "data add": "copies a folder into data/ and runs dvc add",
               "augment": "samples N images a class and runs dvc add (tests/test_augment.py runs it)"}


# --- reading the READMEs ----------------------------------------------------------------------

@dataclass
class Command:
    readme: str
    line: int
    argv: list[str]  # after `ditlab`

    @property
    def kind(self) -> str:
        return " ".join(self.argv[:2]) if self.argv[0] in ("data",) else self.argv[0]

    def __str__(self) -> str:
        return f"{self.readme}:{self.line}: ditlab {shlex.join(self.argv)}"


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every fenced code block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Shell lines with backslash continuations joined, each with its first line's number."""
    out, pending, first = [], "", start
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command on a shell line: comments dropped, split at `;`, `&&`, `||`, `|`,
    `&`, and cut at a redirection (`> result.json`)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands, words, cut = [], [], False
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(words)
            words, cut = [], False
        elif token and set(token) <= set("<>"):
            cut = True
        elif not cut:
            words.append(token)
    commands.append(words)
    return [c for c in commands if c]


def readme_commands(readme: str) -> list[Command]:
    text = (ROOT / readme).read_text()
    found = []
    for start, lines in code_blocks(text):
        for number, line in logical_lines(start, lines):
            for words in simple_commands(line):
                if words[0] == "ditlab":
                    found.append(Command(readme, number, [w.replace(IMAGE_ROOT, str(ROOT) + "/") for w in words[1:]]))
    return found


ALL_COMMANDS = [c for readme in READMES for c in readme_commands(readme)]


def parse(command: Command):
    from ditlab.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(command.argv)
    except SystemExit:
        pytest.fail(f"{command}: the CLI does not parse it: {err.getvalue().strip()}")


def run_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`ditlab ARGV` in-process from `cwd`: (exit status, stdout, stderr)."""
    from ditlab import cli

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_readmes_hold_commands_of_every_kind():
    kinds = {c.kind for c in ALL_COMMANDS}
    assert {"run", "tune", "sample", "evaluate", "submit", "jobs"} <= kinds, kinds
    assert simple_commands("ditlab run a.yaml --json > result.json  # one line") == [
        ["ditlab", "run", "a.yaml", "--json"]]
    assert simple_commands("kubectl delete x && ditlab jobs list") == [["kubectl", "delete", "x"],
                                                                         ["ditlab", "jobs", "list"]]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=str)
def test_every_command_parses_and_is_accounted_for(command):
    args = parse(command)
    kind = command.kind
    assert kind in DRY_RUN | CLUSTER | RUN_IN_E2E | set(STATIC_ONLY), (
        f"{command}: a new kind of command; say in tests/test_readme.py how it runs cheaply")
    if kind in DRY_RUN:
        assert hasattr(args, "dry_run"), f"{command}: `ditlab {kind}` lost --dry-run"


# --- commands that run here ---------------------------------------------------------------------

@pytest.fixture
def empty_project(tmp_path) -> Path:
    """An empty folder seeing the repository's specs, protocols and the pipeline's params.yaml."""
    for name in ("experiments", "evaluation", "params.yaml"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_dry_run_forms_print_and_write_nothing(empty_project):
    before = sorted(p.name for p in empty_project.iterdir())
    ran = set()
    for command in (c for c in ALL_COMMANDS if c.kind in DRY_RUN):
        argv = [*command.argv, "--dry-run"] if "--dry-run" not in command.argv else command.argv
        code, out, err = run_cli(argv, empty_project)
        assert code == 0, f"{command}: exit {code}: {err.strip()[-500:]}"
        assert out.strip(), f"{command}: --dry-run printed nothing"
        if command.kind == "tune":
            assert re.search(r"^trials: \d+$", out, re.MULTILINE) or '"trials":' in out, f"{command}: no trial count"
        ran.add(command.kind)
    assert {"run", "tune", "data prepare"} <= ran, ran
    assert sorted(p.name for p in empty_project.iterdir()) == before, "a --dry-run wrote something"


def test_tune_help_says_what_dry_run_prints():
    from ditlab.cli import build_parser

    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    (action,) = [a for a in tune._actions if a.dest == "dry_run"]
    assert "number of trials" in action.help


def test_cluster_commands_get_as_far_as_the_cluster():
    dead = f"http://127.0.0.1:{free_port()}"
    ran = 0
    for command in (c for c in ALL_COMMANDS if c.kind in CLUSTER):
        argv = list(command.argv)
        if "--address" in argv:
            argv[argv.index("--address") + 1] = dead
        code, _, err = run_cli(argv, ROOT, {"RAY_API_SERVER_ADDRESS": dead, "RAY_AUTH_MODE": "token",
                                            "RAY_AUTH_TOKEN": "0" * 32})
        assert code == 2 and f"cannot reach the Ray dashboard at {dead}" in err, (
            f"{command}: stopped before contacting the cluster (exit {code}): {err.strip()[-500:]}")
        ran += 1
    assert ran >= 4


# --- what a README names must exist -------------------------------------------------------------

def checkpoints_kept() -> int:
    """The default of build_trainer's `checkpoints_kept`, read from its source (importing
    orchestration.trainer would load Ray Train)."""
    tree = ast.parse((ROOT / "src/ditlab/orchestration/trainer.py").read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "build_trainer"]
    names = [a.arg for a in fn.args.kwonlyargs]
    return ast.literal_eval(fn.args.kw_defaults[names.index("checkpoints_kept")])


def kept_steps(spec) -> list[int]:
    steps, every = spec.train.steps, spec.train.checkpoint_every
    return sorted(set(range(every, steps + 1, every)) | {steps})[-checkpoints_kept():]


def named_runs(commands: list[Command]) -> dict[str, list[tuple[int, object]]]:
    """NAME -> [(line, spec)] for every `run`/`train ... --name NAME` (into ./runs) in the list."""
    from ditlab.config import load

    runs: dict[str, list] = {}
    for command in commands:
        if command.kind in ("run", "train"):
            args = parse(command)
            if args.name and args.storage == "runs":
                with contextlib.chdir(ROOT):
                    spec = load(args.spec, args.overrides)
                runs.setdefault(args.name, []).append((command.line, spec))
    return runs


def run_folder_problems(commands: list[Command]) -> list[str]:
    runs, problems = named_runs(commands), []
    for command in commands:
        for word in command.argv:
            match = RUN_PATH.match(word)
            if not match:
                continue
            name, step = match.group(1), match.group(2)
            earlier = [spec for line, spec in runs.get(name, []) if line < command.line]
            if not earlier:
                problems.append(f"{command}: no earlier command of {command.readme} makes the run folder runs/{name} "
                                f"(give the run --name {name})")
            elif step is not None and int(step) not in kept_steps(earlier[-1]):
                problems.append(f"{command}: checkpoint_{step} never exists; runs/{name} keeps "
                                f"{', '.join(f'checkpoint_{s:06d}' for s in kept_steps(earlier[-1]))}")
    return problems


@pytest.mark.parametrize("readme", READMES)
def test_run_folders_and_checkpoints_named_are_ones_the_readme_makes(readme):
    assert run_folder_problems(readme_commands(readme)) == []


def test_run_folder_check_finds_a_checkpoint_that_never_exists():
    commands = [Command("x", 1, ["run", "experiments/quickstart.yaml", "--name", "qs"]),
                Command("x", 2, ["sample", "runs/qs/checkpoint_000300", "--num", "2", "--out", "s"]),
                Command("x", 3, ["sample", "runs/other", "--num", "2", "--out", "s"])]
    problems = run_folder_problems(commands)
    assert len(problems) == 2 and "checkpoint_000250, checkpoint_000500" in problems[0]


def sample_sizes_problems(commands: list[Command]) -> list[str]:
    """An evaluation of a folder that an earlier `sample --num N` wrote must fit N images (KID's
    subsets, precision/recall's k): the check the suite makes before any Inception pass."""
    from ditlab.cli.evaluate import protocol
    from ditlab.evaluation.suite import check_set_sizes

    written: dict[str, int] = {}
    problems = []
    for command in commands:
        args = parse(command)
        if command.kind == "sample":
            written[args.out.rstrip("/")] = args.num or 100
        elif command.kind == "evaluate" and args.fake.rstrip("/") in written:
            with contextlib.chdir(ROOT):
                ev = protocol(args)
            if ev is None:
                continue
            try:
                check_set_sizes(ev, written[args.fake.rstrip("/")])
            except ValueError as err:
                problems.append(f"{command}: {err}")
    return problems


@pytest.mark.parametrize("readme", READMES)
def test_evaluations_fit_the_samples_written_before_them(readme):
    assert sample_sizes_problems(readme_commands(readme)) == []


def test_sample_size_check_finds_a_kid_subset_larger_than_the_samples():
    commands = [Command("x", 1, ["sample", "runs/qs", "--num", "20", "--out", "samples"]),
                Command("x", 2, ["evaluate", "--fake", "samples/", "--real", "digits:test", "--set",
                                 "kid.subset_size=50"])]
    (problem,) = sample_sizes_problems(commands)
    assert "kid.subset_size 50 exceeds the fake set (20 images)" in problem


PATH_TOKEN = re.compile(r"^\.{0,2}[\w.-]+(/[\w.*-]+)+/?$|^[\w-]+\.(py|ya?ml|md|txt|sh|toml|json|env|example)$")
# Roots a README's relative paths are written against: its own folder, the repository, the package.
PACKAGE_ROOTS = ("src/ditlab", "src/ditlab/training")
# What commands write (Where things go), not what the repository holds.
OUTPUT_PREFIXES = ("runs/", "sweeps/", "samples/", "evaluations/", "cache/", "mlruns/", "mlartifacts/", "pipeline/",
                   "data/", ".dvc/cache", ".dvc/tmp")


def repo_paths(readme: str) -> list[tuple[str, list[Path]]]:
    """Each path-looking word of the README (in backticks, links and code blocks) whose first part
    exists under one of the roots, with the candidates it may mean."""
    text = (ROOT / readme).read_text()
    words = [w for quoted in re.findall(r"`([^`\n]+)`", text) for w in quoted.split()]
    words += re.findall(r"\]\(([^)#\s]+)\)", text)
    words += [w for _, lines in code_blocks(text) for line in lines for w in line.split()]
    roots = [(ROOT / readme).parent, ROOT, *(ROOT / r for r in PACKAGE_ROOTS)]
    found = []
    for word in {w.strip("'\",;:()") for w in words}:
        word = word.removeprefix(IMAGE_ROOT).removeprefix("./")
        if (not PATH_TOKEN.match(word) or word.startswith(("/", "~", "..", "http", *OUTPUT_PREFIXES))
                or "<" in word or "..." in word):
            continue
        first = word.split("/")[0]
        bases = [r for r in roots if (r / first).exists()]
        if bases:
            found.append((word, [b / word for b in bases]))
    return found


@pytest.mark.parametrize("readme", READMES)
def test_every_repository_path_a_readme_names_exists(readme):
    missing = []
    for word, candidates in repo_paths(readme):
        if "*" in word:
            ok = any(list(c.parent.glob(c.name)) for c in candidates)
        else:
            ok = any(c.exists() or _git_ignored_example(c) for c in candidates)
        if not ok:
            missing.append(word)
    assert missing == [], f"{readme} names paths that do not exist: {sorted(missing)}"


def _git_ignored_example(path: Path) -> bool:
    """A file the reader makes from a committed example (mlflow.env from mlflow.env.example)."""
    return path.with_name(path.name + ".example").is_file()


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \??:?= (.+)$", text, re.MULTILINE))
    targets = set()
    for target in re.findall(r"^([^\s:#=]+):", text, re.MULTILINE):
        while "$(" in target:
            target = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], target)
        targets.add(target)
    return targets


def test_every_make_target_a_readme_names_exists():
    targets, named = make_targets(), set()
    for readme in READMES:
        text = (ROOT / readme).read_text()
        snippets = re.findall(r"`(make [^`]+)`", text)
        snippets += [line for start, lines in code_blocks(text) for _, line in logical_lines(start, lines)]
        for snippet in snippets:
            for words in simple_commands(snippet):
                if words[0] == "make":
                    named |= {w for w in words[1:] if "=" not in w and w != "..."}
    assert named and named <= targets, f"not Makefile targets: {sorted(named - targets)}"


# --- figures, outputs, the quick paths -------------------------------------------------------------

def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section '## {title}'"
    return match.group(1)


def unsourced_figures(prose: str, sources: str) -> list[str]:
    """Numbers in prose (code blocks and `code` left out: flags and commands) that no results file
    holds."""
    prose = re.sub(r"```.*?```", "", prose, flags=re.DOTALL)
    prose = re.sub(r"`[^`]*`", "", prose)
    return [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", prose) if n not in sources]


def test_benchmark_figures_come_from_committed_results():
    results = ROOT / "benchmarks" / "results"
    tracked = subprocess.run(["git", "ls-files", str(results)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    sources = "\n".join((ROOT / f).read_text() for f in tracked if f.endswith(".json"))
    prose = section((ROOT / "README.md").read_text(), "Benchmarks")
    assert unsourced_figures(prose, sources) == []
    assert unsourced_figures("random search best val_loss 0.2145, 1785 worker-seconds", sources) != []


# Default outputs in the working directory ("Where things go").
WORKDIR_OUTPUTS = ("runs", "sweeps", "evaluations", "samples", "cache", "mlflow.db", "mlartifacts", "mlruns")


def test_working_directory_outputs_are_listed_ignored_and_never_submitted():
    from ditlab.orchestration.jobs import EXCLUDES

    table = section((ROOT / "README.md").read_text(), "Where things go")
    as_paths = [name if "." in name else f"{name}/" for name in WORKDIR_OUTPUTS]  # folders end in /
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *as_paths], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    for name, path in zip(WORKDIR_OUTPUTS, as_paths, strict=True):
        assert f"`{name}" in table, f"'Where things go' does not say what writes {name}"
        assert path in ignored, f"{name} is not git-ignored"
        assert f"/{name}" in EXCLUDES, f"ditlab submit would ship {name}"


def dashboard_commands(text: str) -> list[list[str]]:
    """Every `mlflow ui` / `mlflow server` command in a text's code blocks, with the variables
    assigned before it on its line."""
    found = []
    for start, lines in code_blocks(text):
        for _, line in logical_lines(start, lines):
            for words in simple_commands(line):
                names = [w for w in words if "=" not in w]
                if names[:1] == ["mlflow"] and names[1:2] in (["ui"], ["server"]):
                    found.append(words)
    return found


def jobs_off() -> list[str]:
    """The assignments a dashboard command starts with (tracking.DASHBOARD_ENV)."""
    from ditlab.orchestration.tracking import DASHBOARD_ENV

    return [f"{name}={value}" for name, value in DASHBOARD_ENV.items()]


@pytest.mark.parametrize("readme", READMES)
def test_every_dashboard_a_readme_starts_leaves_mlflows_job_consumers_off(readme):
    """MLflow 3's job-execution back end, for jobs ditlab never submits, takes 13-24 CPU seconds
    as it starts beside the runs and holds 1.3 GB (benchmarks/dashboard_cost.py)."""
    assert jobs_off(), "the assignments to look for"
    for words in dashboard_commands((ROOT / readme).read_text()):
        assert set(jobs_off()) <= set(words[:words.index("mlflow")]), f"{readme}: {shlex.join(words)}"


def test_the_dashboard_command_ditlab_prints_leaves_the_job_consumers_off():
    from ditlab.orchestration.tracking import Tracker

    assert dashboard_commands("```\nmlflow ui --port 1\nX=1 mlflow server\nmlflow runs list\n```\n") == [
        ["mlflow", "ui", "--port", "1"], ["X=1", "mlflow", "server"]], "the README check finds what it should"
    local = Tracker(None, "r", "1", "sqlite:///x/mlflow.db")
    assert dashboard_commands(f"```\n{local.url.split('  (')[0]}\n```") == [
        ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", "mlflow", "ui", "--backend-store-uri", "sqlite:///x/mlflow.db"]]


def test_mlflow_artifacts_land_beside_the_default_store(tmp_path, monkeypatch):
    from ditlab.orchestration.tracking import Tracker

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker.create("readme check", "r")
    monkeypatch.chdir(elsewhere)  # Ray workers and later commands run from other folders
    tracker.log_text("x", "note.txt")
    tracker.end("FINISHED")
    assert (store / "mlflow.db").is_file()
    assert list(store.glob(f"mlartifacts/*/{tracker.run_id}/artifacts/note.txt"))
    assert not (store / "mlruns").exists() and list(elsewhere.iterdir()) == []


def test_the_store_opened_while_ray_starts_is_the_one_the_run_uses(tmp_path, monkeypatch):
    """`ditlab run` opens the default store on a thread while Ray starts (a new SQLite store
    migrates its tables first); the run's tracker then uses that store. A store that cannot open
    ends the thread quietly: the run's own first call reports it."""
    import threading

    from ditlab.orchestration import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    tracking.open_store_in_background().join()
    assert (tmp_path / "mlflow.db").is_file()
    tracker = tracking.Tracker.create("opened early", "r")
    tracker.end("FINISHED")
    assert tracking.MlflowClient(tracking.tracking_uri()).get_run(tracker.run_id).info.status == "FINISHED"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    tracking.open_store_in_background(f"sqlite:///{not_a_folder}/mlflow.db").join()
    assert escaped == []


def test_quick_paths_give_each_role_three_to_five_commands():
    text = section((ROOT / "README.md").read_text(), "Quick paths")
    roles = re.findall(r"^\*\*(.+?)\*\*", text, re.MULTILINE)
    assert roles[:3] == ["Researcher on a laptop", "Cluster operator", "Reviewer comparing runs"]
    blocks = code_blocks(text)
    assert len(blocks) == len(roles)
    for role, (_, lines) in zip(roles, blocks, strict=True):
        commands = [w for line in lines for w in simple_commands(line) if w[0] != "export"]
        assert 3 <= len(commands) <= 5, f"{role}: {len(commands)} commands"


# --- e2e: the examples that sample and evaluate, in README order ----------------------------------

def make_paired_folders(root: Path, count: int = 8) -> None:
    """Ground-truth digits and the same digits with noise, paired by file name."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    images = (load_digits().images[:count] * 255 / 16).astype("uint8")
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255).astype("uint8")
    for folder, batch in zip(PAIRED_FOLDERS, (noisy, images), strict=True):
        (root / folder).mkdir()
        for i, image in enumerate(batch):
            Image.fromarray(np.kron(image, np.ones((2, 2), dtype="uint8"))).save(root / folder / f"{i:03d}.png")


def substitute_runs(argv: list[str], run_dir: Path) -> list[str]:
    """runs/NAME -> the tiny run's folder; runs/NAME/checkpoint_STEP -> its latest checkpoint (the
    static check above has shown STEP is the README run's latest or an earlier kept one)."""
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_[0-9]*") if p.is_dir())
    out = []
    for word in argv:
        match = RUN_PATH.match(word)
        out.append(word if not match else str(checkpoints[-1] if match.group(2) else run_dir))
    return out


def make_reference_folder(folder: Path, count: int = 40) -> None:
    """The stand-in for `digits:test`: `count` digits as 8x8 PNG files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir()
    for i, image in enumerate(load_digits().images[-count:]):
        Image.fromarray((image * 255 / 16).astype("uint8")).save(folder / f"{i:03d}.png")


@pytest.mark.e2e
def test_examples_run_in_readme_order(tiny_run, mlflow_server, tmp_path):
    run_dir = Path(tiny_run["run_dir"])
    for name in ("experiments", "evaluation"):
        (tmp_path / name).symlink_to(ROOT / name)
    make_paired_folders(tmp_path)
    make_reference_folder(tmp_path / "digits-test")
    ran = []
    for command in ALL_COMMANDS:
        args = parse(command)
        if command.kind not in RUN_IN_E2E or (command.kind == "evaluate" and RUN_PATH.match(args.fake)):
            continue
        argv = [str(tmp_path / "digits-test") if w == "digits:test" else w
                for w in substitute_runs(command.argv, run_dir)]
        if command.kind == "evaluate":
            argv += ["--no-progress"] if "--no-progress" not in argv else []
        code, _, err = run_cli(argv, tmp_path, {"MLFLOW_TRACKING_URI": mlflow_server})
        assert code == 0, f"{command}: exit {code}: {err.strip()[-800:]}"
        ran.append(command.kind)
    assert ran.count("sample") >= 2 and ran.count("evaluate") >= 3 and "inspect" in ran, ran
