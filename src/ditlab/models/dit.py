"""Diffusion Transformer (DiT), Peebles & Xie 2023, "Scalable Diffusion Models with Transformers".

The model maps (noisy image x_t, timestep t, class label y) to the denoiser output. It knows
nothing about noise schedules or sampling: those live in `ditlab.diffusion`. A conditional model
(`cond_channels` > 0, e.g. restoration) also takes an image the size of x_t, concatenated to its
channels before the patch embedding (SR3, Saharia et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditlab import kernels


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to rebuild a DiT; stored in every checkpoint."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    dropout: float = 0.0
    cond_channels: int = 0  # channels of a conditioning image concatenated to x_t (0: none)
    # "class" (labels) or "text" (captions, models/text.py; num_classes then only counts the data's classes)
    conditioning: str = "class"
    text_encoder: str = "learned"
    text_injection: str = "cross_attention"
    max_caption_tokens: int = 16
    # The timestep embedding's frequencies are max_period^(-i / (half - frequency_shift)): 0 in the
    # DiT paper's code, 1 in diffusers' DiTTransformer2DModel (models/convert.py loads either exactly).
    frequency_shift: int = 0
    # eps of the LayerNorm before each block's MLP: 1e-6 in the DiT code, 1e-5 in diffusers' default.
    mlp_norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention Is All You Need"."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = t.float()[:, None] * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE style): half the channels encode rows, half columns."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, matching patch raster order

    def embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(embed_dim // 2, grid_w), embed_1d(embed_dim // 2, grid_h)], 1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, frequency_shift: int = 0):
        super().__init__()
        self.frequency_size = frequency_size
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size, shift=self.frequency_shift))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Index `num_classes` is the null class used by classifier-free guidance;
    with `num_classes` 0 (a model without labels) the null class is the only row."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0 or num_classes == 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        # The training loop draws `drop_mask` from its own seeded generator, so that label dropout
        # is reproducible across an interrupted-and-resumed run.
        if drop_mask is not None:
            labels = torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, proj_bias: bool = True) -> torch.Tensor:
        """With `proj_bias` False the output projection's bias is left for the caller to add."""
        # ditlab's CPU kernel where it applies (float32 on a CPU with AVX-512), else torch's attention.
        out = kernels.attention(self.qkv(x), self.num_heads, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out) if proj_bias else F.linear(out, self.proj.weight)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, out_bias: bool = True) -> torch.Tensor:
        """With `out_bias` False fc2's bias is left for the caller to add (never with dropout on)."""
        h = self.drop(kernels.linear_gelu(x, self.fc1.weight, self.fc1.bias))
        return self.drop(self.fc2(h) if out_bias else F.linear(h, self.fc2.weight))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (paper, section 3.2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        # Regresses shift, scale and gate for both sub-layers from the conditioning vector.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        # adaLN: LayerNorm, then a per-sample scale and shift; each sub-layer's output is added to the
        # residual through a per-sample gate. Where ditlab.kernels apply (float32 on CPUs) each of these is
        # one pass, and the gated add also adds the sub-layer's last bias (not under dropout, which acts
        # on the output with its bias).
        fuse = kernels.uses_kernel(x) and not (self.training and self.mlp.drop.p > 0)
        h = self.attn(kernels.norm_modulate(x, shift1, scale1, self.norm1.eps), proj_bias=not fuse)
        x = kernels.gated_add(x, gate1, h, self.attn.proj.bias if fuse else None)
        h = self.mlp(kernels.norm_modulate(x, shift2, scale2, self.norm2.eps), out_bias=not fuse)
        return kernels.gated_add(x, gate2, h, self.mlp.fc2.bias if fuse else None)


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(kernels.norm_modulate(x, shift, scale, self.norm_final.eps))


class DiT(nn.Module):
    """Class-conditional DiT. With `learn_sigma` the output has 2x channels: prediction, then
    the interpolation coefficient of the log-variance (Nichol & Dhariwal 2021, eq. 15)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.input_size % config.patch_size:
            raise ValueError(
                f"input_size {config.input_size} is not divisible by patch_size {config.patch_size}"
            )
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}"
            )
        self.config = config
        h, p = config.hidden_size, config.patch_size
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.grid_size = config.input_size // p
        # 1. input: non-overlapping p x p patches -> tokens, plus fixed position embedding
        self.x_embedder = nn.Conv2d(config.in_channels + config.cond_channels, h, kernel_size=p, stride=p)
        pos = sincos_pos_embed_2d(h, self.grid_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)
        # 2. conditioning: timestep and class embeddings are summed into one vector c
        self.t_embedder = TimestepEmbedder(h, frequency_shift=config.frequency_shift)
        self.y_embedder = (LabelEmbedder(config.num_classes, h, config.class_dropout_prob)
                           if config.conditioning == "class" else None)
        # 3. transformer blocks and the output head
        self.blocks = nn.ModuleList(
            DiTBlock(h, config.num_heads, config.mlp_ratio, config.dropout, config.mlp_norm_eps)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(h, p, self.out_channels)
        self.initialize_weights()
        # Set by the trainer (train.grad_checkpointing): recompute block activations in the backward pass.
        self.gradient_checkpointing = False
        self.text = None
        if config.conditioning == "text":
            from ditlab.models.text import TextConditioning

            self.text = TextConditioning(config)

    @property
    def null_class(self) -> int:
        """The fill value of the null condition: the null class, or for text the padding id (an
        all-padding caption is the null caption)."""
        return self.config.num_classes if self.text is None else 0

    def initialize_weights(self) -> None:
        """Xavier for linear layers; zero for every adaLN regression and the output layer
        (the "-Zero" in adaLN-Zero: each block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) image."""
        p, g, c = self.config.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (cond is not None) != (self.config.cond_channels > 0):
            raise ValueError(f"this DiT takes {self.config.cond_channels} conditioning channels; "
                             f"got {'none' if cond is None else cond.shape[1]}")
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        # Contiguous tokens: the transposed view would carry its strides through every residual add,
        # and each LayerNorm would copy it, forward and backward (BENCHMARKS.md, "Training step").
        x = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed
        tokens = None
        if self.text is None:
            c = self.t_embedder(t) + self.y_embedder(y, drop_mask)
        else:  # y: caption inputs (models/text.py)
            tokens, mask, pooled = self.text.encoder(y, drop_mask)
            c = self.t_embedder(t) + pooled
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, c, use_reentrant=False) if recompute else block(x, c)
            if tokens is not None and len(self.text.cross):
                x = self.text.cross[i](x, tokens, mask)
        return self.unpatchify(self.final_layer(x, c))
