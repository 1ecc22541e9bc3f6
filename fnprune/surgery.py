"""Physically remove MLP neurons: slice the projection weights and write the new width into the config."""

from __future__ import annotations

import torch
from torch import nn

from .arch import MLPLayout, get_module, layer_blocks, output_weight_by_neuron
from .compensation import fold_into_output
from .errors import ModelError

__all__ = ["prune_mlp", "compensation_bias", "supports_bias_compensation", "layout_record", "WIDTH_LAYOUTS"]


def supports_bias_compensation(layout: MLPLayout, model: nn.Module | None = None) -> bool:
    """Whether a constant can be added after the output projection (checked on the model when given)."""
    if layout.bias is None:
        return False
    if layout.bias == "native" and model is not None:
        out = get_module(layer_blocks(model, layout)[0], layout.output)
        return getattr(out, "bias", None) is not None
    return True


def compensation_bias(output_module: nn.Module, layout: MLPLayout, removed_mean: torch.Tensor) -> torch.Tensor:
    """Mean contribution of the removed neurons to the output: W_out[:, removed] @ mean(a_removed).

    `removed_mean` is the full-width mean activation with kept neurons set to zero.
    """
    w = output_weight_by_neuron(output_module, layout).double()  # (d_ff, hidden)
    return (removed_mean.double() @ w).to(output_module.weight.dtype)  # (hidden,)


def _slice_input(module: nn.Module, layout: MLPLayout, keep: torch.Tensor, width: int) -> None:
    rows = torch.cat([keep + half * width for half in range(layout.fused)])
    if layout.conv1d:  # weight (hidden, d_ff)
        module.weight = nn.Parameter(module.weight.detach()[:, rows].contiguous())
        module.nf = len(rows)
    else:  # weight (d_ff, hidden)
        module.weight = nn.Parameter(module.weight.detach()[rows].contiguous())
        module.out_features = len(rows)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.detach()[rows].contiguous())


def _slice_output(module: nn.Module, layout: MLPLayout, keep: torch.Tensor) -> None:
    if layout.conv1d:  # weight (d_ff, hidden)
        module.weight = nn.Parameter(module.weight.detach()[keep].contiguous())
        module.nx = len(keep)
    else:  # weight (hidden, d_ff)
        module.weight = nn.Parameter(module.weight.detach()[:, keep].contiguous())
        module.in_features = len(keep)


def _set_output_weight(module: nn.Module, layout: MLPLayout, w_by_neuron: torch.Tensor) -> None:
    w = w_by_neuron if layout.conv1d else w_by_neuron.t()
    module.weight = nn.Parameter(w.contiguous())


def _add_output_bias(module: nn.Module, block: nn.Module, layout: MLPLayout, delta: torch.Tensor) -> None:
    if getattr(module, "bias", None) is None:
        if layout.bias is None or not layout.bias.startswith("config:"):
            raise ModelError("bias compensation is not possible for this architecture (no MLP bias)")
        for path in layout.inputs:  # the config flag gives these a bias too: zero, so outputs are unchanged
            inp = get_module(block, path)
            inp.bias = nn.Parameter(torch.zeros(inp.weight.shape[0], dtype=inp.weight.dtype))
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype))
    module.bias = nn.Parameter(module.bias.detach() + delta.to(module.bias.dtype))


WIDTH_LAYOUTS = ("uniform", "per-layer", "padded")


def _pad_input(module: nn.Module, layout: MLPLayout, width: int, target: int) -> None:
    """Append zero neurons to an input projection (each fused half padded separately)."""
    w = module.weight.detach()
    w = w.t() if layout.conv1d else w  # (fused * width, hidden)
    halves = [torch.cat([h, h.new_zeros(target - width, h.shape[1])]) for h in w.chunk(layout.fused, dim=0)]
    w = torch.cat(halves)
    module.weight = nn.Parameter((w.t() if layout.conv1d else w).contiguous())
    if getattr(module, "bias", None) is not None:
        b = [torch.cat([h, h.new_zeros(target - width)]) for h in module.bias.detach().chunk(layout.fused)]
        module.bias = nn.Parameter(torch.cat(b))
    if layout.conv1d:
        module.nf = layout.fused * target
    else:
        module.out_features = layout.fused * target


