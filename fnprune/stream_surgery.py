"""Surgery straight from the source checkpoint files, one tensor at a time, for models too big to copy.

`prune_mlp` slices the loaded model and `save_pretrained` writes it: fine when the model fits in memory, but
a model spread over CPU and disk (device_map) has no real weights in memory to slice. Here every tensor is
read from the source safetensors (`safe_open`), transformed with the same per-tensor math as
`fnprune.surgery` (slice the MLP neurons, pad, fold the removed neurons' mean into the output bias) and
written to its output shard before the next one is read. Shard headers are computed in advance from the
planned shapes (the transforms run on meta tensors), so neither the source nor the output is ever held whole.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Container
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils.hub import convert_file_size_to_int

from .arch import MLPLayout, by_neuron
from .choices import STREAMED_LAYOUTS
from .errors import ModelError
from .safetensors_io import DTYPES, write_safetensors
from .surgery import (
    LayerPlan,
    pad_input_bias,
    pad_input_weight,
    pad_output_weight,
    plan_layers,
    slice_input_bias,
    slice_input_weight,
    slice_output_weight,
    update_config,
)

__all__ = ["StreamResult", "stream_prune", "source_weight_map", "checkpoint_key"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StreamResult:
    """What was written: weight files (in the output folder) and the change in parameter count."""

    files: list[str]
    parameters_delta: int
    widths: list[int] = field(default_factory=list)


def source_weight_map(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file: the single model.safetensors, else the shard index's files (the order
    `from_pretrained` reads them in, so a folder holding both streams the weights the loaded model has)."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():  # untrusted input: a JSON object whose weight_map names shard files in this folder
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not all(isinstance(v, str) and Path(v).name == v for v in weight_map.values()):
                raise ValueError("a shard is not a file name in the model folder")
            files = {str(k): folder / v for k, v in weight_map.items()}
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index}: not a valid shard index ({type(exc).__name__}: {exc})") from exc
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise ModelError(f"{index} names {len(missing)} shard file(s) not in {folder}, e.g. {missing[0]}")
        return files
    raise ModelError(
        f"{folder}: streamed surgery reads {WEIGHTS_NAME} or {INDEX_NAME} and neither is there; a .gguf "
        "or pickled checkpoint cannot be streamed (load it and save_pretrained it as safetensors first)"
    )


def _candidates(name: str, layout: MLPLayout) -> list[str]:
    return [name] + ([name.removeprefix(layout.prefix + ".")] if name.startswith(layout.prefix + ".") else [])


def _stored_key(name: str, keys: Container[str], layout: MLPLayout) -> str | None:
    return next((key for key in _candidates(name, layout) if key in keys), None)


def checkpoint_key(name: str, keys: Container[str], layout: MLPLayout) -> str:
    """The checkpoint key of module parameter `name`: as is, or without the layout's base-model prefix (some
    checkpoints, e.g. GPT-2's, store `h.0.mlp.c_fc.weight` for the module path `transformer.h.0.mlp.c_fc.weight`)."""
    key = _stored_key(name, keys, layout)
    if key is not None:
        return key
    candidates = _candidates(name, layout)
    raise ModelError(
        f"the checkpoint has no tensor {' or '.join(candidates)}: its key names do not match the model's "
        "module paths (a checkpoint of another architecture, or renamed keys)"
    )


class _Source:
    """Open safetensors files; hands out one tensor (or only its dtype and shape) at a time."""

    def __init__(self, weight_map: dict[str, Path], stack: ExitStack):
        self.map = weight_map
        self._files = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(weight_map.values())}

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored dtype and shape (nothing read)."""
        part = self._files[self.map[key]].get_slice(key)
        dtype = part.get_dtype()
        if dtype not in DTYPES:
            raise ModelError(f"tensor {key} has dtype {dtype}, which streamed surgery cannot write")
        return torch.empty(part.get_shape(), dtype=DTYPES[dtype], device="meta")

    def tensor(self, key: str) -> torch.Tensor:
        return self._files[self.map[key]].get_tensor(key)


@dataclass
class _Entry:
    """One output tensor: planned dtype and shape, and how to make it."""

    name: str
    planned: torch.Tensor  # meta
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.planned.numel() * self.planned.element_size()


def _cast(dtype: torch.dtype | None) -> Transform:
    """Floating-point tensors to the model's dtype, as loading with that dtype and saving would."""
    return lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _entry(name: str, src: _Source, key: str | None, transform: Transform, base: Callable[[], torch.Tensor] | None
           = None) -> _Entry:
    """Output `name` = transform(source tensor `key`) (or transform(base()) for tensors new in the output)."""
    if key is not None:
        planned = transform(src.meta(key))
        return _Entry(name, planned, lambda: transform(src.tensor(key)))
    assert base is not None
    return _Entry(name, transform(base()), lambda: transform(base()))


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + "bias"


