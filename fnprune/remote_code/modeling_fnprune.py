"""Load an fnprune checkpoint whose MLP layers have different widths, with plain transformers.

fnprune copies this file beside the weights and points `auto_map` at it, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without fnprune installed.
It builds the base architecture from the config, then gives each layer's MLP projections the width recorded
in `config.fnprune_layout["widths"]`; the weights load into those shapes. No other behaviour changes.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel as _Base  # fnprune:base-class (rewritten when saved)
from transformers.pytorch_utils import Conv1D


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


def _resized(old: nn.Module, n_in: int, n_out: int, conv1d: bool) -> nn.Module:
    """A projection like `old` with new sizes (values come from the checkpoint)."""
    has_bias = getattr(old, "bias", None) is not None
    dtype, device = old.weight.dtype, old.weight.device
    if conv1d:
        new = Conv1D(n_out, n_in).to(device=device, dtype=dtype)
        if not has_bias:
            new.bias = None
        return new
    cls = type(old) if isinstance(old, nn.Linear) else nn.Linear  # keeps subclasses such as FalconLinear
    return cls(n_in, n_out, bias=has_bias, device=device, dtype=dtype)


def resize_mlps(model: nn.Module, layout: dict) -> None:
    """Give layer i's MLP `layout["widths"][i]` neurons (input projections' outputs, output projection's inputs)."""
    blocks = _get(model, layout["layers"])
    conv1d, fused = layout["conv1d"], layout["fused"]
    for block, width in zip(blocks, layout["widths"]):
        for path in layout["inputs"]:
            old = _get(block, path)
            n_in = old.weight.shape[0] if conv1d else old.weight.shape[1]
            _set(block, path, _resized(old, n_in, fused * width, conv1d))
        old = _get(block, layout["output"])
        n_out = old.weight.shape[1] if conv1d else old.weight.shape[0]
        _set(block, layout["output"], _resized(old, width, n_out, conv1d))
        mlp = _get(block, layout["output"].rpartition(".")[0]) if "." in layout["output"] else block
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


def per_layer_class(base: type) -> type:
    """`base` (a transformers model class) with per-layer MLP widths: what FnpruneModel is, for any base.

    It keeps the base's name and module, so transformers treats it as its own class (checkpoint key renames
    such as GPT-NeoX's `embed_out` -> `lm_head` still apply).
    """

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        resize_mlps(self, config.fnprune_layout)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def _share_key_renames(name: str) -> None:
    """transformers >= 5 renames legacy checkpoint keys only for its own classes; give `name` the base's."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers: no renames to share
        return
    model_type = getattr(getattr(_Base, "config_class", None), "model_type", "")
    mapping = get_checkpoint_conversion_mapping(_Base.__name__) or get_checkpoint_conversion_mapping(model_type)
    if mapping:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


class FnpruneModel(_Base):
    """The base architecture with per-layer MLP widths."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize_mlps(self, config.fnprune_layout)


if _Base.__name__ != "PreTrainedModel":  # only in the copy saved beside a checkpoint
    _share_key_renames(FnpruneModel.__name__)
