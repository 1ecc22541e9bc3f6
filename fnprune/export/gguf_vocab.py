"""SentencePiece-style vocabularies (Llama 2, TinyLlama, Mistral v0.1-v0.3) for llama.cpp's `llama` tokenizer.

Such a tokenizer.json is a BPE model with `byte_fallback` over text whose spaces became "▁" (by its normalizer or
a Metaspace pre-tokenizer), with one "▁" put in front. llama.cpp's SPM tokenizer rebuilds that from the GGUF alone:
it adds the front space (`add_space_prefix`), turns spaces into "▁", then keeps merging the adjacent pair whose
joined text is the best-scored token (the leftmost on a tie) and spells whatever is no token as <0xXX> byte
tokens. It has no merge list, so the scores carry tokenizer.json's merge order: a token scores minus the rank of
the first merge that builds it. llama.cpp's converter reads real scores from tokenizer.model with sentencepiece,
which a transformers 5 folder no longer has; its tokenizer.json fallback (gguf-py's `LlamaHfVocab`) scores every
token -1000, which leaves the merge order to position. Token types, special ids and add-bos/eos follow the
converter's `_create_vocab_sentencepiece` and `SpecialVocab`, except the special tokens: the converter gives
every added token CONTROL and -1000 (unknown included), fnprune gives control and unknown tokens sentencepiece's
score 0 and the unknown token its UNKNOWN type, as sentencepiece's own model has them (no text builds them, so
tokenization is the same either way).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from ..errors import ModelError
from . import Checkpoint

__all__ = ["is_sentencepiece", "special_flags", "space_prefix", "sentencepiece_table", "write_sentencepiece_vocab"]

log = logging.getLogger("fnprune")

SPACE = "\u2581"  # SentencePiece's visible space
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")
_BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
_SCORE_CONTROL = 0.0  # SentencePiece's score of its control, unknown and byte pieces
_SCORE_ADDED = -1000.0  # llama.cpp's converter's score of an added (user-defined or special) token
_SCORE_UNUSED = -10000.0  # llama.cpp's converter's score of an id no token has
_PREPEND = {"type": "Prepend", "prepend": SPACE}
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}


def is_sentencepiece(data: dict[str, Any]) -> bool:
    """A BPE tokenizer.json that spells unknown characters as <0xXX> byte tokens: SentencePiece's BPE, as the Llama
    2 family's converted tokenizers are (a byte-level BPE needs no byte fallback, and keeps its own path)."""
    model = data.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(data.get("decoder"))
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level


