"""Does llama.cpp tokenize a `fnprune export --format gguf` file as the checkpoint's own tokenizer does?

A tiny random Llama is saved with the given tokenizer (a folder `AutoTokenizer` loads, e.g. one holding Llama 2's
tokenizer.model), exported by fnprune's own exporter, and llama.cpp's tokenizer on the GGUF (llama-cpp-python,
vocabulary only) is compared with the saved folder's tokenizer, and with sentencepiece when the folder has a
tokenizer.model, on the lines of a text file: as they are, and with leading spaces stripped.

    python -m evaluation.gguf_tokenizer_check --tokenizer DIR --texts ../shared/data/wikitext-2-raw/wiki.test.raw \
        --lines 2000 --out-prefix evaluation/results/gguf_tokenizer_llama2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from evaluation.tables import with_extension, write_file
from fnprune.export import export


def _checkpoint(tokenizer_dir: Path, folder: Path):
    """A 2-layer random Llama with the tokenizer's vocabulary, saved with that tokenizer as transformers saves it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)  # as a user of the checkpoint loads it


def _lines(path: Path, n: int) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [line for line in text.split("\n") if line.strip()][:n]


def compare(tokenizer_dir: Path, texts: list[str]) -> dict:
    """Matches of llama.cpp's ids with the folder tokenizer's (and sentencepiece's) per text variant."""
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        tok = _checkpoint(tokenizer_dir, ckpt)
        info = export(ckpt, "gguf", Path(tmp) / "m.gguf", outtype="f32", progress=False)
        llm = Llama(str(Path(tmp) / "m.gguf"), vocab_only=True, verbose=False)
        sp = None
        if (tokenizer_dir / "tokenizer.model").is_file():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        rows, examples = {}, []
        for variant, items in (("as is", texts), ("leading spaces stripped", [t.lstrip() for t in texts])):
            same_hf = same_sp = 0
            for text in items:
                ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                hf = tok(text)["input_ids"]
                same_hf += ours == hf
                if sp is not None:
                    same_sp += ours == [sp.bos_id(), *sp.encode(text)]
                if ours != hf and len(examples) < 3:
                    examples.append({"variant": variant, "text": text[:60], "llama_cpp": ours[:12], "hf": hf[:12]})
            rows[variant] = {"texts": len(items), "same_as_tokenizer": same_hf,
                             "same_as_sentencepiece": same_sp if sp is not None else None}
        return {"export": {k: info.get(k) for k in ("arch", "tokenizer_pre")}, "rows": rows, "examples": examples,
                "tokenizer_json_pre_tokenizer": json.loads((ckpt / "tokenizer.json").read_text())["pre_tokenizer"],
                "tokenizer_json_normalizer": json.loads((ckpt / "tokenizer.json").read_text())["normalizer"]}


def markdown(result: dict, command: str) -> str:
    lines = [f"`{command}`", "", f"export: {result['export']}; the saved tokenizer.json's pre-tokenizer "
             f"{json.dumps(result['tokenizer_json_pre_tokenizer'])}, normalizer "
             f"{json.dumps(result['tokenizer_json_normalizer'])}", "",
             "| texts | n | llama.cpp = the folder's tokenizer | llama.cpp = sentencepiece |", "|---|---|---|---|"]
    for variant, r in result["rows"].items():
        sp = "" if r["same_as_sentencepiece"] is None else r["same_as_sentencepiece"]
        lines.append(f"| {variant} | {r['texts']} | {r['same_as_tokenizer']} | {sp} |")
    for e in result["examples"]:
        lines.append(f"\n- {e['variant']}: {e['text']!r}: llama.cpp {e['llama_cpp']} ..., tokenizer {e['hf']} ...")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="A folder AutoTokenizer loads (tokenizer.model or .json).")
    ap.add_argument("--texts", required=True, help="A text file; its non-empty lines are tokenized.")
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--out-prefix", required=True, help="Results go to PREFIX.json and PREFIX.md.")
    args = ap.parse_args(argv)
    result = compare(Path(args.tokenizer).expanduser(), _lines(Path(args.texts).expanduser(), args.lines))
    command = "python -m evaluation.gguf_tokenizer_check " + shlex.join(sys.argv[1:] if argv is None else argv)
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_file(with_extension(prefix, ".json"), json.dumps({"command": command, **result}, indent=2) + "\n")
    write_file(with_extension(prefix, ".md"), markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
