"""Stage 5 (optional), recover: distil the pruned model toward the dense one on the calibration prompts
(fnprune.distillation), with the dense model's distributions cached and the training resumable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from . import cache
from .arch import MLPLayout
from .data import Example
from .distillation import RecoveryResult, TeacherTargets, consensus_label_logprobs, recover, teacher_targets
from .evaluate import label_token_ids, next_token_logprobs
from .inputs import under_template
from .provenance import key_versions
from .recipe import PromptTemplate, Recipe, TaskSpec
from .tokens import batches, encode, encode_inputs
from .validation import Scores, Validation, accuracy_report, validation_report

__all__ = ["teacher", "recover_model", "recovery_report", "teacher_cache_key"]

log = logging.getLogger("fnprune")


def teacher_cache_key(recipe: Recipe, seqs: list[list[int]], label_ids: list[list[int]]) -> str:
    """Everything the dense model's distributions on the calibration prompts depend on."""
    return cache.cache_key({
        "teacher": hashlib.sha256(json.dumps(seqs).encode()).hexdigest(),
        "label_ids": hashlib.sha256(json.dumps(label_ids).encode()).hexdigest(),
        "top_k": recipe.recovery.top_k,
        "batch_size": recipe.calibration.batch_size,  # the teacher runs in these padded batches: other floats
        **({"label_target": "consensus"} if _consensus(recipe) else {}),
        "model": cache.model_fingerprint(recipe.model.name_or_path, recipe.model.revision),
        "dtype": recipe.model.dtype,
        "versions": key_versions(),
    })


def recovery_inputs(tokenizer, model, calibration: list[Example], recipe: Recipe) -> list[list[int]]:
    return encode_inputs(tokenizer, calibration, recipe.calibration.max_length, model)


def _consensus(recipe: Recipe) -> bool:
    return recipe.recovery.label_weight > 0 and recipe.recovery.label_target == "consensus"


def _one_token_words(tokenizer, task: TaskSpec, template: PromptTemplate) -> list[int]:
    """The template's label words as one token id each, in the task's label order; [] if one is longer."""
    ids = label_token_ids(tokenizer, template.words(task.label_words))
    return [v[0] for v in ids.values()] if all(len(v) == 1 for v in ids.values()) else []


def label_word_ids(tokenizer, calibration: list[Example], task: TaskSpec) -> list[list[int]]:
    """Per calibration prompt, its template's label words as one token id each, in the task's label order; an
    empty list where the prompt has no template (raw or generic text), the task is multiple choice, or a label
    word is longer than one token."""
    if task.kind != "classification":
        return [[] for _ in calibration]
    ids_of = {template.name: _one_token_words(tokenizer, task, template) for template in task.templates}
    return [ids_of.get(e.template, []) for e in calibration]


def consensus_labels(model, tokenizer, calibration: list[Example], task: TaskSpec, recipe: Recipe, progress: bool
                     ) -> torch.Tensor:
    """(N, C) the consensus label distribution of each calibration prompt's text: the dense model asked under
    every calibration template with one-token label words (never a held-out one)."""
    templates = [(t, ids) for t in task.calibration_templates() if (ids := _one_token_words(tokenizer, task, t))]
    per_template = torch.zeros(len(templates), len(calibration), len(task.label_words), dtype=torch.float64)
    bar = tqdm(total=len(templates) * len(calibration), desc="teacher consensus", unit="prompt",
               disable=not progress)
    with bar:
        for t, (template, ids) in enumerate(templates):
            prompts = [under_template(task, e, template).prompt for e in calibration]
            for batch in batches(encode(tokenizer, prompts, recipe.calibration.max_length),
                                 recipe.calibration.batch_size, "left"):
                per_template[t, batch.index] = next_token_logprobs(model, batch, ids)
                bar.update(len(batch.index))
    return consensus_label_logprobs(per_template)


def teacher(model, tokenizer, calibration: list[Example], recipe: Recipe, task: TaskSpec, progress: bool
            ) -> TeacherTargets:
    """The dense model's distributions on the calibration prompts (recovery's targets), from the cache if there;
    `task`: the resolved task (its templates' label words)."""
    seqs = recovery_inputs(tokenizer, model, calibration, recipe)
    labels = label_word_ids(tokenizer, calibration, task)
    use_cache = recipe.calibration.cache and cache.usable()
    key = teacher_cache_key(recipe, seqs, labels) if use_cache else ""
    found = cache.load_teacher(key) if key else None
    if found is not None:
        log.info("teacher distributions from cache %s", cache.cache_dir())
        return found
    targets = teacher_targets(model, seqs, recipe.recovery.top_k, recipe.calibration.batch_size, progress, labels)
    worded = [i for i, ids in enumerate(labels) if ids]
    if _consensus(recipe) and worded and targets.label_ids.shape[1]:  # a classifier head has no label words
        label_logprobs = targets.label_logprobs.clone()  # made in inference mode: read-only outside it
        label_logprobs[worded] = consensus_labels(model, tokenizer, [calibration[i] for i in worded], task, recipe,
                                                  progress)
        targets = dataclasses.replace(targets, label_logprobs=label_logprobs)
    log.info("teacher: %d positions x top %d = %.1f MiB", targets.indices.shape[0], targets.indices.shape[1],
             targets.nbytes / 2**20)
    if key:
        cache.save_teacher(key, targets)
    return targets


def recover_model(model, tokenizer, layout: MLPLayout, calibration: list[Example], teacher: TeacherTargets,
                  recipe: Recipe, progress: bool) -> RecoveryResult:
    """Recovery with its progress in the cache, kept after the training (`result.progress_file`) until the
    caller has written the checkpoint: a run stopped while scoring the recovered model loses no training."""
    seqs = recovery_inputs(tokenizer, model, calibration, recipe)
    use_cache = recipe.calibration.cache and cache.usable()
    return recover(model, layout, seqs, teacher, recipe.recovery, progress,
                   progress_dir=cache.cache_dir() if use_cache else None, keep_progress=True)


def recovery_report(recipe: Recipe, result: RecoveryResult, task: TaskSpec, validation: Validation, dense: Scores,
                    before: Scores) -> dict[str, Any]:
    """report.json's `recovery`: its settings and cost, and the pruned model's scores before it."""
    acc = accuracy_report(task, dense.task, before.task) if before.task is not None else None
    return {
        "settings": dataclasses.asdict(recipe.recovery),
        **{k: v for k, v in dataclasses.asdict(result).items() if k != "progress_file"},
        "before": {"metric": acc["metric"], "template_means": acc["template_means"],
                   "templates": {t["name"]: t["pruned"] for t in acc["templates"]}} if acc else None,
        # None when the pruned model was not scored before recovery (recovery.evaluate_before: false)
        "validation_before": (validation_report(validation, dense.validation, before.validation) or None)
        if before.validation else None,
    }