def special_flags(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer adds a BOS / EOS token, as its post-processor does it (not as a config claims)."""
    plain, marked = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    return {"bos": marked[:1] != plain[:1], "eos": marked[-1:] != plain[-1:]}


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as its list of steps (a Sequence flattened; none: no step)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key) or [] for step in _steps(child, key)]
    return [node]


def space_prefix(data: dict[str, Any], vocab: Iterable[str]) -> tuple[bool, str | None]:
    """llama.cpp's `add_space_prefix` for tokenizer.json's space handling, and what llama.cpp will do otherwise
    than it (None: nothing). llama.cpp turns every space into "▁" and, with the flag, puts one "▁" before each text
    and after each added token, as a Prepend normalizer does; Metaspace skips a text that starts with "▁" already
    (and, `first`, all but the first). Anything else that changes text is refused."""
    norms = _steps(data.get("normalizer"), "normalizers")
    for step in norms:
        if step not in (_PREPEND, _REPLACE):
            raise ModelError(f"tokenizer.json normalizes text with {step.get('type')!r}; llama.cpp's SentencePiece "
                             "tokenizer only turns spaces into '▁' and puts one in front: not exportable to GGUF")
    pres = _steps(data.get("pre_tokenizer"), "pretokenizers")
    if len(pres) > 1 or (pres and (pres[0].get("type"), pres[0].get("replacement")) != ("Metaspace", SPACE)):
        raise ModelError(f"tokenizer.json pre-tokenizer {[p.get('type') for p in pres]} is not a Metaspace with '▁': "
                         "llama.cpp's SentencePiece tokenizer does not split text: not exportable to GGUF")
    meta = pres[0] if pres else None
    if _REPLACE not in norms and meta is None:
        raise ModelError("tokenizer.json keeps spaces as spaces (no Replace ' ' -> '▁' normalizer, no Metaspace): "
                         "llama.cpp's SentencePiece tokenizer turns them into '▁': not exportable to GGUF")
    if meta is not None and meta.get("split", True):
        inner = next((t for t in vocab if SPACE in t[1:]), None)
        if inner is not None:
            raise ModelError(f"tokenizer.json's Metaspace splits words at '▁' but token {inner!r} has a '▁' "
                             "inside: llama.cpp, which does not split words, would build it: not exportable to GGUF")
    if _PREPEND in norms:
        return True, None
    scheme = (meta or {}).get("prepend_scheme") or ("always" if (meta or {}).get("add_prefix_space", True) else
                                                    "never")
    if meta is None or scheme == "never":
        return False, None
    skipped = "a text that starts with a space" + (" or follows an added token" if scheme == "first" else "")
    return True, (f"tokenizer.json's Metaspace (prepend_scheme {scheme}) puts no '▁' before {skipped}; llama.cpp "
                  "puts one before every text (as with llama.cpp's own converter), so such a prompt tokenizes "
                  "otherwise there")


def _check_model(model: dict[str, Any]) -> None:
    """Refuse BPE options llama.cpp's merge-by-score has no counterpart for."""
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ModelError(f"tokenizer.json's BPE has {key} {model[key]!r}; llama.cpp's SentencePiece tokenizer "
                             "has none: not exportable to GGUF")
    if model.get("dropout") or model.get("ignore_merges"):
        which = "dropout" if model.get("dropout") else "ignore_merges"
        raise ModelError(f"tokenizer.json's BPE sets {which}; llama.cpp's SentencePiece tokenizer only merges by "
                         "score: not exportable to GGUF")
    missing = [p for p in _BYTE_PIECES if p not in model["vocab"]]
    if missing:
        raise ModelError(f"tokenizer.json falls back to bytes but has no {missing[0]} token ({len(missing)} of the "
                         "256 byte tokens missing): llama.cpp needs all 256 to spell unknown characters")


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges") or []]


def _unmerged(vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[str]:
    """Tokens llama.cpp can build from two adjacent tokens tokenizer.json has no merge of (so Hugging Face never
    joins them): a tokenizer converted from a SentencePiece model has every such merge, a trained one may not."""
    pairs = set(merges)
    return [t for t in vocab if not _BYTE.fullmatch(t) and any(
        t[:k] in vocab and t[k:] in vocab and (t[:k], t[k:]) not in pairs for k in range(1, len(t)))]


def sentencepiece_table(data: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Every id's token text, score and llama.cpp token type. Merged tokens score minus their first merge's rank;
    tokens no merge builds (single characters) come after them in id order, as SentencePiece ranks them; byte,
    unknown and special tokens score 0 as in sentencepiece (llama.cpp's converter: -1000 for the special ones; no
    text builds them), other added ones -1000 as in the converter; an id no token has is an UNUSED `[PADn]`."""
    import gguf

    model = data["model"]
    merges = _merges(model)
    rank: dict[str, int] = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores, types = [_SCORE_UNUSED] * n_vocab, [int(gguf.TokenType.UNUSED)] * n_vocab

    def put(text: str, i: int, score: float, kind: int) -> None:
        if i >= n_vocab:
            raise ModelError(f"token {text!r} has id {i}, beyond the model's vocab_size {n_vocab}")
        tokens[i], scores[i], types[i] = text, score, int(kind)

    for text, i in model["vocab"].items():
        if _BYTE.fullmatch(text):
            put(text, i, _SCORE_CONTROL, gguf.TokenType.BYTE)
        else:
            put(text, i, -float(rank[text] if text in rank else len(merges) + i), gguf.TokenType.NORMAL)
    for added in data.get("added_tokens") or []:
        if any(added.get(k) for k in ("lstrip", "rstrip", "single_word")):
            raise ModelError(f"added token {added['content']!r} strips spaces or matches whole words only; "
                             "llama.cpp matches added tokens as they are: not exportable to GGUF")
        if added.get("normalized") and not added.get("special"):  # transformers' add_tokens() default
            raise ModelError(f"added token {added['content']!r} is matched in the normalized text (normalized: "
                             "true); llama.cpp matches added tokens in the raw text, so texts around it tokenize "
                             "otherwise there: not exportable to GGUF")
        if added.get("special"):
            put(added["content"], added["id"], _SCORE_CONTROL, gguf.TokenType.CONTROL)
        else:  # llama.cpp matches it in the text before spaces become "▁" (the converter's pre-normalizing)
            put(added["content"].replace(SPACE, " "), added["id"], _SCORE_ADDED, gguf.TokenType.USER_DEFINED)
    unk = model["vocab"].get(model.get("unk_token"))
    if unk is not None:
        put(tokens[unk], unk, _SCORE_CONTROL, gguf.TokenType.UNKNOWN)
    return tokens, scores, types


def _check_unique(tokens: list[str]) -> None:
    """llama.cpp maps each text to one id and refuses a vocabulary with a text twice."""
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in seen:
            raise ModelError(f"token {text!r} is both id {seen[text]} and id {i}: llama.cpp refuses a vocabulary "
                             "with a token twice")
        seen[text] = i


def _special_vocab(ckpt: Checkpoint, n_vocab: int):
    """gguf's SpecialVocab (special ids, chat template) without its warning about Llama's pair template
    (`<s> $A <s> $B`): the add-bos/eos flags it would read from that template come from encoding instead."""
    import gguf

    gguf_log = logging.getLogger("gguf.vocab")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(ckpt.path, n_vocab=n_vocab)
    finally:
        gguf_log.setLevel(level)


def write_sentencepiece_vocab(writer, ckpt: Checkpoint, data: dict[str, Any], tokenizer, pre: str | None) -> str:
    """Tokens, scores, types, special ids, add-bos/eos, add_space_prefix and chat template of a SentencePiece-style
    tokenizer.json (tokenizer.ggml.model `llama`); returns its `tokenizer.ggml.pre`, `default` as llama.cpp's
    converter writes it (llama.cpp splits no SentencePiece text)."""
    if pre:
        raise ModelError(f"--tokenizer-pre {pre}: names how llama.cpp splits text before byte-level BPE; this "
                         "SentencePiece-style tokenizer is not split (leave the flag out)")
    model = data["model"]
    _check_model(model)
    add_prefix, caveat = space_prefix(data, model["vocab"])
    n_vocab = int(ckpt.config["vocab_size"])
    tokens, scores, types = sentencepiece_table(data, n_vocab)
    _check_unique(tokens)
    unmerged = _unmerged(model["vocab"], _merges(model))
    if unmerged:  # a trained tokenizer's; none seen tokenize otherwise, so a note rather than a warning
        log.info("%d tokens of tokenizer.json (such as %r) can also be joined from two tokens it has no merge for "
                 "(a trained, not SentencePiece-converted tokenizer): llama.cpp joins any two tokens whose text is "
                 "a token, so a rare text may tokenize otherwise there", len(unmerged), unmerged[0])
    if caveat:
        log.warning(caveat)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_prefix)
    special = _special_vocab(ckpt, n_vocab)
    unk = model["vocab"].get(model.get("unk_token"))
    if unk is not None:
        special.special_token_ids.setdefault("unk", unk)
    special.add_special_token = special_flags(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    return "default"
