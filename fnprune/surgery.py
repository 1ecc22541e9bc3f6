"""Physically remove MLP neurons: slice the projection weights and write the new width into the config.

The per-layer decisions (which neurons, reconstruction or mean fill, new biases, padding, widths) are made once
by `plan_layers`; `prune_mlp` applies the plan to a loaded model and fnprune.stream_surgery to checkpoint
tensors, both with the tensor-level functions below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import MLPLayout, by_neuron, get_module, layer_blocks, output_weight_by_neuron
from .choices import LAYOUTS
from .compensation import fold_into_output
from .errors import ModelError
from .memory import release_memory

__all__ = [
    "LayerPlan",
    "plan_layers",
    "prune_mlp",
    "supports_bias_compensation",
    "set_output_weight",
    "layout_record",
    "check_keep",
    "check_widths",
    "removed_mean",
    "slice_input_weight",
    "slice_input_bias",
    "slice_output_weight",
    "pad_input_weight",
    "pad_input_bias",
    "pad_output_weight",
    "update_config",
]


def supports_bias_compensation(layout: MLPLayout, model: nn.Module | None = None) -> bool:
    """Whether a constant can be added after the output projection (checked on the model when given)."""
    if layout.bias is None:
        return False
    if layout.bias == "native" and model is not None:
        out = get_module(layer_blocks(model, layout)[0], layout.output)
        return getattr(out, "bias", None) is not None
    return True


def removed_mean(mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Full-width mean activation with the kept neurons zeroed: what compensation folds in."""
    out = mean.clone().to(torch.float64)
    out[keep] = 0.0
    return out


