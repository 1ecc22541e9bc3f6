"""`fnprune export`: a pruned (or dense) checkpoint in the forms other runtimes load.

- `gguf`: one .gguf file for llama.cpp / Ollama (fnprune's own writer on the `gguf` package). Uniform and padded
  checkpoints keep their family's llama.cpp architecture; per-layer widths of the Llama family become llama.cpp's
  `deci` architecture, whose FFN width is a per-layer array (the `llama` architecture has one width).
- `deci`: a Hugging Face folder in the DeciLM / Nemotron-NAS layout (`block_configs` with each block's FFN width),
  which vLLM's `DeciLMForCausalLM` and llama.cpp's `deci` converter read.

Both read the checkpoint's config.json and safetensors directly (no model is built), and write through a
temporary file or folder renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import MLP_LAYOUTS
from ..checkpoint import read_json_object
from ..errors import ModelError, OutputError, first_line

__all__ = ["Checkpoint", "read_checkpoint", "export", "FORMATS"]

FORMATS = ("gguf", "deci")


@dataclass
class Checkpoint:
    """What an exporter needs to know about a Hugging Face checkpoint folder."""

    path: Path
    config: dict[str, Any]
    files: list[Path]
    widths: list[int]  # real MLP width of each layer (padded checkpoints: the padded width)
    layout: str  # uniform | per-layer | padded
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the checkpoint, one at a time, as stored."""
        from safetensors import safe_open

        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def tensor_shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape from the files' headers, in the order `tensors` yields them."""
        return _tensor_shapes(self.files)

    def tensor_names(self) -> list[str]:
        from safetensors import safe_open

        names: list[str] = []
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                names.extend(f.keys())
        return names


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors index", ModelError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index}: no weight_map object: not a safetensors index")
        return [path / str(s) for s in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def _tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Every tensor's shape from the files' headers; a missing, truncated or foreign file is a one-line error."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types (and OSError)
            reason = f"{type(exc).__name__}: {first_line(exc)}"
            raise ModelError(f"{file}: not a readable safetensors file ({reason})") from exc
    return shapes


def _check_widths(path: Path, config: dict[str, Any], widths: list[int], shapes: dict[str, list[int]]) -> None:
    """config.json's MLP widths are the weights' (a folder whose config and weights disagree is not exported)."""
    from ..stream_surgery import checkpoint_key  # the key as stored (some checkpoints drop the base prefix)

    row = MLP_LAYOUTS.get(str(config.get("model_type")))
    if row is None:
        return
    for i, width in enumerate(widths):
        try:
            shape = shapes[checkpoint_key(f"{row.layers}.{i}.{row.output}.weight", shapes.keys(), row)]
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from exc
        actual = shape[0] if row.conv1d else shape[-1]
        if actual != width:
            raise ModelError(f"{path}: layer {i}'s MLP is {actual} neurons wide in the weights, {width} in "
                             "config.json: the folder's config and weights disagree")


def _deci_widths(path: Path, config: dict[str, Any]) -> list[int]:
    """The FFN widths DeciLM readers derive from a DeciLM config's `block_configs`."""
    from .to_deci import width_from_ffn_mult

    try:
        return [width_from_ffn_mult(float(b["ffn"]["ffn_mult"]), int(config["hidden_size"]))
                for b in config["block_configs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'}: block_configs has no ffn_mult per block ({exc})") from exc


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The checkpoint in `directory` (an fnprune output folder or a plain HF safetensors folder)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder: expected an fnprune output folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not an fnprune output folder or Hugging Face checkpoint")
    files = _weight_files(path)
    if not files:
        raise ModelError(f"{path} has no model.safetensors (or index): only safetensors checkpoints are read")
    config = read_json_object(path / "config.json", "a model config", ModelError)
    report_file = path / "report.json"
    report = read_json_object(report_file, "fnprune's report object", ModelError) if report_file.is_file() else {}
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))  # GPT-2 names it n_layer
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ModelError(f"{path / 'config.json'}: num_hidden_layers is {n_layers!r}, not a number of layers")
    per_layer = (config.get("fnprune_layout") or {}).get("widths")
    if per_layer and not (isinstance(per_layer, list) and all(isinstance(w, int) for w in per_layer)):
        raise ModelError(f"{path / 'config.json'}: fnprune_layout.widths is not a list of widths")
    if per_layer and len(per_layer) != n_layers:
        raise ModelError(f"{path / 'config.json'}: fnprune_layout.widths has {len(per_layer)} widths for "
                         f"{n_layers} layers")
    if per_layer:
        widths, layout = per_layer, "per-layer"
    elif isinstance(config.get("block_configs"), list):  # a DeciLM folder (`fnprune export --format deci`)
        widths, layout = _deci_widths(path, config), "per-layer"
    else:  # a family without an MLP width in config.json is refused by the exporter that needs it
        row = MLP_LAYOUTS.get(str(config.get("model_type")))
        width = config.get(row.width_key if row else "intermediate_size")
        widths = [int(width)] * n_layers if width else []
        layout = "padded" if report.get("layout") == "padded" else "uniform"
    _check_widths(path, config, widths, _tensor_shapes(files))
    return Checkpoint(path, config, files, widths, layout, report)


def check_output_file(path: Path, overwrite: bool, source: Path) -> None:
    """Refuse before any work when the output file exists (without overwrite), is a folder, or is one of the
    files of the checkpoint `source` (a .gguf exported beside them may be replaced)."""
    if path.exists() and path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name such as model.gguf")
    if path.exists() and path.suffix != ".gguf" and path.resolve().parent == source.resolve():
        raise OutputError(f"output {path} is a file of the input checkpoint {source}; give a new file name")
    if os.path.lexists(path) and not overwrite:  # a dangling symbolic link too
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it")
    if path.is_file() and not _is_gguf(path):  # --overwrite replaces a GGUF file, never another model's weights
        raise OutputError(f"output {path} exists and is not a GGUF file; --overwrite replaces only a GGUF file")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def export(directory: str | Path, fmt: str, output: str | Path, *, outtype: str = "f16", gguf_arch: str = "auto",
           tokenizer_pre: str | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Export the checkpoint in `directory` as `fmt` to `output`; returns a short summary of what was written.
    `tokenizer_pre` (gguf): llama.cpp's pre-tokenizer name for a tokenizer fnprune cannot name."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(output).expanduser()
    ckpt = read_checkpoint(directory)
    if fmt == "gguf":
        from .to_gguf import write_gguf

        check_output_file(out, overwrite, ckpt.path)
        return write_gguf(ckpt, out, outtype=outtype, arch=gguf_arch, tokenizer_pre=tokenizer_pre, progress=progress,
                          overwrite=overwrite)
    from .to_deci import write_deci

    return write_deci(ckpt, out, overwrite=overwrite)
