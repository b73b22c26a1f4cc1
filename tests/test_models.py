import numpy as np
import pytest
import torch

from ditlab.models import PRESETS, DiT, DiTConfig, build_model
from ditlab.models.dit import sincos_pos_embed_2d, timestep_embedding


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # includes the frozen position embedding


@pytest.mark.parametrize("name,expected", [("DiT-XL/2", 675_129_632), ("DiT-S/2", 32_963_360)])
def test_reference_parameter_counts(name, expected):
    # The DiT paper's configuration: 32x32x4 latents (256px images), 1000 classes, learned sigma.
    with torch.device("meta"):
        model = build_model(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert count(model) == expected


def test_presets_cover_paper_sizes_and_patches():
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert f"DiT-{size}/{patch}" in PRESETS
    with pytest.raises(KeyError, match="unknown model"):
        build_model("DiT-Z/2")


@pytest.mark.parametrize("learn_sigma,patch", [(False, 2), (True, 4)])
def test_forward_shapes(learn_sigma, patch):
    model = build_model(f"DiT-N/{patch}", input_size=16, in_channels=3, num_classes=5, learn_sigma=learn_sigma)
    x = torch.randn(4, 3, 16, 16)
    out = model(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 4, 5]))  # 5 = null class
    assert out.shape == (4, 6 if learn_sigma else 3, 16, 16)


def test_adaln_zero_starts_at_zero_output():
    """adaLN-Zero: zero-initialized modulation and output layer make the fresh network output 0."""
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_label_dropout_uses_null_class():
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    y = torch.tensor([3, 4])
    dropped = emb(y, torch.tensor([True, False]))
    assert torch.equal(dropped[0], emb.embedding_table.weight[10])
    assert torch.equal(dropped[1], emb.embedding_table.weight[4])


def test_position_embedding_closed_form():
    pos = sincos_pos_embed_2d(8, 4)
    assert pos.shape == (16, 8)
    # token 5 = row 1, column 1; the first quarter is sin(col * omega_k), omega_k = 10000^(-k/2)
    assert np.allclose(pos[5, :2], np.sin([1.0, 1.0 / 100.0]))
    assert np.allclose(pos[4, 4:6], np.sin([1.0, 1.0 / 100.0]))  # token 4 = row 1, col 0: rows in 2nd half
    assert np.allclose(pos[4, :2], 0.0)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 6)
    assert torch.allclose(emb[0], torch.tensor([1, 1, 1, 0, 0, 0.0]))
    assert torch.isclose(emb[1, 3], torch.sin(torch.tensor(2.0)))


def test_bad_geometry_is_rejected():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT(DiTConfig(input_size=10, patch_size=4, hidden_size=64, depth=1, num_heads=2))
