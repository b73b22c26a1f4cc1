"""Adversarial terms shared by the tasks that use them: a patch discriminator, its loss and the
generator's, and the adaptive weight that balances the generator's term against reconstruction.

The autoencoder task applies them to reconstructions (Esser et al. 2021, "Taming Transformers"); the
generation task to the denoiser's predicted clean image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): stride-2 convolutions down to a grid of logits,
    one per overlapping patch, so it judges local texture and sharpness rather than the whole image.
    GroupNorm instead of BatchNorm, so data-parallel ranks need no synchronized statistics."""

    def __init__(self, in_channels: int, width: int = 32, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), _norm(2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        blocks += [nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss: hinge (Lim & Ye 2017) or non-saturating (Goodfellow et al. 2014)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial term: -D(x) for hinge, softplus(-D(x)) (non-saturating) otherwise."""
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad rec|| / ||grad adv|| at the decoder's last layer (Esser et al. 2021, eq. 7), detached, so
    the adversarial term's gradient there has the reconstruction term's size."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
