"""Forward pre-hooks on each layer's MLP output projection, whose input is the intermediate neurons.

Hooks are registered inside a context manager that always removes them. Each hook is built by a factory
called with its layer index, so no hook can see another layer's data (the reference code's masks all used
the last layer's mask because a loop variable was captured late).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .arch import MLPLayout, get_module, layer_blocks

__all__ = ["mlp_input_hooks", "masked_neurons"]

PreHook = Callable[[nn.Module, tuple], object]


@contextmanager
def mlp_input_hooks(model: nn.Module, layout: MLPLayout, make_hook: Callable[[int], PreHook]) -> Iterator[None]:
    """Register `make_hook(layer)` as a forward pre-hook on every layer's output projection."""
    handles = []
    try:
        for i, block in enumerate(layer_blocks(model, layout)):
            handles.append(get_module(block, layout.output).register_forward_pre_hook(make_hook(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def masked_neurons(
    model: nn.Module,
    layout: MLPLayout,
    keep: list[torch.Tensor],
    fill: list[torch.Tensor] | None = None,
    scale: list[torch.Tensor] | None = None,
    fill_map: list[torch.Tensor] | None = None,
) -> Iterator[None]:
    """Run the dense model as if only `keep[layer]` neurons existed.

    Removed neurons are set to zero, or to `fill[layer]` (their mean: what bias compensation folds in).
    With `fill_map[layer]` (n_kept, n_removed), removed neurons are reconstructed from the kept ones instead,
    `fill_D + (x_K - fill_K) @ fill_map` (fill = 0 when None): what `compensation.fold_into_output` folds in.
    `scale[layer]` (full width) multiplies neurons instead, for amplification experiments.
    """

    def make_hook(i: int) -> PreHook:
        def hook(module: nn.Module, args: tuple) -> tuple:
            (x, *rest) = args
            gate = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
            gate[keep[i].to(x.device)] = 1
            out = x * gate
            if fill_map is not None:
                kept = keep[i].to(x.device).sort().values
                removed = (gate == 0).nonzero().flatten()
                centre = fill[i].to(x.device, x.dtype) if fill is not None else torch.zeros_like(gate)
                recon = centre[removed] + (x[..., kept] - centre[kept]) @ fill_map[i].to(x.device, x.dtype)
                out = out.index_copy(-1, removed, recon)
            elif fill is not None:
                out = out + (1 - gate) * fill[i].to(x.device, x.dtype)
            if scale is not None:
                out = out * scale[i].to(x.device, x.dtype)
            return (out, *rest)

        return hook

    with mlp_input_hooks(model, layout, make_hook):
        yield
