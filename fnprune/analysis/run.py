"""One analysis from data to tables: load the task and model, calibrate and find each layer's networks with
compress's capture and ICA (the same Recipe sections; the prompts under the first calibration template), then run
the four experiments."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__, cache
from ..arch import is_classifier, layout_for, mlp_widths
from ..calibration import Calibration, calibrate
from ..checkpoint import check_output_dir
from ..data import (
    Example,
    check_disjoint,
    example_key,
    left_out,
    load_split,
    prompts_digest,
    resolve_task,
    sample,
)
from ..errors import DataError, MissingSplitFile, RecipeError
from ..models import load_model
from ..pipeline import StageTimer
from ..provenance import key_versions
from ..recipe import TaskSpec
from .cross_layer import GroupNetworks, group_networks
from .experiments import (
    Baseline,
    amplification,
    dense_baseline,
    group_mask,
    group_tables,
    key_networks,
    live_neurons,
    network_tables,
    pick_networks,
    recurrence,
    rounded,
)
from .report import SUMMARY_FILE, write_report
from .scoring import SCORES_REVISION, SavedScores, Scorer
from .spec import AnalysisSpec, spec_command

__all__ = ["Analysis", "analyze", "run_analysis"]

log = logging.getLogger("fnprune")


@dataclass
class Analysis:
    """Results: `tables` (name -> list of row dicts, one CSV each), `info` (settings, timings, headline
    numbers), and the objects behind them for further work in a notebook."""

    spec: AnalysisSpec
    tables: dict[str, list[dict[str, Any]]]
    info: dict[str, Any]
    calibration: Calibration | None = None
    group: GroupNetworks | None = None


@dataclass
class _Data:
    task: TaskSpec  # resolved
    calibration: list[Example]  # sampled from the calibration split
    evaluation: list[Example]  # sampled from the evaluation split
    held_out: list[Example]  # calibration-split examples in neither sample: the recurrence groups' source
    pool_size: int  # examples in the calibration split
    evaluation_split_size: int


def _classification(task: TaskSpec) -> TaskSpec:
    if task.kind != "classification":
        raise DataError(f"analyze scores label words: task {task.name!r} is {task.kind}, not classification")
    return task


def _split(task: TaskSpec, split: str, also: bool = False) -> list[Example]:
    """A split's examples; a missing file's remedy in analyze's own flags, not compress's (a recipe; --data-files
    for an --also-task, whose files are NAME:SPLIT=PATH)."""
    try:
        return load_split(task, split)
    except MissingSplitFile as exc:
        how = (f"--also-task {task.name}:{split}=FILE (or {task.name}:DIR)" if also
               else f"--data-files {split}=FILE (or --data-dir DIR)")
        raise DataError(f"{exc.problem}; give the {split} file with {how}") from exc


def _load_data(spec: AnalysisSpec) -> _Data:
    task = _classification(resolve_task(spec.task))
    evaluation = _split(task, task.evaluation_split)
    held = {example_key(e) for e in evaluation}  # rows in both files stay evaluation rows, as compress keeps them
    pool = left_out(_split(task, task.calibration_split), example_key, held, task.calibration_split)
    calibration = sample(pool, spec.calibration.num_samples, spec.seed)
    check_disjoint(calibration, evaluation)
    eval_set = sample(evaluation, spec.eval_samples, spec.seed)
    if len(eval_set) < 2:  # each half needs an example, or its accuracy is NaN
        raise DataError(f"the {task.evaluation_split} split has {len(eval_set)} example: analyze needs at least 2 "
                        "(the examples are split into two halves)")
    used = {e.prompt for e in calibration} | {e.prompt for e in evaluation}
    held_out = [e for e in pool if e.prompt not in used]
    return _Data(task, calibration, eval_set, held_out, len(pool), len(evaluation))


def _saved_scores(spec: AnalysisSpec, data: _Data) -> SavedScores | None:
    """The scores this analysis already has in the cache (an interrupted run's), keyed by everything an
    intervention's scores depend on besides its neurons; None with --no-cache or an unwritable cache."""
    if not (spec.calibration.cache and cache.usable()):
        return None
    return SavedScores(cache.cache_key({
        "analysis_scores": True,
        "model": cache.model_fingerprint(spec.model.name_or_path, spec.model.revision),
        "dtype": spec.model.dtype,
        "examples": prompts_digest(data.evaluation),
        "label_words": list(data.task.label_words.items()),  # in order: the score columns follow it
        "batch_size": spec.eval_batch_size,
        "versions": key_versions(),
        "revision": SCORES_REVISION,
    }))


def run_analysis(spec: AnalysisSpec, progress: bool = True) -> Analysis:
    """Run all four experiments; nothing is written (see `write_report`)."""
    spec.validate()
    timer = StageTimer()
    load_before = [round(v, 2) for v in os.getloadavg()]
    with timer.stage("load"):
        data = _load_data(spec)
        also = []
        for extra in spec.also_tasks:
            t = _classification(resolve_task(extra))
            also.append((t, _split(t, t.calibration_split, also=True)))
        model, tokenizer = load_model(spec.model)
        # before the heavy work: label words that cannot be scored, or a classifier head of other classes, stop here
        scorer = Scorer(model, tokenizer, data.evaluation, data.task.label_words, spec.eval_batch_size,
                        progress=progress, saved_scores=_saved_scores(spec, data))

    widths = mlp_widths(model, layout_for(model))
    components, max_tokens = spec.networks.components, spec.calibration.max_tokens
    if components >= min(min(widths), max_tokens):
        raise RecipeError(f"components ({components}) must be below the MLP width ({min(widths)}) and "
                          f"max_tokens ({max_tokens})")
    with timer.stage("calibration + per-layer ICA"):
        calib = calibrate(model, tokenizer, data.calibration, data.task.label_words, spec.recipe(data.task), True,
                          progress, use_cache=spec.calibration.cache)
    with timer.stage("group ICA"):
        tables = network_tables(calib)
        group = group_networks(calib, spec)
        tables.update(group_tables(group))
    with timer.stage("recurrence"):
        sources = [(data.task.name, data.held_out)] + [(t.name, list(pool)) for t, pool in also]
        tables.update(recurrence(model, tokenizer, spec, group, sources, progress))
    nets = pick_networks(calib, spec)
    try:
        with timer.stage("dense evaluation"):
            base = dense_baseline(scorer, nets, spec, live_neurons(calib))
        with timer.stage("key networks"):
            key, masked = key_networks(base, nets, spec, progress)
            tables.update(key)
        with timer.stage("group masking"):
            tables["group_mask"] = group_mask(base, group, spec)
        with timer.stage("amplification"):
            tables.update(amplification(base, nets, masked, spec, progress))
    except KeyboardInterrupt as exc:
        raise _interrupted(scorer, exc) from exc

    info = _info(spec, data, [t.name for t, _ in also], calib, group, base, timer.seconds, load_before)
    return Analysis(spec, tables, info, calib, group)


def _interrupted(scorer: Scorer, exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """The interrupt, saying what the rerun will not repeat."""
    saved = scorer.saved_scores
    if saved is None or not saved.written:
        return exc
    return KeyboardInterrupt(f"the scores of {saved.written} evaluation runs are in the cache: the same command "
                             "continues from there")


def _info(spec: AnalysisSpec, data: _Data, also_tasks: list[str], calib: Calibration, group: GroupNetworks,
          base: Baseline, timings: dict[str, float], load_before: list[float]) -> dict[str, Any]:
    """summary.json: what the analysis ran on, the headline numbers, and where the time went."""
    widths, scorer, halves = base.scorer.widths, base.scorer, base.halves
    ica_tokens = int(calib.activations[0].tokens.shape[0])
    return {
        "fnprune_version": __version__,
        "model": spec.model.name_or_path,
        "task": data.task.name,
        "also_tasks": also_tasks,
        "calibration": {"split": data.task.calibration_split, "samples": len(data.calibration),
                        "pool": data.pool_size, "tokens_for_ica": ica_tokens,
                        "group_ica_tokens": min(spec.group_tokens, ica_tokens)},
        "evaluation": {"split": data.task.evaluation_split, "samples": len(data.evaluation),
                       "split_size": data.evaluation_split_size, "half_sizes": [len(h) for h in halves],
                       "disjoint_from_calibration": True},
        "layers": len(widths), "mlp_width": widths[0] if len(set(widths)) == 1 else None,
        "mlp_widths": list(widths), "mlp_neurons": int(sum(widths)),
        "live_neurons": int(sum(m.sum() for m in base.live)),  # that vary on the calibration tokens
        "scoring": "classifier head" if is_classifier(scorer.model) else "label words (zero-shot)",
        "dense_accuracy": rounded(base.accuracy, 4),
        "dense_accuracy_halves": [rounded(base.correct[h].mean(), 4) for h in halves],
        "group_ica_converged": group.converged,
        "per_layer_ica_converged_layers": int(sum(n.converged for n in calib.networks)),
        "evaluation_runs": scorer.runs,
        "evaluation_runs_from_cache": scorer.reused,  # an interrupted run's, or the same neurons scored before
        "evaluation_seconds": round(scorer.seconds, 1),
        "replay_layers": sorted(k for k, v in scorer.replay_ok.items() if v),
        "timings_seconds": timings,
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "load_average_1_5_15_min_at_start": load_before,
                "load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()]},
        "spec": _spec_dict(spec),
        "command": spec_command(spec),
    }


def _spec_dict(spec: AnalysisSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["scales"] = list(spec.scales)
    return d


def analyze(spec: AnalysisSpec, progress: bool = True) -> Analysis:
    """Run the analysis and write the report into `spec.output` (refuses an existing folder without overwrite)."""
    if not spec.output:
        raise RecipeError("output: required (use --output DIR)")
    spec.validate()
    check_output_dir(Path(spec.output).expanduser(), spec.overwrite, spec.input_paths(), own_files=[SUMMARY_FILE])
    start = time.perf_counter()
    analysis = run_analysis(spec, progress)
    analysis.info["wall_seconds"] = round(time.perf_counter() - start, 1)  # before writing: summary.json holds it
    write_report(analysis, spec.output, spec.overwrite, checked=True)
    return analysis
