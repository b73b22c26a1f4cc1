"""scikit-learn's digits (1,797 8x8 grayscale images, 10 classes), the embedded default dataset.

It ships inside scikit-learn's wheel, so it works on a machine with no network."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] scaled 0..255, labels int64 [N])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); map them onto 0..255.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def resize_to(images_uint8: np.ndarray, resolution: int, channels: int) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, C, R, R] in [-1, 1], bilinear (antialiased when shrinking),
    then quantized back to 8 bits so the training data matches what an image file would hold."""
    x = torch.from_numpy(images_uint8).float().unsqueeze(1)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)
    return (x / 127.5 - 1.0).repeat(1, channels, 1, 1)
