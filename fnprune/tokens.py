"""Token batches: prompts to ids, padded batches with explicit position ids (so padding changes nothing)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import is_classifier
from .errors import DataError
from .offload import input_device

__all__ = ["Batch", "classifier_texts", "context_length", "encode", "encode_inputs", "make_batch", "batches",
           "forward", "tokenizer_state", "save_tokenizer"]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    index: list[int]  # positions of these rows in the caller's list

    @property
    def last(self) -> torch.Tensor:
        """Position of each row's last real token, for either padding side."""
        length = self.attention_mask.shape[1]
        return length - 1 - self.attention_mask.flip(-1).argmax(-1)


def encode_inputs(tokenizer, examples, max_length: int, model: nn.Module) -> list[list[int]]:
    """Token ids per example for `model`: the filled-in prompt for LMs, the raw text (or text pair) for
    classifiers, cut to the positions an encoder has (past them its position embeddings fail)."""
    if not is_classifier(model):
        return encode(tokenizer, [e.prompt for e in examples], max_length)
    limits = [max_length, getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    length = min(n for n in limits if isinstance(n, int) and n > 0)  # the tokenizer's: RoBERTa's offset positions
    return [tokenizer(*classifier_texts(e), truncation=True, max_length=length)["input_ids"] for e in examples]


def classifier_texts(example) -> tuple[str, ...]:
    """The text, or text pair, a classifier head reads: the example's row fields. A task whose templates read
    more (WiC: the word and both sentences) cannot be given to it as it was fine-tuned, so it is refused."""
    if len(example.texts) > 2:
        raise DataError(f"a classifier head reads one text or a pair; this task's templates read {len(example.texts)} "
                        "fields: give task.templates that read only the text or pair it was fine-tuned on")
    return example.texts


DEFAULT_CONTEXT = 2048  # lm-eval's length where neither the config nor the tokenizer names one
_UNSET_TOKENIZER_LENGTH = int(1e30)  # transformers' model_max_length when the tokenizer has none


def context_length(model: nn.Module, tokenizer) -> int:
    """The tokens a scored prompt may hold, as lm-evaluation-harness 0.4.13 finds it: the (text) config's
    n_positions, max_position_embeddings or n_ctx, else the tokenizer's model_max_length, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length != _UNSET_TOKENIZER_LENGTH else DEFAULT_CONTEXT


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text (with the tokenizer's special tokens), cut from the left to keep the prompt end."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [x[-max_length:] for x in ids]


TokenizerState = tuple[dict[str, Any] | None, dict[str, Any] | None] | None


def tokenizer_state(tokenizer) -> TokenizerState:
    """A fast tokenizer's truncation and padding as they are now (None for a slow one, which keeps no such state):
    taken at load, before any call changes them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else (backend.truncation, backend.padding)


def save_tokenizer(tokenizer, state: TokenizerState, folder: Path) -> None:
    """save_pretrained with the truncation and padding `state` took: every call of a fast tokenizer sets its
    backend's to the call's (scoring's truncation, none), and save_pretrained writes them into tokenizer.json,
    where every later reader of the checkpoint would apply them."""
    if state is not None:
        backend, (truncation, padding) = tokenizer.backend_tokenizer, state
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)
    tokenizer.save_pretrained(folder)


def make_batch(seqs: list[list[int]], index: list[int], padding_side: str = "right") -> Batch:
    length = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
        input_ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return Batch(input_ids, mask, index)


def batches(seqs: list[list[int]], batch_size: int, padding_side: str = "right") -> Iterator[Batch]:
    """Batches of similar length (sorted longest first, stable) to waste little compute on padding."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield make_batch([seqs[i] for i in idx], idx, padding_side)


@torch.inference_mode()
def forward(model: nn.Module, batch: Batch, all_logits: bool = True) -> torch.Tensor:
    """Logits (B, L, V); position ids follow the real tokens, so left padding gives unpadded results.

    With `all_logits=False` (capture) the LM head may be skipped for all but the last position.
    """
    device = input_device(model)  # under a device map: the embedding's execution device
    kwargs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
    }
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params and not is_classifier(model):  # encoders are right padded: positions as is
        kwargs["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    if not all_logits and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return model(**kwargs).logits
