"""Benchmark: choices inside a CPU training step, each against its alternative.

    python benchmarks/step_kernels.py [--shapes "quickstart DiT-Ti/4" DiT-S/4 DiT-S/2] [--rounds 5] [--json FILE]

1. AdamW. `training/optim.py` builds it fused; torch's default on CPU is a loop of small ops per
   parameter. Timed as one `step()` over the quickstart model's parameters (1.9M in 71 tensors)
   and DiT-S/4's (33M).
2. The patch tokens' layout. `DiT.forward` makes the tokens contiguous before the blocks. The
   patch embedding's `flatten(2).transpose(1, 2)` is a strided view, and adding the position
   embedding keeps those strides, and so does every residual add after it: each LayerNorm then
   copies its input, forward and backward. Timed as a DiT block's forward and backward on the
   same tokens in either layout.
3. Attention as two matmuls and a softmax instead of `scaled_dot_product_attention` (on CPU its
   flash kernel). On contiguous q, k and v alone the matmul form is faster at 16-64 tokens, but
   inside the attention layer, where q, k and v are strided views of the fused qkv projection, it
   is not (below). Timed as the attention layer's forward and backward in either form, with
   ditlab.kernels off. Since ditlab's own attention kernel (item 4) the model runs neither where it
   applies.
4. ditlab.kernels (3 December): adaLN's LayerNorm and modulation, the gated residual adds with
   the biases before them, fc1's bias and GELU, each one compiled pass, and (on CPUs with AVX-512)
   attention read from the fused qkv projection, against torch's operations (the kernels turned
   off). Timed as the attention layer's forward and backward, as a DiT block's, and as a whole
   training step (forward, MSE loss, backward, AdamW) of the full model at the shape's preset
   size.

Each pair is timed alternately, `--rounds` times, in one process (medians of 20 calls a round);
printed per round as the ratio alternative / ours, so above 1 means the shipped choice is faster.
Shapes: the quickstart's (64 images, 16 tokens, width 128, 4 heads) on one thread and DiT-S/4's
(32 images, 64 tokens, width 384, 6 heads) on two; DiT-S/2's (256 tokens) on two when asked for.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import header, table, time_median  # noqa: E402
from train_step import train_step  # noqa: E402

# name -> (preset, images, tokens, width, heads, threads, input size, input channels, classes)
SHAPES = {"quickstart DiT-Ti/4": ("DiT-Ti/4", 64, 16, 128, 4, 1, 16, 1, 10),
          "DiT-S/4": ("DiT-S/4", 32, 64, 384, 6, 2, 32, 4, 1000),
          "DiT-S/2": ("DiT-S/2", 32, 256, 384, 6, 2, 32, 4, 1000)}
DEFAULT_SHAPES = ["quickstart DiT-Ti/4", "DiT-S/4"]  # DiT-S/2's step takes 4-5 s here: ask for it


class MatmulAttention(torch.nn.Module):
    """The attention layer's computation with the attention itself as matmuls and a softmax."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.layer.num_heads
        q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in self.layer.qkv(x).split(c, dim=-1))
        out = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        return self.layer.proj(out.transpose(1, 2).reshape(b, n, c))


def torch_ops(fn):
    """fn with ditlab.kernels off: torch's operations throughout, as where no compiler is found."""
    from ditlab import kernels

    def run():
        with kernels.off():
            fn()

    return run


def rounds(ours, alternative, count: int, calls: int = 20) -> list[tuple[float, float]]:
    """(ours, alternative) median seconds per round, alternated."""
    return [(time_median(ours, calls, 3), time_median(alternative, calls, 3)) for _ in range(count)]


def row(choice: str, shape: str, timed: list[tuple[float, float]]) -> dict:
    ratios = [alt / ours for ours, alt in timed]
    return {"choice": f"{choice}, {shape}", "ours ms": 1e3 * statistics.median(t[0] for t in timed),
            "alternative ms": 1e3 * statistics.median(t[1] for t in timed),
            "alternative / ours, per round": " / ".join(f"{r:.3f}" for r in ratios),
            "median ratio": statistics.median(ratios)}


def measure(name: str, count: int) -> list[dict]:
    from ditlab.models import build_model
    from ditlab.models.dit import DiTBlock
    from ditlab.training.optim import adamw

    preset, images, tokens, width, heads, threads, size, channels, classes = SHAPES[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = []

    params = [p for p in build_model(preset, input_size=size, in_channels=channels, num_classes=classes,
                                     learn_sigma=False).parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    fused = adamw(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)  # what every task builds
    assert fused.defaults["fused"], "ditlab's AdamW is not fused here"
    default = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    out.append(row("AdamW fused (ours) vs torch's CPU default", name, rounds(fused.step, default.step, count)))

    block = DiTBlock(width, heads, 4.0)
    for p in block.adaLN_modulation.parameters():
        torch.nn.init.normal_(p, std=0.02)
    c = torch.randn(images, width)
    strided = torch.randn(images, width, tokens).transpose(1, 2).requires_grad_(True)  # as the patch embedding
    contiguous = strided.detach().contiguous().requires_grad_(True)
    grad = torch.randn(images, tokens, width)
    out.append(row("DiT block on contiguous tokens (ours) vs the transposed view", name,
                   rounds(lambda: block(contiguous, c).backward(grad), lambda: block(strided, c).backward(grad),
                          count)))

    matmul = MatmulAttention(block.attn)
    x = contiguous.detach().requires_grad_(True)
    out.append(row("attention layer with torch's SDPA vs matmuls and a softmax", name,
                   rounds(torch_ops(lambda: block.attn(x).backward(grad)), lambda: matmul(x).backward(grad), count)))
    out.append(row("attention layer with ditlab.kernels' attention (ours) vs torch's SDPA", name,
                   rounds(lambda: block.attn(x).backward(grad), torch_ops(lambda: block.attn(x).backward(grad)),
                          count)))
    out.append(row("DiT block with ditlab.kernels (ours) vs torch's operations", name,
                   rounds(lambda: block(contiguous, c).backward(grad),
                          torch_ops(lambda: block(contiguous, c).backward(grad)), count)))

    model = build_model(preset, input_size=size, in_channels=channels, num_classes=classes).train()
    g = torch.Generator().manual_seed(1)
    x, target = (torch.randn(images, channels, size, size, generator=g) for _ in range(2))
    t, y = torch.randint(0, 1000, (images,), generator=g), torch.randint(0, classes, (images,), generator=g)
    step = train_step(model, model, x, t, y, target)
    out.append(row(f"{preset} training step with ditlab.kernels (ours) vs torch's operations", name,
                   rounds(step, torch_ops(step), count, calls=5)))
    for r in out:
        r["threads"] = threads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=DEFAULT_SHAPES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [r for name in args.shapes for r in measure(name, args.rounds)]
    print(header("step choices: each against its alternative, alternated (ratio > 1: ours is faster)"))
    print(table(rows, ["choice", "threads", "ours ms", "alternative ms", "alternative / ours, per round",
                       "median ratio"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
