"""Validation loss: the training objective on a fixed held-out set with fixed noise and timesteps.

Everything random here comes from one generator with a constant seed, independent of the spec's
`seed`: two runs, or two trials of a sweep, that share the data spec score their weights on the
same (image, label, timestep, noise) tuples, so their `val_loss` values compare directly.
Values compare across trials that share the diffusion process (prediction target and schedule);
the loss of an eps-model and of a v-model are different quantities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditlab.data import ImageDataset, load_dataset
from ditlab.diffusion import GaussianDiffusion, training_losses

# A constant, not spec.seed: trials that differ only in their seed are still scored on one set.
VALIDATION_SEED = 8_675_309


@dataclass(frozen=True)
class ValidationSet:
    x0: torch.Tensor  # [N, C, R, R] test images in [-1, 1]
    y: torch.Tensor  # [N] labels
    fraction: torch.Tensor  # [N] timesteps as fractions of T in [0, 1)
    noise: torch.Tensor  # [N, C, R, R]

    def __len__(self) -> int:
        return len(self.y)

    def timesteps(self, num_timesteps: int) -> torch.Tensor:
        return (self.fraction * num_timesteps).long().clamp(max=num_timesteps - 1)


def validation_set(data_spec, num_images: int, test: ImageDataset | None = None) -> ValidationSet | None:
    """`num_images` test images (all of the split if it has fewer), or None for 0. `test` replaces
    the data section's test split (a latent model validates on encoded test images)."""
    if num_images <= 0:
        return None
    test = test or load_dataset(data_spec, "test")
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    n = min(num_images, len(test))
    x0, y = test.batch(torch.randperm(len(test), generator=g)[:n])
    # Stratified: one timestep in each 1/n of [0, 1), shuffled over the images, so that a small set
    # still covers every noise level. Fractions of T, so a sweep over num_timesteps sees the same levels.
    fraction = (torch.arange(n) + torch.rand(n, generator=g)) / n
    fraction = fraction[torch.randperm(n, generator=g)]
    noise = torch.randn(x0.shape, generator=g)
    return ValidationSet(x0, y, fraction, noise)


@torch.no_grad()
def validation_loss(model: nn.Module, diffusion: GaussianDiffusion, val: ValidationSet, device: torch.device,
                    chunk: int = 256) -> float:
    """Mean per-sample training loss (mse, plus vb with a learned variance) over the set, in fp32,
    in eval mode (no dropout) and with every label kept (no classifier-free dropout)."""
    was_training = model.training
    model.eval()
    t_all = val.timesteps(diffusion.num_timesteps)
    total = 0.0
    for i in range(0, len(val), chunk):
        part = slice(i, i + chunk)
        x0, y, t, noise = (v[part].to(device) for v in (val.x0, val.y, t_all, val.noise))
        total += float(training_losses(model, diffusion, x0, t, y, noise, None)["loss"].double().sum())
    model.train(was_training)
    return total / len(val)
