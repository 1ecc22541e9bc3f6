"""Zero-shot label scores of a fixed evaluation set under neuron interventions, and a check that an
intervention touches exactly the neurons it names.

Per-layer interventions only change layers >= their own, so scoring replays the cached output of the layer
just before it (identical batches, checked against the dense scores) and runs only the rest. Each intervention's
scores are saved in the cache as it finishes, so an interrupted analysis resumes from its last finished run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import cache
from ..arch import get_module, is_classifier, layer_blocks, layout_for, mlp_widths
from ..data import Example
from ..errors import DataError
from ..evaluate import check_head, evaluate_accuracy, label_token_ids, next_token_logprobs
from ..hooks import masked_neurons
from ..tokens import Batch, batches, encode_inputs, forward

__all__ = ["Changes", "SavedScores", "Scorer", "verify_masking"]

log = logging.getLogger("fnprune")

Changes = dict[int, tuple[np.ndarray, float]]  # layer -> (neuron indices, factor; 0 = masked)


def _kept(widths: list[int], removed: dict[int, np.ndarray]) -> list[torch.Tensor]:
    """Per layer, the neuron indices that stay when `removed[layer]` are zeroed."""
    keep = []
    for i, w in enumerate(widths):
        m = np.ones(w, dtype=bool)
        if i in removed:
            m[removed[i]] = False
        keep.append(torch.from_numpy(np.flatnonzero(m)))
    return keep


def _changes_key(changes: Changes) -> str:
    """A name for an intervention: its layers, neurons and factors."""
    h = hashlib.sha256()
    for layer in sorted(changes):
        neurons, factor = changes[layer]
        h.update(f"{layer}:{float(factor)!r}:".encode())
        h.update(np.asarray(neurons, dtype=np.int64).tobytes())
        h.update(b";")
    return h.hexdigest()[:32]


# Raise when a change to scoring or masking changes an intervention's scores: saved scores of an earlier revision
# are then not read back (fnprune's version number does not move with every change).
SCORES_REVISION = 1


class SavedScores:
    """The scores of the interventions already run, under a cache key naming everything else they depend on
    (model files, dtype, examples, label words, batch size, versions), written after each new one."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.scores = cache.load_analysis_scores(key)
        self.written = len(self.scores)  # entries the cache holds (a full disk keeps the last written)
        if self.scores:
            log.info("resuming: %d evaluation runs of this analysis are in the cache", len(self.scores))

    def get(self, changes: Changes) -> np.ndarray | None:
        """The scores of `changes` if they were saved, else None."""
        return self.scores.get(_changes_key(changes))

    def put(self, changes: Changes, scores: np.ndarray) -> None:
        """Keep the scores of `changes` and rewrite the entry (atomically: an interrupt keeps the last one whole),
        with what another run of the same key saved meanwhile (a sweep over --top-networks in parallel)."""
        self.scores = {**cache.load_analysis_scores(self.key), **self.scores, _changes_key(changes): scores}
        if cache.save_analysis_scores(self.key, self.scores):
            self.written = len(self.scores)


class _Replay(nn.Module):
    """Stands in for a transformer block: returns the cached output of block `start - 1` for this batch."""

    def __init__(self, store: dict[str, Any], original: nn.Module):
        super().__init__()
        self._store = store
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return self._store["current"]


