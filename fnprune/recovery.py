"""Stage 5 (optional), recover: distil the pruned model toward the dense one on the calibration prompts
(fnprune.distillation), with the dense model's distributions cached and the training resumable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from . import cache
from .arch import MLPLayout, is_classifier
from .data import Example
from .distillation import RecoveryResult, TeacherTargets, recover, teacher_targets
from .evaluate import label_token_ids
from .provenance import key_versions
from .recipe import Recipe, TaskSpec
from .tokens import encode_inputs
from .validation import Scores, Validation, accuracy_report, validation_report

__all__ = ["teacher", "recover_model", "recovery_report", "teacher_cache_key"]

log = logging.getLogger("fnprune")


def teacher_cache_key(recipe: Recipe, seqs: list[list[int]], label_ids: list[list[int]]) -> str:
    """Everything the dense model's distributions on the calibration prompts depend on."""
    return cache.cache_key({
        "teacher": hashlib.sha256(json.dumps(seqs).encode()).hexdigest(),
        "label_ids": hashlib.sha256(json.dumps(label_ids).encode()).hexdigest(),
        "top_k": recipe.recovery.top_k,
        "model": cache.model_fingerprint(recipe.model.name_or_path, recipe.model.revision),
        "dtype": recipe.model.dtype,
        "versions": key_versions(),
    })


def recovery_inputs(tokenizer, model, calibration: list[Example], recipe: Recipe) -> list[list[int]]:
    return encode_inputs(tokenizer, calibration, recipe.calibration.max_length, is_classifier(model))


def label_word_ids(tokenizer, calibration: list[Example], task: TaskSpec) -> list[list[int]]:
    """Per calibration prompt, its template's label words as one token id each, in the task's label order; an
    empty list where the prompt has no template (raw or generic text), the task is multiple choice, or a label
    word is longer than one token."""
    if task.kind != "classification":
        return [[] for _ in calibration]
    ids_of: dict[str, list[int]] = {}
    for template in task.templates:
        ids = label_token_ids(tokenizer, template.words(task.label_words))
        ids_of[template.name] = [v[0] for v in ids.values()] if all(len(v) == 1 for v in ids.values()) else []
    return [ids_of.get(e.template, []) for e in calibration]


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
    log.info("teacher: %d positions x top %d = %.1f MiB", targets.indices.shape[0], targets.indices.shape[1],
             targets.nbytes / 2**20)
    if key:
        cache.save_teacher(key, targets)
    return targets


def recover_model(model, tokenizer, layout: MLPLayout, calibration: list[Example], teacher: TeacherTargets,
                  recipe: Recipe, progress: bool) -> RecoveryResult:
    seqs = recovery_inputs(tokenizer, model, calibration, recipe)
    use_cache = recipe.calibration.cache and cache.usable()
    return recover(model, layout, seqs, teacher, recipe.recovery, progress,
                   progress_dir=cache.cache_dir() if use_cache else None)


def recovery_report(recipe: Recipe, result: RecoveryResult, task: TaskSpec, validation: Validation, dense: Scores,
                    before: Scores) -> dict[str, Any]:
    """report.json's `recovery`: its settings and cost, and the pruned model's scores before it."""
    acc = accuracy_report(task, dense.task, before.task) if before.task is not None else None
    return {
        "settings": dataclasses.asdict(recipe.recovery),
        **dataclasses.asdict(result),
        "before": {"metric": acc["metric"], "template_means": acc["template_means"],
                   "templates": {t["name"]: t["pruned"] for t in acc["templates"]}} if acc else None,
        # None when the pruned model was not scored before recovery (recovery.evaluate_before: false)
        "validation_before": (validation_report(validation, dense.validation, before.validation) or None)
        if before.validation else None,
    }
