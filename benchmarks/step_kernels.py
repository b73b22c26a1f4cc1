"""Benchmark: the two kernel choices inside a CPU training step, each against torch's default.

    python benchmarks/step_kernels.py [--threads 1 2] [--tokens 16 32 64 128 256] [--json FILE]

1. Attention. `models/dit.py` runs attention over at most SHORT_SEQUENCE tokens on CPU as two
   batched matmuls and a softmax, and longer sequences through `scaled_dot_product_attention` (on
   CPU its flash kernel). Timed here for each token count: forward and backward, and forward alone
   (sampling), at the quickstart's heads (batch 64, 4 heads of 32) and DiT-S's (batch 32, 6 heads
   of 64). A ratio above 1 means the matmul form is faster.
2. AdamW. `training/optim.py` builds it fused; torch's default on CPU is a loop of small ops per
   parameter. Timed as one `step()` over the quickstart model's parameters (1.9M, 71 tensors) and
   DiT-S/4's (33M).

Medians of repeated calls, each pair timed alternately in one process. Run it with nothing else on
the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import header, table, time_median  # noqa: E402

HEADS = {"quickstart (b64, 4x32)": (64, 4, 32), "DiT-S (b32, 6x64)": (32, 6, 64)}


def matmul_attention(q, k, v):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def attention_rows(tokens: list[int], repeats: int) -> list[dict]:
    rows = []
    for name, (b, h, d) in HEADS.items():
        for n in tokens:
            q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
            grad = torch.randn(b, h, n, d)
            row = {"heads": name, "tokens": n}
            for label, fn in (("flash", F.scaled_dot_product_attention), ("matmul", matmul_attention)):
                def both(fn=fn, q=q, k=k, v=v, grad=grad):
                    fn(q, k, v).backward(grad)

                def forward(fn=fn, q=q, k=k, v=v):
                    with torch.no_grad():
                        fn(q, k, v)

                row[f"{label} fwd+bwd ms"] = 1e3 * time_median(both, repeats, 3)
                row[f"{label} fwd ms"] = 1e3 * time_median(forward, repeats, 3)
            row["fwd+bwd flash/matmul"] = row["flash fwd+bwd ms"] / row["matmul fwd+bwd ms"]
            row["fwd flash/matmul"] = row["flash fwd ms"] / row["matmul fwd ms"]
            rows.append(row)
    return rows


def adamw_rows(repeats: int) -> list[dict]:
    from ditlab.models import build_model

    rows = []
    for name, kwargs in (("quickstart DiT-Ti/4", dict(input_size=16, in_channels=1, num_classes=10)),
                         ("DiT-S/4", dict(input_size=32, in_channels=4, num_classes=1000))):
        preset = name.split()[-1]
        params = [p for p in build_model(preset, learn_sigma=False, **kwargs).parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        row = {"model": name, "parameters": sum(p.numel() for p in params), "tensors": len(params)}
        for label, fused in (("default", None), ("fused", True)):
            opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
            row[f"{label} ms"] = 1e3 * time_median(opt.step, repeats, 5)
        row["default/fused"] = row["default ms"] / row["fused ms"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    out = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        attention = attention_rows(args.tokens, args.repeats)
        adamw = adamw_rows(args.repeats)
        print(header(f"attention on CPU, {threads} thread(s): scaled_dot_product_attention (flash) against "
                     f"two matmuls and a softmax"))
        print(table(attention, list(attention[0])))
        print(f"\n# AdamW step, {threads} thread(s): torch's default on CPU against fused")
        print(table(adamw, list(adamw[0])) + "\n", flush=True)
        out[threads] = {"attention": attention, "adamw": adamw}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
