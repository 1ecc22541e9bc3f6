"""Record MLP intermediate activations on calibration prompts, batch by batch, with bounded memory.

For every layer we keep (a) running statistics over all real (non-padding) tokens: mean, mean |a| and
variance per neuron; (b) a uniform sample of at most `max_tokens` tokens (the same tokens in every layer,
the `max_tokens` smallest of one seeded random key per token), stored either as the tokens themselves or,
for ICA and reconstruction, which need no more, as their d x d second moments (fnprune.moments); (c) the
activation at each prompt's last token (the "decision" token, where the label word is predicted). No ICA here.

Capture is the long step on a big model, so it can save its progress (`progress_file`): every `save_every`
seconds and when Ctrl-C is pressed (which then waits for the current batch), the statistics so far go to one
safetensors file; a later capture of the same prompts with the same settings continues from it and gives the
same numbers, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import MLPLayout, mlp_widths
from .choices import SAMPLE_STORES
from .errors import NumericalError
from .hooks import mlp_input_hooks
from .interrupt import ProgressSaver
from .moments import SecondMoments, constant_columns
from .safetensors_io import read_with_meta, write_atomic
from .tokens import Batch, batches, forward

__all__ = ["LayerActivations", "LayerStats", "SAMPLE_STORES", "capture_activations", "capture_memory_bytes",
           "resolve_sample_store", "sample_positions"]

log = logging.getLogger("fnprune")
PROGRESS_FORMAT = 2  # bumped when the progress file's layout changes; other versions are ignored (2: pending rows)

@dataclass
class LayerActivations:
    """What calibration left us about one layer's neurons (d = MLP width)."""

    tokens: torch.Tensor | None  # (T, d) sampled token activations in the storage dtype, or None (moments)
    decision: torch.Tensor  # (N, d) float32 activation at each prompt's last token, in prompt order
    mean: torch.Tensor  # (d,) over all real tokens
    mean_abs: torch.Tensor  # (d,)
    var: torch.Tensor  # (d,)
    count: int  # real tokens seen
    moments: SecondMoments | None = None  # second moments of the token sample (float32), or None (tokens)

    @property
    def sampled(self) -> int:
        """Tokens in the sample that ICA and the reconstruction are fitted on."""
        return self.moments.count if self.moments is not None else int(self.tokens.shape[0])

    @property
    def constant(self) -> torch.Tensor:
        """(d,) bool: neurons that never vary over the token sample (ReLU-dead, a padded checkpoint's padding):
        the ones ICA counts dead and leaves out of every network; the same exact test as the whitening's."""
        if self.moments is not None:
            return self.moments.constant
        if self.tokens is None or self.tokens.shape[0] == 0:
            raise ValueError("the token sample was released")
        return constant_columns(self.tokens)

    def sample_moments(self) -> SecondMoments:
        """Second moments of the token sample, however it was stored."""
        if self.moments is not None:
            return self.moments
        if self.tokens is None or self.tokens.shape[0] == 0:
            raise ValueError("the token sample was released")
        return SecondMoments.of(self.tokens.float(), torch.float32)


