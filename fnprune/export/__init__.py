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

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import MLP_LAYOUTS
from ..errors import ModelError, OutputError

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
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The checkpoint in `directory` (an fnprune output folder or a plain HF safetensors folder)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder: expected an fnprune output folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not an fnprune output folder or Hugging Face checkpoint")
    files = _weight_files(path)
    if not files:
        raise ModelError(f"{path} has no model.safetensors (or index): export reads safetensors checkpoints only")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    report_file = path / "report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    n_layers = int(config.get("num_hidden_layers", 0))
    per_layer = (config.get("fnprune_layout") or {}).get("widths")
    if per_layer:
        widths, layout = [int(w) for w in per_layer], "per-layer"
    else:  # a family without an MLP width in config.json is refused by the exporter that needs it
        row = MLP_LAYOUTS.get(str(config.get("model_type")))
        width = config.get(row.width_key if row else "intermediate_size")
        widths = [int(width)] * n_layers if width else []
        layout = "padded" if report.get("layout") == "padded" else "uniform"
    return Checkpoint(path, config, files, widths, layout, report)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse before any work when the output file exists (without overwrite) or is a folder."""
    if path.exists() and path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name such as model.gguf")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it")


def export(directory: str | Path, fmt: str, output: str | Path, *, outtype: str = "f16", gguf_arch: str = "auto",
           overwrite: bool = False) -> dict[str, Any]:
    """Export the checkpoint in `directory` as `fmt` to `output`; returns a short summary of what was written."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(output).expanduser()
    ckpt = read_checkpoint(directory)
    if fmt == "gguf":
        from .to_gguf import write_gguf

        check_output_file(out, overwrite)
        return write_gguf(ckpt, out, outtype=outtype, arch=gguf_arch)
    from .to_deci import write_deci

    return write_deci(ckpt, out, overwrite=overwrite)