class Scorer:
    """Label scores as `fnprune.evaluate` computes them (its `next_token_logprobs`, or `evaluate_accuracy` for
    label words of several tokens and for a classifier's head), under interventions. With one-token label words,
    the dense run caches the outputs of the blocks before the layers in `replay_layers`; an intervention confined
    to layers >= L then runs only blocks L.. on the cached states. With `saved_scores`, an intervention already scored
    (by an interrupted run of the same analysis) is read back instead of run.
    """

    def __init__(self, model: nn.Module, tokenizer, examples: list[Example], label_words: dict[str, str],
                 batch_size: int = 32, max_length: int = 1024, progress: bool = False,
                 saved_scores: SavedScores | None = None):
        if not examples:
            raise DataError("no evaluation examples")
        self.model, self.tokenizer, self.examples = model, tokenizer, examples
        self.label_words, self.batch_size, self.max_length = label_words, batch_size, max_length
        self.progress = progress
        self.layout = layout_for(model)
        self.widths = mlp_widths(model, self.layout)
        self.labels = list(label_words)
        self.target = np.array([self.labels.index(e.label) for e in examples])
        if is_classifier(model):  # its head's classes: evaluate_accuracy's classifier branch, no replay
            check_head(model, len(self.labels))
            label_ids = {}
        else:
            label_ids = label_token_ids(tokenizer, label_words)
        self.single = bool(label_ids) and all(len(v) == 1 for v in label_ids.values())
        self.ids = [label_ids[lab][0] for lab in self.labels] if self.single else []
        self.batches: list[Batch] = (
            list(batches(encode_inputs(tokenizer, examples, max_length, model), batch_size, "left"))
            if self.single else []
        )
        self.saved: dict[int, list[Any]] = {}  # start layer -> cached output of block start-1, per batch
        self.dense: np.ndarray | None = None
        self.replay_ok: dict[int, bool] = {}
        self.seconds = 0.0
        self.runs = 0  # interventions scored, `reused` of them read back from `saved_scores`
        self.saved_scores, self.reused = saved_scores, 0

    def _intervention(self, changes: Changes | None):
        if not changes:
            return nullcontext()
        if all(f == 0 for _, f in changes.values()):  # masking: zeroing through `keep`
            return masked_neurons(self.model, self.layout, _kept(self.widths, {i: c[0] for i, c in changes.items()}))
        keep = [torch.arange(w) for w in self.widths]
        scale = []
        for i, w in enumerate(self.widths):
            s = torch.ones(w)
            if i in changes:
                s[torch.as_tensor(changes[i][0], dtype=torch.long)] = float(changes[i][1])
            scale.append(s)
        return masked_neurons(self.model, self.layout, keep, scale=scale)

    @contextmanager
    def _replaying(self, start: int, store: dict[str, Any]) -> Iterator[None]:
        blocks = get_module(self.model, self.layout.layers)
        originals = [blocks[i] for i in range(start)]
        try:
            for i in range(start):
                blocks[i] = _Replay(store, originals[i])
            yield
        finally:
            for i in range(start):
                blocks[i] = originals[i]

    def _run_batches(self, start: int) -> np.ndarray:
        scores = np.zeros((len(self.examples), len(self.labels)))
        store: dict[str, Any] = {}
        use = start > 0 and self.replay_ok.get(start, False)
        with self._replaying(start, store) if use else nullcontext():
            for b, batch in enumerate(tqdm(self.batches, desc="evaluate", unit="batch", disable=not self.progress,
                                           leave=False)):
                if use:
                    store["current"] = self.saved[start][b]
                scores[batch.index] = next_token_logprobs(self.model, batch, self.ids).numpy()
        return scores

    def _dense_saving(self, layers: list[int]) -> np.ndarray:
        """Dense scores, keeping the output of block `layer - 1` of every batch for each of `layers`."""
        blocks = layer_blocks(self.model, self.layout)
        self.saved = {layer: [] for layer in layers}
        handles = []

        def keeper(layer: int):
            def hook(module, args, output):
                self.saved[layer].append(output.detach().clone() if torch.is_tensor(output) else output)

            return hook

        try:
            for layer in layers:
                handles.append(blocks[layer - 1].register_forward_hook(keeper(layer)))
            return self._run_batches(0)
        finally:
            for h in handles:
                h.remove()

    def prepare(self, replay_layers: set[int]) -> np.ndarray:
        """Dense scores, caching what replay from each layer in `replay_layers` needs; returns dense scores."""
        start_time = time.perf_counter()
        if not self.single:
            self.dense = self._full(None)
            self.seconds += time.perf_counter() - start_time
            return self.dense
        layers = sorted(layer for layer in replay_layers if layer > 0)
        self.dense = self._dense_saving(layers)
        # Replay must reproduce the dense scores exactly; check the first batch per start layer.
        first = self.batches[0]
        for layer in layers:
            self.replay_ok[layer] = True
            store = {"current": self.saved[layer][0]}
            with self._replaying(layer, store):
                got = next_token_logprobs(self.model, first, self.ids).numpy()
            ok = np.allclose(got, self.dense[first.index], atol=1e-4)
            self.replay_ok[layer] = bool(ok)
            if not ok:
                log.warning("replay from layer %d does not reproduce the dense scores; using full passes", layer)
                self.saved.pop(layer)
        self.seconds += time.perf_counter() - start_time
        self.runs += 1
        return self.dense

    def _full(self, changes: Changes | None) -> np.ndarray:
        with self._intervention(changes):
            r = evaluate_accuracy(self.model, self.tokenizer, self.examples, self.label_words, self.batch_size,
                                  self.max_length, progress=False)
        return r.scores.numpy()

    def scores(self, changes: Changes | None = None) -> np.ndarray:
        """(n, labels) log-probabilities with `changes` {layer: (neuron indices, factor)} applied."""
        found = self.saved_scores.get(changes) if self.saved_scores and changes else None
        if found is not None and found.shape == (len(self.examples), len(self.labels)):
            self.runs += 1
            self.reused += 1
            return found
        t = time.perf_counter()
        if not self.single:
            out = self._full(changes)
        else:
            start = min(changes) if changes else 0
            if start > 0 and not self.replay_ok.get(start, False):
                start = 0
            with self._intervention(changes):
                out = self._run_batches(start)
        self.seconds += time.perf_counter() - t
        self.runs += 1
        if self.saved_scores and changes:
            self.saved_scores.put(changes, out)
        return out

    def correct(self, scores: np.ndarray) -> np.ndarray:
        return scores.argmax(axis=1) == self.target


