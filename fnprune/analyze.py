"""`fnprune analyze`: the paper's functional-network experiments on any supported model, with pictures.

Four experiments, each a table (CSV) and a figure (PNG), gathered in `report.md`:

1. networks:      per-layer ICA maps (the pipeline's) and cross-layer "group" maps (ICA over every layer's
                  neurons concatenated), where each network's neurons sit (layer x neuron index), sizes.
2. recurrence:    group-ICA templates vs ICA on small groups of held-out samples, matched by IoU of the
                  thresholded maps; how often each template recurs, per task, against a shuffled null.
3. key networks:  zero one network's neurons in its own layer, measure the task accuracy drop on the
                  evaluation split (never used to find the networks), vs the same number of random neurons
                  of the same layer over several seeds; plus the paper's "mask the top FNs together" test.
4. amplification: scale a network's neurons by factors; the gain, with the factor chosen on one half of the
                  evaluation data and measured on the other half, and random-neuron controls.

Notebook use::

    from fnprune.analyze import AnalysisSpec, run_analysis, write_report
    spec = AnalysisSpec(model=ModelSpec("path"), task=TaskSpec("sst2", data_dir="data/sst2"), eval_samples=200)
    analysis = run_analysis(spec)          # tables: analysis.tables["key_networks"] (list of dicts), ...
    write_report(analysis, "out/analysis") # report.md + PNGs + CSVs (atomically)

Per-layer interventions only change layers >= their own, so evaluation replays the cached output of the
layer just before it (identical batches, checked against the dense scores) and runs only the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import FastICA
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .arch import get_module, layer_blocks, layout_for, mlp_widths
from .capture import capture_activations
from .checkpoint import atomic_output_dir, check_output_dir, write_json
from .data import Example, check_disjoint, load_split, resolve_task, sample
from .errors import DataError, RecipeError
from .evaluate import evaluate_accuracy, label_token_ids
from .hooks import masked_neurons
from .models import load_model
from .networks import LayerNetworks, find_networks, network_relevance, networks_from_sources
from .pipeline import Calibration, calibrate
from .recipe import CalibrationSpec, ModelSpec, NetworksSpec, Recipe, TaskSpec, seed_problems
from .tokens import Batch, batches, encode, forward

__all__ = [
    "AnalysisSpec",
    "Analysis",
    "GroupNetworks",
    "analyze",
    "run_analysis",
    "write_report",
    "spatial_ica",
    "group_networks",
    "iou_matrix",
    "match_templates",
    "Scorer",
    "verify_masking",
    "spec_command",
]

log = logging.getLogger("fnprune")

REPORT = "report.md"
FIGURES = {
    "layer_networks": "fig_layer_networks.png",
    "group_map": "fig_group_network_map.png",
    "group_layers": "fig_group_network_layers.png",
    "recurrence": "fig_recurrence.png",
    "key_networks": "fig_key_networks.png",
    "amplification": "fig_amplification.png",
}


# --------------------------------------------------------------------------------------------------- spec


@dataclass
class AnalysisSpec:
    """Every setting of one analysis (the CLI flags map one to one onto these fields)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    also_tasks: list[TaskSpec] = field(default_factory=list)  # extra tasks for the recurrence experiment
    num_samples: int = 256  # calibration examples (calibration split)
    max_tokens: int = 4096  # tokens per layer kept for ICA
    batch_size: int = 16
    components: int = 32  # ICA components, per layer and for the group (cross-layer) ICA
    threshold: float = 3.0
    max_iter: int = 400
    tol: float = 1e-4
    seed: int = 0
    group_tokens: int = 2048  # calibration tokens used for the group ICA (all layers concatenated)
    recurrence_groups: int = 12  # small groups of held-out samples, per task
    group_size: int = 8  # samples per group
    iou_threshold: float = 0.2
    top_networks: int = 8  # per-layer networks analyzed, ranked by task relevance
    control_networks: int = 2  # random per-layer networks analyzed as controls
    seeds: int = 3  # random-neuron control seeds
    scales: tuple[float, ...] = (0.0, 0.5, 1.5, 2.0, 3.0)
    group_mask: int = 10  # top group networks masked together (the paper's test); 0 = skip
    eval_samples: int = 300  # evaluation subset (evaluation split, seeded sample)
    eval_batch_size: int = 32
    cache: bool = True
    output: str = ""
    overwrite: bool = False

    def problems(self) -> list[str]:
        out = []
        for name in ("num_samples", "max_tokens", "batch_size", "components", "group_tokens", "group_size",
                     "eval_samples", "eval_batch_size", "seeds", "max_iter"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("recurrence_groups", "top_networks", "control_networks", "group_mask"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.top_networks + self.control_networks < 1:
            out.append("top_networks + control_networks: analyze at least one network")
        if self.threshold <= 0:
            out.append(f"threshold: must be > 0, got {self.threshold}")
        if not 0 < self.iou_threshold < 1:
            out.append(f"iou_threshold: must be in (0, 1), got {self.iou_threshold}")
        if any(s < 0 for s in self.scales) or not self.scales:
            out.append(f"scales: need at least one factor, all >= 0, got {list(self.scales)}")
        if not self.model.name_or_path:
            out.append("model: required")
        out += seed_problems("seed", self.seed, max(self.recurrence_groups, NetworksSpec().runs))  # seed + g, ...
        return out + self.model.check() + self.task.check() + [p for t in self.also_tasks for p in t.check()]

    def validate(self) -> AnalysisSpec:
        problems = self.problems()
        if problems:
            raise RecipeError(problems)
        return self


def task_from_arg(value: str) -> TaskSpec:
    """`NAME`, `NAME:DIR` or `NAME:SPLIT=PATH,SPLIT=PATH` (the --also-task syntax) -> TaskSpec."""
    name, _, data = value.partition(":")
    if not name:
        raise RecipeError(f"--also-task {value!r}: expected NAME, NAME:DIR or NAME:SPLIT=PATH,...")
    if "=" not in data:
        return TaskSpec(name=name, data_dir=data or None)
    files = {}
    for part in data.split(","):
        split, sep, path = part.partition("=")
        if not sep or not split.strip() or not path.strip():
            raise RecipeError(f"--also-task {value!r}: {part!r} is not SPLIT=PATH")
        files[split.strip()] = path.strip()
    return TaskSpec(name=name, data_files=files)


def parse_scales(value: str | None) -> tuple[float, ...] | None:
    """'0,0.5,2' -> (0.0, 0.5, 2.0); None stays None."""
    if not value:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as exc:
        raise RecipeError(f"--scales {value!r}: expected numbers separated by commas, e.g. 0,0.5,2") from exc


def _task_arg(task: TaskSpec) -> str:
    if task.data_files:
        return task.name + ":" + ",".join(f"{k}={v}" for k, v in task.data_files.items())
    return task.name + (f":{task.data_dir}" if task.data_dir else "")


def spec_command(spec: AnalysisSpec) -> str:
    """The `fnprune analyze` command line that reruns exactly this spec."""
    args = ["fnprune", "analyze", "--task", spec.task.name, "--model", spec.model.name_or_path]
    if spec.task.data_files:
        args += ["--data-files", ",".join(f"{k}={v}" for k, v in spec.task.data_files.items())]
    elif spec.task.data_dir:
        args += ["--data-dir", spec.task.data_dir]
    for t in spec.also_tasks:
        args += ["--also-task", _task_arg(t)]
    defaults = AnalysisSpec()
    flags = {
        "num_samples": "--num-samples", "max_tokens": "--max-tokens", "components": "--components",
        "threshold": "--threshold", "seed": "--seed", "group_tokens": "--group-tokens",
        "recurrence_groups": "--recurrence-groups", "group_size": "--group-size", "iou_threshold": "--iou",
        "top_networks": "--top-networks", "control_networks": "--control-networks", "seeds": "--seeds",
        "group_mask": "--group-mask", "eval_samples": "--eval-samples",
    }
    for name, flag in flags.items():
        if getattr(spec, name) != getattr(defaults, name):
            args += [flag, str(getattr(spec, name))]
    if tuple(spec.scales) != defaults.scales:
        args += ["--scales", ",".join(f"{s:g}" for s in spec.scales)]
    if not spec.cache:
        args.append("--no-cache")
    args += ["--output", spec.output or "DIR"]
    if spec.overwrite:
        args.append("--overwrite")
    return shlex.join(args)


# ------------------------------------------------------------------------------------------ group ICA


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """Each row standardized (zero rows stay zero), in place for float arrays."""
    x -= x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    x /= np.where(std > 0, std, 1)
    return x


def spatial_ica(
    tokens: np.ndarray, components: int, threshold: float, seed: int, max_iter: int = 400, tol: float = 1e-4
) -> LayerNetworks:
    """Spatial ICA of `tokens` (T tokens, D neurons): the same maps as `networks.find_networks`, but the PCA
    goes through the T x T token Gram matrix, so D may be large (every layer's neurons concatenated).
    Runs with one BLAS thread: threaded LAPACK on these matrices is far slower on shared CPUs."""
    with threadpool_limits(1):
        return _spatial_ica(tokens, components, threshold, seed, max_iter, tol)


def _spatial_ica(
    tokens: np.ndarray, components: int, threshold: float, seed: int, max_iter: int, tol: float
) -> LayerNetworks:
    n_tokens, width = tokens.shape
    if width <= n_tokens:
        return find_networks(tokens, components, threshold, seed, max_iter, tol)
    if components >= n_tokens:
        raise ValueError(f"components ({components}) must be below the number of tokens ({n_tokens})")
    x = np.array(tokens, dtype=np.float32).T  # (D, T) copy
    if not np.isfinite(x).all():
        raise ValueError("activations contain NaN or inf")
    dead = int((x.std(axis=1) == 0).sum())
    _zscore_rows(x)
    x -= x.mean(axis=0, keepdims=True)
    eigval, eigvec = np.linalg.eigh((x.T @ x).astype(np.float64))  # (T, T), ascending
    top = np.argsort(eigval)[::-1][:components]
    if eigval[top[-1]] <= 1e-8 * max(eigval[top[0]], 1e-300):
        raise ValueError(f"activations have rank below {components} components; lower `components`")
    u = (x @ eigvec[:, top].astype(np.float32)).astype(np.float64) / np.sqrt(eigval[top])  # (D, k) orthonormal
    whitened = u * np.sqrt(width)
    ica = FastICA(n_components=components, whiten=False, fun="logcosh", max_iter=max_iter, tol=tol,
                  random_state=seed)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(whitened)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return networks_from_sources(sources.T, threshold, converged, dead)


@dataclass
class GroupNetworks:
    """Cross-layer networks: maps over every layer's neurons concatenated (layer-major)."""

    maps: np.ndarray  # (k, D) z-scored
    members: np.ndarray  # (k, D) bool
    widths: list[int]  # neurons per layer; offsets = cumsum
    relevance: np.ndarray  # (k,)
    converged: bool

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.widths)])

    def layer_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.widths)), self.widths)

    def per_layer(self, k: int) -> list[np.ndarray]:
        """Network k's member indices within each layer."""
        off = self.offsets
        return [np.flatnonzero(self.members[k, off[i] : off[i + 1]]) for i in range(len(self.widths))]


