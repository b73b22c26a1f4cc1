"""Time per training step (forward + backward + AdamW) of DiT-Ti/4 on 16x16 digits, batch 64, one
thread: class labels against text with cross-attention and text with pooled adaLN conditioning.
Five interleaved rounds after a warm-up round; the median of each.

    flock /tmp/ditlab-ray.lock .venv/bin/python benchmarks/text_step.py
"""
import statistics
import time

import torch

from ditlab.models import build_model
from ditlab.models.text import hash_ids
torch.set_num_threads(1)
caps = ["a handwritten seven", "the digit 3", "an image of a four", "number 9 written by hand"] * 16
def make(kind):
    torch.manual_seed(0)
    kw = dict(input_size=16, in_channels=1, num_classes=10, learn_sigma=False)
    if kind != "class":
        kw.update(conditioning="text", text_injection=kind, max_caption_tokens=8)
    m = build_model("DiT-Ti/4", **kw)
    if kind != "class":
        m.text.encoder.learn_vocabulary(caps)
    y = torch.arange(64) % 10 if kind == "class" else hash_ids(caps, 8)
    return m, y, torch.optim.AdamW(m.parameters(), 1e-3)
models = {k: make(k) for k in ("class", "cross_attention", "pooled")}
x, t = torch.randn(64, 1, 16, 16), torch.randint(1000, (64,))
times = {k: [] for k in models}
for r in range(6):
    for k, (m, y, opt) in models.items():
        tic = time.perf_counter()
        loss = m(x, t, y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if r:  # round 0 warms up
            times[k].append(time.perf_counter() - tic)
for k in models:
    n = sum(p.numel() for p in models[k][0].parameters())
    print(f"{k}: {statistics.median(times[k])*1000:.1f} ms/step, {n/1e6:.2f}M parameters")