def _output_key(src: _Source, layout: MLPLayout, i: int) -> str:
    return checkpoint_key(f"{layout.layers}.{i}.{layout.output}.weight", src.map, layout)


def _layer_entries(
    src: _Source, layout: MLPLayout, i: int, plan: LayerPlan, cast: Transform
) -> tuple[dict[str, _Entry], set[str]]:
    """Output tensors of layer i's MLP as `plan` has them, and the source keys they replace."""
    prefix = f"{layout.layers}.{i}."
    idx, width, new = plan.keep, plan.width, len(plan.keep)
    out: dict[str, _Entry] = {}
    replaced: set[str] = set()

    def pad(fn):  # padded layout: zero neurons up to the widest layer
        return (lambda t: fn(t, layout, new, plan.target)) if plan.target > new else (lambda t: t)

    out_w = _output_key(src, layout, i)
    out_b = _bias_key(out_w)
    delta = None
    if plan.centre is not None:  # the output weight is read for the bias now, then freed, and read again to slice
        _, delta = plan.output_change(by_neuron(cast(src.tensor(out_w)), layout))
    for path in layout.inputs:
        w_key = checkpoint_key(prefix + path + ".weight", src.map, layout)
        pad_w = pad(pad_input_weight)
        out[w_key] = _entry(w_key, src, w_key, lambda t, f=pad_w: f(slice_input_weight(cast(t), layout, idx, width)))
        replaced.add(w_key)
        b_key = _bias_key(w_key)
        if b_key in src.map:
            pad_b = pad(pad_input_bias)
            out[b_key] = _entry(b_key, src, b_key, lambda t, f=pad_b: f(slice_input_bias(cast(t), layout, idx, width)))
            replaced.add(b_key)
        elif plan.new_biases:  # the config flag gives these a bias too: zero, so outputs are unchanged
            rows = out[w_key].planned.shape[1 if layout.conv1d else 0]
            dtype = out[w_key].planned.dtype
            out[b_key] = _entry(b_key, src, None, lambda t: t, lambda r=rows, d=dtype: torch.zeros(r, dtype=d))
    pad_o = pad(pad_output_weight)
    if plan.fill is not None:
        def folded(t: torch.Tensor) -> torch.Tensor:
            if t.is_meta:  # planning: the folded weight has the sliced weight's shape and dtype
                return pad_o(slice_output_weight(cast(t), layout, idx))
            w_kept, _ = plan.output_change(by_neuron(cast(t), layout))
            return pad_o(by_neuron(w_kept, layout).contiguous())  # back to the stored orientation

        out[out_w] = _entry(out_w, src, out_w, folded)
    else:
        out[out_w] = _entry(out_w, src, out_w, lambda t: pad_o(slice_output_weight(cast(t), layout, idx)))
    replaced.add(out_w)
    if delta is not None:
        if not plan.new_biases:
            out[out_b] = _entry(out_b, src, out_b, lambda t: (b := cast(t)) + delta.to(b.device, b.dtype))
            replaced.add(out_b)
        else:
            w = out[out_w].planned
            hidden, dtype = w.shape[1 if layout.conv1d else 0], w.dtype
            out[out_b] = _entry(out_b, src, None, lambda t: t + delta.to(t.device, t.dtype),
                                lambda: torch.zeros(hidden, dtype=dtype))
    return out, replaced


