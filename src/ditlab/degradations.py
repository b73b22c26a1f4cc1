"""Degradations for image restoration: what a restoration model learns to undo, and the baselines
it is judged against.

Images are tensors in [-1, 1], [N, C, R, R], as everywhere in ditlab. A degradation has two halves:

    observation = degradation.observe(clean, indices, split)   # what a user holds: low-res or noisy
    condition = degradation.condition(observation)              # the DiT's conditioning input, R x R

For super-resolution the observation is the box-filtered (area) downsampling by `factor`, and the
condition is its bicubic upsampling back to R x R, which is also the bicubic baseline (SR3). For
denoising the observation is the clean image plus Gaussian noise of standard deviation `sigma` in
[0, 1] image units (2 * sigma in [-1, 1] units), clipped to the valid range; the condition is the
observation itself.

Noise is drawn per image from a generator seeded by (data.split_seed, split, index in the split):
a pair is a property of the dataset, the same on every rank, run and step, and the test split's
pairs are the same for every run that shares its data section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Keeps the train and test splits' noise apart for one split seed.
SPLIT_SALT = {"train": 1, "test": 2, "all": 3}


def image_seed(split_seed: int, split: str, index: int) -> int:
    """The seed of one image's degradation noise."""
    return (split_seed * 1_000_003 + SPLIT_SALT[split]) * 1_000_033 + index


def box_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of each factor x factor block (area interpolation): [N, C, R, R] -> [N, C, R/f, R/f]."""
    size = images.shape[-1]
    if size % factor:
        raise ValueError(f"factor {factor} does not divide the image size {size}")
    return F.avg_pool2d(images, factor)


def bicubic_upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic interpolation (a = -0.75, as PyTorch and OpenCV) to size x size, clipped to [-1, 1]."""
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def gaussian_noise(images: torch.Tensor, sigma: float, seeds: list[int]) -> torch.Tensor:
    """`images` plus N(0, sigma^2) noise in [0, 1] units (2 sigma in [-1, 1] units), image i's noise
    drawn from a generator seeded by seeds[i]; clipped to [-1, 1] like any stored image."""
    if sigma < 0:
        raise ValueError(f"sigma must be at least 0, got {sigma}")
    noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    return (images + 2 * sigma * noise.to(images.device)).clamp(-1, 1)


@dataclass(frozen=True)
class Degradation:
    """One degradation with its settings (the spec's `restoration` section) for R x R images."""

    kind: str  # "downsample" or "gaussian_noise"
    resolution: int
    factor: int = 2
    sigma: float = 0.2
    split_seed: int = 0

    @classmethod
    def from_spec(cls, spec) -> Degradation:
        r = spec.restoration
        return cls(r.degradation, spec.data.resolution, r.factor, r.sigma, spec.data.split_seed)

    @property
    def observed_size(self) -> int:
        """The side of an observation: what `ditlab restore` accepts."""
        return self.resolution // self.factor if self.kind == "downsample" else self.resolution

    @property
    def baseline_name(self) -> str:
        """The restoration that needs no training, named as its figures are."""
        return "bicubic" if self.kind == "downsample" else "noisy"

    def describe(self) -> str:
        if self.kind == "downsample":
            return f"x{self.factor} box downsampling of {self.resolution}px images, bicubic upsampling as input"
        return f"Gaussian noise sigma {self.sigma:g} ([0, 1] units) on {self.resolution}px images, clipped"

    def observe(self, clean: torch.Tensor, indices, split: str) -> torch.Tensor:
        """The degraded observation of clean images at positions `indices` of `split`."""
        if self.kind == "downsample":
            return box_downsample(clean, self.factor)
        if self.kind == "gaussian_noise":
            seeds = [image_seed(self.split_seed, split, int(i)) for i in indices]
            return gaussian_noise(clean, self.sigma, seeds)
        raise ValueError(f"unknown degradation {self.kind!r}")

    def condition(self, observation: torch.Tensor) -> torch.Tensor:
        """The conditioning image the DiT takes (R x R) for an observation."""
        if observation.shape[-1] != self.observed_size or observation.shape[-2] != self.observed_size:
            raise ValueError(f"expected {self.observed_size}x{self.observed_size} observations, "
                             f"got {observation.shape[-2]}x{observation.shape[-1]}")
        if self.kind == "downsample":
            return bicubic_upsample(observation, self.resolution)
        return observation

    def pair(self, clean: torch.Tensor, indices, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(observation, condition) for clean images."""
        observation = self.observe(clean, indices, split)
        return observation, self.condition(observation)


# -- classical denoisers: the baseline a learned denoiser must beat -----------------------------------

# Candidate settings, chosen between on a validation slice (`choose_classical_denoiser`): non-local
# means' filter strength h as a multiple of sigma, total variation's weight on [0, 1] images. Patch
# sizes suit 16-32 px images.
NL_MEANS_H = (0.6, 0.8, 1.0, 1.2)
TV_WEIGHTS = (0.05, 0.08, 0.12, 0.18, 0.25)


@dataclass(frozen=True)
class ClassicalDenoiser:
    """scikit-image's non-local means (Buades et al. 2005) or total-variation denoising (Chambolle 2004)."""

    method: str  # "nl_means" or "tv"
    strength: float  # h for nl_means, weight for tv; on [0, 1] images
    sigma: float

    @property
    def name(self) -> str:
        return self.method

    def describe(self) -> str:
        knob = "h" if self.method == "nl_means" else "weight"
        return f"scikit-image {self.method} ({knob} {self.strength:.3g})"

    def __call__(self, noisy: torch.Tensor) -> torch.Tensor:
        """Denoise [N, C, R, R] images in [-1, 1], one by one."""
        from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

        unit = ((noisy.float().cpu() + 1) / 2).permute(0, 2, 3, 1).double().numpy()
        out = []
        for img in unit:
            if self.method == "nl_means":
                den = denoise_nl_means(img, h=self.strength, sigma=self.sigma, fast_mode=True, patch_size=3,
                                       patch_distance=4, channel_axis=-1)
            else:
                den = denoise_tv_chambolle(img, weight=self.strength, channel_axis=-1)
            out.append(torch.from_numpy(den.reshape(img.shape)))
        return (torch.stack(out).permute(0, 3, 1, 2).float() * 2 - 1).clamp(-1, 1)


def mean_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB on [0, 1] units (images given in [-1, 1]), per image, then averaged."""
    mse = ((pred.double() - target.double()) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return float((-10 * torch.log10(mse)).mean())


def choose_classical_denoiser(noisy: torch.Tensor, clean: torch.Tensor, sigma: float) -> ClassicalDenoiser:
    """The candidate (each NL_MEANS_H and TV_WEIGHTS setting) with the best mean PSNR on the pairs given:
    pass a validation slice, not the images it will be scored on."""
    candidates = [ClassicalDenoiser("nl_means", r * sigma, sigma) for r in NL_MEANS_H]
    candidates += [ClassicalDenoiser("tv", w, sigma) for w in TV_WEIGHTS]
    return max(candidates, key=lambda d: mean_psnr(d(noisy), clean))