def concat_layers(token_blocks: list[torch.Tensor | np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(t, dtype=np.float32) for t in token_blocks], axis=1)


def group_networks(calib: Calibration, spec: AnalysisSpec) -> GroupNetworks:
    """Group ICA over all layers' neurons from the calibration token sample (same tokens in every layer)."""
    acts = calib.activations
    n_tokens = acts[0].tokens.shape[0]
    rng = np.random.default_rng(spec.seed)
    rows = np.sort(rng.choice(n_tokens, min(spec.group_tokens, n_tokens), replace=False))
    x = concat_layers([a.tokens[rows] for a in acts])
    nets = spatial_ica(x, spec.components, spec.threshold, spec.seed, spec.max_iter, spec.tol)
    decision = concat_layers([a.decision for a in acts])
    rel = network_relevance(nets.maps, decision, calib.labels)
    return GroupNetworks(nets.maps, nets.members, [a.tokens.shape[1] for a in acts], rel, nets.converged)


# -------------------------------------------------------------------------------------------- IoU


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every row of boolean `a` (K, D) with every row of `b` (M, D); empty vs empty = 0."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    inter = a32 @ b32.T
    union = a32.sum(1)[:, None] + b32.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_templates(templates: np.ndarray, maps: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(best IoU of each template among `maps`, whether it exceeds `threshold`)."""
    if maps.shape[0] == 0:
        best = np.zeros(templates.shape[0])
    else:
        best = iou_matrix(templates, maps).max(axis=1)
    return best, best > threshold


def shuffle_within_layers(members: np.ndarray, widths: list[int], rng: np.random.Generator) -> np.ndarray:
    """Null maps: each map's members permuted within each layer (same sizes per layer)."""
    out = np.empty_like(members)
    off = np.concatenate([[0], np.cumsum(widths)])
    for i in range(len(widths)):
        block = members[:, off[i] : off[i + 1]]
        out[:, off[i] : off[i + 1]] = np.take_along_axis(block, rng.permuted(
            np.tile(np.arange(widths[i]), (members.shape[0], 1)), axis=1), axis=1)
    return out


# ---------------------------------------------------------------------------------------------- scoring


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
    """Zero-shot label scores of a fixed evaluation set under neuron interventions.

    Same scoring as `fnprune.evaluate` (label-word log-probability after the prompt, left padding, ties to the
    first label). With one-token label words, the dense run caches the outputs of the blocks before the layers
    in `replay_layers`; an intervention confined to layers >= L then runs only blocks L.. on the cached states.
    """

    def __init__(self, model: nn.Module, tokenizer, examples: list[Example], label_words: dict[str, str],
                 batch_size: int = 32, max_length: int = 1024, progress: bool = False):
        if not examples:
            raise DataError("no evaluation examples")
        self.model, self.tokenizer, self.examples = model, tokenizer, examples
        self.label_words, self.batch_size, self.max_length = label_words, batch_size, max_length
        self.progress = progress
        self.layout = layout_for(model)
        self.widths = mlp_widths(model, self.layout)
        label_ids = label_token_ids(tokenizer, label_words)
        self.labels = list(label_ids)
        self.target = np.array([self.labels.index(e.label) for e in examples])
        self.single = all(len(v) == 1 for v in label_ids.values())
        self.ids = [label_ids[lab][0] for lab in self.labels] if self.single else []
        self.batches: list[Batch] = (
            list(batches(encode(tokenizer, [e.prompt for e in examples], max_length), batch_size, "left"))
            if self.single else []
        )
        self.saved: dict[int, list[Any]] = {}  # start layer -> cached output of block start-1, per batch
        self.dense: np.ndarray | None = None
        self.replay_ok: dict[int, bool] = {}
        self.seconds = 0.0
        self.runs = 0

    # -- interventions -------------------------------------------------------------------------------
    def _intervention(self, changes: dict[int, tuple[np.ndarray, float]] | None):
        if not changes:
            return _nullcontext()
        keep, scale = [], None
        if all(f == 0 for _, f in changes.values()):  # masking: zeroing through `keep`
            for i, w in enumerate(self.widths):
                m = np.ones(w, dtype=bool)
                if i in changes:
                    m[changes[i][0]] = False
                keep.append(torch.from_numpy(np.flatnonzero(m)))
        else:
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

    def _logp(self, batch: Batch) -> torch.Tensor:
        logits = forward(self.model, batch, all_logits=False)[:, -1].double()
        return torch.log_softmax(logits, dim=-1)[:, self.ids].cpu()

    def _run_batches(self, start: int) -> np.ndarray:
        scores = np.zeros((len(self.examples), len(self.labels)))
        store: dict[str, Any] = {}
        use = start > 0 and self.replay_ok.get(start, False)
        ctx = self._replaying(start, store) if use else _nullcontext()
        with ctx:
            for b, batch in enumerate(tqdm(self.batches, desc="evaluate", unit="batch", disable=not self.progress,
                                           leave=False)):
                if use:
                    store["current"] = self.saved[start][b]
                scores[batch.index] = self._logp(batch).numpy()
        return scores

    def prepare(self, replay_layers: set[int]) -> np.ndarray:
        """Dense scores, caching what replay from each layer in `replay_layers` needs; returns dense scores."""
        start_time = time.perf_counter()
        if not self.single:
            self.dense = self._full(None)
            self.seconds += time.perf_counter() - start_time
            return self.dense
        layers = sorted(layer for layer in replay_layers if layer > 0)
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
            self.dense = self._run_batches(0)
        finally:
            for h in handles:
                h.remove()
        # Replay must reproduce the dense scores exactly; check the first batch per start layer.
        first = self.batches[0]
        for layer in layers:
            self.replay_ok[layer] = True
            store = {"current": self.saved[layer][0]}
            with self._replaying(layer, store):
                got = self._logp(first).numpy()
            ok = np.allclose(got, self.dense[first.index], atol=1e-4)
            self.replay_ok[layer] = bool(ok)
            if not ok:
                log.warning("replay from layer %d does not reproduce the dense scores; using full passes", layer)
                self.saved.pop(layer)
        self.seconds += time.perf_counter() - start_time
        self.runs += 1
        return self.dense

    def _full(self, changes) -> np.ndarray:
        with self._intervention(changes):
            r = evaluate_accuracy(self.model, self.tokenizer, self.examples, self.label_words, self.batch_size,
                                  self.max_length, progress=False)
        return r.scores.numpy()

    def scores(self, changes: dict[int, tuple[np.ndarray, float]] | None = None) -> np.ndarray:
        """(n, labels) log-probabilities with `changes` {layer: (neuron indices, factor)} applied."""
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
        return out

    def correct(self, scores: np.ndarray) -> np.ndarray:
        return scores.argmax(axis=1) == self.target


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def verify_masking(model: nn.Module, tokenizer, prompts: list[str], changes: dict[int, np.ndarray]) -> dict:
    """Run a few prompts dense and masked (`changes`: layer -> neurons zeroed); record every layer's MLP
    intermediate activations and check that exactly those neurons, in those layers only, became zero."""
    layout = layout_for(model)
    blocks = layer_blocks(model, layout)
    widths = mlp_widths(model, layout)
    seqs = encode(tokenizer, prompts, 1024)
    batch = next(batches(seqs, len(seqs), "right"))

    def record() -> list[torch.Tensor]:
        seen: list[torch.Tensor | None] = [None] * len(blocks)
        handles = []

        def make(i: int):
            def hook(module, args, output):
                seen[i] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

            return hook

        try:
            for i, b in enumerate(blocks):
                handles.append(get_module(b, layout.output).register_forward_hook(make(i)))
            forward(model, batch, all_logits=False)
        finally:
            for h in handles:
                h.remove()
        return seen  # type: ignore[return-value]

    dense = record()
    keep = []
    for i, w in enumerate(widths):
        m = np.ones(w, dtype=bool)
        if i in changes:
            m[changes[i]] = False
        keep.append(torch.from_numpy(np.flatnonzero(m)))
    with masked_neurons(model, layout, keep):
        masked = record()
    problems = []
    first = min(changes) if changes else len(blocks)
    for i in range(len(blocks)):
        newly_zero = (masked[i] == 0).all(0) & ~(dense[i] == 0).all(0)
        want = np.zeros(widths[i], dtype=bool)
        if i in changes:
            want[changes[i]] = True
        if not (masked[i][:, torch.from_numpy(want)] == 0).all():
            problems.append(f"layer {i}: some masked neurons are not zero")
        extra = newly_zero.numpy() & ~want
        if extra.any():
            problems.append(f"layer {i}: {int(extra.sum())} neurons outside the network became zero")
        if i < first and not torch.equal(masked[i], dense[i]):
            problems.append(f"layer {i}: changed although it comes before the first masked layer")
        rest = torch.from_numpy(~want)
        if i == first and not torch.equal(masked[i][:, rest], dense[i][:, rest]):
            problems.append(f"layer {i}: unmasked neurons of the first masked layer changed")
    return {"ok": not problems, "problems": problems}


# ------------------------------------------------------------------------------------------ analysis


@dataclass
class Analysis:
    """Results: `tables` (name -> list of row dicts, one CSV each), `info` (settings, timings, headline
    numbers), and the objects behind them for further work in a notebook."""

    spec: AnalysisSpec
    tables: dict[str, list[dict[str, Any]]]
    info: dict[str, Any]
    calibration: Calibration | None = None
    group: GroupNetworks | None = None


def _rnd(v: Any, digits: int = 6) -> Any:
    if isinstance(v, (float, np.floating)):
        return round(float(v), digits)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _std(x: list[float] | np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


def _bootstrap_ci(diff: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-example differences."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _classification(task: TaskSpec) -> TaskSpec:
    if task.kind != "classification":
        raise DataError(f"analyze scores label words: task {task.name!r} is {task.kind}, not classification")
    return task


def _load_data(spec: AnalysisSpec):
    task = _classification(resolve_task(spec.task))
    pool = load_split(task, task.calibration_split)
    evaluation = load_split(task, task.evaluation_split)
    calibration = sample(pool, spec.num_samples, spec.seed)
    check_disjoint(calibration, evaluation)
    eval_set = sample(evaluation, spec.eval_samples, spec.seed)
    used = {e.prompt for e in calibration} | {e.prompt for e in evaluation}
    held_out = [e for e in pool if e.prompt not in used]
    return task, calibration, eval_set, held_out, len(pool), len(evaluation)


def _groups(examples: list[Example], spec: AnalysisSpec, seed: int) -> list[list[Example]]:
    n = min(spec.recurrence_groups, len(examples) // spec.group_size)
    picked = sample(examples, n * spec.group_size, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(picked))
    return [[picked[j] for j in order[g * spec.group_size : (g + 1) * spec.group_size]] for g in range(n)]


def _recurrence(model, tokenizer, spec: AnalysisSpec, group: GroupNetworks, task_name: str,
                groups: list[list[Example]], progress: bool) -> tuple[list[dict], list[dict]]:
    layout = layout_for(model)
    rng = np.random.default_rng(spec.seed + 7)
    per_group = []
    for g, examples in enumerate(tqdm(groups, desc=f"recurrence {task_name}", unit="group", disable=not progress)):
        seqs = encode(tokenizer, [e.prompt for e in examples], 1024)
        n_tok = sum(len(s) for s in seqs)
        acts = capture_activations(model, layout, seqs, max_tokens=n_tok, batch_size=spec.batch_size,
                                   seed=spec.seed, progress=False)
        k = min(spec.components, max(2, n_tok // 2))
        try:
            nets = spatial_ica(concat_layers([a.tokens for a in acts]), k, spec.threshold, spec.seed + g,
                               spec.max_iter, spec.tol)
        except ValueError as exc:
            log.warning("recurrence %s group %d skipped: %s", task_name, g, exc)
            continue
        best, hit = match_templates(group.members, nets.members, spec.iou_threshold)
        null_best, null_hit = match_templates(group.members, shuffle_within_layers(nets.members, group.widths, rng),
                                              spec.iou_threshold)
        for t in range(group.members.shape[0]):
            per_group.append({"task": task_name, "group": g, "tokens": n_tok, "components": k, "template": t,
                              "best_iou": _rnd(best[t]), "recurs": bool(hit[t]), "null_best_iou": _rnd(null_best[t]),
                              "null_recurs": bool(null_hit[t])})
    summary = []
    for t in range(group.members.shape[0]):
        rows = [r for r in per_group if r["template"] == t]
        if not rows:
            continue
        summary.append({
            "task": task_name, "template": t, "template_size": int(group.members[t].sum()),
            "relevance": _rnd(group.relevance[t]), "groups": len(rows),
            "recurrence_rate": _rnd(np.mean([r["recurs"] for r in rows])),
            "mean_best_iou": _rnd(np.mean([r["best_iou"] for r in rows])),
            "null_rate": _rnd(np.mean([r["null_recurs"] for r in rows])),
            "null_mean_best_iou": _rnd(np.mean([r["null_best_iou"] for r in rows])),
        })
    return summary, per_group


def _ranked_networks(calib: Calibration) -> list[tuple[float, int, int]]:
    """(relevance, layer, component) of every per-layer network with members, most relevant first."""
    cands = [(float(calib.relevance[i][k]), i, k) for i, n in enumerate(calib.networks)
             for k in range(n.maps.shape[0]) if n.members[k].any()]
    return sorted(cands, key=lambda c: (-c[0], c[1], c[2]))


def _network_ranks(calib: Calibration) -> dict[tuple[int, int], int]:
    """Relevance rank (1 = most relevant) among per-layer networks with members; empty networks are unranked."""
    return {(i, k): r + 1 for r, (_, i, k) in enumerate(_ranked_networks(calib))}


def _pick_networks(calib: Calibration, spec: AnalysisSpec) -> list[dict]:
    cands = _ranked_networks(calib)
    rank = _network_ranks(calib)
    top = cands[: spec.top_networks]
    rest = cands[spec.top_networks :]
    rng = np.random.default_rng(spec.seed + 11)
    ctrl_idx = sorted(rng.choice(len(rest), min(spec.control_networks, len(rest)), replace=False).tolist())
    chosen = [("top", c) for c in top] + [("control", rest[j]) for j in ctrl_idx]
    out = []
    for kind, (rel, i, k) in chosen:
        out.append({"name": f"L{i}.N{k}", "kind": kind, "layer": i, "network": k, "rank": rank[(i, k)],
                    "relevance": rel, "members": np.flatnonzero(calib.networks[i].members[k])})
    return out


def _random_same_layer(width: int, exclude: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    pool = np.setdiff1d(np.arange(width), exclude)
    return np.sort(rng.choice(pool, min(count, len(pool)), replace=False))


def run_analysis(spec: AnalysisSpec, progress: bool = True) -> Analysis:
    """Run all four experiments; nothing is written (see `write_report`)."""
    spec.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("%s done in %.1f s", name, timings[name])
        t0 = time.perf_counter()

    load_before = [round(v, 2) for v in os.getloadavg()]
    task, calibration, eval_set, held_out, n_pool, n_eval_split = _load_data(spec)
    also = []
    for extra in spec.also_tasks:
        t = _classification(resolve_task(extra))
        also.append((t, load_split(t, t.calibration_split)))
    model, tokenizer = load_model(spec.model)
    layout = layout_for(model)
    lap("load")

    recipe = Recipe(model=spec.model, task=task,
                    calibration=CalibrationSpec(num_samples=spec.num_samples, max_tokens=spec.max_tokens,
                                                batch_size=spec.batch_size, seed=spec.seed, cache=spec.cache,
                                                sample_store="tokens"),  # group ICA needs the tokens
                    networks=NetworksSpec(components=spec.components, threshold=spec.threshold,
                                          max_iter=spec.max_iter, tol=spec.tol, seed=spec.seed))
    widths = mlp_widths(model, layout)
    if spec.components >= min(min(widths), spec.max_tokens):
        raise RecipeError(f"components ({spec.components}) must be below the MLP width ({min(widths)}) and "
                          f"max_tokens ({spec.max_tokens})")
    calib = calibrate(model, tokenizer, calibration, task.label_words, recipe, True, progress, use_cache=spec.cache)
    lap("calibration + per-layer ICA")

    tables: dict[str, list[dict[str, Any]]] = {}
    # 1. networks ---------------------------------------------------------------------------------------
    layer_rows = []
    for i, (n, rel) in enumerate(zip(calib.networks, calib.relevance)):
        for k in range(n.maps.shape[0]):
            layer_rows.append({"layer": i, "network": k, "size": int(n.members[k].sum()), "relevance": _rnd(rel[k]),
                               "converged": n.converged})
    ranks = _network_ranks(calib)
    for row in layer_rows:
        row["relevance_rank"] = ranks.get((row["layer"], row["network"]), "")
    tables["layer_networks"] = layer_rows
    tables["layer_summary"] = [{
        "layer": i, "networks": int(n.maps.shape[0]), "median_size": float(np.median(n.members.sum(1))),
        "max_size": int(n.members.sum(1).max()), "union_size": int(n.members.any(0).sum()),
        "union_fraction": _rnd(n.members.any(0).mean(), 4), "max_relevance": _rnd(rel.max(), 4),
        "dead_neurons": n.dead_neurons, "converged": n.converged,
    } for i, (n, rel) in enumerate(zip(calib.networks, calib.relevance))]

    group = group_networks(calib, spec)
    g_order = np.argsort(-group.relevance, kind="stable")
    g_rank = {int(k): r + 1 for r, k in enumerate(g_order)}
    layer_of = group.layer_of()
    tables["group_networks"] = [{
        "network": k, "relevance_rank": g_rank[k], "relevance": _rnd(group.relevance[k]),
        "size": int(group.members[k].sum()), "fraction": _rnd(group.members[k].mean(), 5),
        "layers_spanned": int(len(np.unique(layer_of[group.members[k]]))),
        "top_layer": int(np.bincount(layer_of[group.members[k]], minlength=len(widths)).argmax())
        if group.members[k].any() else -1,
    } for k in range(group.members.shape[0])]
    tables["group_network_layers"] = [{"network": k, "layer": i, "members": int(len(idx))}
                                      for k in range(group.members.shape[0])
                                      for i, idx in enumerate(group.per_layer(k))]
    lap("group ICA")

    # 2. recurrence ---------------------------------------------------------------------------------------
    rec_summary, rec_detail = [], []
    if spec.recurrence_groups:
        sources = [(task.name, held_out)] + [(t.name, [e for e in pool]) for t, pool in also]
        for j, (name, examples) in enumerate(sources):
            gs = _groups(examples, spec, spec.seed + 100 + j)
            if not gs:
                log.warning("recurrence: not enough held-out %s examples for one group of %d", name, spec.group_size)
                continue
            s, d = _recurrence(model, tokenizer, spec, group, name, gs, progress)
            rec_summary += s
            rec_detail += d
    tables["recurrence"] = rec_summary
    tables["recurrence_groups"] = rec_detail
    lap("recurrence")

    # 3. key networks ------------------------------------------------------------------------------------
    nets = _pick_networks(calib, spec)
    scorer = Scorer(model, tokenizer, eval_set, task.label_words, spec.eval_batch_size, progress=progress)
    dense_scores = scorer.prepare({n["layer"] for n in nets})
    dense_correct = scorer.correct(dense_scores)
    half_rng = np.random.default_rng(spec.seed + 3)
    perm = half_rng.permutation(len(eval_set))
    halves = [np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])]
    dense_acc = float(dense_correct.mean())
    verify_prompts = [e.prompt for e in eval_set[:4]]
    lap("dense evaluation")

    key_rows, seed_rows = [], []
    corrects: dict[str, np.ndarray] = {}
    for n in tqdm(nets, desc="key networks", unit="network", disable=not progress):
        i, members = n["layer"], n["members"]
        check = verify_masking(model, tokenizer, verify_prompts, {i: members})
        if not check["ok"]:
            raise RuntimeError(f"masking network {n['name']} failed its per-layer check: {check['problems']}")
        c_fn = scorer.correct(scorer.scores({i: (members, 0.0)}))
        corrects[n["name"]] = c_fn
        rand = []
        for s in range(spec.seeds):
            idx = _random_same_layer(widths[i], members, len(members), np.random.default_rng(spec.seed * 1000 + s))
            c = scorer.correct(scorer.scores({i: (idx, 0.0)}))
            rand.append(c)
            seed_rows.append({"network": n["name"], "seed": s, "accuracy": _rnd(c.mean())})
        rand_acc = np.array([c.mean() for c in rand])
        diff = np.mean(rand, axis=0) - c_fn  # per example: random-masked correct minus FN-masked correct
        lo, hi = _bootstrap_ci(diff.astype(float), spec.seed)
        key_rows.append({
            "network": n["name"], "kind": n["kind"], "layer": i, "component": n["network"],
            "relevance_rank": n["rank"], "relevance": _rnd(n["relevance"], 4), "size": int(len(members)),
            "masked_fn_acc": _rnd(c_fn.mean(), 4), "fn_drop": _rnd(dense_acc - c_fn.mean(), 4),
            "random_acc_mean": _rnd(rand_acc.mean(), 4), "random_acc_std": _rnd(_std(rand_acc), 4),
            "random_drop_mean": _rnd(dense_acc - rand_acc.mean(), 4),
            "excess_drop": _rnd(rand_acc.mean() - c_fn.mean(), 4), "excess_ci_low": _rnd(lo, 4),
            "excess_ci_high": _rnd(hi, 4),
            "fn_drop_half_a": _rnd(dense_correct[halves[0]].mean() - c_fn[halves[0]].mean(), 4),
            "fn_drop_half_b": _rnd(dense_correct[halves[1]].mean() - c_fn[halves[1]].mean(), 4),
            "masking_verified": check["ok"],
        })
    tables["key_networks"] = key_rows
    tables["key_networks_seeds"] = seed_rows
    lap("key networks")

    group_rows = []
    if spec.group_mask:
        chosen = [int(k) for k in g_order[: spec.group_mask] if group.members[k].any()]
        union = group.members[chosen].any(0)
        per_layer = {i: np.flatnonzero(union[group.offsets[i] : group.offsets[i + 1]]) for i in range(len(widths))}
        per_layer = {i: idx for i, idx in per_layer.items() if len(idx)}
        check = verify_masking(model, tokenizer, verify_prompts, per_layer)
        if not check["ok"]:
            raise RuntimeError(f"masking the group networks failed its per-layer check: {check['problems']}")
        c_fn = scorer.correct(scorer.scores({i: (idx, 0.0) for i, idx in per_layer.items()}))
        rand = []
        for s in range(spec.seeds):
            rng = np.random.default_rng(spec.seed * 1000 + 500 + s)
            changes = {i: (_random_same_layer(widths[i], idx, len(idx), rng), 0.0) for i, idx in per_layer.items()}
            rand.append(scorer.correct(scorer.scores(changes)))
        rand_acc = np.array([c.mean() for c in rand])
        lo, hi = _bootstrap_ci((np.mean(rand, axis=0) - c_fn).astype(float), spec.seed)
        total = int(sum(len(v) for v in per_layer.values()))
        group_rows.append({
            "networks": len(chosen), "neurons": total, "fraction_of_mlp_neurons": _rnd(total / sum(widths), 5),
            "layers": len(per_layer), "dense_acc": _rnd(dense_acc, 4), "masked_fn_acc": _rnd(c_fn.mean(), 4),
            "random_acc_mean": _rnd(rand_acc.mean(), 4), "random_acc_std": _rnd(_std(rand_acc), 4),
            "random_accs": " ".join(f"{a:.4f}" for a in rand_acc),
            "excess_drop": _rnd(rand_acc.mean() - c_fn.mean(), 4), "excess_ci_low": _rnd(lo, 4),
            "excess_ci_high": _rnd(hi, 4), "masking_verified": check["ok"],
        })
    tables["group_mask"] = group_rows
    lap("group masking")

    # 4. amplification ----------------------------------------------------------------------------------
    amp_rows, amp_summary = [], []
    for n in tqdm(nets, desc="amplification", unit="network", disable=not progress):
        i, members = n["layer"], n["members"]
        curve = {}
        for f in spec.scales:
            if f == 1.0:
                continue
            c = corrects[n["name"]] if f == 0 and n["name"] in corrects else scorer.correct(
                scorer.scores({i: (members, float(f))}))
            curve[float(f)] = c
            amp_rows.append({"network": n["name"], "kind": n["kind"], "target": "network", "seed": "",
                             "scale": f, "accuracy": _rnd(c.mean(), 4),
                             "acc_half_a": _rnd(c[halves[0]].mean(), 4), "acc_half_b": _rnd(c[halves[1]].mean(), 4),
                             "gain": _rnd(c.mean() - dense_acc, 4)})
        if not curve:
            continue
        gains = {f: c.mean() - dense_acc for f, c in curve.items()}
        best = max(gains, key=lambda f: (gains[f], -abs(f - 1)))
        # honest gain: choose the factor on one half, measure it on the other half
        cv = []
        for a, b in ((0, 1), (1, 0)):
            fa = max(curve, key=lambda f: (curve[f][halves[a]].mean(), -abs(f - 1)))
            cv.append((fa, curve[fa][halves[b]].mean() - dense_correct[halves[b]].mean()))
        rand_gain = []
        if gains[best] > 0:
            for s in range(spec.seeds):
                idx = _random_same_layer(widths[i], members, len(members),
                                         np.random.default_rng(spec.seed * 1000 + 900 + s))
                c = scorer.correct(scorer.scores({i: (idx, float(best))}))
                rand_gain.append(c.mean() - dense_acc)
                amp_rows.append({"network": n["name"], "kind": n["kind"], "target": "random", "seed": s,
                                 "scale": best, "accuracy": _rnd(c.mean(), 4),
                                 "acc_half_a": _rnd(c[halves[0]].mean(), 4),
                                 "acc_half_b": _rnd(c[halves[1]].mean(), 4), "gain": _rnd(c.mean() - dense_acc, 4)})
        amp_summary.append({
            "network": n["name"], "kind": n["kind"], "size": int(len(members)), "best_scale": best,
            "best_gain": _rnd(gains[best], 4),
            "best_gain_half_a": _rnd(curve[best][halves[0]].mean() - dense_correct[halves[0]].mean(), 4),
            "best_gain_half_b": _rnd(curve[best][halves[1]].mean() - dense_correct[halves[1]].mean(), 4),
            "cv_scale_a_to_b": cv[0][0], "cv_gain_on_b": _rnd(cv[0][1], 4),
            "cv_scale_b_to_a": cv[1][0], "cv_gain_on_a": _rnd(cv[1][1], 4),
            "random_gain_mean": _rnd(np.mean(rand_gain), 4) if rand_gain else "",
            "random_gain_std": _rnd(_std(rand_gain), 4) if rand_gain else "",
        })
    tables["amplification"] = amp_rows
    tables["amplification_summary"] = amp_summary
    lap("amplification")

    info = {
        "fnprune_version": __version__,
        "model": spec.model.name_or_path,
        "task": task.name,
        "also_tasks": [t.name for t, _ in also],
        "calibration": {"split": task.calibration_split, "samples": len(calibration), "pool": n_pool,
                        "tokens_for_ica": int(calib.activations[0].tokens.shape[0]),
                        "group_ica_tokens": min(spec.group_tokens, int(calib.activations[0].tokens.shape[0]))},
        "evaluation": {"split": task.evaluation_split, "samples": len(eval_set), "split_size": n_eval_split,
                       "half_sizes": [len(h) for h in halves], "disjoint_from_calibration": True},
        "layers": len(widths), "mlp_width": widths[0], "mlp_neurons": int(sum(widths)),
        "dense_accuracy": _rnd(dense_acc, 4),
        "dense_accuracy_halves": [_rnd(dense_correct[h].mean(), 4) for h in halves],
        "group_ica_converged": group.converged,
        "per_layer_ica_converged_layers": int(sum(n.converged for n in calib.networks)),
        "evaluation_runs": scorer.runs,
        "evaluation_seconds": round(scorer.seconds, 1),
        "replay_layers": sorted(k for k, v in scorer.replay_ok.items() if v),
        "timings_seconds": timings,
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "load_average_1_5_15_min_at_start": load_before,
                "load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()]},
        "spec": _spec_dict(spec),
        "command": spec_command(spec),
    }
    return Analysis(spec, tables, info, calib, group)


def _spec_dict(spec: AnalysisSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["scales"] = list(spec.scales)
    return d


# ---------------------------------------------------------------------------------------------- output


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("", encoding="utf-8")
        return
    fields = list(rows[0])
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _rnd(v) for k, v in r.items()})


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 100})
    return plt


def plot_layer_networks(analysis: Analysis, path: Path) -> list[dict]:
    """Per-layer ICA: relevance of every (layer, component) and union of members per layer."""
    plt = _plt()
    rows = analysis.tables["layer_networks"]
    n_layers = max(r["layer"] for r in rows) + 1
    k = max(r["network"] for r in rows) + 1
    rel = np.zeros((n_layers, k))
    for r in rows:
        rel[r["layer"], r["network"]] = r["relevance"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.16 * n_layers + 1.5)),
                               gridspec_kw={"width_ratios": [3, 2]})
    im = a.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    a.set_xlabel("ICA component (per layer)")
    a.set_ylabel("layer")
    a.set_title("Per-layer networks: task relevance (label separation)")
    fig.colorbar(im, ax=a, fraction=0.04)
    for r in analysis.tables["key_networks"]:
        a.plot(r["component"], r["layer"], marker="o" if r["kind"] == "top" else "s", mfc="none",
               mec="red" if r["kind"] == "top" else "white", ms=7)
    summ = analysis.tables["layer_summary"]
    b.barh([s["layer"] for s in summ], [s["union_size"] for s in summ], color="tab:blue")
    b.set_xlabel("neurons in any network (|z| > threshold)")
    b.set_ylabel("layer")
    b.set_title("Per-layer networks: neurons covered")
    b.set_ylim(-0.5, n_layers - 0.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [{"layer": i, "component": j, "relevance": _rnd(rel[i, j], 5)} for i in range(n_layers) for j in range(k)]


def _top_group(analysis: Analysis, n: int) -> list[int]:
    rows = sorted(analysis.tables["group_networks"], key=lambda r: r["relevance_rank"])
    return [r["network"] for r in rows[:n]]


def plot_group_map(analysis: Analysis, path: Path, n: int = 8, bins: int = 64) -> list[dict]:
    """Where each of the top-n group networks' neurons sit: layer x neuron-index bins, member counts."""
    plt = _plt()
    group = analysis.group
    nets = _top_group(analysis, n)
    width = max(group.widths)
    bins = min(bins, width)
    edges = np.linspace(0, width, bins + 1).astype(int)
    cols = 2
    rows_n = (len(nets) + cols - 1) // cols
    n_layers = len(group.widths)
    fig, axes = plt.subplots(rows_n, cols, figsize=(11, max(2.2, rows_n * (0.06 * n_layers + 1.4))), squeeze=False)
    data = []
    for ax, k in zip(axes.flat, nets):
        grid = np.zeros((n_layers, bins))
        for i, idx in enumerate(group.per_layer(k)):
            grid[i] = np.histogram(idx, bins=edges)[0]
        for i, j in zip(*np.nonzero(grid)):
            data.append({"network": k, "layer": int(i), "bin": int(j), "neuron_from": int(edges[j]),
                         "neuron_to": int(edges[j + 1]), "members": int(grid[i, j])})
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest", origin="lower",
                       extent=(0, width, -0.5, n_layers - 0.5), vmin=0, vmax=max(1, grid.max()))
        rel = group.relevance[k]
        ax.set_title(f"group network {k}: {int(group.members[k].sum())} neurons, relevance {rel:.2f}")
        ax.set_ylabel("layer")
        ax.set_xlabel(f"MLP neuron index (bins of {width // bins})")
        fig.colorbar(im, ax=ax, fraction=0.03, label="members")
    for ax in list(axes.flat)[len(nets) :]:
        ax.axis("off")
    fig.suptitle("Cross-layer (group ICA) networks, most task-relevant first")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return data


