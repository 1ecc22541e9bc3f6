"""Token-level WikiText-2 perplexity over non-overlapping windows of a fixed prefix of the test text."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PerplexityResult", "wikitext_ids", "perplexity"]


@dataclass
class PerplexityResult:
    ppl: float  # exp(mean next-token NLL) over tokens of the model's own tokenizer (not word-level)
    tokens_scored: int
    seconds: float


def wikitext_ids(tokenizer, path: Path, n_tokens: int) -> torch.Tensor:
    """First `n_tokens` token ids of the WikiText-2 raw test text, lines joined HF-style with blank lines."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    lines = [line for line in text.split("\n") if line.strip()]
    ids = tokenizer("\n\n".join(lines), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"{path} has only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 4) -> PerplexityResult:
    """Perplexity of `ids` cut into non-overlapping windows; each window's first token is context only."""
    start = time.perf_counter()
    n_win = ids.numel() // window
    wins = ids[: n_win * window].view(n_win, window)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in range(0, n_win, batch_size):
        x = wins[b : b + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return PerplexityResult(math.exp(nll / count), count, time.perf_counter() - start)
