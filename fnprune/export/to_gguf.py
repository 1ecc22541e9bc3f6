"""fnprune's own GGUF writer (on the `gguf` package): metadata, tokenizer and tensors for llama.cpp.

llama.cpp's `llama` architecture has one FFN width for every layer, so a per-layer checkpoint is written as its
`deci` architecture, which reads `deci.feed_forward_length` (and head counts) as per-layer arrays and otherwise
runs the Llama block. Q/K projections are re-ordered for llama.cpp's rotary layout (pairs of adjacent
channels) where its architecture needs it; everything else is renamed, not changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch import LLAMA_CPP_ARCH
from ..checkpoint import atomic_output_file, read_json_object
from ..errors import ModelError, first_line
from . import Checkpoint
from .gguf_vocab import is_sentencepiece, special_flags, write_sentencepiece_vocab

__all__ = ["OUTTYPES", "GGUF_ARCHS", "write_gguf", "gguf_arch_for", "tokenizer_pre", "permute_for_rope",
           "quant_type"]

log = logging.getLogger("fnprune")

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_ARCHS = ("auto", "llama", "deci")
_PERMUTED = ("llama", "deci")  # llama.cpp archs with "normal" (adjacent-pair) RoPE: HF's Q/K rows re-ordered
_ROPE_TYPES = (None, "default", "linear", "llama3")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3's per-frequency factors (gguf.TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS])

# Tokenizer fingerprint -> llama.cpp's `tokenizer.ggml.pre` (which regex splits text before BPE). The key is
# sha256 of the token ids of _PROBE (see tokenizer_pre); add a row per tokenizer family checked in llama.cpp.
_PROBE = ("fnprune probe:\n \n\n\t\t x  y   z\r\n 7 42 123 4567 3.14 1,000,000 -= += == ... !!? 'll 's 'T n't I'M "
          "don't café naïve Ünïcödé Привет мир 你好世界 こんにちは 안녕 مرحبا 🚀🦙 ✅ <tag> {\"k\": [1, 2]}")
_PRE_BY_FINGERPRINT: dict[str, str] = {
    # HuggingFaceTB SmolLM / SmolLM2 (135M ... 1.7B share one tokenizer); llama.cpp calls it "smollm"
    "66bffb19a4c6066ed021edde89a7cdf6a43aacced33f0aababdefc445b744dbc": "smollm",
}


def gguf_arch_for(ckpt: Checkpoint, requested: str = "auto") -> str:
    """The llama.cpp architecture for this checkpoint, or a one-line error saying why it cannot be written."""
    if requested not in GGUF_ARCHS:
        raise ModelError(f"unknown GGUF architecture {requested!r}; choose one of {', '.join(GGUF_ARCHS)}")
    base = LLAMA_CPP_ARCH.get(ckpt.model_type)
    if base is None:
        raise ModelError(f"GGUF export of {ckpt.model_type!r} checkpoints is not supported; supported: "
                         f"{', '.join(sorted(LLAMA_CPP_ARCH))}")
    varied = len(set(ckpt.widths)) > 1
    if requested == "deci" or (requested == "auto" and varied):
        if base != "llama" and not varied:
            raise ModelError(f"llama.cpp's per-layer 'deci' architecture is Llama-only; {ckpt.model_type!r} "
                             f"checkpoints with one FFN width are written as {base!r}: use --gguf-arch auto")
        if base != "llama":
            raise ModelError(f"per-layer widths of {ckpt.model_type!r} cannot be written as GGUF (llama.cpp's "
                             "per-layer 'deci' architecture is Llama-only); re-run compress with --layout padded")
        return "deci"
    if varied:
        raise ModelError(f"llama.cpp's {base!r} architecture has one FFN width, this checkpoint has per-layer widths "
                         f"{min(ckpt.widths)}..{max(ckpt.widths)}; use --gguf-arch deci (the default, auto) or "
                         "re-run compress with --layout padded")
    if requested == "llama" and base != "llama":
        raise ModelError(f"{ckpt.model_type!r} is llama.cpp architecture {base!r}, not 'llama'; use --gguf-arch auto")
    return base


def permute_for_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotary layout (each head's first half rotates with its second half) to llama.cpp's (channel 2i
    with 2i+1): within each head, rows [h0 | h1] become interleaved h0[0], h1[0], h0[1], h1[1], ..."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def quant_type(name: str, shape: tuple[int, ...], outtype: str):
    """GGML type of one tensor: 1-D tensors (norms, biases) stay F32; q8_0 needs rows of whole 32-blocks."""
    from gguf import GGMLQuantizationType as Q

    if outtype == "f32" or len(shape) < 2:
        return Q.F32
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    if outtype == "q8_0":
        log.info("%s: rows of %d values are not whole q8_0 blocks of 32; written as f16", name, shape[-1])
    return Q.F16


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype]


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope(config: dict[str, Any]) -> tuple[float, str | None, float | None]:
    params = _rope_params(config)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type"))
    if kind not in _ROPE_TYPES:
        raise ModelError(f"RoPE type {kind!r} is not supported by fnprune's GGUF export yet "
                         f"(supported: {', '.join(str(k) for k in _ROPE_TYPES[1:])})")
    return float(theta), kind, params.get("factor")


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Llama 3's frequency-dependent RoPE scaling as one divisor per rotary frequency (llama.cpp's
    `rope_freqs.weight`): long wavelengths are slowed by `factor`, short ones kept, the band between blended."""
    params = _rope_params(config)
    theta, _, _ = _rope(config)
    dim = _head_dim(config)
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def check_gguf_config(config: dict[str, Any]) -> None:
    """ModelError for what config.json holds that fnprune's GGUF files cannot state (sliding-window attention, a
    RoPE type not written yet): the export's own refusal, which the model card asks before it offers the export."""
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < config.get("max_position_embeddings",
                                                                                  window + 1):
        raise ModelError(f"sliding-window attention (window {window}) is not written to GGUF by fnprune yet")
    _rope(config)