def _pad_output(module: nn.Module, layout: MLPLayout, width: int, target: int) -> None:
    """Zero output columns for padded neurons: whatever they compute, they add nothing."""
    w = output_weight_by_neuron(module, layout)  # (width, hidden)
    w = torch.cat([w, w.new_zeros(target - width, w.shape[1])])
    module.weight = nn.Parameter((w if layout.conv1d else w.t()).contiguous())
    if layout.conv1d:
        module.nx = target
    else:
        module.in_features = target


def layout_record(layout: MLPLayout, widths: list[int]) -> dict:
    """What the per-layer loader needs to rebuild the MLP shapes (stored as config.fnprune_layout)."""
    return {
        "layers": layout.layers, "inputs": list(layout.inputs), "output": layout.output,
        "conv1d": layout.conv1d, "fused": layout.fused, "widths": list(widths),
    }


def prune_mlp(
    model: nn.Module,
    layout: MLPLayout,
    keep: list[torch.Tensor],
    removed_means: list[torch.Tensor] | None = None,
    width_layout: str = "uniform",
    fill_maps: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Keep neurons `keep[layer]` (sorted indices) in every MLP, in place; returns the model.

    With `removed_means` (per layer, full-width mean activation over calibration tokens), the mean output of
    the removed neurons is folded into the output-projection bias (FLAP-style bias compensation).
    `width_layout`: "uniform" needs equal widths (one intermediate size, vanilla config); "per-layer" keeps
    each layer's width (recorded in `config.fnprune_layout`); "padded" pads every layer with zero neurons up
    to the widest (exact, vanilla config).
    With `fill_maps` (per layer, n_kept x n_removed; see fnprune.compensation), the removed neurons'
    least-squares reconstruction from the kept ones is folded into the kept output weights (and, with
    `removed_means` as the centre, into the bias).
    """
    if width_layout not in WIDTH_LAYOUTS:
        raise ValueError(f"width_layout must be one of {WIDTH_LAYOUTS}, got {width_layout!r}")
    blocks = layer_blocks(model, layout)
    if len(keep) != len(blocks):
        raise ValueError(f"got {len(keep)} index sets for {len(blocks)} layers")
    widths = [len(k) for k in keep]
    if width_layout == "uniform" and len(set(widths)) != 1:
        raise ModelError(
            f"per-layer widths {sorted(set(widths))} need --layout per-layer or padded; uniform needs equal widths"
        )
    for i, (block, idx) in enumerate(zip(blocks, keep)):
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        out_module = get_module(block, layout.output)
        width = output_weight_by_neuron(out_module, layout).shape[0]
        if idx.numel() == 0 or idx[-1] >= width or idx[0] < 0 or idx.unique().numel() != idx.numel():
            raise ValueError(f"layer {i}: kept indices must be unique and in [0, {width})")
        delta = folded = None
        if fill_maps is not None:
            centre = removed_means[i] if removed_means is not None else None
            folded, delta = fold_into_output(output_weight_by_neuron(out_module, layout), idx, fill_maps[i], centre)
        elif removed_means is not None:
            mean = removed_means[i].clone().to(torch.float64)
            mean[idx] = 0.0
            delta = compensation_bias(out_module, layout, mean)
        for path in layout.inputs:
            _slice_input(get_module(block, path), layout, idx, width)
        _slice_output(out_module, layout, idx)
        if folded is not None:
            _set_output_weight(out_module, layout, folded)
        new_width = len(idx)
        if width_layout == "padded" and new_width < max(widths):
            for path in layout.inputs:
                _pad_input(get_module(block, path), layout, new_width, max(widths))
            _pad_output(out_module, layout, new_width, max(widths))
            new_width = max(widths)
        if delta is not None:
            _add_output_bias(out_module, block, layout, delta)
        mlp = get_module(block, layout.output.rpartition(".")[0]) if "." in layout.output else block
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = new_width
    setattr(model.config, layout.width_key, max(widths))
    if width_layout == "per-layer":
        model.config.fnprune_layout = layout_record(layout, widths)
    if removed_means is not None and layout.bias and layout.bias.startswith("config:"):
        setattr(model.config, layout.bias.split(":", 1)[1], True)
    return model
