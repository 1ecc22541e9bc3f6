"""Record MLP intermediate activations on calibration prompts, batch by batch, with bounded memory.

For every layer we keep (a) running statistics over all real (non-padding) tokens: mean, mean |a| and
variance per neuron; (b) a uniform sample of at most `max_tokens` token activations (the same tokens in every
layer), drawn by streaming bottom-k sampling with seeded keys, for ICA; (c) the activation at each prompt's
last token (the "decision" token, where the label word is predicted). No ICA here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import MLPLayout, layer_blocks
from .hooks import mlp_input_hooks
from .tokens import batches, forward

__all__ = ["LayerActivations", "capture_activations", "capture_memory_bytes"]


@dataclass
class LayerActivations:
    """What calibration left us about one layer's neurons (d = MLP width)."""

    tokens: torch.Tensor  # (T, d) sampled token activations
    decision: torch.Tensor  # (N, d) activation at each prompt's last token, in prompt order
    mean: torch.Tensor  # (d,) over all real tokens
    mean_abs: torch.Tensor  # (d,)
    var: torch.Tensor  # (d,)
    count: int  # real tokens seen


class _LayerStats:
    def __init__(self, width: int, n_prompts: int, store_dtype: torch.dtype):
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sum_abs = torch.zeros(width, dtype=torch.float64)
        self.sum_sq = torch.zeros(width, dtype=torch.float64)
        self.tokens = torch.zeros(0, width, dtype=store_dtype)
        self.decision = torch.zeros(n_prompts, width, dtype=store_dtype)
        self.count = 0

    def finish(self) -> LayerActivations:
        n = max(self.count, 1)
        mean = self.sum / n
        var = (self.sum_sq / n - mean.pow(2)).clamp(min=0)
        return LayerActivations(
            self.tokens.float(), self.decision.float(), mean.float(), (self.sum_abs / n).float(),
            var.float(), self.count,
        )


def capture_memory_bytes(n_layers: int, width: int, max_tokens: int, n_prompts: int, store_dtype: str) -> int:
    """Upper bound of what capture holds: token sample + decision tokens + statistics, all layers."""
    item = 2 if store_dtype in ("float16", "bfloat16") else 4
    return n_layers * width * ((max_tokens + n_prompts) * item + 3 * 8)


def capture_activations(
    model: nn.Module,
    layout: MLPLayout,
    seqs: list[list[int]],
    *,
    max_tokens: int,
    batch_size: int,
    seed: int,
    store_dtype: str = "float32",
    padding_side: str = "right",
    progress: bool = True,
) -> list[LayerActivations]:
    """Run every sequence through the model once and return per-layer activations (see module doc)."""
    dtype = getattr(torch, store_dtype)
    n_layers = len(layer_blocks(model, layout))
    stats: list[_LayerStats | None] = [None] * n_layers
    keys = torch.zeros(0, dtype=torch.float64)  # sampling keys of the tokens currently kept
    keygen = torch.Generator().manual_seed(seed)
    # Per batch, set before the forward pass and read by every layer's hook:
    step: dict[str, torch.Tensor | list[int]] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            mask = step["mask"]
            # On the CPU whatever device (or offload hook) ran the layer; OPT flattens to (B*L, d).
            x = args[0].detach().cpu().reshape(*mask.shape, -1)  # (B, L, d)
            if stats[i] is None:
                stats[i] = _LayerStats(x.shape[-1], len(seqs), dtype)
            s = stats[i]
            real = x[mask].to(torch.float64)  # (n_real, d)
            s.sum += real.sum(0)
            s.sum_abs += real.abs().sum(0)
            s.sum_sq += real.pow(2).sum(0)
            s.count += real.shape[0]
            s.decision[step["rows"]] = x[torch.arange(x.shape[0]), step["last"]].to(dtype)
            pool = torch.cat([s.tokens, real.to(dtype)])
            s.tokens = pool[step["keep"]]

        return hook

    total = sum(len(s) for s in seqs)
    bar = tqdm(total=total, desc="capture", unit="tok", disable=not progress)
    with mlp_input_hooks(model, layout, make_hook):
        for batch in batches(seqs, batch_size, padding_side):
            mask = batch.attention_mask.bool()
            new_keys = torch.rand(int(mask.sum()), generator=keygen, dtype=torch.float64)
            pool_keys = torch.cat([keys, new_keys])
            keep = pool_keys.argsort(stable=True)[:max_tokens].sort().values
            keys = pool_keys[keep]
            position = batch.last if layout.decision == "last" else torch.zeros(len(batch.index), dtype=torch.long)
            step.update(mask=mask, rows=torch.tensor(batch.index), last=position, keep=keep)
            forward(model, batch, all_logits=False)
            bar.update(int(mask.sum()))
    bar.close()
    if any(s is None for s in stats):
        raise RuntimeError("some MLP layers were never called during capture")
    return [s.finish() for s in stats]  # type: ignore[union-attr]
