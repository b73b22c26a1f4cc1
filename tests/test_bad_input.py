"""Bad input, as a new user would give it (issue 15, section 2): each is refused with one
`ditlab: error: ...` line naming the field, file or value at fault, exit status 2, and nothing
written. Every case goes through the real `ditlab` command in-process; none reaches Ray (the
`no_ray` fixture turns a run or sweep that would start into a test failure)."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab import cli
from ditlab.training.checkpoint import load_bundle, save_bundle

from conftest import ROOT

TINY = str(ROOT / "experiments" / "tiny.yaml")
TINY_SWEEP = str(ROOT / "experiments" / "sweeps" / "tiny.yaml")
LEGACY = ROOT / "tests" / "data" / "legacy_checkpoint"  # a real generation checkpoint (tests/test_tasks.py)


def refused(argv: list[str], capsys) -> str:
    """Run `ditlab argv`; check it exits 2 with exactly one `ditlab: error:` line on stderr and
    nothing on stdout; return that line."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ditlab: error: "), (code, err)
    assert out == "" and "Traceback" not in err
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path below `root` with its bytes (None for a folder): to check that nothing changed."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_ray(monkeypatch):
    """A refusal must come before Ray: reaching the run or the sweep fails the test instead."""
    def started(*args, **kwargs):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr("ditlab.orchestration.train.run_experiment", started)
    monkeypatch.setattr("ditlab.orchestration.tune.run_sweep", started)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_pngs(folder: Path, count: int = 2, size: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size, size), 40 * i, dtype=np.uint8)).save(folder / f"img{i}.png")


