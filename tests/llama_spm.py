"""llama.cpp's SentencePiece (`llama`) tokenizer in Python, from a GGUF file's metadata alone, to check fnprune's
GGUF vocabularies where llama-cpp-python is not installed.

A plain re-statement of llama.cpp's src/llama-vocab.cpp (`tokenizer_st_partition`, the SPM branch of
`llama_vocab::impl::tokenize`, `llm_tokenizer_spm_session`, `byte_to_token`): added tokens are cut out of the text
first (control and unknown ones only when parsing specials), longest first; each remaining piece gets a leading
space when `add_space_prefix` is set and it starts the text or follows a cut-out token, its spaces become "▁", then
the adjacent pair whose joined text is the best-scored token is merged (the leftmost on a tie) until none is left;
a piece that is no token is spelled as <0xXX> byte tokens.
"""

from __future__ import annotations

import heapq
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class LlamaSpm:
    def __init__(self, gguf_file: Path):
        import gguf

        reader = gguf.GGUFReader(gguf_file)
        field = lambda key, default=None: (reader.fields[key].contents() if key in reader.fields  # noqa: E731
                                           else default)
        assert field("tokenizer.ggml.model") == "llama"
        self.tokens: list[str] = field("tokenizer.ggml.tokens")
        self.scores: list[float] = field("tokenizer.ggml.scores")
        self.types: list[int] = field("tokenizer.ggml.token_type")
        assert len(set(self.tokens)) == len(self.tokens)  # llama.cpp asserts one id per text
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.bos, self.eos = field("tokenizer.ggml.bos_token_id", 1), field("tokenizer.ggml.eos_token_id", 2)
        self.add_bos, self.add_eos = field("tokenizer.ggml.add_bos_token", True), field("tokenizer.ggml.add_eos_token",
                                                                                        False)
        self.add_space_prefix = field("tokenizer.ggml.add_space_prefix", True)
        specials = [i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        self.specials = sorted(specials, key=lambda i: -len(self.tokens[i].encode()))

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        parts: list[str | int] = [text] if text else []
        for i in self.specials:
            if not parse_special and self.types[i] in (CONTROL, UNKNOWN):
                continue
            piece, out = self.tokens[i], []
            for part in parts:
                if isinstance(part, int):
                    out.append(part)
                    continue
                chunks = part.split(piece)
                for k, chunk in enumerate(chunks):
                    if k:
                        out.append(i)
                    if chunk:
                        out.append(chunk)
            parts = out
        return parts

    def _byte(self, b: int) -> int:
        return self.ids.get(f"<0x{b:02X}>", self.ids.get(chr(b)))

    def _spm(self, text: str) -> list[int]:
        """llm_tokenizer_spm_session::tokenize: merge the best-scored adjacent pair, leftmost first."""
        syms = list(text)  # one symbol per character (llama.cpp: per UTF-8 sequence)
        nxt, prv = list(range(1, len(syms))) + [-1], list(range(-1, len(syms) - 1))
        queue: list[tuple[float, int, int, str]] = []

        def bigram(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            joined = syms[left] + syms[right]
            if joined in self.ids:
                heapq.heappush(queue, (-self.scores[self.ids[joined]], left, right, joined))

        for i in range(1, len(syms)):
            bigram(i - 1, i)
        while queue:
            _, left, right, joined = heapq.heappop(queue)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != joined:
                continue
            syms[left], syms[right] = joined, ""
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prv[nxt[right]] = left
            bigram(prv[left], left)
            bigram(left, nxt[left])
        out, i = [], 0 if syms else -1
        while i != -1:
            piece = syms[i]
            out.extend([self.ids[piece]] if piece in self.ids else [self._byte(b) for b in piece.encode()])
            i = nxt[i]
        return out

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        out = [self.bos] if add_special and self.add_bos else []
        prev_special = True
        for part in self._partition(text, parse_special):
            if isinstance(part, int):
                out.append(part)
                prev_special = True
                continue
            piece = (" " if self.add_space_prefix and prev_special else "") + part
            out.extend(self._spm(piece.replace(" ", "\u2581")))
            prev_special = False
        return out + ([self.eos] if add_special and self.add_eos else [])
