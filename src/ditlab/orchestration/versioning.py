"""DVC: named dataset versions (`ditlab data add`) and the tags that tie an MLflow run to the data
and the DVC experiment that produced it.

A run's data version is the hash DVC itself records for the data folder: in `<folder>.dvc` for a
dataset added with `ditlab data add`, in `dvc.lock` for the pipeline's prepared data. The same
hash shows in `dvc data status`, `dvc.lock` and the MLflow run's tag `ditlab.data.dvc_md5`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

from ditlab.atomic import file_digest, write_json
from ditlab.config import DATASETS_ROOT, check_name
from ditlab.data.prepared import MANIFEST
from ditlab.data.shards import shards_from_folder

DATASET_FORMAT = "ditlab-dataset/1"


class VersioningError(ValueError):
    pass


def dvc_root(start: str | Path) -> Path | None:
    """The nearest folder at or above `start` holding a .dvc folder."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_md5(path: str | Path) -> str | None:
    """The hash DVC recorded for `path` (a `<path>.dvc` file, or an out in dvc.lock); None if DVC
    does not track it (yet)."""
    path = Path(path).resolve()
    root = dvc_root(path.parent if not path.exists() else path)
    if root is None:
        return None
    rel = path.relative_to(root).as_posix()
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
            if out.get("path") == path.name:
                return out.get("md5")
    lock = root / "dvc.lock"
    if lock.is_file():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == rel:
                    return out.get("md5")
    return None


def data_tags(data_spec) -> dict[str, str]:
    """MLflow tags naming the data version a run used."""
    if data_spec.source == "digits":
        name = "digits"
    else:
        name = data_spec.name or Path(data_spec.path or "").name
    tags = {"ditlab.data.name": name}
    tracked = data_spec.prepared or (data_spec.path if data_spec.source == "folder" else None)
    if tracked:
        tags["ditlab.data.path"] = str(tracked)
        tags["ditlab.data.dvc_md5"] = dvc_md5(tracked) or "untracked"
        manifest = Path(tracked) / MANIFEST
        if manifest.is_file():
            tags["ditlab.data.sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return tags


def experiment_tags() -> dict[str, str]:
    """The DVC experiment this process runs in (`dvc exp run` sets these for its stages)."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["ditlab.dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["ditlab.dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    if os.environ.get("DVC_STAGE"):
        tags["ditlab.dvc.stage"] = os.environ["DVC_STAGE"]
    return tags


def run_tags(data_spec) -> dict[str, str]:
    return {**data_tags(data_spec), **experiment_tags()}


# -- ditlab data add ---------------------------------------------------------------------------


def inspect_image_folder(src: str | Path) -> dict:
    """Validate an image folder (one subfolder per class, every file a readable image) and
    describe it: count, classes, image sizes, modes and one checksum over names and contents."""
    from PIL import Image

    from ditlab.data.folder import scan_image_folder

    src = Path(src)
    try:
        files, labels, classes = scan_image_folder(src)
    except (FileNotFoundError, ValueError) as err:
        raise VersioningError(str(err)) from None
    # Copied by value, a link would bring in whatever it points to, inside the folder or not.
    link = next((p for p in [*(src / c for c in classes), *files] if p.is_symlink()), None)
    if link is not None:
        raise VersioningError(f"{str(link)!r} is a symbolic link; ditlab data add copies plain files and folders "
                              "only (replace the link by a copy of what it points to)")
    sizes, modes, digest = set(), set(), hashlib.sha256()
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below twice its limit
                with Image.open(f) as img:
                    img.verify()
                with Image.open(f) as img:
                    sizes.add(img.size)
                    modes.add(img.mode)
        except Exception as err:  # PIL raises several types for bad files (DecompressionBombError among them)
            raise VersioningError(f"cannot read image {str(f)!r}: {err}") from None
        rel = f.relative_to(src).as_posix()
        digest.update(f"{rel}\0{file_digest(f)}\n".encode())
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return {
        "format": DATASET_FORMAT,
        "count": len(files),
        "classes": {name: int((labels == i).sum()) for i, name in enumerate(classes)},
        "image_size": {"min": [min(widths), min(heights)], "max": [max(widths), max(heights)]},
        "modes": sorted(modes),
        "sha256": digest.hexdigest(),
        "files": [f.relative_to(src).as_posix() for f in files],
    }


def add_dataset(src: str | Path, name: str, root: str | Path = DATASETS_ROOT, track: bool = True,
                shards: dict | None = None) -> dict:
    """Copy a validated image folder to <root>/<name> with a manifest, then `dvc add` it.
    Adding the same name again makes a new version of that dataset (the old folder is replaced only
    once the new one is complete). With `shards` (resolution, channels, shard_size, test_fraction,
    split_seed) the folder is written as a shard set instead (data/shards.py), one DVC version too."""
    try:
        check_name(name)
    except ValueError as err:
        raise VersioningError(f"--name: {err}") from None
    src, root = Path(src), Path(root)
    dest = root / name
    if track and dvc_root(root if root.exists() else Path.cwd()) is None:
        raise VersioningError(f"no DVC repository at or above {str(root.resolve())!r}: run `dvc init` there "
                              "(or pass --no-dvc)")
    info = inspect_image_folder(src)
    manifest = {"name": name, **{k: v for k, v in info.items() if k != "files"}}
    root.mkdir(parents=True, exist_ok=True)
    if shards is not None and src.resolve() == dest.resolve():
        raise VersioningError(f"--format shards: the shard set would replace its own source {str(src)!r}; "
                              "pick another --name or --root")
    if src.resolve() == dest.resolve():
        write_json(dest / MANIFEST, manifest)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            if shards is not None:
                manifest = shards_from_folder(src, staging, **shards, extra={
                    "name": name, "source_sha256": manifest["sha256"], "source_count": manifest["count"]})
            else:
                for rel in info["files"]:
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / rel, staging / rel)
                write_json(staging / MANIFEST, manifest)
            old = None
            if dest.exists():
                old = root / f".{name}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                dest.rename(old)
            staging.rename(dest)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    result = {"name": name, "path": str(dest), "manifest": str(dest / MANIFEST), **manifest}
    if track:
        proc = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(dest)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise VersioningError(f"`dvc add {dest}` failed: {(proc.stderr or proc.stdout).strip()}")
        result["dvc_file"] = str(dest) + ".dvc"
        result["dvc_md5"] = dvc_md5(dest)
    return result
