"""What a generation model attends to, and how its picture of the clean image forms while sampling.

Three figures, drawn from a few samples of a checkpoint (cheap: a handful of images, the sampler's
own steps), logged to MLflow at the end of every generation run and evaluation, and written by
`ditlab inspect CHECKPOINT --out DIR`:

- attention_maps.png: self-attention per layer (rows) and head (columns), for each sample,
  averaged over every sampling step;
- attention_timesteps.png: the same maps for the first sample at a few chosen timesteps;
- denoising_trajectory.png: the predicted clean image x0 at chosen steps, one row per sample.

How attention is captured without touching models/dit.py: a forward hook on each block's fused
`attn.qkv` projection keeps its output, and the weights are recomputed from it as
softmax(Q K^T / sqrt(d)) (Vaswani et al. 2017, eq. 1), the product that
F.scaled_dot_product_attention computes inside but does not return. What a map shows is the
attention each image patch *receives*, averaged over all query patches: where the layer looks.
1 means uniform attention (the maps are scaled by the number of tokens); with guidance, only the
conditional half of the batch is kept.

Extension point: any other attention (a text model's cross-attention to caption tokens) is
recorded by an `AttentionProbe`: the module to hook, a function from that module's (inputs,
output) to attention probabilities [B, heads, queries, keys], and how to reduce them per step.
Append a function model -> list[AttentionProbe] to `PROBE_FACTORIES` and a `FigureMaker` (a
figure's stem, `draw(trace, path)`, and which models it `applies` to) to `FIGURE_MAKERS`;
`Trace.probes[name]` then holds the reduced weights, [steps, layers, samples, ...], and
`save_token_attention` draws one map per caption token. `trace(..., denoiser=...)` takes a
denoiser for conditioning other than class labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditlab.data import to_uint8
from ditlab.diffusion import get_sampler, guided_denoiser
from ditlab.evaluation.plots import pyplot, save_png

# A latent model's decoder: latents [S, c, h, w] -> images [S, C, H, W] in [-1, 1].
Decoder = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_SAMPLES = 3
DEFAULT_TIMESTEPS = 4  # chosen timesteps of attention_timesteps.png
DEFAULT_TRAJECTORY = 8  # columns of denoising_trajectory.png


# -- capture ---------------------------------------------------------------------------------------


def received_attention(weights: torch.Tensor) -> torch.Tensor:
    """[B, heads, queries, keys] -> [B, heads, keys]: the attention each key token receives,
    averaged over the queries."""
    return weights.mean(dim=2)


@dataclass
class AttentionProbe:
    """One attention to record at every sampling step. `weights(inputs, output)` turns the hooked
    module's forward inputs and output into probabilities [B, heads, queries, keys]; `reduce`
    keeps what the figures need of them (the full matrices of every step would be large)."""

    name: str  # the figures' key in Trace.probes, e.g. "self"
    layer: int
    module: nn.Module
    weights: Callable[[tuple, torch.Tensor], torch.Tensor]
    reduce: Callable[[torch.Tensor], torch.Tensor] = received_attention


def self_attention_weights(num_heads: int) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
    """From the output of a fused qkv projection [B, N, 3C]: softmax(Q K^T / sqrt(d)) per head,
    split as models/dit.py's Attention splits it."""

    def weights(_inputs: tuple, qkv: torch.Tensor) -> torch.Tensor:
        b, n, c3 = qkv.shape
        head_dim = c3 // 3 // num_heads
        q, k, _ = qkv.float().reshape(b, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)  # (B, H, N, N)

    return weights


def self_attention_probes(model: nn.Module) -> list[AttentionProbe]:
    """One probe on each DiT block's `attn.qkv`."""
    return [AttentionProbe("self", i, block.attn.qkv, self_attention_weights(block.attn.num_heads))
            for i, block in enumerate(model.blocks)]


# Functions model -> probes, run by `trace`; text conditioning appends its cross-attention probes.
PROBE_FACTORIES: list[Callable[[nn.Module], list[AttentionProbe]]] = [self_attention_probes]