@dataclass(frozen=True)
class LayerPlan:
    """What surgery does to one layer's MLP, whatever holds its weights (a module or checkpoint tensors)."""

    keep: torch.Tensor  # (k,) sorted kept neuron indices
    width: int  # neurons before surgery
    target: int  # neurons stored after surgery: k, or more when padded with zero neurons to the widest layer
    fill: torch.Tensor | None  # (k, width - k) reconstruction map folded into the kept output weights
    centre: torch.Tensor | None  # (width,) mean activation: with it, the removed neurons' mean joins the bias
    new_biases: bool  # the output projection has no bias: the layout's config flag gives each projection one

    def output_change(self, w_by_neuron: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """From the dense output weight (width, hidden): the kept rows (k, hidden) with the reconstruction folded
        in (None without one: the plain slice) and the bias to add (hidden,) (None without compensation)."""
        if self.fill is not None:
            return fold_into_output(w_by_neuron, self.keep, self.fill, self.centre)
        if self.centre is None:
            return None, None
        w = w_by_neuron.double()  # (width, hidden)
        return None, (removed_mean(self.centre, self.keep).double() @ w).to(w_by_neuron.dtype)  # (hidden,)


def plan_layers(
    layout: MLPLayout,
    keep: list[torch.Tensor],
    widths: list[int],
    output_biases: list[bool],
    removed_means: list[torch.Tensor] | None = None,
    width_layout: str = "uniform",
    fill_maps: list[torch.Tensor] | None = None,
) -> list[LayerPlan]:
    """The plan of every layer, from its kept indices, its width before surgery and whether its output
    projection has a bias (as stored); `removed_means`, `width_layout` and `fill_maps` as in `prune_mlp`.
    When no layer loses a neuron there is nothing to compensate, so no bias is added (the model stays as it was)."""
    if len(keep) != len(widths):
        raise ValueError(f"got {len(keep)} index sets for {len(widths)} layers")
    if all(len(idx) == width for idx, width in zip(keep, widths)):
        removed_means = None
    kept = [len(k) for k in keep]
    check_widths(kept, width_layout)
    plans = []
    for i, (idx, width, has_bias) in enumerate(zip(keep, widths, output_biases)):
        idx = check_keep(idx, width, i)
        centre = removed_means[i] if removed_means is not None else None
        if centre is not None and not has_bias and layout.bias_flag is None:
            raise ModelError("bias compensation is not possible for this architecture (no MLP bias)")
        target = max(kept) if width_layout == "padded" else len(idx)
        fill = fill_maps[i] if fill_maps is not None else None
        plans.append(LayerPlan(idx, width, target, fill, centre, centre is not None and not has_bias))
    return plans


def check_keep(keep: torch.Tensor, width: int, layer: int) -> torch.Tensor:
    """Sorted long indices, or ValueError if they are empty, repeated or out of range."""
    idx = torch.as_tensor(keep, dtype=torch.long).sort().values
    if idx.numel() == 0 or idx[-1] >= width or idx[0] < 0 or idx.unique().numel() != idx.numel():
        raise ValueError(f"layer {layer}: kept indices must be unique and in [0, {width})")
    return idx


def check_widths(widths: list[int], width_layout: str) -> None:
    if width_layout not in LAYOUTS:
        raise ValueError(f"width_layout must be one of {LAYOUTS}, got {width_layout!r}")
    if width_layout == "uniform" and len(set(widths)) != 1:
        raise ModelError(
            f"per-layer widths {sorted(set(widths))} need --layout per-layer or padded; uniform needs equal widths"
        )


def _rows(layout: MLPLayout, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Neuron rows of an input projection: `keep` in every fused half."""
    return torch.cat([keep + half * width for half in range(layout.fused)])


def slice_input_weight(w: torch.Tensor, layout: MLPLayout, keep: torch.Tensor, width: int) -> torch.Tensor:
    rows = _rows(layout, keep, width)
    return (w[:, rows] if layout.conv1d else w[rows]).contiguous()  # conv1d (hidden, d_ff); linear (d_ff, hidden)


def slice_input_bias(b: torch.Tensor, layout: MLPLayout, keep: torch.Tensor, width: int) -> torch.Tensor:
    return b[_rows(layout, keep, width)].contiguous()


def slice_output_weight(w: torch.Tensor, layout: MLPLayout, keep: torch.Tensor) -> torch.Tensor:
    return (w[keep] if layout.conv1d else w[:, keep]).contiguous()  # conv1d (d_ff, hidden); linear (hidden, d_ff)


def pad_input_weight(w: torch.Tensor, layout: MLPLayout, width: int, target: int) -> torch.Tensor:
    """Append zero neurons to an input projection's weight (each fused half padded separately)."""
    w = w.t() if layout.conv1d else w  # (fused * width, hidden)
    w = torch.cat([torch.cat([h, h.new_zeros(target - width, h.shape[1])]) for h in w.chunk(layout.fused, dim=0)])
    return (w.t() if layout.conv1d else w).contiguous()


def pad_input_bias(b: torch.Tensor, layout: MLPLayout, width: int, target: int) -> torch.Tensor:
    return torch.cat([torch.cat([h, h.new_zeros(target - width)]) for h in b.chunk(layout.fused)])


def pad_output_weight(w: torch.Tensor, layout: MLPLayout, width: int, target: int) -> torch.Tensor:
    """Zero output columns for padded neurons: whatever they compute, they add nothing."""
    w = by_neuron(w, layout)  # (width, hidden)
    w = torch.cat([w, w.new_zeros(target - width, w.shape[1])])
    return by_neuron(w, layout).contiguous()


def update_config(config, layout: MLPLayout, plans: list[LayerPlan], width_layout: str) -> None:
    """The new width (and bias flag, per-layer record) in the config, as the pruned weights need. The source's
    `auto_map` goes: the weights are the native class's (a per-layer output points it at fnprune's own loader,
    `write_per_layer_code`), and fnprune copies no model code, so its entries would name missing files (a model
    loaded with its own code has save_pretrained copy that code and set auto_map again)."""
    widths = [len(p.keep) for p in plans]
    setattr(config, layout.width_key, max(widths))
    if width_layout == "per-layer":
        config.fnprune_layout = layout_record(layout, widths)
    elif getattr(config, "fnprune_layout", None):  # a per-layer source pruned to one width: its record is stale
        del config.fnprune_layout
    if width_layout != "per-layer" and hasattr(config, "auto_map"):
        del config.auto_map
    if layout.bias_flag and any(p.centre is not None for p in plans):
        setattr(config, layout.bias_flag, True)


def _slice_input(module: nn.Module, layout: MLPLayout, keep: torch.Tensor, width: int) -> None:
    module.weight = nn.Parameter(slice_input_weight(module.weight.detach(), layout, keep, width))
    if layout.conv1d:
        module.nf = layout.fused * len(keep)
    else:
        module.out_features = layout.fused * len(keep)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(slice_input_bias(module.bias.detach(), layout, keep, width))


def _slice_output(module: nn.Module, layout: MLPLayout, keep: torch.Tensor) -> None:
    module.weight = nn.Parameter(slice_output_weight(module.weight.detach(), layout, keep))
    if layout.conv1d:
        module.nx = len(keep)
    else:
        module.in_features = len(keep)


def set_output_weight(module: nn.Module, layout: MLPLayout, w_by_neuron: torch.Tensor) -> None:
    module.weight = nn.Parameter(by_neuron(w_by_neuron, layout).contiguous())


def _add_output_bias(module: nn.Module, block: nn.Module, layout: MLPLayout, plan: LayerPlan,
                     delta: torch.Tensor) -> None:
    if plan.new_biases:  # the config flag gives the input projections a bias too: zero, so outputs are unchanged
        for inp in [get_module(block, path) for path in layout.inputs] + [module]:
            if getattr(inp, "bias", None) is None:
                inp.bias = nn.Parameter(torch.zeros(inp.weight.shape[0], dtype=inp.weight.dtype,
                                                    device=inp.weight.device))
    module.bias = nn.Parameter(module.bias.detach() + delta.to(device=module.bias.device, dtype=module.bias.dtype))


def _pad_input(module: nn.Module, layout: MLPLayout, width: int, target: int) -> None:
    """Append zero neurons to an input projection (each fused half padded separately)."""
    module.weight = nn.Parameter(pad_input_weight(module.weight.detach(), layout, width, target))
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(pad_input_bias(module.bias.detach(), layout, width, target))
    if layout.conv1d:
        module.nf = layout.fused * target
    else:
        module.out_features = layout.fused * target


def _pad_output(module: nn.Module, layout: MLPLayout, width: int, target: int) -> None:
    """Zero output columns for padded neurons: whatever they compute, they add nothing."""
    module.weight = nn.Parameter(pad_output_weight(module.weight.detach(), layout, width, target))
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
    on_block: Callable[[int, LayerPlan, Callable[[LayerPlan], None]], None] | None = None,
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
    `on_block(i, plan, prune)`, when given, is called for every layer in order with its plan and the function that
    prunes it by a plan (fnprune.refit: the sequential refit runs the dense block before it and refits after it;
    sequential selection passes a plan of its own, of the same width).
    """
    blocks = layer_blocks(model, layout)
    outputs = [get_module(b, layout.output) for b in blocks]
    widths = [output_weight_by_neuron(m, layout).shape[0] for m in outputs]
    has_bias = [getattr(m, "bias", None) is not None for m in outputs]
    plans = plan_layers(layout, keep, widths, has_bias, removed_means, width_layout, fill_maps)
    applied: list[LayerPlan] = []
    for i, (block, plan) in enumerate(zip(blocks, plans)):
        prune = _pruner(block, layout, plan, applied)
        on_block(i, plan, prune) if on_block is not None else prune(plan)
        if len(applied) != i + 1:
            raise RuntimeError(f"layer {i} was not pruned by on_block")
        if i % 4 == 3:
            release_memory(collect=False)  # the dense layers' freed weights back to the OS as we go
    update_config(model.config, layout, applied, width_layout)
    return model


def _pruner(block: nn.Module, layout: MLPLayout, plan: LayerPlan, applied: list[LayerPlan]
            ) -> Callable[[LayerPlan], None]:
    """The function that prunes `block` by a plan of `plan`'s widths (recorded in `applied`)."""
    def prune(chosen: LayerPlan) -> None:
        if (chosen.width, chosen.target, len(chosen.keep)) != (plan.width, plan.target, len(plan.keep)):
            raise ValueError("on_block: a plan of other widths than the layer's")
        applied.append(chosen)
        _prune_block(block, layout, chosen)
    return prune


def _prune_block(block: nn.Module, layout: MLPLayout, plan: LayerPlan) -> None:
    out_module = get_module(block, layout.output)
    folded, delta = plan.output_change(output_weight_by_neuron(out_module, layout))
    for path in layout.inputs:
        _slice_input(get_module(block, path), layout, plan.keep, plan.width)
    _slice_output(out_module, layout, plan.keep)
    if folded is not None:
        set_output_weight(out_module, layout, folded)
    kept = len(plan.keep)
    if plan.target > kept:
        for path in layout.inputs:
            _pad_input(get_module(block, path), layout, kept, plan.target)
        _pad_output(out_module, layout, kept, plan.target)
    if delta is not None:
        _add_output_bias(out_module, block, layout, plan, delta)
    mlp = get_module(block, layout.output.rpartition(".")[0]) if "." in layout.output else block
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = plan.target
