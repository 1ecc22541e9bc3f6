"""Tiny, deterministic, offline stand-ins for the real thing: a byte-level BPE tokenizer (and a Llama 2-style
SentencePiece one), small random causal LMs of ten architectures and a GLUE-style SST-2 task, all built locally in
a few seconds.

Plain module (no fixtures): conftest.py calls ``make_tokenizer``, ``make_model`` and ``make_task_data``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

__all__ = [
    "ARCHITECTURES",
    "EOS",
    "EOS_ID",
    "MAX_POSITIONS",
    "NEGATIVE",
    "POSITIVE",
    "VOCAB_SIZE",
    "GGUF_ARCH",
    "make_config",
    "make_gguf",
    "make_model",
    "make_spm_tokenizer",
    "make_task_data",
    "make_tokenizer",
]

EOS = "<|endoftext|>"
EOS_ID = 0  # the only special token, so trained first: bos = eos = unk = 0
VOCAB_SIZE = 384  # len(tokenizer), asserted; a prompt with one review then fits in <= 37 tokens
MAX_POSITIONS = 128

POSITIVE = ["wonderful", "moving", "brilliant", "charming", "delightful", "funny", "beautiful", "great",
            "touching", "clever", "superb", "engaging", "warm", "fresh", "smart", "gorgeous"]
NEGATIVE = ["dull", "boring", "mess", "tedious", "awful", "bland", "clumsy", "lifeless", "stupid", "bad",
            "predictable", "tiresome", "ugly", "pointless", "flat", "lame"]
FILLERS = ["film", "movie", "story", "acting", "plot", "cast", "script", "director", "and", "with", "is",
           "was", "really", "very", "quite", "a", "the", "this", "its", ",", "of", "but", "performances"]
OPENERS = ["a", "the", "this", "one", "its"]


def _sentence(rng: random.Random, label: int) -> str:
    """A lowercase, space-tokenised SST-2-like sentence of 3 to 15 words, 1-3 of them carrying ``label``."""
    n = rng.randint(3, 15)
    cues = POSITIVE if label else NEGATIVE
    words = [rng.choice(FILLERS) for _ in range(n - 1)]
    for _ in range(rng.randint(1, min(3, n - 1))):
        words[rng.randrange(n - 1)] = rng.choice(cues)
    return " ".join([rng.choice(OPENERS)] + words)


def _corpus() -> list[str]:
    """Fixed prompt-shaped training text; the labels are frequent enough to become single BPE tokens."""
    rng = random.Random(1234)
    lines = []
    for i in range(400):
        label = i % 2
        lines.append(f"Review: {_sentence(rng, label)}\nSentiment: {'positive' if label else 'negative'}\n")
    lines += ["positive negative " * 40, "The movie was good. The film was bad. It is a film about a world."]
    return lines


def make_tokenizer(dest: Path) -> PreTrainedTokenizerFast:
    """Train a 384-token byte-level BPE on a fixed corpus, save it to ``dest`` and return it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    assert len(fast) == VOCAB_SIZE and fast.convert_tokens_to_ids(EOS) == EOS_ID, len(fast)
    for word in (" positive", " negative"):
        assert len(fast.encode(word, add_special_tokens=False)) == 1, word
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return fast


SPACE = "\u2581"  # SentencePiece's visible space
SPM_SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama 2; then the 256 <0xXX> byte tokens


def make_spm_tokenizer(dest: Path, chat_template: str | None = None) -> Tokenizer:
    """A tokenizer.json in the shape of Llama 2's (as transformers converted its tokenizer.model): BPE with byte
    fallback, a Prepend + Replace normalizer, <unk> <s> </s>, the 256 byte tokens, merged pieces in merge order,
    single characters, Llama's whitespace-run pieces last, and a merge for every way to join two pieces into a
    third, ranked by that third's id (SentencePiece's score). Plus an added special token `[INST]` and an added
    plain one `<tool>`. Saved to ``dest`` as transformers saves a LlamaTokenizerFast (pad = </s>)."""
    from transformers import LlamaTokenizerFast

    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=320, show_progress=False))
    trained = trainer.get_vocab(with_added_tokens=False)
    pieces = SPM_SPECIAL + [f"<0x{b:02X}>" for b in range(256)]
    for token in sorted(trained, key=trained.get):  # merged pieces in the order they were learned
        if len(token) > 1:
            pieces.append(token)
    pieces += sorted(c for c in trained if len(c) == 1) + [SPACE * 2, SPACE * 4]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = sorted(((p[:k], p[k:]) for p in pieces for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab),
                    key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPM_SPECIAL + ["[INST]"]])
    tok.add_tokens([AddedToken("<tool>", normalized=False, special=False)])
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="</s>", legacy=False)
    fast.chat_template = chat_template
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return tok


def _common(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=None)


def _llama_like(model_type: str, **extra: object) -> Callable[[int], PretrainedConfig]:
    def build(vocab_size: int) -> PretrainedConfig:
        kw: dict = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
                        tie_word_embeddings=False)
        return AutoConfig.for_model(model_type, **{**kw, **_common(vocab_size), **extra})

    return build


