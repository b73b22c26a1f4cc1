"""A KL-regularized convolutional autoencoder (Kingma & Welling 2014; the first stage of latent
diffusion, Rombach et al. 2022): images -> a diagonal Gaussian over latents -> images.

Presets are named `KL-{size}/f{factor}c{channels}`: `size` sets the width (N 16, S 32, B 64 channels
in the first stage, doubled at each downsampling up to 4x), `factor` the spatial downsampling (2, 4 or
8: one stride-2 stage each), `channels` the latent channels. `KL-S/f2c2` turns 16x16 digits into
8x8x2 latents.

Each stage is a residual block (GroupNorm, SiLU, 3x3 convolutions) followed by a resampling
convolution; the encoder ends in a 1x1 projection to the latent mean and log-variance, the decoder
in a 3x3 convolution to pixels (`last_layer`, where the adaptive adversarial weight is measured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = {"N": 16, "S": 32, "B": 64}
FACTORS = (2, 4, 8)
LATENT_CHANNELS = (1, 2, 3, 4, 8, 16)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything needed to rebuild an autoencoder; stored in its checkpoints as "model_config"."""

    input_size: int = 16
    in_channels: int = 1
    width: int = 32
    factor: int = 2
    latent_channels: int = 2
    max_width_multiplier: int = 4
    kind: str = "autoencoder"  # tells an autoencoder checkpoint's model_config from a DiT's

    @property
    def latent_size(self) -> int:
        return self.input_size // self.factor

    def widths(self) -> list[int]:
        """Channels at each resolution, from the input's down to the latents'."""
        levels = self.factor.bit_length() - 1
        return [self.width * min(2**i, self.max_width_multiplier) for i in range(levels + 1)]

    def to_dict(self) -> dict:
        return asdict(self)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    f"KL-{size}/f{factor}c{channels}": AutoencoderConfig(width=width, factor=factor, latent_channels=channels)
    for size, width in WIDTHS.items()
    for factor in FACTORS
    for channels in LATENT_CHANNELS
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = cfg.widths()
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        stages = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=False):
            stages += [ResBlock(c_in, c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        self.stages = nn.Sequential(*stages)
        self.mid = ResBlock(widths[-1], widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.stages(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = cfg.widths()[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid = ResBlock(widths[0], widths[0])
        stages = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=False):
            stages += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       ResBlock(c_out, c_out)]
        self.stages = nn.Sequential(*stages)
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class Posterior:
    """q(z | x): a diagonal Gaussian over the latents."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements (as latent diffusion does)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weights: the adaptive adversarial weight compares gradients here."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> Posterior:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, Posterior]:
        """(reconstruction, posterior); decodes a posterior sample drawn with `noise`, or its mean."""
        posterior = self.encode(x)
        z = posterior.mean if noise is None else posterior.sample(noise)
        return self.decode(z), posterior


def build_autoencoder(name: str, **overrides) -> Autoencoder:
    if name not in AUTOENCODER_PRESETS:
        raise KeyError(f"unknown autoencoder {name!r}; known: {', '.join(sorted(AUTOENCODER_PRESETS))}")
    return Autoencoder(replace(AUTOENCODER_PRESETS[name], **overrides))


def autoencoder_from_config(config: dict) -> Autoencoder:
    return Autoencoder(AutoencoderConfig(**config))
