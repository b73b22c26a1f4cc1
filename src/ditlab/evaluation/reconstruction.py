"""Reconstruction metrics for paired sets (restoration, autoencoders): MSE, PSNR, SSIM, and LPIPS
where its weights are on disk. Every figure is computed on images in [0, 1] (uint8 input is
divided by 255), per image, then averaged over the set."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_RANGE = 1.0  # the value range every figure here is computed on: [0, 1]


def to_unit_range(images) -> torch.Tensor:
    """uint8 [N, H, W, C] (numpy) or float [N, C, H, W] in [0, 1] -> float64 [N, C, H, W]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    x = images.double()
    if x.min() < 0 or x.max() > 1:
        raise ValueError("float images must lie in [0, 1]")
    return x


def _paired(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = to_unit_range(pred), to_unit_range(target)
    if p.shape != t.shape:
        raise ValueError(f"paired sets differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t


def mse(pred, target) -> float:
    p, t = _paired(pred, target)
    return float(((p - t) ** 2).mean())


def psnr(pred, target) -> float:
    """Mean over images of 10 log10(range^2 / MSE_image); identical images give +inf."""
    p, t = _paired(pred, target)
    per_image = ((p - t) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(DATA_RANGE**2 / per_image)).mean())


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred, target, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window (sigma 1.5),
    per channel, averaged over every pixel and then over the set.

    Borders follow torchmetrics (reflect padding, every pixel counted), so figures compare with
    it; the original MATLAB code instead drops the 5-pixel border, which gives slightly
    different numbers on small images."""
    p, t = _paired(pred, target)
    if min(p.shape[-2:]) <= window // 2:
        raise ValueError(f"SSIM needs images larger than {window // 2}x{window // 2}, got {tuple(p.shape[-2:])}")
    c, pad = p.shape[1], window // 2
    g = gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    p, t = (F.pad(x, (pad, pad, pad, pad), mode="reflect") for x in (p, t))

    def blur(x):
        return F.conv2d(x, kernel, groups=c)

    mu_p, mu_t = blur(p), blur(t)
    var_p = (blur(p * p) - mu_p**2).clamp(min=0)
    var_t = (blur(t * t) - mu_t**2).clamp(min=0)
    cov = blur(p * t) - mu_p * mu_t
    c1, c2 = (k1 * DATA_RANGE) ** 2, (k2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return float(ssim_map.flatten(1).mean(1).mean())


def mean_gradient_magnitude(images) -> float:
    """Sharpness of a set: the mean magnitude of horizontal and vertical finite differences, on
    [0, 1]. Blurry reconstructions score below their originals; the ratio of the two is the
    figure to read."""
    x = to_unit_range(images)
    dx, dy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    return float(torch.sqrt(dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2).mean())


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, LPIPS' default backbone


def lpips_unavailable_reason() -> str | None:
    """None when LPIPS can run offline; otherwise why not (the package or a weights file missing)."""
    try:
        import lpips  # noqa: F401
    except ModuleNotFoundError:
        return "the lpips package is not installed (pip install lpips)"
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not (hub / ALEXNET_FILE).is_file():
        return f"AlexNet weights {ALEXNET_FILE} not found in {hub}"
    return None


def lpips_distance(pred, target) -> float:
    """LPIPS (Zhang et al. 2018, AlexNet, v0.1); inputs mapped from [0, 1] to [-1, 1] as it expects."""
    reason = lpips_unavailable_reason()
    if reason:
        raise RuntimeError(f"LPIPS unavailable: {reason}")
    import lpips

    p, t = _paired(pred, target)
    net = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        return float(net(p.float() * 2 - 1, t.float() * 2 - 1).mean())


def reconstruction_metrics(pred, target,
                           metrics=("mse", "psnr", "ssim", "lpips")) -> tuple[dict[str, float], dict[str, str]]:
    """(figures, notes) for the `metrics` asked for; LPIPS when it can run, else a note saying why."""
    figures: dict[str, float] = {}
    notes = {"value_range": "[0, 1]"}
    for name, metric in (("mse", mse), ("psnr", psnr), ("ssim", ssim)):
        if name in metrics:
            figures[name] = metric(pred, target)
    if "lpips" in metrics:
        reason = lpips_unavailable_reason()
        if reason is None:
            figures["lpips"] = lpips_distance(pred, target)
        else:
            notes["lpips"] = f"skipped: {reason}"
    if math.isinf(figures.get("psnr", 0.0)):
        notes["psnr"] = "identical images: infinite PSNR"
    return figures, notes
