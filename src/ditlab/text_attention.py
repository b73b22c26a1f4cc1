"""The cross-attention of a text DiT to each caption token, as a figure of `ditlab inspect` and of
every text generation run's evaluation (interpret.py's extension points: PROBE_FACTORIES and
FIGURE_MAKERS).

At each sampling step a forward hook on every cross-attention layer (models/text.py) recomputes
its attention probabilities; what is kept per sample is, for each caption token, the attention
every image patch pays to it, averaged over heads. The figure averages those maps over steps and
layers: one row per sample, its image first, then the null token (the learned token every caption
starts with, which a patch attends to when no word matters to it) and each word position.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # interpret.py imports this module at its end to register what is below
    from ditlab.interpret import AttentionProbe, Trace

NAME = "cross"


def has_cross_attention(model: nn.Module) -> bool:
    text = getattr(model, "text", None)
    return text is not None and len(text.cross) > 0


def _weights(layer):
    def weights(inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        return layer.attention(*inputs)

    return weights


def per_token(weights: torch.Tensor) -> torch.Tensor:
    """[B, heads, patches, tokens] -> [B, tokens, patches]: each token's map, averaged over heads."""
    return weights.mean(dim=1).transpose(1, 2)


def cross_attention_probes(model: nn.Module) -> list[AttentionProbe]:
    """One probe on each cross-attention layer of a text DiT (none for other models)."""
    from ditlab.interpret import AttentionProbe

    if not has_cross_attention(model):
        return []
    return [AttentionProbe(NAME, i, layer, _weights(layer), per_token) for i, layer in enumerate(model.text.cross)]


def token_maps(tr: Trace) -> np.ndarray:
    """[S, tokens, g, g]: the maps averaged over sampling steps and layers, cut after the last
    token any sample's caption has (padding receives no attention)."""
    maps = tr.probes[NAME].float().mean(dim=(0, 1))  # [S, tokens, patches]
    used = int((maps.sum(dim=(0, 2)) > 0).nonzero().max()) + 1
    return maps[:, :used].reshape(maps.shape[0], used, tr.grid_size, tr.grid_size).numpy()


def save_caption_attention(tr: Trace, path: Path) -> Path:
    """caption_attention.png: interpret.save_token_attention of `token_maps`."""
    from ditlab.interpret import save_token_attention

    maps = token_maps(tr)
    tokens = ["null"] + [f"word {i}" for i in range(1, maps.shape[1])]
    title = (f"cross-attention per caption token (averaged over steps and layers); rows: classes {tr.labels}, "
             "captions in unseen phrasings")
    return save_token_attention(maps, tokens, tr.samples, path, title)