def _gpt2(vocab_size: int) -> PretrainedConfig:
    return AutoConfig.for_model("gpt2", n_embd=64, n_inner=128, n_layer=2, n_head=4,
                                n_positions=MAX_POSITIONS, **_common(vocab_size))


def _opt(vocab_size: int) -> PretrainedConfig:
    return AutoConfig.for_model("opt", hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=MAX_POSITIONS, **_common(vocab_size))


def _gpt_neox(vocab_size: int) -> PretrainedConfig:
    return AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=MAX_POSITIONS,
                                **_common(vocab_size))


def _falcon(vocab_size: int) -> PretrainedConfig:
    return AutoConfig.for_model("falcon", hidden_size=64, ffn_hidden_size=128, num_hidden_layers=2,
                                num_attention_heads=4, new_decoder_architecture=False, multi_query=True,
                                bias=True, max_position_embeddings=MAX_POSITIONS, **_common(vocab_size))


def _encoder(model_type: str, **sizes: object) -> Callable[[int], PretrainedConfig]:
    """A tiny *ForSequenceClassification encoder (2 labels) of `model_type`."""

    def build(vocab_size: int) -> PretrainedConfig:
        kw = dict(vocab_size=vocab_size, num_labels=2, pad_token_id=EOS_ID, architectures=[ENCODER_HEADS[model_type]])
        return AutoConfig.for_model(model_type, **{**kw, **sizes})

    return build


ENCODER_HEADS = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                 "distilbert": "DistilBertForSequenceClassification"}
_BERT_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_POSITIONS + 2)

# model_type -> (vocab_size -> tiny config). Intermediate sizes are 128 (divisible by 16) everywhere.
ARCHITECTURES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": _llama_like("llama", tie_word_embeddings=True),
    "mistral": _llama_like("mistral", sliding_window=None),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "phi3": _llama_like("phi3"),
    "gemma": _llama_like("gemma", tie_word_embeddings=True),
    "gemma2": _llama_like("gemma2", tie_word_embeddings=True, sliding_window=64,
                          query_pre_attn_scalar=16, attn_implementation="eager"),
    "gemma3_text": _llama_like("gemma3_text", tie_word_embeddings=True, sliding_window=64,
                               query_pre_attn_scalar=16, attn_implementation="eager"),
    "falcon": _falcon,
    "bert": _encoder("bert", **_BERT_SIZES),
    "roberta": _encoder("roberta", **_BERT_SIZES),
    "distilbert": _encoder("distilbert", dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                           max_position_embeddings=MAX_POSITIONS),
}


def make_config(model_type: str, vocab_size: int = VOCAB_SIZE) -> PretrainedConfig:
    return ARCHITECTURES[model_type](vocab_size)


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Replace the near-degenerate default init by N(0, 0.15) weights, small biases and norm gains near
    their default (1, or 0 for Gemma's ``1 + w`` RMSNorm) so activations and logits vary with the input."""
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()  # tied parameters are visited once
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if is_norm:
                p.add_(0.02 * noise)
            elif name.endswith("bias") or p.ndim == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.15 * noise)


def make_model(model_type: str, dest: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """Build a tiny random ``model_type`` causal LM for ``tokenizer``, save it (safetensors) with the
    tokenizer to ``dest`` and return ``dest``."""
    torch.manual_seed(seed)
    config = make_config(model_type, len(tokenizer))
    auto = AutoModelForSequenceClassification if model_type in ENCODER_HEADS else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    _reinit(model, seed)
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_task_data(dest: Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> Path:
    """Write balanced, disjoint GLUE-style SST-2 ``train.tsv`` and ``dev.tsv`` (``sentence\\tlabel``)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    while len(rows) < n_train + n_dev:
        label = len(rows) % 2
        sentence = _sentence(rng, label)
        if sentence not in seen:
            seen.add(sentence)
            rows.append((sentence, label))
    dest.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", rows[:n_train]), ("dev.tsv", rows[n_train:])):
        rng.shuffle(part)
        text = "".join(f"{s}\t{y}\n" for s, y in part)
        (dest / name).write_text("sentence\tlabel\n" + text, encoding="utf-8")
    return dest


GGUF_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2"}  # tiny architectures make_gguf can write


def _llama_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf q/k row order, which transformers' GGUF loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(model_dir: Path, dest: Path, qtype: str = "F32") -> Path:
    """Write the tiny model saved in ``model_dir`` (a ``GGUF_ARCH`` type) and its byte-level BPE tokenizer as a
    GGUF file, 2-D weights in ``qtype`` (F32, F16, Q8_0, ...; quantized with gguf.quants), norms in F32."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[cfg["model_type"]])
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny-{cfg['model_type']}")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e4)))
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_vocab_size(cfg["vocab_size"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(EOS_ID)
    writer.add_eos_token_id(EOS_ID)
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for key, array in load_file(str(model_dir / "model.safetensors")).items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if cfg["model_type"] == "llama" and ".attn_q." in name:
            array = _llama_permute(array, cfg["num_attention_heads"])
        elif cfg["model_type"] == "llama" and ".attn_k." in name:
            array = _llama_permute(array, cfg["num_key_value_heads"])
        if array.ndim < 2 or quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