@dataclass
class Trace:
    """What one traced sampling run recorded, all on the CPU."""

    labels: list[int]
    timesteps: list[int]  # the sampler's timesteps, in sampling order
    x0: list[np.ndarray]  # per step: the predicted clean images, uint8 [S, H, W, C]
    samples: np.ndarray  # the final images, uint8 [S, H, W, C]
    grid_size: int  # the image tokens form a grid_size x grid_size grid
    # probe name -> reduced weights stacked as [steps, layers, S, ...] (self: [steps, L, S, heads, N])
    probes: dict[str, torch.Tensor] = field(default_factory=dict)


class _Recorder:
    """Forward hooks that keep each probe's reduced weights for the first `keep` rows of the batch
    (the conditional half under classifier-free guidance), one entry per sampling step."""

    def __init__(self, probes: list[AttentionProbe], keep: int):
        self.probes, self.keep = probes, keep
        self.steps: list[dict[tuple[str, int], torch.Tensor]] = []
        self.handles = [p.module.register_forward_hook(self._hook(p)) for p in probes]

    def _hook(self, probe: AttentionProbe):
        def hook(_module, inputs, output):
            reduced = probe.reduce(probe.weights(inputs, output)[: self.keep])
            self.steps[-1][(probe.name, probe.layer)] = reduced.detach().cpu()

        return hook

    def new_step(self) -> None:
        self.steps.append({})

    def stacked(self) -> dict[str, torch.Tensor]:
        """probe name -> [steps, layers, ...], layers in order."""
        out = {}
        for name in dict.fromkeys(p.name for p in self.probes):
            layers = sorted(p.layer for p in self.probes if p.name == name)
            out[name] = torch.stack([torch.stack([step[(name, layer)] for layer in layers]) for step in self.steps])
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def trace(model: nn.Module, diffusion, labels: torch.Tensor, sampler: str = "ddim", steps: int = 50,
          guidance: float = 1.0, seed: int = 0, clip_x0: bool = True, decode: Decoder | None = None,
          inputs: torch.Tensor | None = None, denoiser: Callable | None = None) -> Trace:
    """Sample `labels` (a few) with `sampler`, recording every probe of PROBE_FACTORIES and the
    predicted x0 at each step. `decode` maps latents to images (a latent model). The model is
    conditioned on `inputs` (default: the labels; a text model: its caption inputs), guided by
    `denoiser` when given (other conditioning) instead of classifier-free guidance on them."""
    model = model.eval()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    condition = labels if inputs is None else inputs
    denoise = denoiser or guided_denoiser(model, condition, guidance, model.null_class)
    recorder = _Recorder([p for make in PROBE_FACTORIES for p in make(model)], keep=len(labels))
    timesteps, x0s = [], []

    def recorded(x_t, t):  # every sampler here makes one network evaluation a step
        recorder.new_step()
        timesteps.append(int(t[0]))
        return denoise(x_t, t)

    def images(x: torch.Tensor) -> np.ndarray:
        return to_uint8(x if decode is None else decode(x))

    try:
        final = get_sampler(sampler)(recorded, x, diffusion, steps, generator=g,
                                     callback=lambda s: x0s.append(images(s["x0"])),
                                     clip_x0=clip_x0 and decode is None)
    finally:
        recorder.close()
    return Trace(labels.tolist(), timesteps, x0s, images(final), model.grid_size, recorder.stacked())


def spread_labels(num: int, num_classes: int) -> torch.Tensor:
    """`num` labels spread over the classes (0, ..., K-1 evenly); the null class for a model
    without classes."""
    if num_classes == 0:
        return torch.zeros(num, dtype=torch.long)
    return torch.linspace(0, num_classes - 1, num).round().long() % num_classes


def chosen_steps(total: int, count: int) -> list[int]:
    """`count` step indices spread from the first to the last of `total` (all if fewer)."""
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, min(count, total))})


# -- figures ---------------------------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    save_png(fig, path)
    pyplot().close(fig)
    return path