def _hparams(writer, ckpt: Checkpoint, arch: str, outtype: str) -> None:
    """Model hyperparameters from config.json, under the keys llama.cpp reads for `arch`."""
    import gguf

    c = ckpt.config
    check_gguf_config(c)
    n_layers = int(c["num_hidden_layers"])
    n_head, n_kv = int(c["num_attention_heads"]), int(c.get("num_key_value_heads") or c["num_attention_heads"])
    name = Path(str(ckpt.report.get("base_model") or ckpt.path.name)).name
    writer.add_name(f"{name} (fnprune)" if ckpt.report else name)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(c.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_block_count(n_layers)
    if arch == "deci":  # per-layer arrays, as llama.cpp's deci loader reads them
        writer.add_feed_forward_length([int(w) for w in ckpt.widths])
        writer.add_head_count([n_head] * n_layers)
        writer.add_head_count_kv([n_kv] * n_layers)
    else:
        writer.add_feed_forward_length(int(ckpt.widths[0]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
    theta, kind, factor = _rope(c)
    writer.add_rope_freq_base(theta)
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    head_dim = _head_dim(c)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(c["vocab_size"]))


def _fingerprint(tokenizer) -> str:
    ids = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


# A byte-level tokenizer's own split regex -> llama.cpp's pre-tokenizer with that regex (llama.cpp's
# src/llama-vocab.cpp): for families whose fingerprint depends on a vocabulary not in the table above.
_PRE_BY_SPLIT: dict[str, str] = {
    # Llama 3 / 3.1 / 3.2 (transformers' convert_slow_tokenizer: digits in runs of up to three)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2 / 2.5 / 3 (transformers' tokenization_qwen2: single digits)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def _pre_by_structure(data: dict[str, Any]) -> str | None:
    """llama.cpp's name for tokenizer.json's split when it is GPT-2's regex alone (a plain ByteLevel, no prefix
    space, no normalizer: `gpt-2`) or one regex of _PRE_BY_SPLIT followed by a regex-free ByteLevel."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        plain = pre.get("use_regex", True) and not pre.get("add_prefix_space") and not data.get("normalizer")
        return "gpt-2" if plain else None  # llama.cpp's name (its `gpt2` is the tokenizer model, not a split)
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type"), split.get("behavior"), split.get("invert")) != ("Split", "Isolated", False) or \
            byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or \
            byte_level.get("add_prefix_space"):  # tokenizers' default use_regex (true) adds GPT-2's split after
        return None
    return _PRE_BY_SPLIT.get((split.get("pattern") or {}).get("Regex"))


def tokenizer_pre(tokenizer, given: str | None = None, data: dict[str, Any] | None = None) -> str:
    """llama.cpp's pre-tokenizer name for a `tokenizers.Tokenizer` (`data`: its tokenizer.json, when already
    read): the name given, else the fingerprint table's, else the one its split regex names. Any other tokenizer
    is refused, as llama.cpp's converter refuses it: llama.cpp's `default` splits digits and punctuation otherwise
    than most tokenizers."""
    if given:
        return given
    fingerprint = _fingerprint(tokenizer)
    pre = _PRE_BY_FINGERPRINT.get(fingerprint) or _pre_by_structure(
        data if data is not None else json.loads(tokenizer.to_str()))
    if pre is None:
        raise ModelError(f"this tokenizer is not in fnprune's table of llama.cpp pre-tokenizers (fingerprint "
                         f"{fingerprint[:16]}), and a wrong one makes llama.cpp split text otherwise than the model "
                         "was trained on: give llama.cpp's name for it with --tokenizer-pre NAME (for example "
                         "llama-bpe for Llama 3, qwen2 for Qwen2/2.5/3)")
    return pre


def _vocab(writer, ckpt: Checkpoint, pre: str | None) -> str:
    """The tokenizer as llama.cpp reads it: a byte-level BPE's vocabulary, merges, special ids and chat template
    (a SentencePiece-style tokenizer's: gguf_vocab); returns the `tokenizer.ggml.pre` written (`pre` if given)."""
    import gguf
    from tokenizers import Tokenizer

    file = ckpt.path / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"{ckpt.path} has no tokenizer.json: GGUF export needs the tokenizer")
    data = read_json_object(file, "a tokenizer", ModelError)
    try:  # what tokenizers itself refuses (no vocab or merges, a merge of unknown tokens): its message, one line
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ModelError(f"{file}: not a tokenizer the tokenizers library can read ({first_line(exc)})") from exc
    if is_sentencepiece(data):
        return write_sentencepiece_vocab(writer, ckpt, data, tokenizer, pre)
    decoder = json.dumps(data.get("decoder"))
    if data.get("model", {}).get("type") != "BPE" or "ByteLevel" not in decoder:
        raise ModelError("GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece-style BPE (byte "
                         "fallback, as Llama 2's) tokenizer.json only; this one is "
                         f"{data.get('model', {}).get('type')!r} with decoder {decoder[:60]}")
    n_vocab = int(ckpt.config["vocab_size"])
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    entries = [(tok, i, gguf.TokenType.NORMAL) for tok, i in data["model"]["vocab"].items()]
    entries += [(t["content"], t["id"], gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
                for t in data.get("added_tokens", [])]
    for tok, i, kind in entries:
        if i >= n_vocab:
            raise ModelError(f"token {tok!r} has id {i}, beyond the model's vocab_size {n_vocab}")
        tokens[i], types[i] = tok, kind
    pre = tokenizer_pre(tokenizer, pre, data)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(ckpt.path, load_merges=True, n_vocab=n_vocab)
    special.add_special_token = special_flags(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    return pre


def _tensor_plan(ckpt: Checkpoint, arch: str):
    """(gguf name, HF name, transform) for every tensor written; errors on a tensor llama.cpp has no name for."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, int(ckpt.config["num_hidden_layers"]))
    tied = bool(ckpt.config.get("tie_word_embeddings", False))
    n_head = int(ckpt.config["num_attention_heads"])
    n_kv = int(ckpt.config.get("num_key_value_heads") or n_head)
    for hf_name in ckpt.tensor_names():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"tensor {hf_name} has no llama.cpp name in architecture {arch!r}")
        heads = None
        if arch in _PERMUTED and ".q_proj." in hf_name:
            heads = n_head
        elif arch in _PERMUTED and ".k_proj." in hf_name:
            heads = n_kv
        yield target, hf_name, heads


def _as_float16(data: np.ndarray, name: str) -> np.ndarray:
    """float16 copy of a tensor, refused when a finite value turns into inf (bfloat16 reaches 3e38, float16
    65504): llama.cpp would compute with inf."""
    with np.errstate(over="ignore"):
        half = data.astype(np.float16)
    if (np.isinf(half) & np.isfinite(data)).any():
        raise ModelError(f"{name} holds values up to {float(np.abs(data[np.isfinite(data)]).max()):.3g}, beyond "
                         "float16's 65504: export with --outtype f32")
    return half


def _as_q8_0(data: np.ndarray, name: str) -> np.ndarray:
    """q8_0 blocks of a tensor, refused when a block's float16 scale (its largest |value| / 127) would be inf."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    largest = float(np.abs(data[np.isfinite(data)]).max(initial=0.0))
    if largest > 127 * float(np.finfo(np.float16).max):
        raise ModelError(f"{name} holds values up to {largest:.3g}: q8_0's float16 block scale cannot hold them "
                         "(above 127 x 65504); export with --outtype f32")
    return quantize(data, GGMLQuantizationType.Q8_0)


def _declare_tensors(writer, ckpt: Checkpoint, plan: dict[str, tuple[str, int | None]], outtype: str
                     ) -> dict[str, Any]:
    """Every planned tensor's name, shape, type and size, from the safetensors headers, before any data: the file
    is then written one tensor at a time (`_write_tensors`), never the whole model in memory. Returns each
    tensor's GGUF type."""
    import gguf

    types: dict[str, Any] = {}
    for hf_name, shape in ckpt.tensor_shapes().items():
        if hf_name not in plan:
            continue
        qtype = types[hf_name] = quant_type(plan[hf_name][0], tuple(shape), outtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0:  # declared as the quantized bytes, as add_tensor does
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(plan[hf_name][0], byte_shape, np.dtype(np.uint8), math.prod(byte_shape), qtype)
        else:
            dtype = np.dtype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
            writer.add_tensor_info(plan[hf_name][0], shape, dtype, math.prod(shape) * dtype.itemsize)
    return types


def _write_tensors(writer, ckpt: Checkpoint, plan: dict[str, tuple[str, int | None]], types: dict[str, Any],
                   progress: bool) -> None:
    """Every planned tensor, renamed, Q/K re-ordered where `plan` gives head counts, in the GGUF type `types`
    declared for it, written in the order `_declare_tensors` declared them."""
    import gguf

    with tqdm(total=len(plan), desc="writing", unit="tensor", disable=not progress) as bar:
        for hf_name, tensor in ckpt.tensors():
            if hf_name not in plan:
                continue
            target, heads = plan[hf_name]
            t = tensor.to(torch.float32)
            if heads is not None:
                t = permute_for_rope(t, heads)
            data = t.numpy()
            if types[hf_name] == gguf.GGMLQuantizationType.Q8_0:
                writer.write_tensor_data(_as_q8_0(data, hf_name))
            elif types[hf_name] == gguf.GGMLQuantizationType.F16:
                writer.write_tensor_data(_as_float16(data, hf_name))
            else:
                writer.write_tensor_data(data.astype(np.float32))
            bar.update()


def write_gguf(ckpt: Checkpoint, out: Path, *, outtype: str = "f16", arch: str = "auto",
               tokenizer_pre: str | None = None, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write `ckpt` as one GGUF file at `out` (through a temporary file renamed into place). `tokenizer_pre`:
    llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), for one fnprune cannot name."""
    try:
        import gguf
    except ImportError as exc:
        raise ModelError("GGUF export needs the gguf package: pip install 'fnprune[gguf]'") from exc
    if outtype not in OUTTYPES:
        raise ModelError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    arch = gguf_arch_for(ckpt, arch)
    _rope(ckpt.config)
    plan = {hf: (target, heads) for target, hf, heads in _tensor_plan(ckpt, arch)}
    with atomic_output_file(out, overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _hparams(writer, ckpt, arch, outtype)
        pre = _vocab(writer, ckpt, tokenizer_pre)
        types = _declare_tensors(writer, ckpt, plan, outtype)
        factors = llama3_rope_factors(ckpt.config) if _rope(ckpt.config)[1] == "llama3" else None
        if factors is not None:
            writer.add_tensor_info(_ROPE_FREQS, factors.shape, factors.dtype, factors.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, ckpt, plan, types, progress)
        if factors is not None:
            writer.write_tensor_data(factors)
        writer.close()
    return {"path": str(out), "format": "gguf", "arch": arch, "outtype": outtype, "tensors": len(plan),
            "widths": ckpt.widths, "tokenizer_pre": pre, "bytes": out.stat().st_size}
