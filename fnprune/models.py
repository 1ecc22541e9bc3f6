"""Load a causal LM and its tokenizer from a Hub id, a local Hugging Face folder or a .gguf file."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .arch import MLP_LAYOUTS, layout_for
from .errors import FnpruneError, ModelError, first_line
from .hub import hub_offline
from .recipe import ModelSpec, Recipe
from .remote_code.modeling_fnprune import per_layer_class
from .safetensors_io import DTYPES

log = logging.getLogger(__name__)

__all__ = [
    "load_model",
    "model_source",
    "load_pruned",
    "local_model_dir",
    "weights_dir",
    "model_dtype",
    "PrunedModel",
    "count_parameters",
    "unique_parameters",
    "checkpoint_bytes",
    "checkpoint_format",
    "placement_kwargs",
]
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def model_source(spec: ModelSpec) -> tuple[str, dict]:
    """What to pass to from_pretrained: (folder or Hub id, extra kwargs). Reads no weights, so a missing local
    model fails before any data is read."""
    path = Path(spec.name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        try:
            import gguf  # transformers reads GGUF files through it
        except ImportError as exc:
            raise ModelError("reading a .gguf model needs the gguf package: pip install 'fnprune[gguf]'") from exc
        try:
            arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
        except Exception:  # not a GGUF file: transformers' own error says so
            arch = None
        if arch == "deci":
            raise ModelError(f"{path} is a per-layer GGUF (llama.cpp arch deci), which transformers cannot read; "
                             "use the checkpoint folder it was exported from")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        _refuse_config_only(path)
        if not list(path.glob("*.safetensors")):
            raise ModelError(f"{path} has no .safetensors weights; fnprune never loads pickled checkpoints")
        return str(path), {"use_safetensors": True}
    if _names_a_path(spec.name_or_path):
        raise ModelError(f"model path not found: {spec.name_or_path}")
    from huggingface_hub import hf_hub_download

    try:  # one request (or the cache offline), not the tokenizer's and the model's retries, before any work
        hf_hub_download(spec.name_or_path, "config.json", revision=spec.revision)
    except Exception as exc:  # not found, offline without a cached copy, no access
        raise _not_on_hub(spec.name_or_path, exc, spec.revision) from exc
    return spec.name_or_path, {"use_safetensors": True, **({"revision": spec.revision} if spec.revision else {})}


def _not_on_hub(name: str, exc: Exception, revision: str | None = None) -> ModelError:
    """One line for a Hub id that cannot be loaded, saying why where huggingface_hub's error type tells (its own
    first line is often only "403 Client Error")."""
    kinds = {c.__name__ for c in type(exc).__mro__}
    at = f" at revision {revision}" if revision else ""
    if "GatedRepoError" in kinds:
        return ModelError(f"{name} is a gated model: request access on its Hub page, then log in with `hf auth "
                          "login` (or set HF_TOKEN)")
    if "RevisionNotFoundError" in kinds:
        return ModelError(f"{name} has no revision {revision!r} on the Hugging Face Hub (a branch, tag or commit)")
    if "RepositoryNotFoundError" in kinds:
        return ModelError(f"no model {name} on the Hugging Face Hub (or a private one: log in with `hf auth login`)")
    return ModelError(f"could not find {name}{at} locally or on the Hugging Face Hub: {type(exc).__name__}: "
                      f"{first_line(exc)}{_offline_hint()}")


def _refuse_config_only(path: Path) -> None:
    """A DeciLM folder as `fnprune export --format deci` writes it (for vLLM) has a config class but no model code,
    and transformers has no DeciLM model: say so instead of transformers' remote-code errors."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # transformers' own error says what is wrong with it
    if not isinstance(config, dict):
        return
    if config.get("model_type") == "nemotron-nas" and "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        raise ModelError(f"{path} is a DeciLM folder without model code (as `fnprune export --format deci` writes it "
                         "for vLLM), which transformers cannot load; use the checkpoint folder it was exported from")


