"""Checkpoints in facebookresearch/DiT's and diffusers' layouts: converted both ways, the same
network (issue 14, "Same model, proven"). Random weights, so a wrong mapping cannot hide behind
an all-zero adaLN-Zero initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT
from ditlab.models import build_model
from ditlab.models.convert import (ConversionError, from_diffusers, from_facebook, load_dit, save_dit, to_diffusers,
                                   to_facebook)

# Float32 rounding only: the same operations in the same order give exactly 0 here.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DiT-S/2", input_size=8, in_channels=4, depth=2, num_classes=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    return x, torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 9, 10])  # 10: the null class


def outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_diffusers_model_and_ours_compute_the_same_both_ways(model, inputs, tmp_path):
    expected = outputs(model, inputs)
    peer = to_diffusers(model)
    with torch.no_grad():
        theirs = peer(*inputs).sample
    assert (theirs - expected).abs().max().item() <= TOLERANCE
    assert (outputs(from_diffusers(peer), inputs) - expected).abs().max().item() <= TOLERANCE
    # Through the files diffusers users hold (save_pretrained), and back.
    folder = save_dit(model, tmp_path / "dit-diffusers", "diffusers")
    assert (folder / "config.json").is_file()
    assert (outputs(load_dit(folder), inputs) - expected).abs().max().item() <= TOLERANCE


def test_a_diffusers_model_keeps_its_own_timestep_embedding_when_loaded(inputs):
    """diffusers' DiT divides the embedding's frequency exponent by half - 1, the DiT code by half, and
    its MLP LayerNorm eps is 1e-5: a model from diffusers keeps diffusers' function, not the DiT code's."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(2)
    peer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(std=0.05)
    with pytest.raises(ConversionError, match="transformer_blocks.1.norm1.emb.* differs from block 0's"):
        from_diffusers(peer)
    # As in every DiT diffusers ships: each block holds a copy of the same embedders.
    peer.transformer_blocks[1].norm1.emb.load_state_dict(peer.transformer_blocks[0].norm1.emb.state_dict())
    with torch.no_grad():
        expected = peer(*inputs).sample
    ours = from_diffusers(peer)
    assert (ours.config.frequency_shift, ours.config.mlp_norm_eps) == (1, 1e-5)
    assert (outputs(ours, inputs) - expected).abs().max().item() <= TOLERANCE
    code_embedding = build_model("DiT-N/2", input_size=8, in_channels=4, num_classes=10).eval()
    code_embedding.load_state_dict(ours.state_dict())
    assert (outputs(code_embedding, inputs) - expected).abs().max().item() > 1e-3


def test_facebook_layout_differs_only_in_the_patch_embedder(model, inputs, tmp_path):
    theirs = to_facebook(model)
    renamed = set(theirs) ^ set(model.state_dict())
    assert renamed == {"x_embedder.proj.weight", "x_embedder.proj.bias", "x_embedder.weight", "x_embedder.bias"}
    back = from_facebook(theirs)
    assert back.config == model.config  # read off the weights' shapes (heads from the DiT-S width)
    expected = outputs(model, inputs)
    assert torch.equal(outputs(back, inputs), expected)
    path = save_dit(model, tmp_path / "DiT-S-2.pt", "facebook")
    assert torch.equal(outputs(load_dit(path), inputs), expected)
    # DiT's train.py checkpoints hold the weights under "ema".
    torch.save({"model": theirs, "ema": theirs, "args": {}}, tmp_path / "0000100.pt")
    assert torch.equal(outputs(load_dit(tmp_path / "0000100.pt"), inputs), expected)


def test_ditlab_convert_writes_a_checkpoints_ema_weights_in_both_layouts(tmp_path, capsys):
    from ditlab import cli
    from ditlab.models.convert import from_ditlab
    from ditlab.training.checkpoint import load_bundle

    checkpoint = ROOT / "tests" / "data" / "legacy_checkpoint" / "checkpoint.pt"
    model = from_ditlab(load_bundle(checkpoint))
    ema = load_bundle(checkpoint)["ema"]["model"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    c = model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(3))
    args = (x, torch.tensor([3, 700]), torch.tensor([0, 1]))
    expected = outputs(model, args)
    for layout, out in (("diffusers", tmp_path / "dit"), ("facebook", tmp_path / "dit.pt")):
        assert cli.main(["convert", str(checkpoint.parent), "--to", layout, "--out", str(out), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["source_layout"] == "ditlab" and result["out"] == str(out)
        assert (outputs(load_dit(out), args) - expected).abs().max().item() <= TOLERANCE
    # Back from facebook's layout to diffusers': the source is read as what it is.
    assert cli.main(["convert", str(tmp_path / "dit.pt"), "--to", "diffusers", "--out", str(tmp_path / "d2")]) == 0
    assert (outputs(load_dit(tmp_path / "d2"), args) - expected).abs().max().item() <= TOLERANCE
    capsys.readouterr()
    assert cli.main(["convert", str(checkpoint), "--to", "facebook", "--out", str(tmp_path / "dit.pt")]) == 2
    assert capsys.readouterr().err.startswith("ditlab: error: --out: ")


def test_weights_that_are_not_a_dit_are_refused_by_name(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not a DiT state dict"):
        load_dit(tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="no such file"):
        load_dit(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a tensor file")
    with pytest.raises(ConversionError, match="not a torch state dict"):
        load_dit(tmp_path / "notes.pt")
