"""GGUF export of SentencePiece-style tokenizers (Llama 2, TinyLlama, Mistral v0.1-v0.3): tokenizer.ggml.model
`llama`, read back three ways.

- `llama_spm.LlamaSpm`: llama.cpp's own SPM algorithm, in Python, from the GGUF metadata alone (scores, types,
  flags): its ids must be the tokenizer.json's (the `tokenizers` library) on every text.
- transformers' GGUF loader (`AutoTokenizer.from_pretrained(..., gguf_file=...)`), which rebuilds the merges from
  the scores: its ids must be the original folder's.
- llama.cpp itself (llama-cpp-python), opt-in: skipped where it is not installed.
The tiny tokenizer (tests/tiny.py `make_spm_tokenizer`) has Llama 2's layout: <unk> <s> </s>, 256 byte tokens,
merged pieces, single characters, a merge for every split; an added special `[INST]`, an added plain `<tool>`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from llama_spm import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, LlamaSpm
from test_export import _cli_error

from fnprune.export import export

gguf = pytest.importorskip("gguf")

CHAT = "{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}"
PAD_ROWS = 2  # embedding rows beyond the tokenizer (ids with no token: UNUSED)
ADDED = ("[INST]", "<tool>", "<unk>", "<s>", "</s>")
TEXTS = [
    "Review: a wonderful film, really moving\nSentiment: positive",
    " leading space", "   three leading spaces", "trailing   ", "several     spaces  inside", "",
    " ", "\n", "x", "digits 0 7 42 1234567 3.14 1,000,000", "punct!? (a) [b] {c} 'q' \"dq\" -- ... ;: @#$%^&*",
    "line one\nline two\n\n\tindented\r\nwindows", "unicode café naïve Ünïcödé Привет 你好世界 こんにちは 🦙🚀 ǂ",
    "\u2581literal \u2581 underbar", "[INST] asked <tool> used [INST]twice", "<s>bos inside</s> and <unk> too",
    "glued<tool>tool", "The movie was good. The film was bad. It is a film about a world.",
]


def _spm_checkpoint(dest: Path) -> Path:
    """A tiny Llama with the SentencePiece-style tokenizer, saved as a plain Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    tok = tiny.make_spm_tokenizer(dest, chat_template=CHAT)
    config = tiny.make_config("llama", tok.get_vocab_size() + PAD_ROWS)
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tiny._reinit(model, 0)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, its f32 GGUF export), built once."""
    ckpt = _spm_checkpoint(tmp_path_factory.mktemp("spm") / "ckpt")
    out = ckpt.parent / "m.gguf"
    export(ckpt, "gguf", out, outtype="f32", progress=False)
    return ckpt, out


def _field(reader, key):
    return reader.fields[key].contents()


def _hf(ckpt: Path, parse_special: bool = True):
    """The tokenizer.json as the tokenizers library reads it (control tokens kept whole or, not parsing
    specials, read as text; plain added tokens are always kept whole, as in llama.cpp)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.encode_special_tokens = not parse_special
    return tok