def _names_a_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is `name` or `owner/name`), so a missing one is a path error,
    not a Hub lookup."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _family_class_name(model_type: str) -> str:
    """The transformers class a family in the table loads as (its causal LM or its sequence classifier)."""
    from transformers.models.auto import modeling_auto

    layout = MLP_LAYOUTS.get(model_type)
    names = (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if layout and layout.classifier
             else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return names.get(model_type, "")


def _model_class(source: str, kwargs: dict):
    """The auto class of the family's layout (causal LM or sequence classifier) or, for an fnprune per-layer
    checkpoint, its base class with per-layer MLP widths (fnprune's own loader, no remote code)."""
    config_kwargs = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    config = AutoConfig.from_pretrained(source, **config_kwargs)
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "fnprune_layout", None):
        base = getattr(transformers, architectures[0], None) if architectures else None
        if base is None:  # saved after loading with its remote code: FnpruneModel, the family's class then
            base = getattr(transformers, _family_class_name(config.model_type), None)
        if base is None:
            raise ModelError(f"per-layer checkpoint with unknown base class {architectures}")
        return per_layer_class(base)
    layout = MLP_LAYOUTS.get(config.model_type)
    if layout is None:
        return AutoModelForCausalLM  # load_model then names the supported families
    if architectures and any(a.endswith("ForSequenceClassification") for a in architectures) != layout.classifier:
        raise ModelError(
            f"{source} holds a {architectures[0]}; fnprune prunes {config.model_type} checkpoints as "
            f"{layout.head} (the family's row in fnprune/arch.py)"
        )
    return getattr(transformers, layout.head)


def placement_kwargs(spec: ModelSpec) -> dict:
    """device_map / max_memory / offload_folder for from_pretrained (GPU indices as ints, as accelerate wants)."""
    if spec.device_map is None:
        return {}
    out: dict = {"device_map": spec.device_map}
    if spec.max_memory:
        out["max_memory"] = {
            int(k) if k.isdigit() else k: int(v) if isinstance(v, str) and v.isdigit() else v
            for k, v in spec.max_memory.items()
        }
    if spec.offload_folder:
        out["offload_folder"] = str(Path(spec.offload_folder).expanduser())
    return out


def _dequantized(extra: dict) -> dict:
    """For a GGUF file, ask for the weights unpacked into a plain model (transformers 5 otherwise marks it as
    quantized even when it dequantizes, and then refuses to save it); older versions always unpacked."""
    if "gguf_file" not in extra or not hasattr(transformers, "GgufConfig"):
        return {}
    return {"quantization_config": transformers.GgufConfig(dequantize=True)}


def _gguf_config(source: str, extra: dict) -> dict:
    """For a GGUF file, transformers' config with what its GGUF reader leaves out and `fnprune export` writes: the
    MLP bias flag when the file holds FFN biases (bias compensation; without the flag the biases are dropped), the
    attention bias flag likewise, linear RoPE scaling and the head size (`<arch>.attention.key_length`, Qwen3's
    differs from hidden / heads). RoPE scaling it cannot rebuild (Llama 3's `rope_freqs`, YaRN) is refused: the
    model would load with other positions."""
    if "gguf_file" not in extra:
        return {}
    import gguf

    config = AutoConfig.from_pretrained(source, gguf_file=extra["gguf_file"])
    path = Path(source) / extra["gguf_file"]
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    layout = MLP_LAYOUTS.get(config.model_type)
    if layout and layout.bias_flag and any(n.endswith(".ffn_down.bias") for n in names):
        setattr(config, layout.bias_flag, True)
    if hasattr(config, "attention_bias") and any(n.endswith(".attn_q.bias") for n in names) and \
            any(n.endswith(".attn_output.bias") for n in names):  # the flag gives all four projections a bias
        config.attention_bias = True
    arch = reader.fields["general.architecture"].contents()
    _gguf_rope(config, reader, arch, names, path)
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key_length.contents())
    return {"config": config}


def _gguf_rope(config, reader, arch: str, names: set[str], path: Path) -> None:
    """Linear RoPE scaling, which transformers' GGUF reader drops, put back into `config`; scaling it cannot
    rebuild (Llama 3's `rope_freqs`, Phi-3's LongRoPE factors, YaRN, per-layer-type settings such as Gemma 3's)
    refused: the model would load with other positions."""
    scaling = reader.fields.get(f"{arch}.rope.scaling.type")
    kind = scaling.contents() if scaling else "none"
    if "rope_freqs.weight" in names:
        kind = "llama3 (rope_freqs)"
    if names & {"rope_factors_long.weight", "rope_factors_short.weight"}:
        kind = "LongRoPE (rope_factors_long/short)"
    params = getattr(config, "rope_parameters", None)  # transformers 5; 4.x has rope_scaling
    if kind == "linear" and isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        kind = "linear, with settings per layer type"
    if kind not in ("none", "linear"):
        raise ModelError(f"{path}: its RoPE scaling, {kind}, is not rebuilt by transformers' GGUF reader (the model "
                         "would load with other positions); load the Hugging Face folder it was made from instead")
    if kind == "linear":
        factor = float(reader.fields[f"{arch}.rope.scaling.factor"].contents())
        if params is not None:
            config.rope_parameters = {**params, "rope_type": "linear", "factor": factor}
        else:
            config.rope_scaling = {"rope_type": "linear", "type": "linear", "factor": factor}


