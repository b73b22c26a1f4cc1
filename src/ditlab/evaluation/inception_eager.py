"""The FID Inception graph re-run eagerly: the same weights, each batch norm folded into its conv.

The TorchScript file computes every `Conv2dLayer` as conv -> batch_norm -> relu, and every mixed
block ends its branches with `.contiguous()`, which turns oneDNN's preferred channels-last tensors
back into NCHW before the next convolution. Here each layer is one conv with a bias (the batch
norm folded in: scale = 1/sqrt(var + eps), weight * scale, beta - mean * scale) and a relu, and
tensors stay channels-last end to end: 1.4x faster for a batch of 50 on the 2-core development
CPU, and 1.6x in passes of 8 images (BENCHMARKS.md). The features move by about 1e-5 (max abs, on
features up to ~7), far below what FID resolves; tests compare this graph with the TorchScript one.

The structure is read from the scripted module itself (its children, their TorchScript class
names, strides, paddings and pool settings), so nothing is typed in by hand that could drift from
the file whose SHA-256 was checked. Images go through 8 at a time, whatever the caller's batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH_NORM_EPS = 1e-3  # every Conv2dLayer's batch_norm call in both known files


class FoldedConv(nn.Module):
    """conv (no bias) + batch norm (no gamma) + relu of the scripted file, as conv + bias + relu."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        scale = (scripted.var + BATCH_NORM_EPS).rsqrt()
        self.register_buffer("weight", (scripted.weight * scale[:, None, None, None]).detach().clone())
        self.register_buffer("bias", (scripted.beta - scripted.mean * scale).detach().clone())
        self.stride = int(scripted.stride)
        padding = scripted.padding
        self.padding = tuple(padding) if isinstance(padding, (list, tuple)) else int(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding), inplace=True)


class Concat(nn.Module):
    """InceptionA/B/C/D: every child applied to the block's input, concatenated on channels."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class ExpandedBlock(nn.Module):
    """InceptionE: two towers that each split into a 1x3 and a 3x1 conv, beside a 1x1 conv and a
    pooled 1x1 conv (child names as in the scripted file)."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        for name, child in scripted.named_children():
            setattr(self, name, eager_copy(child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def _pool(scripted: torch.jit.ScriptModule, kind: str) -> nn.Module:
    if kind == "MaxPool2d":
        return nn.MaxPool2d(scripted.kernel_size, scripted.stride, scripted.padding, ceil_mode=scripted.ceil_mode)
    return nn.AvgPool2d(scripted.kernel_size, scripted.stride, scripted.padding, ceil_mode=scripted.ceil_mode,
                        count_include_pad=scripted.count_include_pad)


def eager_copy(scripted: torch.jit.ScriptModule) -> nn.Module:
    """The eager equivalent of one scripted module, by its TorchScript class name."""
    kind = scripted.original_name
    children = [child for _, child in scripted.named_children()]
    if kind == "Conv2dLayer":
        return FoldedConv(scripted)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return _pool(scripted, kind)
    if kind == "Sequential":
        return nn.Sequential(*[eager_copy(child) for child in children])
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return Concat([eager_copy(child) for child in children])
    if kind == "InceptionE":
        return ExpandedBlock(scripted)
    raise ValueError(f"Inception file: unexpected module type {kind!r}")


class EagerInception(nn.Module):
    """pool3 features of the scripted `layers` module; input [N, 3, 299, 299] scaled to [-1, 1]."""

    # Images a pass. A few at a time keep the early layers' activations (8 x 147x147x64 floats,
    # 44 MB) nearer the caches: seconds per image on the 2-core CPU were 0.094 / 0.065 / 0.062 /
    # 0.067 / 0.071 at 1 / 4 / 8 / 16 / 40 images a pass.
    CHUNK = 8

    def __init__(self, scripted_layers: torch.jit.ScriptModule):
        super().__init__()
        self.net = nn.Sequential(*[eager_copy(child) for _, child in scripted_layers.named_children()])
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.cat([self.net(part) for part in x.split(self.CHUNK)]) if len(x) else self.net(x)