def _duplicate_keys(keys: Container[str], layout: MLPLayout, tied: dict[str, str]) -> set[str]:
    """Stored keys of tied aliases whose original is stored too: `save_pretrained` writes the original only."""
    duplicates = set()
    for alias, original in tied.items():
        alias_key, original_key = _stored_key(alias, keys, layout), _stored_key(original, keys, layout)
        if alias_key is not None and original_key is not None and alias_key != original_key:
            duplicates.add(alias_key)
    return duplicates


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """As huggingface_hub splits a state dict: greedy, in order, a new shard when the next tensor would overflow
    this one; a tensor bigger than a shard gets one of its own at once, the open shard left open."""
    shards: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for e in entries:
        if e.nbytes > max_bytes:
            shards.append([e])
            continue
        if size + e.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    return shards + [current] if current or not shards else shards


def _write_shard(path: Path, entries: list[_Entry]) -> None:
    by_name = {e.name: e for e in entries}
    write_safetensors(path, {e.name: e.planned for e in entries}, {"format": "pt"}, lambda n: by_name[n].make())


def stream_prune(
    source: Path,
    out: Path,
    config,
    layout: MLPLayout,
    keep: list[torch.Tensor],
    removed_means: list[torch.Tensor] | None = None,
    width_layout: str = "uniform",
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    fill_maps: list[torch.Tensor] | None = None,
    tied: dict[str, str] | None = None,
) -> StreamResult:
    """Write into `out` the checkpoint `prune_mlp(model, layout, keep, removed_means, width_layout)` followed by
    `save_pretrained(out, max_shard_size)` would give, reading `source`'s safetensors one tensor at a time.

    `config` is the model's config (copied, then given the new width); `dtype` casts floating-point tensors
    as loading with that dtype would. With `removed_means`, each output projection is read twice (once for
    the compensation bias, once to slice it). `fill_maps` folds least-squares reconstructions in, as
    `prune_mlp(..., fill_maps=...)` does. `tied` (`models.tied_aliases` of the loaded model) names the tied
    aliases: a source that stores both an alias and its original gets the original only, as save_pretrained.
    """
    if width_layout not in STREAMED_LAYOUTS:
        raise ModelError(f"streamed surgery writes layouts {' and '.join(STREAMED_LAYOUTS)}, not {width_layout!r}")
    cast = _cast(dtype)
    with ExitStack() as stack:
        src = _Source(source_weight_map(Path(source)), stack)
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is not None and n_layers != len(keep):
            raise ValueError(f"got {len(keep)} index sets for {n_layers} layers")
        outputs = [_output_key(src, layout, i) for i in range(len(keep))]
        widths = [src.meta(k).shape[0 if layout.conv1d else 1] for k in outputs]
        has_bias = [_bias_key(k) in src.map for k in outputs]
        plans = plan_layers(layout, keep, widths, has_bias, removed_means, width_layout, fill_maps)
        planned: dict[str, _Entry] = {}
        replaced: set[str] = set()
        for i, plan in enumerate(plans):
            layer, gone = _layer_entries(src, layout, i, plan, cast)
            planned.update(layer)
            replaced |= gone
        duplicates = _duplicate_keys(src.map, layout, tied or {})
        for key in src.map:
            if key not in replaced and key not in duplicates:
                planned[key] = _entry(key, src, key, cast)
        entries = [planned[k] for k in sorted(planned)]
        delta = sum(e.planned.numel() for e in planned.values() if e.name in replaced or e.name not in src.map)
        delta -= sum(src.meta(k).numel() for k in replaced)
        shards = _shards(entries, convert_file_size_to_int(max_shard_size))
        out.mkdir(parents=True, exist_ok=True)
        names = [WEIGHTS_NAME] if len(shards) == 1 else [
            f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)
        ]
        for name, shard in zip(names, shards):
            _write_shard(out / name, shard)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(e.planned.numel() for e in entries),
                              "total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    new_config = copy.deepcopy(config)
    update_config(new_config, layout, plans, width_layout)
    new_config.save_pretrained(out)
    return StreamResult(names, int(delta), [p.target for p in plans])