def _check_plain(model: nn.Module, spec: ModelSpec) -> None:
    """Refuse, before any calibration, a model that save_pretrained could not write as plain safetensors (one
    still quantized, or with packed weights), instead of failing at the very end of the run."""
    markers = (getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None))
    quantized = any(m is not None for m in markers)
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if quantized or packed:
        what = f"weights packed as {', '.join(packed)}" if packed else "a quantization config"
        raise ModelError(
            f"{spec.name_or_path} loads as a quantized model ({what}), which cannot be pruned and saved as a plain "
            "checkpoint; use an unquantized checkpoint (GGUF files of any type load dequantized)"
        )


def _explained(exc: Exception, spec: ModelSpec) -> str:
    """The error's first line, with what to do when the model (or tokenizer) needs its own code, which fnprune
    never runs unless asked."""
    said = first_line(exc)
    if spec.trust_remote_code or "custom code" not in said:
        return said
    return (f"{said.rstrip(' .')}; it needs its own code (its auto_map): pass --trust-remote-code "
            "(model.trust_remote_code: true) only if you trust it")


def load_model(spec: ModelSpec, prunable: bool = True) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer); every failure is a ModelError that says what to fix. `prunable` off (to
    evaluate): an architecture missing from fnprune's table loads too.

    With `spec.device_map` the weights are placed (and offloaded to CPU or disk) by accelerate: parameters of
    offloaded modules are then on the meta device and loaded on the fly by accelerate's hooks.
    """
    source, extra = model_source(spec)
    common = dict(extra, trust_remote_code=spec.trust_remote_code)
    tokenizer_kwargs = {k: v for k, v in common.items() if k != "use_safetensors"}
    # a Hub id that cannot be fetched: say what works offline (the Hub client retries for tens of seconds first)
    hub = "" if Path(source).exists() else _offline_hint()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    except Exception as exc:  # missing files, no network, bad tokenizer: the user needs the message
        raise ModelError(f"could not load a tokenizer from {spec.name_or_path}: {type(exc).__name__}: "
                         f"{_explained(exc, spec)}{hub}") from exc
    try:
        model = _model_class(source, common).from_pretrained(
            source, **common, **_gguf_config(source, extra), **_dequantized(extra), **placement_kwargs(spec),
            **{_DTYPE_KW: getattr(torch, spec.dtype)}
        )
    except ModelError:  # a GGUF file transformers would load wrongly: said as it is
        raise
    except Exception as exc:
        raise ModelError(f"could not load model {spec.name_or_path}: {type(exc).__name__}: {_explained(exc, spec)}"
                         f"{hub}") from exc
    _check_plain(model, spec)
    if prunable:
        layout_for(model)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ModelError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}: "
            "tokenizer and model do not match"
        )
    model.eval()
    return model, tokenizer


def _storage(p: nn.Parameter):
    """What tied parameters share: their storage; offloaded (meta) ones have none, so their identity."""
    return p.data_ptr() if p.device.type != "meta" else ("meta", id(p))


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with shared storage counted once."""
    seen = {_storage(p): p for p in model.parameters()}
    return list(seen.values())


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the earlier-registered name it shares storage with (tied embeddings: `lm_head.weight`
    -> `model.embed_tokens.weight`), the aliases `save_pretrained` leaves out of the checkpoint."""
    first: dict = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        original = first.setdefault(_storage(p), name)
        if original != name:
            aliases[name] = original
    return aliases


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in unique_parameters(model))


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads in `folder` (not another copy beside them, as Mistral's
    consolidated one); none for pickled weights or a folder that is not a checkpoint."""
    from .stream_surgery import source_weight_map

    try:
        return sorted(set(source_weight_map(folder).values())) if folder.is_dir() else []
    except ModelError:
        return []


def checkpoint_bytes(spec: ModelSpec) -> int | None:
    """Size on disk of a local source checkpoint (weights only), or None for a Hub id."""
    path = Path(spec.name_or_path).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():  # pickled weights: their size is still the checkpoint's
        files = _safetensors_files(path) or list(path.glob("*.bin"))
        return sum(f.stat().st_size for f in files) or None
    return None


