"""Users' own images: a root folder with one subfolder per class (torchvision ImageFolder layout)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files sorted by class then name, labels, class names). Errors name the folder at fault."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"dataset folder {str(root)!r} has no class subfolders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"dataset folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, np.asarray(labels, dtype=np.int64), classes


def check_image_folder(root: str | Path) -> None:
    """Every image of the folder decodes: the check made before Ray starts, so a corrupt file is one
    error naming it rather than a failure inside each worker (costs one decode of every image)."""
    files, _, _ = scan_image_folder(root)
    for path in files:
        decode_image(path, "L").close()


def decode_image(path: Path, mode: str) -> Image.Image:
    """The image at `path` decoded in `mode` ("L" or "RGB"); an unreadable file, or one larger than
    PIL's pixel limit (a decompression bomb), is a ValueError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below twice the limit
            with Image.open(path) as img:
                return img.convert(mode)
    except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBombError)
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """One image -> float [C, R, R] in [-1, 1]: center crop to a square, then bicubic resize."""
    img = decode_image(path, "L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    arr = np.asarray(img.resize((resolution, resolution), Image.BICUBIC), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).float()
    x = x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0
