"""LoRA for recovery (`recovery.params: lora`): low-rank adapters on every MLP projection's weight, as torch
parametrizations, merged back into plain weights of the same shapes before the checkpoint is written."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .arch import MLPLayout, get_module, input_weights_by_neuron, layer_blocks, output_weight_by_neuron

__all__ = ["add_lora", "merge_lora"]


class _LowRankDelta(nn.Module):
    """weight + scale * B @ A, with B starting at zero so training starts from the pruned model; `mask` (0/1, the
    weight's shape broadcast) keeps a padded layout's zero neurons zero, as training the weights themselves does."""

    def __init__(self, shape: torch.Size, rank: int, generator: torch.Generator, dtype: torch.dtype,
                 mask: torch.Tensor | None = None):
        super().__init__()
        rank = min(rank, *shape)
        bound = 1 / math.sqrt(shape[1])
        self.lora_a = nn.Parameter((torch.rand(rank, shape[1], generator=generator, dtype=torch.float32) * 2 - 1)
                                   .mul_(bound).to(dtype))
        self.lora_b = nn.Parameter(torch.zeros(shape[0], rank, dtype=dtype))
        self.scale = 1.0
        self.register_buffer("mask", None if mask is None else mask.to(dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.lora_b @ self.lora_a
        return weight + self.scale * (delta if self.mask is None else delta * self.mask)


def _padding_mask(block: nn.Module, layout: MLPLayout, path: str) -> torch.Tensor | None:
    """0 at the weights of the block's zero neurons (input rows and output column all zero: a padded layout's
    padding), 1 elsewhere, shaped to broadcast over `path`'s weight; None when every neuron has weights."""
    column = output_weight_by_neuron(get_module(block, layout.output), layout)
    used = column.abs().sum(dim=1) > 0
    for name in layout.inputs:
        for w in input_weights_by_neuron(get_module(block, name), layout):
            used |= w.abs().sum(dim=1) > 0
    if used.all():
        return None
    live = used.float()
    if path == layout.output:  # neurons along the input dimension of nn.Linear, the output one of Conv1D
        return live.view(-1, 1) if layout.conv1d else live.view(1, -1)
    live = live.repeat(layout.fused)  # fused projections stack their halves' neurons
    return live.view(1, -1) if layout.conv1d else live.view(-1, 1)


def add_lora(model: nn.Module, layout: MLPLayout, rank: int, seed: int) -> list[nn.Module]:
    """Low-rank adapters on every MLP projection's weight (torch parametrizations); returns the modules."""
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for block in layer_blocks(model, layout):
        for path in (*layout.inputs, layout.output):
            module = get_module(block, path)
            delta = _LowRankDelta(module.weight.shape, rank, generator, module.weight.dtype,
                                  _padding_mask(block, layout, path))
            parametrize.register_parametrization(module, "weight", delta.to(module.weight.device))
            modules.append(module)
    return modules


def merge_lora(modules: list[nn.Module]) -> None:
    """Fold each adapter into its weight and drop the parametrization: plain weights of the same shapes."""
    for module in modules:
        with torch.no_grad():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