def test_the_gguf_holds_a_llama_cpp_sentencepiece_vocabulary(spm):
    """Tokens by id, types (byte, unknown, control, user-defined, unused padding), scores in merge order, special
    ids, add-bos/eos as the tokenizer does it, the space prefix and the chat template."""
    ckpt, out = spm
    data = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    reader = gguf.GGUFReader(out)
    assert _field(reader, "tokenizer.ggml.model") == "llama" and _field(reader, "tokenizer.ggml.pre") == "default"
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    n = len(data["model"]["vocab"]) + 2  # and the added [INST], <tool>
    assert len(tokens) == len(types) == len(scores) == n + PAD_ROWS == _field(reader, "llama.vocab_size")
    for text, i in data["model"]["vocab"].items():
        assert tokens[i] == text
    assert types[:3] == [UNKNOWN, CONTROL, CONTROL] and set(types[3:259]) == {BYTE} and tokens[3] == "<0x00>"
    assert set(types[259:n - 2]) == {NORMAL} and types[n - 2:] == [CONTROL, USER_DEFINED, UNUSED, UNUSED]
    assert tokens[n - 2:] == ["[INST]", "<tool>", f"[PAD{n}]", f"[PAD{n + 1}]"]
    ranks: dict[str, int] = {}
    for r, (left, right) in enumerate(m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]):
        ranks.setdefault(left + right, r)
    merged = sorted(ranks, key=ranks.get)  # scores fall with the first merge's rank, single characters lowest
    assert all(scores[tokens.index(a)] > scores[tokens.index(b)] for a, b in zip(merged, merged[1:]))
    single = [i for i in range(259, n - 2) if tokens[i] not in ranks]
    assert single and max(scores[i] for i in single) < min(scores[tokens.index(t)] for t in merged)
    assert [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == \
        [1, 2, 0, 2]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_eos_token") is False
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert _field(reader, "tokenizer.chat_template") == CHAT
    assert "tokenizer.ggml.merges" not in reader.fields


@pytest.mark.parametrize("parse_special", [True, False])
def test_llama_cpp_tokenizes_every_text_as_the_tokenizer_json_does(spm, parse_special):
    """llama.cpp's SPM algorithm on the GGUF gives the tokenizer.json's ids: spaces leading, repeated and
    trailing, digits, punctuation, newlines and tabs, characters outside the vocabulary (byte fallback), a
    literal '▁', added tokens; with and without BOS, parsing special tokens or reading them as text."""
    ckpt, out = spm
    hf, llama = _hf(ckpt, parse_special), LlamaSpm(out)
    for text in TEXTS:
        for add in (True, False):
            want = hf.encode(text, add_special_tokens=add).ids
            assert llama.encode(text, add_special=add, parse_special=parse_special) == want, (text, add)
    assert llama.encode("ǂ", add_special=False)[1:] == [3 + b for b in "ǂ".encode()]  # after '▁': <0xC7> <0x82>


def test_a_metaspace_tokenizer_json_as_transformers_5_saves_it(spm, tmp_path, caplog):
    """transformers 5 saves a Llama tokenizer with a Metaspace pre-tokenizer, which puts no '▁' before a text that
    starts with a space (nor, `first`, after an added token); llama.cpp always does. Those texts differ, as they do
    with llama.cpp's own converter, and export says so; every other text is tokenized alike."""
    ckpt = Path(shutil.copytree(spm[0], tmp_path / "ckpt"))
    data = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (ckpt / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level("WARNING", logger="fnprune"):
        export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32", progress=False)
    assert "puts no '▁' before a text that starts with a space or follows an added token" in caplog.text
    assert _field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.add_space_prefix") is True
    hf, llama = _hf(ckpt), LlamaSpm(tmp_path / "m.gguf")
    for text in TEXTS:
        if not text.startswith((" ", "\u2581")) and not any(t in text for t in ADDED):
            assert llama.encode(text) == hf.encode(text).ids, text
    for text, as_read in ((" leading space", "  leading space"), ("[INST]asked", "[INST] asked")):
        assert llama.encode(text) != hf.encode(text).ids and llama.encode(text) == hf.encode(as_read).ids


def test_transformers_reads_the_gguf_tokenizer_back(spm):
    """transformers' GGUF tokenizer (merges rebuilt from the scores, control and user-defined tokens from the
    types) gives the original folder's ids, with and without special tokens."""
    from transformers import AutoTokenizer

    ckpt, out = spm
    shutil.copy(out, ckpt / "m.gguf")
    try:
        original = AutoTokenizer.from_pretrained(ckpt)
        back = AutoTokenizer.from_pretrained(ckpt, gguf_file="m.gguf")
    finally:
        (ckpt / "m.gguf").unlink()
    for text in TEXTS:
        for add in (True, False):
            assert back.encode(text, add_special_tokens=add) == original.encode(text, add_special_tokens=add), text
    assert back.chat_template == CHAT


def test_the_model_in_the_gguf_gives_the_same_logits(spm):
    from transformers import AutoModelForCausalLM

    ckpt, out = spm
    ids = _hf(ckpt).encode(TEXTS[0]).ids
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits, atol=1e-4,
                                   rtol=1e-4)


def _with_tokenizer(spm, dest: Path, edit) -> str:
    """A copy of the checkpoint whose tokenizer.json `edit(data)` changed."""
    ckpt = Path(shutil.copytree(spm[0], dest))
    data = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (ckpt / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return str(ckpt)


def _set(path: str, value):
    def edit(data):
        *parents, key = path.split(".")
        node = data
        for p in parents:
            node = node[p] if not p.isdigit() else node[int(p)]
        node[key] = value
    return edit


def test_what_llama_cpp_cannot_tokenize_alike_is_refused_in_one_line(spm, tmp_path):
    """Each tokenizer.json llama.cpp's SentencePiece tokenizer would read otherwise, refused in one line before
    anything is written: the reason, and why llama.cpp differs."""
    n = len(json.loads((spm[0] / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]) + 2
    nfkc = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Prepend", "prepend": "\u2581"}]}
    split = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    cases = {
        "unigram": (_set("model", {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]],
                                   "byte_fallback": True}), "'Unigram'"),
        "no-fallback": (_set("model.byte_fallback", False), "SentencePiece-style BPE (byte fallback"),
        "nfkc": (_set("normalizer", nfkc), "normalizes text with 'NFKC'"),
        "spaces": (_set("normalizer", None), "keeps spaces as spaces"),
        "split": (lambda d: (_set("normalizer", None)(d), _set("pre_tokenizer", split)(d)),
                  "token '▁▁' has a '▁' inside"),
        "bytes": (lambda d: d["model"]["vocab"].pop("<0x41>"), "has no <0x41> token (1 of the 256"),
        "ignore-merges": (_set("model.ignore_merges", True), "sets ignore_merges"),
        "lstrip": (_set("added_tokens.3.lstrip", True), "added token '[INST]' strips spaces"),
        "normalized": (_set("added_tokens.4.normalized", True), "added token '<tool>' is matched in the normalized"),
        "twice": (_set("added_tokens.4.content", f"[PAD{n + 1}]"), f"is both id {n - 1} and id {n + 1}"),
    }
    for name, (edit, message) in cases.items():
        ckpt = _with_tokenizer(spm, tmp_path / name, edit)
        msg = _cli_error(ckpt, "--format", "gguf", "--output", str(tmp_path / f"{name}.gguf"))
        assert message in msg, (name, msg)
    msg = _cli_error(str(spm[0]), "--format", "gguf", "--tokenizer-pre", "llama-bpe", "--output",
                     str(tmp_path / "pre.gguf"))
    assert "SentencePiece-style tokenizer is not split (leave the flag out)" in msg
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_a_tokenizer_missing_merges_llama_cpp_would_make_is_exported_with_a_note(spm, tmp_path, caplog):
    """A trained (not SentencePiece-converted) tokenizer.json may lack a merge joining two of its tokens into a
    third: llama.cpp, which joins any two whose text is a token, may then split a text otherwise. Export says so,
    as a note: byte-fallback BPE tokenizers the tokenizers library trained (600 to 8000 tokens) tokenized held-out
    wikitext-2 lines alike in llama.cpp's algorithm."""
    def drop_last_merge(data):
        data["model"]["merges"] = data["model"]["merges"][:-1]

    ckpt = _with_tokenizer(spm, tmp_path / "ckpt", drop_last_merge)
    with caplog.at_level("INFO", logger="fnprune"):
        export(Path(ckpt), "gguf", tmp_path / "m.gguf", outtype="f32", progress=False)
    assert "1 tokens of tokenizer.json (such as '\u2581\u2581\u2581\u2581') can also be joined from two tokens it " \
        "has no merge for" in caplog.text


def test_llama_cpp_itself_tokenizes_like_the_tokenizer(spm):
    """When llama-cpp-python is installed: llama.cpp's own tokenizer on the GGUF gives the tokenizer.json's ids
    and the model its logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (build it from source)")
    from transformers import AutoModelForCausalLM

    ckpt, out = spm
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    for parse_special in (True, False):
        hf = _hf(ckpt, parse_special)
        for text in TEXTS:
            for add in (True, False):
                got = llm.tokenize(text.encode("utf-8"), add_bos=add, special=parse_special)
                assert got == hf.encode(text, add_special_tokens=add).ids, (text, add, parse_special)
    ids = _hf(ckpt).encode(TEXTS[0]).ids
    llm.eval(ids)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)], dtype=np.float32), ref, atol=1e-4, rtol=0)