def _mlp_inputs(model: nn.Module, blocks: list[nn.Module], output: str,
                batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's MLP intermediate activations (tokens, neurons) on `batch`, before and after any
    intervention's pre-hook on the output projection (one pass: what the hook itself changed, whatever the
    earlier layers did)."""
    before: list[torch.Tensor | None] = [None] * len(blocks)
    after: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def flat(args: tuple) -> torch.Tensor:
        return args[0].detach().reshape(-1, args[0].shape[-1]).clone()

    def make(i: int):
        def pre(module, args):
            before[i] = flat(args)

        def post(module, args, out):
            after[i] = flat(args)

        return pre, post

    try:
        for i, b in enumerate(blocks):
            pre, post = make(i)
            module = get_module(b, output)
            handles.append(module.register_forward_pre_hook(pre, prepend=True))  # runs before the intervention's
            handles.append(module.register_forward_hook(post))
        forward(model, batch, all_logits=False)
    finally:
        for h in handles:
            h.remove()
    return list(zip(before, after))  # type: ignore[arg-type]


def verify_masking(model: nn.Module, tokenizer, examples: list[Example], changes: dict[int, np.ndarray]) -> dict:
    """Run a few examples dense and masked (`changes`: layer -> neurons zeroed) and check what masking must
    guarantee: in every layer exactly the named neurons are zeroed by the hooks (the rest pass through them
    unchanged), and the layers before the first masked one are untouched. A later layer's neuron may still become
    zero through the earlier masking (ReLU), which is not the hooks' doing and is not a problem."""
    layout = layout_for(model)
    blocks = layer_blocks(model, layout)
    widths = mlp_widths(model, layout)
    seqs = encode_inputs(tokenizer, examples, 1024, model)
    batch = next(batches(seqs, len(seqs), "right"))
    dense = _mlp_inputs(model, blocks, layout.output, batch)
    with masked_neurons(model, layout, _kept(widths, changes)):
        masked = _mlp_inputs(model, blocks, layout.output, batch)
    problems = []
    first = min(changes) if changes else len(blocks)
    for i, (before, after) in enumerate(masked):
        want = np.zeros(widths[i], dtype=bool)
        if i in changes:
            want[changes[i]] = True
        want_t, rest = torch.from_numpy(want), torch.from_numpy(~want)
        if not (after[:, want_t] == 0).all():
            problems.append(f"layer {i}: some masked neurons are not zero")
        touched = int((after[:, rest] != before[:, rest]).any(0).sum())
        if touched:
            problems.append(f"layer {i}: the masking changed {touched} neurons outside the network")
        if i < first and not torch.equal(after, dense[i][1]):
            problems.append(f"layer {i}: changed although it comes before the first masked layer")
        if i == first and not torch.equal(before, dense[i][0]):
            problems.append(f"layer {i}: the first masked layer's input changed")
    return {"ok": not problems, "problems": problems}