def checkpoint_format(spec: ModelSpec) -> str | None:
    """A local source's weight format as the card names it: "GGUF", or the dtype of its first floating-point
    safetensors tensor ("float32", "bfloat16", ...); None for a Hub id or pickled weights."""
    path = Path(spec.name_or_path).expanduser()
    if path.is_file():
        return "GGUF" if path.suffix.lower() == ".gguf" else None
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                dtype = DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return str(dtype).removeprefix("torch.")
    return None


@dataclass
class PrunedModel:
    """A pruned checkpoint: the model, its tokenizer, and fnprune's record of how it was made."""

    model: nn.Module
    tokenizer: object
    report: dict | None
    recipe: object | None


# what streamed surgery reads first: the config and the single weights file or the shard index (whose shards
# `weights_dir` then fetches by name), not a repo's other copies (Mistral's consolidated.safetensors, .bin, .gguf)
WEIGHT_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json"]


def local_model_dir(path: str | Path, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local folder for `path`: itself, or the Hub snapshot (downloaded, or from the cache when offline), of
    the files `allow_patterns` names (None: all; see `weights_dir` for streamed surgery's)."""
    from huggingface_hub import snapshot_download

    local = Path(path).expanduser()
    if local.exists():
        return local
    if _names_a_path(str(path)):
        raise ModelError(f"model path not found: {path}")
    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=allow_patterns))
    except Exception as exc:  # not found, offline without a cached copy, no access
        raise _not_on_hub(str(path), exc, revision) from exc


def weights_dir(path: str | Path, revision: str | None = None) -> Path:
    """A local folder holding the weight files from_pretrained reads for `path` (itself when local): from the Hub,
    the config and the single weights file or the shard index, then exactly the shards the index names (a repo's
    shards can be named otherwise than `model-*`, e.g. `model_00001-of-00072.safetensors`)."""
    folder = local_model_dir(path, revision, WEIGHT_FILES)
    index = folder / "model.safetensors.index.json"
    if Path(path).expanduser().exists() or (folder / "model.safetensors").is_file() or not index.is_file():
        return folder
    try:
        shards = sorted({str(v) for v in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return folder  # source_weight_map says what is wrong with the index
    return local_model_dir(path, revision, [*WEIGHT_FILES, *shards])


def _offline_hint() -> str:
    """What works when a Hub id cannot be fetched (the Hub client retries for tens of seconds unless told)."""
    skip = "" if hub_offline() else (
        " (HF_HUB_OFFLINE=1 skips the Hub's retries)")
    return f"; offline, give a local folder or .gguf file{skip}"


def model_dtype(recorded: Recipe | None, dtype: str | None) -> str:
    """The dtype to load a checkpoint in: the one asked, else the one its recipe.yaml (`recorded`) ran in (so the
    scores are report.json's), else float32."""
    return dtype or (recorded.model.dtype if recorded is not None else "float32")


def load_pruned(path: str | Path, revision: str | None = None, trust_remote_code: bool = False,
                dtype: str | None = None) -> PrunedModel:
    """Load a pruned checkpoint (local folder or Hub id) with its report and recipe when present, in `dtype`
    (default: the dtype its recipe ran in)."""
    from .checkpoint import RECIPE_FILE, REPORT_FILE, read_report
    from .recipe import load_recipe

    local = local_model_dir(path, revision)
    recipe = _readable(lambda: load_recipe(local / RECIPE_FILE), local / RECIPE_FILE, f"dtype {dtype or 'float32'}")
    spec = ModelSpec(name_or_path=str(local), trust_remote_code=trust_remote_code, dtype=model_dtype(recipe, dtype))
    model, tokenizer = load_model(spec)
    report = _readable(lambda: read_report(local), local / REPORT_FILE, "no report")
    return PrunedModel(model, tokenizer, report, recipe)


def _readable(read: Callable[[], Any], path: Path, without: str) -> Any:
    """`read()` when `path` is a file it can read; None otherwise, with a warning when the file is there but
    unreadable (another fnprune version's fields, a damaged file): the weights load without it."""
    if not path.is_file():
        return None
    try:
        return read()
    except FnpruneError as exc:
        log.warning("%s cannot be read (%s); loading the model without it (%s)", path, first_line(str(exc)), without)
        return None
