"""Users' own images: a root folder with one subfolder per class (torchvision ImageFolder layout)."""

from __future__ import annotations

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


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """One image -> float [C, R, R] in [-1, 1]: center crop to a square, then bicubic resize."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            img = img.resize((resolution, resolution), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None
    x = torch.from_numpy(arr.copy()).float()
    x = x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0