def plot_group_layers(analysis: Analysis, path: Path, n: int = 8) -> None:
    plt = _plt()
    group = analysis.group
    nets = _top_group(analysis, n)
    n_layers = len(group.widths)
    fig, ax = plt.subplots(figsize=(11, 4))
    w = 0.8 / max(len(nets), 1)
    for j, k in enumerate(nets):
        counts = [len(idx) for idx in group.per_layer(k)]
        ax.bar(np.arange(n_layers) + (j - len(nets) / 2 + 0.5) * w, counts, width=w, label=f"network {k}")
    ax.set_xlabel("layer")
    ax.set_ylabel("member neurons")
    ax.set_title("Cross-layer networks: neurons per layer (top networks by task relevance)")
    ax.set_xticks(range(n_layers))
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_recurrence(analysis: Analysis, path: Path) -> None:
    plt = _plt()
    rows = analysis.tables["recurrence"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    rel_order = [r["network"] for r in sorted(analysis.tables["group_networks"], key=lambda r: r["relevance_rank"])]
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    w = 0.8 / max(len(tasks), 1)
    x = np.arange(len(rel_order))
    for j, t in enumerate(tasks):
        by = {r["template"]: r for r in rows if r["task"] == t}
        off = (j - len(tasks) / 2 + 0.5) * w
        a.bar(x + off, [by[k]["recurrence_rate"] if k in by else 0 for k in rel_order], width=w, label=t)
        a.plot(x + off, [by[k]["null_rate"] if k in by else 0 for k in rel_order], "k_", ms=8)
        b.bar(x + off, [by[k]["mean_best_iou"] if k in by else 0 for k in rel_order], width=w, label=t)
        b.plot(x + off, [by[k]["null_mean_best_iou"] if k in by else 0 for k in rel_order], "k_", ms=8)
    thr = analysis.spec.iou_threshold
    a.set_ylabel(f"fraction of groups with IoU > {thr:g}")
    a.set_title("Recurrence of group-ICA templates in ICA of small sample groups (black ticks: shuffled null)")
    a.legend()
    b.axhline(thr, color="grey", ls="--", lw=1)
    b.set_ylabel("mean best IoU")
    b.set_xlabel("template (group network id), most task-relevant first")
    b.set_xticks(x)
    b.set_xticklabels([str(k) for k in rel_order], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_key_networks(analysis: Analysis, path: Path) -> None:
    plt = _plt()
    rows = analysis.tables["key_networks"]
    seeds = analysis.tables["key_networks_seeds"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    x = np.arange(len(rows))
    dense = analysis.info["dense_accuracy"]
    ax.bar(x - 0.2, [r["fn_drop"] for r in rows], width=0.4, label="network masked",
           color=["tab:red" if r["kind"] == "top" else "tab:gray" for r in rows])
    ax.bar(x + 0.2, [r["random_drop_mean"] for r in rows], width=0.4, yerr=[r["random_acc_std"] for r in rows],
           capsize=3, label="same number of random neurons, same layer (mean, std over seeds)", color="tab:blue")
    for j, r in enumerate(rows):
        pts = [dense - s["accuracy"] for s in seeds if s["network"] == r["network"]]
        ax.plot([j + 0.2] * len(pts), pts, "k.", ms=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['network']}\n{r['size']} n, {r['kind']}" for r in rows], fontsize=7)
    ax.set_ylabel("accuracy drop (dense - masked)")
    ev = analysis.info["evaluation"]
    ax.set_title(f"Masking one network in its layer ({analysis.info['task']}, {ev['samples']} {ev['split']} examples, "
                 f"dense acc {dense:.3f}); grey bars = random control networks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_amplification(analysis: Analysis, path: Path) -> None:
    plt = _plt()
    rows = [r for r in analysis.tables["amplification"] if r["target"] == "network"]
    rand = [r for r in analysis.tables["amplification"] if r["target"] == "random"]
    dense = analysis.info["dense_accuracy"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in dict.fromkeys(r["network"] for r in rows):
        pts = sorted([(1.0, dense)] + [(r["scale"], r["accuracy"]) for r in rows if r["network"] == name])
        kind = next(r["kind"] for r in rows if r["network"] == name)
        ax.plot(*zip(*pts), marker="o", ms=3, ls="-" if kind == "top" else ":", label=f"{name} ({kind})")
    if rand:
        ax.plot([r["scale"] for r in rand], [r["accuracy"] for r in rand], "kx", label="random neurons, same layer")
    ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    ax.set_xlabel("factor applied to the network's neurons (0 = masked, 1 = unchanged)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Amplification sweep ({analysis.info['task']}, {analysis.info['evaluation']['samples']} examples)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _md_table(rows: list[dict], cols: list[str] | None = None, limit: int | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = cols or list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows[:limit]:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _report_md(a: Analysis, files: dict[str, str]) -> str:
    info, t, spec = a.info, a.tables, a.spec
    ev, cal = info["evaluation"], info["calibration"]
    key = t["key_networks"]
    top = [r for r in key if r["kind"] == "top"]
    sig = [r for r in top if r["excess_ci_low"] > 0]
    lines = [
        f"# Functional networks of `{Path(info['model']).name}` on {info['task']}",
        "",
        f"fnprune {info['fnprune_version']} `analyze`. Exact command:",
        "",
        "```bash",
        info["command"],
        "```",
        "",
        f"- model: `{info['model']}` ({info['layers']} layers x {info['mlp_width']} MLP neurons = "
        f"{info['mlp_neurons']:,} neurons)",
        f"- networks found on {cal['samples']} `{cal['split']}` examples (ICA on {cal['tokens_for_ica']} sampled "
        f"tokens per layer; group ICA on {cal['group_ica_tokens']} of them, all layers concatenated), "
        f"k = {spec.components} components, member = |z| > {spec.threshold:g}",
        f"- every accuracy below: zero-shot, {ev['samples']} examples sampled from the `{ev['split']}` split "
        f"({ev['split_size']} rows), which the networks were not found on (checked disjoint); halves "
        f"{ev['half_sizes'][0]} + {ev['half_sizes'][1]} examples",
        f"- dense accuracy {info['dense_accuracy']:.4f} (halves {info['dense_accuracy_halves'][0]:.4f} / "
        f"{info['dense_accuracy_halves'][1]:.4f}); one example is {1 / ev['samples']:.4f} of accuracy",
        f"- wall time {sum(info['timings_seconds'].values()):.0f} s before writing the report: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in info["timings_seconds"].items())
        + f" ({info['cpu']['cores']} CPU cores; load average {info['cpu']['load_average_1_5_15_min_at_start'][0]:g} "
        f"at the start, {info['cpu']['load_average_1_5_15_min_at_end'][0]:g} at the end)",
        "",
        "## 1. Networks",
        "",
        "Per-layer ICA (the maps `fnprune compress` uses). Left: task relevance of every network (how well its "
        "activity at the last prompt token separates the labels on the calibration data; red circles = the "
        "top networks analyzed below, white squares = random control networks). Right: neurons in any network.",
        "",
        f"![per-layer networks]({files['layer_networks']})",
        "",
        "Per-layer summary (sizes = member neurons):",
        "",
        _md_table(t["layer_summary"], ["layer", "networks", "median_size", "max_size", "union_size",
                                       "union_fraction", "max_relevance", "converged"]),
        "Cross-layer (group) networks: one ICA over all layers' neurons concatenated. Where the most "
        "task-relevant ones sit (layer x neuron index; colour = member neurons per bin) and how many neurons "
        "each has per layer:",
        "",
        f"![group network map]({files['group_map']})",
        "",
        f"![group networks per layer]({files['group_layers']})",
        "",
        _md_table(sorted(t["group_networks"], key=lambda r: r["relevance_rank"]),
                  ["network", "relevance_rank", "relevance", "size", "fraction", "layers_spanned", "top_layer"]),
        "## 2. Recurrence",
        "",
    ]
    if t["recurrence"]:
        rec = t["recurrence"]
        lines += [
            f"Templates = the group networks above. For each task, {spec.recurrence_groups} groups of "
            f"{spec.group_size} examples not used for calibration (or from the other task's calibration split) "
            f"were run through the model and given their own ICA (all layers concatenated); a template *recurs* "
            f"in a group when some map of that group's ICA has IoU > {spec.iou_threshold:g} with it (thresholded "
            "maps). Null: the group maps' members shuffled within each layer (same sizes).",
            "",
            f"![recurrence]({files['recurrence']})",
            "",
        ]
        for task_name in dict.fromkeys(r["task"] for r in rec):
            rows = [r for r in rec if r["task"] == task_name]
            lines.append(f"- {task_name}: templates recurring in at least half of the groups: "
                         f"{sum(r['recurrence_rate'] >= 0.5 for r in rows)} of {len(rows)}; mean recurrence rate "
                         f"{np.mean([r['recurrence_rate'] for r in rows]):.3f} (null "
                         f"{np.mean([r['null_rate'] for r in rows]):.3f})")
        lines += ["", _md_table(sorted(rec, key=lambda r: (r["task"], -r["relevance"])),
                                ["task", "template", "template_size", "relevance", "groups", "recurrence_rate",
                                 "mean_best_iou", "null_rate", "null_mean_best_iou"])]
    else:
        lines += ["_(skipped: --recurrence-groups 0 or too few held-out examples)_", ""]
    lines += [
        "## 3. Key networks",
        "",
        f"Each network's neurons zeroed in its own layer only (checked on every run with hooks: exactly those "
        f"neurons are zero, no other layer is touched), vs the same number of random neurons of the same layer "
        f"({spec.seeds} seeds). `excess_drop` = random-masked accuracy minus network-masked accuracy, with a 95% "
        f"paired bootstrap interval over examples. Top {spec.top_networks} networks by relevance, plus "
        f"{spec.control_networks} random networks as controls.",
        "",
        f"![key networks]({files['key_networks']})",
        "",
        _md_table(key, ["network", "kind", "relevance_rank", "relevance", "size", "masked_fn_acc", "fn_drop",
                        "random_acc_mean", "random_acc_std", "excess_drop", "excess_ci_low", "excess_ci_high",
                        "fn_drop_half_a", "fn_drop_half_b"]),
        f"Measured: {len(sig)} of {len(top)} top networks hurt accuracy more than random neurons of their layer "
        "with the 95% interval above zero; largest single-network drop "
        f"{max((r['fn_drop'] for r in key), default=0):.4f}.",
        "",
    ]
    if t["group_mask"]:
        g = t["group_mask"][0]
        lines += [
            f"The paper's test: the top {g['networks']} group networks masked together ({g['neurons']} neurons = "
            f"{g['fraction_of_mlp_neurons']:.2%} of MLP neurons, in {g['layers']} layers) vs the same number of "
            "random neurons in each of those layers:",
            "",
            _md_table(t["group_mask"], ["networks", "neurons", "fraction_of_mlp_neurons", "dense_acc",
                                        "masked_fn_acc", "random_acc_mean", "random_acc_std", "random_accs",
                                        "excess_drop", "excess_ci_low", "excess_ci_high"]),
        ]
    amp = t["amplification_summary"]
    gains = [r for r in amp if r["cv_gain_on_a"] > 0 and r["cv_gain_on_b"] > 0]
    lines += [
        "## 4. Amplification",
        "",
        f"Each analyzed network's neurons multiplied by {', '.join(f'{s:g}' for s in spec.scales)}. `best_*` "
        "picks the factor on all evaluation examples (optimistic); `cv_*` picks it on one half and measures the "
        "gain on the other half (honest). Random control: the same number of random neurons of the same layer "
        "scaled by the best factor (only when the best gain is positive).",
        "",
        f"![amplification]({files['amplification']})",
        "",
        _md_table(amp),
        f"Measured: {len(gains)} of {len(amp)} networks gain on both held-out halves when the factor is chosen "
        "on the other half.",
        "",
        "## Files",
        "",
        "Every figure's data is a CSV in this folder: "
        + ", ".join(f"`{name}.csv`" for name in sorted(t)) + "; settings and timings in `summary.json`.",
        "",
    ]
    return "\n".join(lines)


def write_report(analysis: Analysis, output: str | Path, overwrite: bool = False) -> Path:
    """report.md, PNG figures, one CSV per table and summary.json, written atomically into `output`."""
    out = Path(output).expanduser()
    with atomic_output_dir(out, overwrite) as tmp:
        tables = dict(analysis.tables)
        tables["layer_relevance_grid"] = plot_layer_networks(analysis, tmp / FIGURES["layer_networks"])
        tables["group_network_map"] = plot_group_map(analysis, tmp / FIGURES["group_map"])
        plot_group_layers(analysis, tmp / FIGURES["group_layers"])
        if analysis.tables["recurrence"]:
            plot_recurrence(analysis, tmp / FIGURES["recurrence"])
        plot_key_networks(analysis, tmp / FIGURES["key_networks"])
        plot_amplification(analysis, tmp / FIGURES["amplification"])
        analysis.tables.update(tables)
        for name, rows in tables.items():
            write_csv(tmp / f"{name}.csv", rows)
        write_json(tmp / "summary.json", analysis.info)
        (tmp / REPORT).write_text(_report_md(analysis, FIGURES), encoding="utf-8")
    return out


def analyze(spec: AnalysisSpec, progress: bool = True) -> Analysis:
    """Run the analysis and write the report into `spec.output` (refuses an existing folder without overwrite)."""
    if not spec.output:
        raise RecipeError("output: required (use --output DIR)")
    spec.validate()
    data = [p for t in (spec.task, *spec.also_tasks) for p in (t.data_dir, *t.data_files.values())]
    check_output_dir(Path(spec.output).expanduser(), spec.overwrite, [spec.model.name_or_path, *data])
    start = time.perf_counter()
    analysis = run_analysis(spec, progress)
    write_report(analysis, spec.output, spec.overwrite)
    analysis.info["wall_seconds"] = round(time.perf_counter() - start, 1)
    return analysis