def sample_positions(total: int, capacity: int, seed: int) -> torch.Tensor:
    """Stream indices (sorted) of the uniform sample: the `capacity` smallest of one seeded key per token."""
    keys = torch.rand(total, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return keys.argsort(stable=True)[:capacity].sort().values


def resolve_sample_store(store: str, width: int, max_tokens: int, store_dtype: str) -> str:
    """"auto": moments when a layer's d x d float32 matrix is no bigger than its token sample, else tokens."""
    if store != "auto":
        return store
    item = 2 if store_dtype in ("float16", "bfloat16") else 4
    return "moments" if width * 4 <= max_tokens * item else "tokens"


class LayerStats:
    """One layer's running statistics over real tokens (sums, a uniform token sample or its moments, each prompt's
    decision token), batch by batch: capture's, and sequential selection's on the pruned model (fnprune.refit)."""

    def __init__(self, width: int, n_prompts: int, capacity: int, store_dtype: torch.dtype,
                 moments_buffer: torch.Tensor | None):
        # Per-neuron sums over all real tokens, of a - shift and (a - shift)^2 (shift: the first batch's mean, so
        # float32 sums within a batch do not cancel) and of |a|: float32 within a batch, float64 across batches.
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sum_abs = torch.zeros(width, dtype=torch.float64)
        self.sum_sq = torch.zeros(width, dtype=torch.float64)
        store_tokens = moments_buffer is None
        self.tokens = torch.empty(capacity, width, dtype=store_dtype) if store_tokens else None
        self.moments = None if store_tokens else SecondMoments(width, dtype=torch.float32, out=moments_buffer)
        self.filled = 0
        self.decision = torch.zeros(n_prompts, width, dtype=store_dtype)
        self.count = 0

    def add_sample(self, sampled: torch.Tensor) -> None:
        if self.moments is not None:
            self.moments.update(sampled)
            return
        self.tokens[self.filled : self.filled + sampled.shape[0]] = sampled
        self.filled += sampled.shape[0]

    def add_statistics(self, real: torch.Tensor, scratch: torch.Tensor) -> None:
        """Add a batch's real tokens (R, d) float32 to the running sums; `scratch` is a reusable (R, d) buffer.
        Column sums in float32, shifted by the first batch's mean so they stay accurate, instead of float64 norms
        over the rows: much cheaper on long calibration sets."""
        if self.shift is None:
            self.shift = real.mean(0)
        self.sum_abs += torch.abs(real, out=scratch).sum(0)
        centred = torch.sub(real, self.shift, out=scratch)
        self.sum += centred.sum(0)
        self.sum_sq += centred.square_().sum(0)
        self.count += real.shape[0]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors that `restore` continues from (the tokens or moments sampled so far, sums, decisions)."""
        out = {f"{prefix}{name}": getattr(self, name) for name in ("sum", "sum_abs", "sum_sq", "decision")}
        out[f"{prefix}counts"] = torch.tensor([self.count, self.filled])
        if self.shift is not None:
            out[f"{prefix}shift"] = self.shift
        if self.tokens is not None:
            out[f"{prefix}tokens"] = self.tokens[: self.filled]
        elif self.moments.count:
            out.update({f"{prefix}moments.{k}": v for k, v in self.moments.state().items()})
        return out

    def restore(self, t: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("sum", "sum_abs", "sum_sq", "decision"):
            getattr(self, name).copy_(t[f"{prefix}{name}"])
        self.count, self.filled = (int(v) for v in t[f"{prefix}counts"])
        self.shift = t[f"{prefix}shift"].clone() if f"{prefix}shift" in t else None
        if self.tokens is not None:
            self.tokens[: self.filled] = t[f"{prefix}tokens"]
        elif f"{prefix}moments.packed" in t:
            self.moments.load_state_({k[len(f"{prefix}moments."):]: v for k, v in t.items()
                                      if k.startswith(f"{prefix}moments.")})

    def finish(self) -> LayerActivations:
        if self.moments is not None:
            self.moments.flush()  # the last, shorter group
        n = max(self.count, 1)
        centred = self.sum / n  # mean - shift
        var = (self.sum_sq / n - centred.pow(2)).clamp(min=0)
        mean = centred + self.shift.double() if self.shift is not None else centred
        return LayerActivations(
            self.tokens, self.decision.float(), mean.float(), (self.sum_abs / n).float(), var.float(), self.count,
            self.moments,
        )


def capture_memory_bytes(
    n_layers: int, width: int, max_tokens: int, n_prompts: int, store_dtype: str, sample_store: str = "tokens"
) -> int:
    """Upper bound of what capture holds: token sample (or its moments) + decision tokens + statistics."""
    item = 2 if store_dtype in ("float16", "bfloat16") else 4
    store = resolve_sample_store(sample_store, width, max_tokens, store_dtype)
    sample = SecondMoments.packed_size(width) * 4 // width if store == "moments" else max_tokens * item
    return n_layers * width * (sample + n_prompts * item + 5 * 8)


def capture_activations(
    model: nn.Module,
    layout: MLPLayout,
    seqs: list[list[int]],
    *,
    max_tokens: int,
    batch_size: int,
    seed: int,
    store_dtype: str = "float32",
    sample_store: str = "tokens",
    padding_side: str = "right",
    progress: bool = True,
    progress_file: Path | None = None,
    save_every: float = 300.0,
) -> list[LayerActivations]:
    """Run every sequence through the model once and return per-layer activations (see module doc).

    `sample_store`: "tokens" keeps the sampled tokens (T, d) in `store_dtype`; "moments" keeps only their
    float32 second moments (d, d); "auto" picks the smaller (`resolve_sample_store`). `max_tokens=0` keeps no
    sample at all (an empty token store), for callers that need neither ICA nor the reconstruction.
    `progress_file`: where to save and resume partial progress (see module doc); it belongs to this model,
    which the caller's file name must say (the file only checks prompts, settings and MLP widths). It is
    removed once capture completes. Saving takes at most about a tenth of the time: `save_every` seconds grow
    to ten times the last save's duration.
    """
    if sample_store not in SAMPLE_STORES:
        raise ValueError(f"sample_store must be one of {SAMPLE_STORES}, got {sample_store!r}")
    if padding_side not in ("right", "left") or (padding_side == "left" and layout.classifier):
        raise ValueError(f"padding_side {padding_side!r}: 'right', or 'left' for a causal LM (an encoder's positions "
                         "and its decision token at position 0 need right padding)")
    dtype = getattr(torch, store_dtype)
    widths = mlp_widths(model, layout)
    total = sum(len(s) for s in seqs)
    capacity = min(max_tokens, total)  # the sample as it will be (fewer tokens than max_tokens on small data)
    sizes = _moment_sizes(widths, capacity, sample_store, store_dtype)
    recorder = _Recorder(widths, sizes, len(seqs), capacity, dtype)
    sampled = sample_positions(total, max_tokens, seed)  # stream indices of the uniform token sample
    fingerprint = {
        "format": PROGRESS_FORMAT, "prompts": hashlib.sha256(json.dumps(seqs).encode()).hexdigest(),
        "widths": widths, "sizes": sizes, "max_tokens": max_tokens, "batch_size": batch_size, "seed": seed,
        "store_dtype": store_dtype, "padding_side": padding_side, "group_rows": SecondMoments.GROUP_ROWS,
        "panels": SecondMoments.PANELS,
    }
    done, seen = 0, 0
    if progress_file is not None:
        done, seen = _resume(progress_file, fingerprint, recorder.stats, recorder.new_stats)
        if done:
            log.info("capture resumes at token %d of %d from %s", seen, total, progress_file)
    saver = ProgressSaver("capture", progress_file, save_every)
    bar = tqdm(total=total, initial=seen, desc="capture", unit="tok", disable=not progress)
    with mlp_input_hooks(model, layout, recorder.hook), saver.deferring(), bar:
        for number, batch in enumerate(batches(seqs, batch_size, padding_side)):
            if number < done:
                continue
            n_real = recorder.next_batch(batch, layout.decision, sampled, seen)
            forward(model, batch, all_logits=False)
            seen += n_real
            done = number + 1
            bar.update(n_real)
            last = done == -(-len(seqs) // batch_size)
            saver.after_step(partial(_save_progress, progress_file, recorder.stats, fingerprint, done, seen),
                             f"{seen} of {total} tokens", last)
    if any(s is None for s in recorder.stats):
        raise RuntimeError("some MLP layers were never called during capture")
    saver.finished()
    layers = [s.finish() for s in recorder.stats]  # type: ignore[union-attr]
    if dtype == torch.float16:
        _check_float16_range(layers)
    return layers


def _check_float16_range(layers: list[LayerActivations]) -> None:
    """A float16 store turns activations beyond 65504 into inf, which only the ICA or the reconstruction would
    notice, with a misleading message; the float32 running statistics stay finite, so say it here."""
    for i, a in enumerate(layers):
        stored = [a.decision] + ([a.tokens] if a.tokens is not None else [])
        if torch.isfinite(a.mean).all() and not all(torch.isfinite(t).all() for t in stored):
            raise NumericalError(f"layer {i}: activations beyond float16's range (65504) were stored as inf; set "
                                 "calibration.store_dtype to bfloat16 or float32")


def _moment_sizes(widths: list[int], n_sample: int, sample_store: str, store_dtype: str) -> list[int]:
    """Each layer's share of the moments pool (0: the layer keeps tokens, or no sample when n_sample is 0)."""
    return [SecondMoments.packed_size(w) if n_sample and resolve_sample_store(sample_store, w, n_sample, store_dtype)
            == "moments" else 0 for w in widths]


@dataclass
class _BatchRows:
    """Where, in the batch being run, every layer's hook finds what it records."""

    mask: torch.Tensor  # (B, L) bool, True = real token
    prompts: torch.Tensor  # (B,) each row's index in the prompt list
    decision: torch.Tensor  # (B,) position of each row's decision token
    real: torch.Tensor  # rows of the flattened (B * L) batch that are real tokens
    picked: torch.Tensor  # rows of the flattened batch that are in the token sample


class _Recorder:
    """Every layer's running statistics, filled by one forward pre-hook per layer from the current batch's rows."""

    def __init__(self, widths: list[int], sizes: list[int], n_prompts: int, capacity: int, dtype: torch.dtype):
        self.widths, self.sizes, self.n_prompts, self.capacity, self.dtype = widths, sizes, n_prompts, capacity, dtype
        # The moments of all layers in one zeroed allocation (see SecondMoments), sliced per layer.
        self.pool = torch.zeros(sum(sizes), dtype=torch.float32)
        self.offsets = [sum(sizes[:i]) for i in range(len(widths))]
        self.stats: list[LayerStats | None] = [None] * len(widths)
        self.rows: _BatchRows | None = None  # set by next_batch before each forward pass
        self._buffers: dict[tuple, torch.Tensor] = {}

    def new_stats(self, i: int) -> LayerStats:
        """Layer i's empty statistics, its moments in its slice of the pool."""
        buffer = self.pool[self.offsets[i] : self.offsets[i] + self.sizes[i]] if self.sizes[i] else None
        return LayerStats(self.widths[i], self.n_prompts, self.capacity, self.dtype, buffer)

    def next_batch(self, batch: Batch, decision: str, sampled: torch.Tensor, seen: int) -> int:
        """Point the hooks at this batch's rows (`seen`: real tokens before it); returns its real tokens."""
        mask = batch.attention_mask.bool()
        n_real = int(mask.sum())
        lo, hi = torch.searchsorted(sampled, torch.tensor([seen, seen + n_real])).tolist()
        position = batch.last if decision == "last" else torch.zeros(len(batch.index), dtype=torch.long)
        real_rows = mask.flatten().nonzero().flatten()  # the real tokens' rows of the flattened batch
        self.rows = _BatchRows(mask, torch.tensor(batch.index), position, real_rows, real_rows[sampled[lo:hi] - seen])
        return n_real

    def hook(self, i: int) -> Callable[[nn.Module, tuple], None]:
        """Layer i's forward pre-hook on its output projection, whose input is the MLP activation."""

        def record(module: nn.Module, args: tuple) -> None:
            self._record(i, args[0])

        return record

    def _record(self, i: int, activation: torch.Tensor) -> None:
        rows = self.rows
        # On the CPU whatever device (or offload hook) ran the layer; OPT flattens to (B*L, d).
        x = activation.detach().cpu().reshape(*rows.mask.shape, -1)  # (B, L, d)
        if self.stats[i] is None:
            width = x.shape[-1]
            if width != self.widths[i]:
                raise RuntimeError(f"layer {i}: the MLP hook saw {width} neurons, the weights have {self.widths[i]}")
            self.stats[i] = self.new_stats(i)
        s = self.stats[i]
        flat = x.reshape(-1, x.shape[-1])  # (B * L, d)
        # Row gathers and the centred copy go into reused buffers: capture's temporaries interleave with the
        # model's, and fresh ones per layer and batch fragmented the heap.
        real = torch.index_select(flat, 0, rows.real, out=self._scratch("real", rows.real, flat))
        real32 = real if real.dtype == torch.float32 else real.float()
        s.add_statistics(real32, self._scratch("centred", rows.real, real32))
        s.decision[rows.prompts] = x[torch.arange(x.shape[0]), rows.decision].to(self.dtype)
        picked = torch.index_select(flat, 0, rows.picked, out=self._scratch("picked", rows.picked, flat))
        s.add_sample(picked.to(torch.float32) if s.moments is not None else picked.to(self.dtype))

    def _scratch(self, name: str, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A reused (len(rows), d) buffer for gathered rows of `like`, grown when a batch needs more."""
        key = (name, like.shape[-1], like.dtype)
        if key not in self._buffers or self._buffers[key].shape[0] < len(rows):
            self._buffers[key] = torch.empty(max(len(rows), 256), like.shape[-1], dtype=like.dtype)
        return self._buffers[key][: len(rows)]


def _save_progress(path: Path, stats: list, fingerprint: dict[str, Any], done: int, seen: int) -> None:
    """The statistics so far, and how far capture got."""
    tensors = {k: v for i, st in enumerate(stats) if st is not None for k, v in st.state(f"{i}.").items()}
    write_atomic(path, tensors, {**fingerprint, "batches_done": done, "tokens_seen": seen})


def _resume(path: Path, fingerprint: dict[str, Any], stats: list, new_stats: Callable[[int], LayerStats]
            ) -> tuple[int, int]:
    """Fill `stats` from a progress file written for the same prompts and settings; (batches, tokens) done.
    A file for anything else, or an unreadable one, is ignored (and later replaced)."""
    loaded = read_with_meta(path)
    if loaded is None:
        return 0, 0
    t, meta = loaded
    if {k: meta.get(k) for k in fingerprint} != json.loads(json.dumps(fingerprint)):
        log.info("ignoring capture progress %s: it was saved for other prompts or settings", path)
        return 0, 0
    for i in range(len(stats)):
        if f"{i}.counts" in t:
            stats[i] = new_stats(i)
            stats[i].restore(t, f"{i}.")
    return int(meta["batches_done"]), int(meta["tokens_seen"])
