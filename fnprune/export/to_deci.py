"""A Llama-family checkpoint (per-layer widths or not) as a DeciLM / Nemotron-NAS Hugging Face folder.

The layout: `model_type: nemotron-nas`, `architectures: ["DeciLMForCausalLM"]` and one `block_configs` entry per
layer, `{"attention": {"n_heads_in_group": H / KV, ...}, "ffn": {"ffn_mult": m, ...}}`. The weights keep
Llama's names, which both vLLM's DeciLMForCausalLM and llama.cpp's `deci` converter read. Both derive a layer's
FFN width from `ffn_mult` as `multiple_of_256_at_or_above(int(2 * m * hidden / 3))`, so only widths that are
multiples of 256 can be written exactly; other widths are refused with the way to get valid ones.

`nemotron-nas` is not a model type transformers knows, so the folder carries a small config class of fnprune's
own (configuration_decilm.py, loaded with trust_remote_code) that gives `block_configs` attribute access.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..arch import LLAMA_CPP_ARCH
from ..checkpoint import atomic_output_dir, check_output_dir
from ..errors import ModelError
from . import Checkpoint

log = logging.getLogger(__name__)

__all__ = ["DECI_MULTIPLE", "CONFIG_CODE_FILE", "ffn_mult_for", "width_from_ffn_mult", "deci_config", "write_deci"]

DECI_MULTIPLE = 256
CONFIG_CODE_FILE = "configuration_decilm.py"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "generation_config.json", "recipe.yaml", "report.json")
_DROPPED_KEYS = ("fnprune_layout", "auto_map", "intermediate_size", "architectures", "model_type")

_CONFIG_CODE = '''"""DeciLM / Nemotron-NAS config of a checkpoint exported by fnprune (`fnprune export --format deci`).

`block_configs` entries get attribute access (block.attention.n_heads_in_group, block.ffn.ffn_mult), as vLLM's
DeciLMForCausalLM reads them; `to_dict` turns them back into plain dicts for config.json.
"""

from types import SimpleNamespace

from transformers import LlamaConfig


def _obj(value):
    return SimpleNamespace(**{k: _obj(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _plain(value):
    return {k: _plain(v) for k, v in vars(value).items()} if isinstance(value, SimpleNamespace) else value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_obj(b) for b in (block_configs or [])]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in self.block_configs]
        return out
'''


def width_from_ffn_mult(ffn_mult: float, hidden: int) -> int:
    """The FFN width DeciLM readers (vLLM, llama.cpp's converter) derive from `ffn_mult`."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // DECI_MULTIPLE) * DECI_MULTIPLE


def ffn_mult_for(width: int, hidden: int) -> float:
    """An `ffn_mult` that maps back to exactly `width` (a multiple of 256), checked with the readers' formula."""
    mult = round(1.5 * width / hidden, 6)
    if width_from_ffn_mult(mult, hidden) != width:
        mult = 1.5 * width / hidden
    if width_from_ffn_mult(mult, hidden) != width:
        raise ModelError(f"no ffn_mult maps to FFN width {width} at hidden size {hidden}")
    return mult


def check_deci_layout(model_type: str, layout: str) -> None:
    """ModelError unless the family and the width layout can be held by DeciLM (before any width is looked at)."""
    if LLAMA_CPP_ARCH.get(model_type) != "llama":
        raise ModelError(f"the DeciLM layout is Llama-only; {model_type!r} checkpoints cannot be exported as deci")
    if layout == "padded":
        raise ModelError("padded checkpoints hold zero neurons, not per-layer widths: export them with --format gguf, "
                         "or re-run compress with --layout per-layer for the deci layout")


def deci_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json of the DeciLM folder, or a one-line error when the checkpoint cannot be written exactly."""
    c = ckpt.config
    check_deci_layout(ckpt.model_type, ckpt.layout)
    hidden, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_head)
    if c.get("head_dim") and int(c["head_dim"]) != hidden // n_head:
        raise ModelError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads ({hidden // n_head}): "
                         "DeciLM readers (llama.cpp's converter) assume the latter")
    if n_head % n_kv:
        raise ModelError(f"{n_head} attention heads are not a multiple of {n_kv} key/value heads")
    bad = [(i, w) for i, w in enumerate(ckpt.widths) if w % DECI_MULTIPLE or w <= 0]
    if bad:
        shown = ", ".join(f"layer {i}: {w}" for i, w in bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise ModelError(f"DeciLM readers (vLLM, llama.cpp) round FFN widths up to multiples of {DECI_MULTIPLE}, so "
                         f"{len(bad)} layer widths cannot be written exactly ({shown}); re-run compress with "
                         f"--round-to {DECI_MULTIPLE}, or export with --format gguf (any widths)")
    blocks = [{"attention": {"n_heads_in_group": n_head // n_kv, "no_op": False, "replace_with_linear": False},
               "ffn": {"ffn_mult": ffn_mult_for(w, hidden), "no_op": False, "replace_with_linear": False}}
              for w in ckpt.widths]
    base = {k: v for k, v in c.items() if k not in _DROPPED_KEYS}
    return {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
            "auto_map": {"AutoConfig": f"{CONFIG_CODE_FILE[:-3]}.DeciLMConfig"}, **base, "block_configs": blocks}


def write_deci(ckpt: Checkpoint, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the DeciLM folder at `out` (temporary folder renamed into place); weights are copied unchanged."""
    check_output_dir(out, overwrite, [ckpt.path], own_files=[CONFIG_CODE_FILE])
    config = deci_config(ckpt)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CONFIG_CODE_FILE).write_text(_CONFIG_CODE, encoding="utf-8")
        for f in ckpt.files:
            log.info("copying %s (%.2f GB)", f.name, f.stat().st_size / 1e9)
            shutil.copy2(f, tmp / f.name)
        index = ckpt.path / "model.safetensors.index.json"
        for f in [index, *(ckpt.path / name for name in _COPIED)]:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return {"path": str(out), "format": "deci", "widths": ckpt.widths,
            "ffn_mult": [b["ffn"]["ffn_mult"] for b in config["block_configs"]]}
