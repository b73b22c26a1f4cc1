"""The benchmark scripts' shared parts and the GPU script, at sizes CI can afford (issue 14): the FLOP
count that MFU and %-of-peak figures rest on, and benchmarks/gpu.py running on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from common import count_flops  # noqa: E402


def dit_forward_macs(depth: int, hidden: int, tokens: int, patch_in: int, patch_out: int, batch: int) -> int:
    """Multiply-adds of a DiT forward pass, counted by hand (the DiT paper's way, its table 1)."""
    block = tokens * 12 * hidden**2 + 2 * tokens**2 * hidden + 6 * hidden**2  # qkv+proj+mlp, QK^T+AV, adaLN
    embed = tokens * patch_in * hidden + 256 * hidden + hidden**2  # patches, timestep MLP
    final = 2 * hidden**2 + tokens * hidden * patch_out
    return batch * (depth * block + embed + final)


def test_flop_count_includes_attention_and_matches_the_hand_count():
    from ditlab.models import build_model

    model = build_model("DiT-N/2", input_size=8, in_channels=4, num_classes=10).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        flops = count_flops(lambda: model(x, t, y))
    c = model.config
    expected = dit_forward_macs(c.depth, c.hidden_size, 16, 4 * 2 * 2, 8 * 2 * 2, batch=2)
    assert flops == 2 * expected
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
        model(x, t, y)
    assert flops - plain.get_total_flops() == 2 * 2 * c.depth * 2 * 16**2 * c.hidden_size  # torch's own misses it


def test_gpu_benchmark_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["model"] == "DiT-N/2" and figures["device"] == "cpu"
    assert figures["images_per_s"] > 0 and 0 < figures["mfu"] < 1
    assert "images_per_s" in proc.stdout and "command: python benchmarks/gpu.py --tiny" in proc.stdout


def test_per_worker_images_per_sec_is_the_steady_windows_median_over_the_workers(tmp_path):
    """quickstart_e2e.py's per-worker figure (issue 14's per-worker target): the log windows after the
    first (warm-up), each the global batch's images/s, their median divided by the spec's workers."""
    from quickstart_e2e import per_worker_images_per_sec

    history = [{"step": 20, "images_per_sec": 400.0}, {"step": 40, "images_per_sec": 900.0, "loss": 0.5},
               {"step": 40, "fid": 80.0}, {"step": 60, "images_per_sec": 880.0},
               {"step": 80, "images_per_sec": 1000.0}]
    (tmp_path / "history.json").write_text(json.dumps({"history": history}))
    (tmp_path / "spec.yaml").write_text("name: x\nresources:\n  num_workers: 2\n")
    assert per_worker_images_per_sec(tmp_path) == 450.0
    (tmp_path / "history.json").write_text(json.dumps({"history": history[:1]}))
    assert per_worker_images_per_sec(tmp_path) is None
