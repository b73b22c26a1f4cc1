"""Datasets, all served the same way: an in-memory `ImageDataset` of images in [-1, 1] and labels.

The split into train and test is fixed by `data.split_seed` (stratified by class), so every run
and every evaluation of the same spec sees the same images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditlab.data.digits import load_digits_arrays, resize_to
from ditlab.data.folder import load_image, scan_image_folder


@dataclass
class ImageDataset:
    images: torch.Tensor  # float32 [N, C, R, R] in [-1, 1]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]

    def to_uint8(self) -> np.ndarray:
        """[N, R, R, C] uint8, the form images are saved and evaluated in."""
        return to_uint8(self.images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] [N, C, H, W] -> uint8 [N, H, W, C] (round to nearest level)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each class split in the same proportion, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def load_dataset(data_spec, split: str) -> ImageDataset:
    """`split` is "train", "test" or "all"."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}")
    if data_spec.format == "shards":  # a shard set is split already: `data add --format shards` did it
        from ditlab.data.shards import load_float_split

        # Scaled in place: peak memory is the uint8 split plus one float32 copy.
        images, labels, manifest = load_float_split(data_spec.path, split)
        return ImageDataset(images, labels, int(manifest["num_classes"]), f"shards:{data_spec.path}")
    if data_spec.prepared:
        from ditlab.data.prepared import load_prepared

        images, labels, num_classes = load_prepared(data_spec, split)
        source = "digits" if data_spec.source == "digits" else f"folder:{data_spec.path}"
        return ImageDataset(images, torch.as_tensor(labels), num_classes, f"{source} (prepared)")
    if data_spec.source == "digits":
        raw, labels = load_digits_arrays()
        images = resize_to(raw, data_spec.resolution, data_spec.channels)
        num_classes, name = 10, "digits"
    else:
        files, labels, classes = scan_image_folder(data_spec.path)
        images = torch.stack([load_image(f, data_spec.resolution, data_spec.channels) for f in files])
        num_classes, name = len(classes), f"folder:{data_spec.path}"
    if split != "all":
        train, test = stratified_split(labels, data_spec.test_fraction, data_spec.split_seed)
        keep = torch.from_numpy(train if split == "train" else test)
        images, labels = images[keep], labels[keep.numpy()]
    return ImageDataset(images.contiguous(), torch.as_tensor(labels), num_classes, name)

