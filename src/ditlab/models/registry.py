"""Named DiT presets, built by name: `build_model("DiT-XL/2", input_size=32, in_channels=4)`.

The S/B/L/XL sizes and patch sizes 2/4/8 are those of the DiT paper (table 1). The Ti and N
presets are ours, sized for CPU work: DiT-Ti/4 is the quickstart model (about 1.9M parameters
on 16x16 digits; the quickstart trains it with 4 of its 6 blocks, `model.depth`, 1.3M), DiT-N/2 is
a few-second model for tests. `build_model(name, depth=...)` overrides a preset's block count.
"""

from __future__ import annotations

from dataclasses import replace

from ditlab.models.dit import DiT, DiTConfig

# name -> (depth, hidden_size, num_heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "Ti": (6, 128, 4),
    "N": (2, 64, 2),
}
PATCH_SIZES = (2, 4, 8)

PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in SIZES.items()
    for patch in PATCH_SIZES
}


def build_model(name: str, **overrides) -> DiT:
    """Build a preset by name, with any DiTConfig field overridden (input_size, in_channels, ...)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    return DiT(replace(PRESETS[name], **overrides))


def model_from_config(config: dict) -> DiT:
    """Rebuild a model from the dict stored in a checkpoint."""
    return DiT(DiTConfig(**config))
