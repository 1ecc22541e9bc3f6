"""Token-level WikiText-2 perplexity over non-overlapping windows of a fixed prefix of the test text: a
general-ability check beside the task (a model pruned for one task should not forget how to write)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .offload import input_device

__all__ = ["PerplexityResult", "wikitext_file", "wikitext_ids", "perplexity"]

WIKITEXT_FILE = "wiki.test.raw"


@dataclass
class PerplexityResult:
    ppl: float  # exp(mean next-token NLL) over tokens of the model's own tokenizer (not word-level)
    tokens_scored: int
    seconds: float


def wikitext_file(path: str | Path) -> Path:
    """The raw test file: `path` itself, or wiki.test.raw inside the folder `path`."""
    p = Path(path).expanduser()
    p = (p / WIKITEXT_FILE if p.is_dir() else p).resolve()
    if not p.is_file():
        raise DataError(f"WikiText file not found: {p}")
    return p


def wikitext_ids(tokenizer, path: Path, n_tokens: int) -> torch.Tensor:
    """First `n_tokens` token ids of the WikiText-2 raw test text, its non-empty lines joined with one blank line
    between them. The local copy has no empty lines (and CRLF ends; see its PROVENANCE.md), so this is not
    byte for byte the `"\n\n".join(dataset["text"])` of the Hub dataset (whose rows end in a newline and
    include the empty ones) that published perplexities use."""
    try:
        text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the WikiText text ({exc})") from exc
    lines = [line for line in text.split("\n") if line.strip()]
    ids = tokenizer("\n\n".join(lines), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise DataError(f"{path} has only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 4) -> PerplexityResult:
    """Perplexity of `ids` cut into non-overlapping windows; each window's first token is context only."""
    start = time.perf_counter()
    n_win = ids.numel() // window
    if n_win < 1:
        raise DataError(f"{ids.numel()} tokens do not fill one window of {window}")
    wins = ids[: n_win * window].view(n_win, window)
    device = input_device(model)
    nll, count = 0.0, 0
    for b in range(0, n_win, batch_size):
        x = wins[b : b + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1).to(logits.device),
                               reduction="sum").item()
        count += x[:, 1:].numel()
    return PerplexityResult(math.exp(nll / count), count, time.perf_counter() - start)
