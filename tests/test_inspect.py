"""Interpretability artifacts (interpret.py, `ditlab inspect`): attention recomputed from the hooked
qkv projection is the attention the model uses, the trace keeps the conditional half under guidance
and ends on the sample, and `ditlab inspect` writes the figures or refuses in one line. All
in-process on the committed tiny checkpoint (DiT-N/2 on 8x8 digits: 2 layers, 2 heads, 16 tokens);
that a run's evaluation logs the figures to MLflow is checked in test_e2e."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab import cli, interpret
from ditlab.sampling import load_for_sampling
from ditlab.training.checkpoint import load_bundle, save_bundle

from conftest import ROOT

TINY_CHECKPOINT = ROOT / "tests" / "data" / "legacy_checkpoint"  # a real generation checkpoint


@pytest.fixture(scope="module")
def ckpt():
    return load_for_sampling(TINY_CHECKPOINT)


def test_recomputed_attention_weights_reproduce_the_blocks_attention_output(ckpt):
    """softmax(QK^T/sqrt(d)) from the hooked qkv output, applied to V and projected, equals what
    the model's own (fused) attention returned: the maps show the attention the model uses."""
    model = ckpt.model
    x = torch.randn(3, 16, model.config.hidden_size)
    for block in model.blocks:
        attn = block.attn
        captured = {}
        handle = attn.qkv.register_forward_hook(lambda _m, _i, out, kept=captured: kept.update(qkv=out))
        with torch.no_grad():
            expected = attn(x)
        handle.remove()
        weights = interpret.self_attention_weights(attn.num_heads)((x,), captured["qkv"])  # (B, H, N, N)
        b, n, c = x.shape
        v = captured["qkv"].reshape(b, n, 3, attn.num_heads, c // attn.num_heads)[:, :, 2].transpose(1, 2)
        rebuilt = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
        assert torch.allclose(weights.sum(-1), torch.ones(b, attn.num_heads, n), atol=1e-5)
        assert torch.allclose(rebuilt, expected, atol=1e-5)


def test_a_guided_trace_keeps_the_conditional_half_and_ends_on_the_sample(ckpt):
    tr = interpret.trace(ckpt.model, ckpt.diffusion, torch.tensor([1, 8]), "ddim", 4, guidance=2.0, seed=3)
    assert tr.probes["self"].shape == (4, 2, 2, 2, 16)  # steps, layers, samples (not 4), heads, tokens
    # each query's weights sum to 1, so the attention received, averaged over queries, sums to 1
    assert torch.allclose(tr.probes["self"].sum(-1), torch.ones(4, 2, 2, 2), atol=1e-5)
    assert len(tr.timesteps) == len(tr.x0) == 4 and tr.timesteps[0] > tr.timesteps[-1]
    # deterministic DDIM's last step returns its x0 prediction: the trajectory ends on the sample
    assert np.array_equal(tr.x0[-1], tr.samples)
    # the recorded maps differ between the two samples: the hooks see each sample's own batch row
    assert not torch.allclose(tr.probes["self"][:, :, 0], tr.probes["self"][:, :, 1])


def test_inspect_writes_the_figures_and_the_maps(tmp_path, capsys):
    out = tmp_path / "inspect"
    code = cli.main(["inspect", str(TINY_CHECKPOINT), "--out", str(out), "--num", "2", "--labels", "3,7",
                     "--steps", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["labels"] == [3, 7] and len(result["timesteps"]) == 3
    assert (result["layers"], result["heads"], result["grid_size"]) == (2, 2, 4)
    for stem in ("attention_maps", "attention_timesteps", "denoising_trajectory"):
        assert Path(result["files"][stem]).stat().st_size > 2000, stem
    maps = np.load(result["files"]["attention"])
    assert maps["self_attention"].shape == (3, 2, 2, 2, 16) and list(maps["timesteps"]) == result["timesteps"]
    assert json.loads((out / "inspect.json").read_text()) == result


def _other_task_checkpoint(folder: Path) -> Path:
    bundle = load_bundle(TINY_CHECKPOINT)
    bundle.pop("format")
    bundle["spec"]["task"] = "restoration"
    return save_bundle(folder / "checkpoint.pt", bundle).parent


@pytest.mark.parametrize("case", ["missing checkpoint", "restoration checkpoint", "out is a file", "num 0",
                                  "label out of range", "earlier output"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint, out, extra = str(TINY_CHECKPOINT), "out", []
    if case == "missing checkpoint":
        checkpoint = "nowhere"
    elif case == "restoration checkpoint":
        checkpoint = str(_other_task_checkpoint(tmp_path / "restore"))
    elif case == "out is a file":
        Path("taken").write_text("x")
        out = "taken/inner"
    elif case == "num 0":
        extra = ["--num", "0"]
    elif case == "label out of range":
        extra = ["--labels", "10"]
    else:
        Path("out").mkdir()
        Path("out/attention_maps.png").write_bytes(b"old")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = cli.main(["inspect", checkpoint, "--out", out, *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ditlab: error: "), captured.err
    assert captured.out == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    expected = {"missing checkpoint": "not found", "restoration checkpoint": "not a generation checkpoint",
                "out is a file": "is a file", "num 0": "--num", "label out of range": "--labels",
                "earlier output": "already holds"}[case]
    assert expected in lines[0]
