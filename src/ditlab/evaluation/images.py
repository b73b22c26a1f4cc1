"""Image sets for evaluation: folders of PNG/JPEG files, read into one uint8 array [N, H, W, 3].

Conversions are explicit and documented, never silent guesses:
- grayscale (L), palette (P) and RGBA images are converted to RGB (gray replicated, alpha dropped),
  so a grayscale set and an RGB set are compared as RGB, as Inception requires;
- images of different sizes in one set are an error (resize them yourself, so FID does not depend
  on a resize ditlab picked);
- an empty folder or an unreadable file is an error that names it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageSetError(ValueError):
    pass


def list_images(folder: str | Path) -> list[Path]:
    """Image files below `folder` (recursively), sorted, so the order is stable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageSetError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageSetError(f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """One image as uint8 [H, W, 3]; an unreadable file, or one larger than PIL's pixel limit (a
    decompression bomb), is an ImageSetError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below twice the limit
            with Image.open(path) as img:
                img.load()
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBombError)
        raise ImageSetError(f"cannot read image {str(path)!r}: {err}") from None


def load_image_folder(folder: str | Path, limit: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3]; `limit` keeps the first N files in sorted order."""
    files = list_images(folder)[:limit]
    first = read_rgb(files[0])
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, path in enumerate(files[1:], start=1):
        img = read_rgb(path)
        if img.shape != first.shape:
            raise ImageSetError(
                f"images in {str(folder)!r} differ in size: {files[0].name} is {first.shape[1]}x{first.shape[0]}, "
                f"{path.name} is {img.shape[1]}x{img.shape[0]}; resize them to one size first"
            )
        out[i] = img
    return out


def as_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """Accept uint8 [N, H, W, C] with C in {1, 3}; return [N, H, W, 3]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ImageSetError(f"expected uint8 images [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ImageSetError("empty image set")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