def _gray(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8


def _upsample(cell: np.ndarray, size: int) -> np.ndarray:
    """A g x g map (or an image) shown as a size x size block of nearest-neighbour pixels."""
    factor = -(-size // cell.shape[0])
    return np.repeat(np.repeat(cell, factor, axis=0), factor, axis=1)[:size, :size]


def attention_canvas(maps: np.ndarray, headers: list[np.ndarray], vmax: float, gap: int = 2) -> np.ndarray:
    """maps [G, L, H, g, g] and G header images -> one RGB float canvas: a header row (each
    header above its group's first head), then one row per layer, G groups of H columns."""
    from matplotlib import colormaps

    groups, layers, heads = maps.shape[:3]
    size = max(headers[0].shape[0], 16)
    step = size + gap
    canvas = np.ones(((layers + 1) * step + gap, groups * heads * step + gap * groups, 3))
    colour = colormaps["magma"]
    for gi in range(groups):
        left = gap * gi  # a wider gap between groups
        header = _upsample(headers[gi].astype(np.float64) / 255.0, size)
        x = left + gi * heads * step + gap
        canvas[gap:gap + size, x:x + size] = header if header.shape[-1] == 3 else np.repeat(header, 3, axis=-1)
        for layer in range(layers):
            for h in range(heads):
                x = left + (gi * heads + h) * step + gap
                y = (layer + 1) * step + gap
                canvas[y:y + size, x:x + size] = colour(_upsample(maps[gi, layer, h], size) / vmax)[..., :3]
    return canvas


def attention_grid_figure(maps: np.ndarray, headers: list[np.ndarray], header_titles: list[str],
                          path: Path, title: str) -> Path:
    """maps [G, L, H, g, g] (groups, layers, heads): one row per layer, G groups of H columns,
    each group under its header image (a sample, or the x0 at that timestep). Drawn as one
    canvas: a subplot per map costs seconds at a run's end."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = pyplot()
    groups, layers, heads = maps.shape[:3]
    vmax = max(float(maps.max()), 1e-12)
    canvas = attention_canvas(maps, headers, vmax)
    step = (canvas.shape[0] - 2) / (layers + 1)
    fig, ax = plt.subplots(figsize=(0.55 * groups * heads + 1.6, 0.55 * (layers + 1) + 0.8))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([(layer + 1.5) * step for layer in range(layers)], [f"layer {i}" for i in range(layers)],
                  fontsize=7)
    ax.set_xticks([2 * gi + (gi * heads + h + 0.5) * step for gi in range(groups) for h in range(heads)],
                  [f"h{h}" for _ in range(groups) for h in range(heads)], fontsize=6)
    for gi, text in enumerate(header_titles):
        ax.text(2 * gi + gi * heads * step + step * 1.1, step * 0.5, text, fontsize=7, va="center")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(ScalarMappable(Normalize(0, vmax), "magma"), ax=ax, shrink=0.8,
                 label="attention received (1 = uniform)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def self_attention_maps(tr: Trace) -> np.ndarray:
    """[steps, layers, S, heads, g, g]: the attention each patch receives, scaled by the number of
    tokens (1 = uniform)."""
    maps = tr.probes["self"].numpy()
    n = maps.shape[-1]
    return maps.reshape(*maps.shape[:-1], tr.grid_size, tr.grid_size) * n


def save_attention_maps(tr: Trace, path: Path) -> Path:
    """Per sample: each layer's and head's map averaged over all sampling steps."""
    maps = self_attention_maps(tr).mean(axis=0).transpose(1, 0, 2, 3, 4)  # (S, L, H, g, g)
    titles = [f"class {y}" for y in tr.labels]
    return attention_grid_figure(maps, list(tr.samples), titles, path,
                                 f"self-attention per layer and head, mean over {len(tr.timesteps)} steps")


def save_attention_timesteps(tr: Trace, path: Path, count: int = DEFAULT_TIMESTEPS) -> Path:
    """The first sample's maps at `count` timesteps spread over the sampling run."""
    picked = chosen_steps(len(tr.timesteps), count)
    maps = self_attention_maps(tr)[picked, :, 0]  # (G, L, H, g, g)
    headers = [tr.x0[i][0] for i in picked]
    titles = [f"t={tr.timesteps[i]} (x0)" for i in picked]
    return attention_grid_figure(maps, headers, titles, path,
                                 f"self-attention of the class-{tr.labels[0]} sample at {len(picked)} timesteps")


def save_trajectory(tr: Trace, path: Path, count: int = DEFAULT_TRAJECTORY) -> Path:
    """One row per sample: the predicted x0 at `count` steps, then the final sample."""
    plt = pyplot()
    picked = chosen_steps(len(tr.timesteps), count)
    rows, cols = len(tr.labels), len(picked) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 0.6, 0.9 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c, image in enumerate([tr.x0[i][r] for i in picked] + [tr.samples[r]]):
            ax = axes[r, c]
            ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={tr.timesteps[picked[c]]}" if c < len(picked) else "sample", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"class {tr.labels[r]}", fontsize=7)
    fig.suptitle("denoising trajectory: predicted x0 at chosen steps", fontsize=9)
    return _save(fig, path)


def save_token_attention(maps: np.ndarray, tokens: list[str], images: np.ndarray, path: Path,
                         title: str = "cross-attention per caption token") -> Path:
    """For text conditioning: maps [S, tokens, g, g] (how much each image patch attends to each
    caption token), one row per sample, its image first, one column per token."""
    plt = pyplot()
    rows, cols = maps.shape[0], maps.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 1.0, 0.9 * rows + 0.6), squeeze=False)
    vmax = float(maps.max())
    for r in range(rows):
        axes[r, 0].imshow(_gray(images[r]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for c in range(cols - 1):
            axes[r, c + 1].imshow(maps[r, c], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            if r == 0:
                axes[r, c + 1].set_title(tokens[c], fontsize=7)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


@dataclass(frozen=True)
class FigureMaker:
    """One figure of a trace: `draw(trace, path)` writes the PNG at `path` and returns it, for a
    model that `applies(model)` (a token figure: a model with cross-attention)."""

    stem: str
    draw: Callable[[Trace, Path], Path]
    applies: Callable[[nn.Module], bool] = lambda _model: True


# The figures written for every traced model; text conditioning appends its token figure.
FIGURE_MAKERS: list[FigureMaker] = [
    FigureMaker("attention_maps", save_attention_maps),
    FigureMaker("attention_timesteps", save_attention_timesteps),
    FigureMaker("denoising_trajectory", save_trajectory),
]


def makers_for(model: nn.Module) -> list[FigureMaker]:
    return [m for m in FIGURE_MAKERS if m.applies(model)]


def write_figures(tr: Trace, model: nn.Module, out_dir: str | Path) -> dict[str, Path]:
    """Every figure that applies to `model`, written into `out_dir` as <stem>.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {m.stem: m.draw(tr, out_dir / f"{m.stem}.png") for m in makers_for(model)}


# -- for a checkpoint ------------------------------------------------------------------------------


def trace_checkpoint(ckpt, ev, num: int = DEFAULT_SAMPLES, labels: torch.Tensor | None = None) -> Trace:
    """A sampling.LoadedCheckpoint traced with an EvaluationSpec's sampler, steps, guidance and seed."""
    labels = spread_labels(num, ckpt.model.config.num_classes) if labels is None else labels
    return trace(ckpt.model, ckpt.diffusion, labels, ev.sampler, ev.steps, ev.guidance, ev.seed, ev.clip_x0,
                 ckpt.decode, model_inputs(ckpt, labels))


def model_inputs(ckpt, labels: torch.Tensor) -> torch.Tensor:
    """What the model is conditioned on for `labels`: the labels, or for a text model captions of
    them in phrasings training never saw (as sampling.generate draws them)."""
    if getattr(ckpt.model, "text", None) is None:
        return labels
    from ditlab.data.captions import CaptionBank, heldout_captions
    from ditlab.models.text import caption_inputs

    return caption_inputs(ckpt.model.config, CaptionBank([], heldout_captions(ckpt.spec.data)).for_labels(labels))


def report_plots(ckpt, ev, num: int = DEFAULT_SAMPLES) -> dict[str, Callable[[Path], Path]]:
    """The figures as evaluation.suite.Report.plots writers (stem -> write(path) -> path). The
    sampling run is traced once, when the first figure is written."""
    traced: list[Trace] = []

    def writer(maker: FigureMaker) -> Callable[[Path], Path]:
        def write(path: Path) -> Path:
            if not traced:
                traced.append(trace_checkpoint(ckpt, ev, num))
            return maker.draw(traced[0], path)

        return write

    return {m.stem: writer(m) for m in makers_for(ckpt.model)}


# Text conditioning's cross-attention to each caption token (text_attention.py): probes and a figure.
from ditlab.text_attention import cross_attention_probes, has_cross_attention, save_caption_attention  # noqa: E402

PROBE_FACTORIES.append(cross_attention_probes)
FIGURE_MAKERS.append(FigureMaker("caption_attention", save_caption_attention, has_cross_attention))
