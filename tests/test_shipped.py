"""Every file the project ships for users to run, collected from its folder (a new file is covered
without editing this test): experiment specs (experiments/*.yaml and params.yaml) pass
`ditlab run --dry-run`, sweeps (experiments/sweeps/*.yaml) pass `ditlab tune --dry-run` and their
trial specs resolve, evaluation protocols (evaluation/*.yaml) load, and the RayJob entrypoints in
k8s/ parse with the current CLI and dry-run against the files they name. The CLI runs in-process."""

from __future__ import annotations

import json
import math
import random
import shlex
from pathlib import Path

import pytest
import yaml

from ditlab import cli
from ditlab.config import EvaluationSpec, load
from ditlab.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
# Where the image puts the repository (platform/Dockerfile): entrypoints name files under it.
IMAGE_WORKDIR = "/home/ray/ditlab/"
RANDOM_TRIALS = 16  # sampled trial configs per sweep, on top of the values the sweep checks itself


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _cases() -> list:
    cases = []
    folders = {"spec": ROOT.glob("experiments/*.yaml"), "sweep": ROOT.glob("experiments/sweeps/*.yaml"),
               "protocol": ROOT.glob("evaluation/*.yaml")}
    for kind, paths in folders.items():
        found = sorted(paths)
        cases += [pytest.param(kind, _rel(p), None, id=f"{kind}:{_rel(p)}") for p in found]
        if not found:
            cases.append(pytest.param("empty", kind, None, id=f"empty:{kind}"))
    for params in ["params.yaml", *(_rel(p) for p in sorted(ROOT.glob("pipelines/*/params.yaml")))]:
        cases.append(pytest.param("spec", params, None, id=f"spec:{params}"))
    jobs = [(p, doc) for p in sorted(ROOT.glob("k8s/**/*.yaml")) for doc in yaml.safe_load_all(p.read_text())
            if isinstance(doc, dict) and doc.get("kind") == "RayJob"]
    cases += [pytest.param("rayjob", _rel(p), doc, id=f"rayjob:{_rel(p)}#{doc['metadata']['name']}")
              for p, doc in jobs]
    if not jobs:
        cases.append(pytest.param("empty", "rayjob", None, id="empty:rayjob"))
    return cases


def _dry_run(argv: list[str], capsys) -> str:
    code = cli.main([*argv, "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, f"ditlab {shlex.join(argv)} --dry-run: exit {code}\n{err}"
    return out


def _sample(dist, rng: random.Random):
    """One value as Tune would draw it (the half-open ranges [low, high))."""
    if dist.kind in ("choice", "grid"):
        return rng.choice(dist.values)
    if dist.kind == "randint":
        return rng.randrange(int(dist.low), int(dist.high))
    if dist.kind == "loguniform":
        return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    return rng.uniform(dist.low, dist.high)


def check_spec(path: str, capsys, overrides: tuple[str, ...] = ()) -> None:
    out = _dry_run(["run", str(ROOT / path), *(f"--set={o}" for o in overrides)], capsys)
    assert json.loads(out) == load(ROOT / path, list(overrides)).to_dict()


def check_sweep(path: str, capsys, overrides: tuple[str, ...] = ()) -> None:
    record = json.loads(_dry_run(["tune", str(ROOT / path), *(f"--set={o}" for o in overrides)], capsys))
    sweep = load_sweep(ROOT / path, list(overrides))
    assert record["sweep"] == sweep.to_dict()
    # Trial specs: every value the sweep checks on its own (each choice, both ends of each range),
    # all of them at once, and random draws of whole configs.
    for key, dist in sweep.spec.space.items():
        for value in dist.extremes():
            sweep.trial_spec({key: value}, f"{path}: space.{key}={value!r}")
    for pick in (0, -1):
        sweep.trial_spec({k: d.extremes()[pick] for k, d in sweep.spec.space.items()}, f"{path}: extremes")
    rng = random.Random(0)
    for i in range(RANDOM_TRIALS):
        config = {k: _sample(d, rng) for k, d in sweep.spec.space.items()}
        sweep.trial_spec(config, f"{path}: trial {i} {config}")


def check_rayjob(path: str, doc: dict, capsys) -> None:
    entrypoint = doc["spec"].get("entrypoint")
    assert entrypoint, f"{path}: RayJob {doc['metadata']['name']} has no entrypoint"
    argv = shlex.split(entrypoint)
    assert argv[0] == "ditlab", f"{path}: the entrypoint runs {argv[0]!r}, not ditlab: {entrypoint}"
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{path}: the current CLI does not parse the entrypoint: {entrypoint}")
    target = getattr(args, "spec", None) or getattr(args, "sweep", None)
    assert target and target.startswith(IMAGE_WORKDIR), f"{path}: {target!r} is not a file of the image"
    local = target.removeprefix(IMAGE_WORKDIR)
    assert (ROOT / local).is_file(), f"{path}: {target} is not in the repository ({local})"
    overrides = tuple(getattr(args, "overrides", ()))
    if args.command in ("run", "train"):
        check_spec(local, capsys, overrides)
    elif args.command == "tune":
        check_sweep(local, capsys, overrides)
    else:
        pytest.fail(f"{path}: no dry run for `ditlab {args.command}`")


@pytest.mark.parametrize("kind, path, doc", _cases())
def test_shipped_file(kind, path, doc, capsys):
    if kind == "spec":
        check_spec(path, capsys)
    elif kind == "sweep":
        check_sweep(path, capsys)
    elif kind == "protocol":
        load(ROOT / path, model=EvaluationSpec)
    elif kind == "rayjob":
        check_rayjob(path, doc, capsys)
    else:
        pytest.fail(f"nothing shipped in {path}: the folder was moved or emptied")


def test_the_pipelines_params_train_what_the_quickstart_trains():
    """params.yaml is the quickstart for DVC (README: "the quickstart's values"), kept by hand in two
    files: any field that differs, once both are resolved, but the run's name and MLflow experiment."""
    quickstart, pipeline = (load(ROOT / name).to_dict() for name in ("experiments/quickstart.yaml", "params.yaml"))

    def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
        found = []
        for key in sorted(a.keys() | b.keys()):
            x, y = a.get(key), b.get(key)
            if isinstance(x, dict) and isinstance(y, dict):
                found += differences(x, y, f"{prefix}{key}.")
            elif x != y:
                found.append(f"{prefix}{key}: quickstart {x!r}, params.yaml {y!r}")
        return found

    assert differences(quickstart, pipeline) == ["name: quickstart 'quickstart', params.yaml 'pipeline'",
                                                 "tracking.experiment: quickstart 'ditlab-quickstart', "
                                                 "params.yaml 'ditlab-pipeline'"]
