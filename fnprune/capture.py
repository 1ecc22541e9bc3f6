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

    tokens: torch.Tensor  # (T, d) sampled token activations, in the storage dtype (convert where used)
    decision: torch.Tensor  # (N, d) float32 activation at each prompt's last token, in prompt order
    mean: torch.Tensor  # (d,) over all real tokens
    mean_abs: torch.Tensor  # (d,)
    var: torch.Tensor  # (d,)
    count: int  # real tokens seen


class _Reservoir:
    """Which tokens the bottom-k sample holds, shared by all layers: the k smallest of one seeded random key
    per token, i.e. a uniform sample without replacement of every token streamed so far.

    Every layer stores its sampled tokens in a preallocated (k, d) buffer. A batch only writes its own
    incoming tokens into the slots of the ones they evict, so no layer ever copies its buffer;
    `order` puts the rows back in stream order at the end.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.keys = torch.zeros(0, dtype=torch.float64)  # key of the token in each slot
        self.position = torch.zeros(0, dtype=torch.long)  # stream index of the token in each slot
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0

    def admit(self, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw keys for `n_new` tokens; returns (slots to write, which new tokens go there)."""
        new_keys = torch.rand(n_new, generator=self.generator, dtype=torch.float64)
        pool = torch.cat([self.keys, new_keys])
        chosen = pool.argsort(stable=True)[: self.capacity]
        chosen_old = torch.zeros(len(self.keys), dtype=torch.bool)
        chosen_old[chosen[chosen < len(self.keys)]] = True
        incoming = chosen[chosen >= len(self.keys)] - len(self.keys)  # indices into the new tokens
        free = torch.cat([(~chosen_old).nonzero().flatten(), torch.arange(len(self.keys), self.capacity)])
        slots = free[: len(incoming)]
        size = max(len(self.keys), int(slots.max()) + 1 if len(slots) else 0)
        keys = torch.cat([self.keys, self.keys.new_zeros(size - len(self.keys))])
        position = torch.cat([self.position, self.position.new_zeros(size - len(self.position))])
        keys[slots] = new_keys[incoming]
        position[slots] = incoming + self.seen
        self.keys, self.position = keys, position
        self.seen += n_new
        return slots, incoming

    @property
    def order(self) -> torch.Tensor:
        return self.position.argsort()


class _LayerStats:
    def __init__(self, width: int, n_prompts: int, capacity: int, store_dtype: torch.dtype):
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sum_abs = torch.zeros(width, dtype=torch.float64)
        self.sum_sq = torch.zeros(width, dtype=torch.float64)
        self.tokens = torch.empty(capacity, width, dtype=store_dtype)
        self.decision = torch.zeros(n_prompts, width, dtype=store_dtype)
        self.count = 0

    def finish(self, order: torch.Tensor) -> LayerActivations:
        n = max(self.count, 1)
        mean = self.sum / n
        var = (self.sum_sq / n - mean.pow(2)).clamp(min=0)
        tokens = self.tokens[order]  # the filled slots, in stream order
        self.tokens = tokens  # drop the buffer before the next layer finishes
        return LayerActivations(
            tokens, self.decision.float(), mean.float(), (self.sum_abs / n).float(), var.float(), self.count
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
    reservoir = _Reservoir(max_tokens, seed)
    # Per batch, set before the forward pass and read by every layer's hook:
    step: dict[str, torch.Tensor | list[int]] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            mask = step["mask"]
            # On the CPU whatever device (or offload hook) ran the layer; OPT flattens to (B*L, d).
            x = args[0].detach().cpu().reshape(*mask.shape, -1)  # (B, L, d)
            if stats[i] is None:
                stats[i] = _LayerStats(x.shape[-1], len(seqs), min(max_tokens, total), dtype)
            s = stats[i]
            real = x[mask].to(torch.float64)  # (n_real, d)
            s.sum += real.sum(0)
            s.sum_abs += real.abs().sum(0)
            s.sum_sq += real.pow(2).sum(0)
            s.count += real.shape[0]
            s.decision[step["rows"]] = x[torch.arange(x.shape[0]), step["last"]].to(dtype)
            s.tokens[step["slots"]] = real[step["incoming"]].to(dtype)

        return hook

    total = sum(len(s) for s in seqs)
    bar = tqdm(total=total, desc="capture", unit="tok", disable=not progress)
    with mlp_input_hooks(model, layout, make_hook):
        for batch in batches(seqs, batch_size, padding_side):
            mask = batch.attention_mask.bool()
            slots, incoming = reservoir.admit(int(mask.sum()))
            position = batch.last if layout.decision == "last" else torch.zeros(len(batch.index), dtype=torch.long)
            step.update(mask=mask, rows=torch.tensor(batch.index), last=position, slots=slots, incoming=incoming)
            forward(model, batch, all_logits=False)
            bar.update(int(mask.sum()))
    bar.close()
    if any(s is None for s in stats):
        raise RuntimeError("some MLP layers were never called during capture")
    order = reservoir.order
    return [s.finish(order) for s in stats]  # type: ignore[union-attr]