def bomb_png(path: Path, side: int) -> None:
    """A valid PNG of a few bytes whose header claims side x side pixels: PIL's decompression-bomb
    limit (89 M pixels warns, twice that refuses) is for such files. No pixel is ever decoded."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # 8-byte signature, then the IHDR chunk: length (4), b"IHDR" (4), width and height first in its
    # 13 data bytes, then a CRC over type and data.
    struct.pack_into(">II", data, 16, side, side)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


# -- specs and --set ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_spec_file_that_is_not_utf8_is_named(command, workdir, capsys, no_ray):
    spec = workdir / "latin1.yaml"
    spec.write_bytes("name: caf\xe9\n".encode("latin-1"))
    before = tree(workdir)
    line = refused([command, str(spec)], capsys)
    assert "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 9)" in line
    assert tree(workdir) == before


def test_a_line_break_in_a_file_name_stays_on_the_one_error_line(workdir, capsys):
    assert refused(["run", "a\nb\x1b[31m.yaml"], capsys) == "ditlab: error: a\\nb\\x1b[31m.yaml: spec file not found"


def test_invalid_yaml_in_set_names_the_assignment(workdir, capsys, no_ray):
    line = refused(["run", TINY, "--set", "train.steps=[1"], capsys)
    assert "--set 'train.steps=[1': value: not valid YAML" in line and "line 1, column 3" in line
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("assignment,field", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("evaluation.guidance=-.inf", "evaluation.guidance"),
    ("train.adam_betas=[0.9, .nan]", "train.adam_betas.1"),
    ("restoration.sigma=.Inf", "restoration.sigma"),
    ("loss.kl_weight=.inf", "loss.kl_weight"),
])
def test_a_non_finite_float_anywhere_is_refused(assignment, field, workdir, capsys, no_ray):
    line = refused(["run", TINY, "--set", assignment], capsys)
    assert f"{field}: Input should be a finite number" in line
    assert list(workdir.iterdir()) == []


def test_lr_inf_in_a_spec_file_is_refused(workdir, capsys, no_ray):
    spec = workdir / "spec.yaml"
    spec.write_text("train:\n  lr: .inf\n")
    assert "spec.yaml: train.lr: Input should be a finite number (got inf)" in refused(["train", str(spec)], capsys)


def test_a_non_finite_sweep_bound_is_refused(workdir, capsys, no_ray):
    sweep = workdir / "sweep.yaml"
    sweep.write_text(f"base: {TINY}\nspace:\n  train.lr: {{uniform: [0.001, .inf]}}\n")
    assert "space.train.lr" in refused(["tune", str(sweep)], capsys)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "ok\n", ""])
def test_a_spec_name_is_one_safe_path_component(name, workdir, capsys, no_ray):
    """The default run folder is <name>-<time> inside --storage."""
    line = refused(["run", TINY, "--set", f"name={json.dumps(name)}"], capsys)
    assert f"name: {name!r} is not a valid name" in line


# -- ditlab sample -------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_sample_steps_below_one_is_refused_not_replaced(steps, workdir, capsys):
    line = refused(["sample", str(LEGACY), "--steps", steps, "--num", "1", "--out", "s"], capsys)
    assert line == f"ditlab: error: --steps: must be at least 1, got {steps}"
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("guidance", ["nan", "inf", "-1"])
def test_sample_guidance_must_be_finite_and_not_negative(guidance, workdir, capsys):
    assert "--guidance: must be a finite number >= 0" in refused(
        ["sample", str(LEGACY), "--guidance", guidance, "--num", "1", "--out", "s"], capsys)
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("argv,field", [
    (["sample", str(LEGACY), "--seed", "-1", "--out", "s"], "--seed: must be in [0, 2**32), got -1"),
    (["restore", str(LEGACY), "--input", "s", "--seed", str(2**32), "--out", "s"], "--seed: must be in [0, 2**32)"),
    (["run", TINY, "--set", "evaluation.seed=-1"], "evaluation.seed: Input should be greater than or equal to 0"),
    (["run", TINY, "--set", f"data.split_seed={2**40}"], "data.split_seed: Input should be less than 4294967296"),
])
def test_a_seed_numpy_cannot_take_is_refused(argv, field, workdir, capsys, no_ray):
    assert field in refused(argv, capsys)
    assert list(workdir.iterdir()) == []


def _changed_checkpoint(folder: Path, change) -> Path:
    bundle = load_bundle(LEGACY)
    bundle.pop("format")
    change(bundle)
    return save_bundle(folder / "checkpoint.pt", bundle).parent


@pytest.mark.parametrize("case,change,message", [
    ("unknown key", lambda b: b["model_config"].update(bogus=1),
     "its model_config does not describe a DiT (DiTConfig.__init__() got an unexpected keyword argument 'bogus')"),
    ("other shape", lambda b: b["model_config"].update(hidden_size=128),
     "its ema weights do not match its model_config (size mismatch for pos_embed"),
    ("missing weights", lambda b: b["ema"]["model"].pop("pos_embed"),
     "its ema weights do not match its model_config (Missing key(s) in state_dict: \"pos_embed\""),
])
@pytest.mark.parametrize("command", ["sample", "restore", "evaluate"])
def test_a_checkpoint_whose_model_config_does_not_fit_is_one_line(command, case, change, message, workdir, capsys):
    def changed(bundle):
        change(bundle)
        bundle["spec"]["task"] = "restoration" if command == "restore" else "generation"

    checkpoint = _changed_checkpoint(workdir / "ckpt", changed)
    write_pngs(workdir / "inputs", 1)
    before = tree(workdir)
    argv = {"sample": ["sample", str(checkpoint), "--num", "1", "--steps", "1", "--out", "s"],
            "restore": ["restore", str(checkpoint), "--input", "inputs", "--steps", "1", "--out", "s"],
            "evaluate": ["evaluate", "--fake", str(checkpoint), "--out", "s"]}[command]
    line = refused(argv, capsys)
    assert line.startswith(f"ditlab: error: checkpoint '{checkpoint}") and f"': {message}" in line
    assert tree(workdir) == before


@pytest.mark.parametrize("command", ["sample", "restore"])
@pytest.mark.parametrize("existing", ["file", "older samples", "older manifest"])
def test_out_must_be_a_fresh_folder(command, existing, workdir, capsys):
    """Stale PNGs beside new ones would be evaluated as new ones (`ditlab evaluate --fake DIR`)."""
    out = workdir / "out"
    if existing == "file":
        out.write_text("not a folder")
    elif existing == "older samples":
        write_pngs(out / "nested", 1)
    else:
        out.mkdir()
        (out / ("samples.json" if command == "sample" else "restore.json")).write_text("{}")
    write_pngs(workdir / "inputs", 1)
    before = tree(workdir)
    extra = ["--input", "inputs"] if command == "restore" else []
    line = refused([command, str(LEGACY), *extra, "--num" if command == "sample" else "--steps", "1",
                    "--out", "out"], capsys)
    if existing == "file":
        assert line == "ditlab: error: --out: 'out' is a file, not a folder; name a folder"
    else:
        assert "--out: 'out' already holds the output of an earlier command (1 file(s), e.g." in line
        assert line.endswith("write to a new folder, or delete them first")
    assert tree(workdir) == before


# -- images ----------------------------------------------------------------------------------------------


BOMBS = [20_000, 10_000]  # 400 M pixels: PIL refuses; 100 M: PIL only warns (ours refuses too)


@pytest.mark.parametrize("side", BOMBS)
def test_a_decompression_bomb_in_data_path_is_named_before_ray(side, workdir, capsys, no_ray):
    write_pngs(workdir / "digits" / "a")
    bomb_png(workdir / "digits" / "b" / "bomb.png", side)
    before = tree(workdir)
    line = refused(["run", TINY, "--set", "data.source=folder", "--set", "data.path=digits"], capsys)
    assert "data.path: cannot read image 'digits/b/bomb.png'" in line and "decompression bomb" in line
    assert tree(workdir) == before


@pytest.mark.parametrize("side", BOMBS)
def test_a_decompression_bomb_in_an_evaluated_folder_is_named(side, workdir, capsys):
    write_pngs(workdir / "fake")
    bomb_png(workdir / "fake" / "z.png", side)
    before = tree(workdir)
    line = refused(["evaluate", "--fake", "fake", "--real", "digits:test", "--out", "ev"], capsys)
    assert "cannot read image 'fake/z.png'" in line and "decompression bomb" in line
    assert tree(workdir) == before


@pytest.mark.parametrize("side", BOMBS)
def test_a_decompression_bomb_is_not_added_as_data(side, workdir, capsys):
    write_pngs(workdir / "src" / "a")
    bomb_png(workdir / "src" / "a" / "bomb.png", side)
    before = tree(workdir)
    line = refused(["data", "add", "src", "--name", "ok", "--root", "datasets", "--no-dvc"], capsys)
    assert "cannot read image 'src/a/bomb.png'" in line and "decompression bomb" in line
    assert tree(workdir) == before


@pytest.mark.parametrize("command", [["run", TINY], ["data", "prepare", TINY, "--out", "prepared"]])
def test_a_corrupt_image_in_data_path_is_caught_before_ray(command, workdir, capsys, no_ray):
    """It used to pass the pre-Ray checks (file names only) and fail in every worker."""
    write_pngs(workdir / "digits" / "a")
    write_pngs(workdir / "digits" / "b")
    (workdir / "digits" / "b" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    before = tree(workdir)
    line = refused([*command, "--set", "data.source=folder", "--set", "data.path=digits"], capsys)
    assert line.startswith("ditlab: error: data.path: cannot read image 'digits/b/img1.png'")
    assert tree(workdir) == before


@pytest.mark.parametrize("manifest,message", [
    ("{not json", "is corrupt, not JSON"),
    (json.dumps(["ditlab-prepared/1"]), "is not a ditlab-prepared/1 manifest"),
    (json.dumps({"format": "ditlab-prepared/1", "data": {}, "num_classes": 10, "counts": {}}),
     "is corrupt: its 'sha256' field is missing or malformed"),
    (json.dumps({"format": "ditlab-prepared/1", "data": [], "num_classes": 10, "counts": {}, "sha256": {}}),
     "is corrupt: its 'data' field is missing or malformed"),
])
def test_a_corrupt_prepared_manifest_is_named(manifest, message, workdir, capsys, no_ray):
    (workdir / "prepared").mkdir()
    (workdir / "prepared" / "manifest.json").write_text(manifest)
    before = tree(workdir)
    line = refused(["run", TINY, "--set", "data.prepared=prepared"], capsys)
    assert line.startswith(f"ditlab: error: data.prepared: 'prepared/manifest.json' {message}")
    assert tree(workdir) == before


# -- folders and names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,flag", [(["run", TINY, "--storage", "taken"], "--storage"),
                                       (["train", TINY, "--storage", "taken/runs"], "--storage"),
                                       (["tune", TINY_SWEEP, "--storage", "taken"], "--storage"),
                                       (["run", TINY, "--export", "taken"], "--export"),
                                       (["data", "prepare", TINY, "--out", "taken"], "--out"),
                                       (["data", "add", ".", "--name", "ok", "--root", "taken"], "--root"),
                                       (["evaluate", "--fake", ".", "--real", "digits", "--out", "taken"], "--out")])
def test_a_folder_flag_naming_a_file_is_refused(argv, flag, workdir, capsys, no_ray):
    (workdir / "taken").write_text("a file")
    assert refused(argv, capsys) == f"ditlab: error: {flag}: 'taken' is a file, not a folder; name a folder"
    assert tree(workdir) == {"taken": b"a file"}


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/tmp/x", ".hidden", "ok\n", "x" * 101])
@pytest.mark.parametrize("command", [["run", TINY, "--restart-if-changed"], ["tune", TINY_SWEEP],
                                     ["submit", TINY]])
def test_a_run_name_is_one_safe_path_component(name, command, workdir, capsys, no_ray):
    """`--name ../x` put the run folder outside --storage, and --restart-if-changed then removed it."""
    (workdir / "x").mkdir()
    (workdir / "x" / "keep.txt").write_text("outside --storage")
    before = tree(workdir)
    line = refused([*command, "--storage", "runs", "--name", name] if command[0] != "submit"
                   else [*command, "--name", name], capsys)
    assert line.startswith(f"ditlab: error: --name: {name!r} is not a valid name")
    assert tree(workdir) == before


def test_a_run_folder_that_is_a_link_is_never_restarted(workdir, capsys, no_ray):
    (workdir / "elsewhere").mkdir()
    (workdir / "elsewhere" / "keep.txt").write_text("not a run")
    (workdir / "runs").mkdir()
    (workdir / "runs" / "r1").symlink_to(workdir / "elsewhere")
    line = refused(["run", TINY, "--storage", "runs", "--name", "r1", "--restart-if-changed"], capsys)
    assert "--name: 'runs/r1' is a symbolic link" in line
    assert (workdir / "elsewhere" / "keep.txt").read_text() == "not a run"


@pytest.mark.parametrize("name", ["ok\n", "../up", "a b", "-dash", "é"])
def test_data_add_names_are_a_safe_charset(name, workdir, capsys):
    write_pngs(workdir / "src" / "a")
    before = tree(workdir)
    line = refused(["data", "add", "src", f"--name={name}", "--root", "datasets", "--no-dvc"], capsys)
    assert line.startswith(f"ditlab: error: --name: {name!r} is not a valid name")
    assert tree(workdir) == before


@pytest.mark.parametrize("link", ["class folder", "image"])
def test_data_add_refuses_symlinks_naming_the_link(link, workdir, capsys):
    """Copied by value, a link would bring files from outside the folder into the dataset."""
    write_pngs(workdir / "outside")
    write_pngs(workdir / "src" / "a")
    if link == "class folder":
        (workdir / "src" / "b").symlink_to(workdir / "outside")
        named = "src/b"
    else:
        (workdir / "src" / "a" / "zz.png").symlink_to(workdir / "outside" / "img0.png")
        named = "src/a/zz.png"
    before = tree(workdir)
    line = refused(["data", "add", "src", "--name", "ok", "--root", "datasets", "--no-dvc"], capsys)
    assert f"{named!r} is a symbolic link" in line
    assert tree(workdir) == before


# -- corrupt or refused checkpoints --------------------------------------------------------------------


class Payload:
    """Pickled as code, which `weights_only=True` refuses to run."""


def _bad_checkpoint(folder: Path, kind: str) -> None:
    folder.mkdir()
    path = folder / "checkpoint.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint " * 20)
    elif kind == "truncated":
        path.write_bytes((LEGACY / "checkpoint.pt").read_bytes()[:5000])
    else:
        torch.save({"format": "ditlab-checkpoint/1", "payload": Payload()}, path)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickled code"])
@pytest.mark.parametrize("command", [["evaluate", "--fake", "ckpt", "--set", "kid.subset_size=5"],
                                     ["sample", "ckpt", "--num", "1", "--out", "s"]])
def test_a_corrupt_or_refused_checkpoint_is_one_line(kind, command, workdir, capsys):
    """Not torch's many lines advising to load it with weights_only=False."""
    _bad_checkpoint(workdir / "ckpt", kind)
    before = tree(workdir)
    line = refused(command, capsys)
    assert line.startswith("ditlab: error: checkpoint 'ckpt/checkpoint.pt' is unreadable or corrupt")
    assert "weights_only" not in line
    assert tree(workdir) == before
