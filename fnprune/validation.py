"""Stage 6, validate: the task's accuracy under every template, the extra validation benchmarks and WikiText-2
perplexity, for the dense and the pruned model; the dense model's results are cached. And report.json's
accuracy sections built from them."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import cache
from .card import is_number
from .data import BUILTIN_TASKS, Example, load_evaluation, prompts_text, resolve_task
from .errors import DataError, RecipeError
from .evaluate import TaskResult, evaluate_templates
from .intervals import retained_interval
from .lm_eval_backend import score_lm_eval
from .perplexity import perplexity, wikitext_file, wikitext_ids
from .provenance import file_sha256, key_versions
from .recipe import PERPLEXITY_TASK, ModelSpec, Recipe, TaskSpec, ValidationTask

__all__ = [
    "Scores", "Validation", "load_validation", "score", "score_task", "score_validation", "evaluation_cache_key",
    "accuracy_report", "validation_report", "read_hits", "read_right_probs",
]

log = logging.getLogger("fnprune")


@dataclass
class Scores:
    """One model's results: the task under every template (None: evaluation off), each validation benchmark, and
    lm-eval's (fnprune.lm_eval_backend.run_lm_eval; None: no lm-eval tasks, or not run for this model)."""

    task: TaskResult | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    lm_eval: dict[str, Any] | None = None


def score_task(model, tokenizer, sets, task, recipe: Recipe, progress: bool, cached_as: ModelSpec | None = None,
              ) -> TaskResult | None:
    """Accuracy under every template; with `cached_as` (the dense model's spec) read from / saved to the cache,
    so the next compress of the same base model does not score it again."""
    if not recipe.evaluation.enabled:
        return None
    key = ""
    if cached_as is not None and recipe.calibration.cache and cache.usable():
        key = evaluation_cache_key(cached_as, sets, task, recipe.evaluation.batch_size)
        found = cache.load_evaluation(key, sets, task)
        if found is not None:
            log.info("dense evaluation from cache %s", cache.cache_dir())
            return found
    result = evaluate_templates(model, tokenizer, sets, task, recipe.evaluation.batch_size, progress=progress)
    if key:
        cache.save_evaluation(key, result)
    return result


def evaluation_cache_key(spec: ModelSpec, sets: dict[str, list[Example]], task: TaskSpec, batch_size: int) -> str:
    """Everything a model's scores depend on: model files, prompts, label words, batching, versions."""
    digest = hashlib.sha256()
    for name, examples in sets.items():
        words = next(t for t in task.templates if t.name == name).words(task.label_words)
        digest.update(json.dumps([name, words]).encode())
        digest.update(prompts_text(examples).encode())
        if task.kind != "classification":  # classification keys stay as they were
            digest.update(json.dumps([task.kind, [[e.delimiter, *e.choices] for e in examples]]).encode())
    return cache.cache_key({
        "evaluation": digest.hexdigest(),
        "model": cache.model_fingerprint(spec.name_or_path, spec.revision),
        "dtype": spec.dtype,
        "batch_size": batch_size,
        "versions": key_versions(),
    })


@dataclass
class Validation:
    """A run's extra benchmarks, loaded once: each task's examples under its templates, the perplexity tokens."""

    tasks: list[tuple[ValidationTask, TaskSpec, dict[str, list[Example]]]] = field(default_factory=list)
    perplexity: tuple[ValidationTask, Path, torch.Tensor] | None = None
    window: int = 512


def load_validation(recipe: Recipe, tokenizer) -> Validation:
    """The recipe's `evaluation.validation`: built-in tasks on their evaluation split (held-out templates unless
    named), WikiText-2 as the first `evaluation.perplexity_tokens` tokens of the file. Problems: Data/RecipeError."""
    ev = recipe.evaluation
    out = Validation(window=ev.perplexity_window)
    if not ev.enabled:
        return out
    for v in ev.validation:
        if v.task == PERPLEXITY_TASK:
            path = wikitext_file(v.file or v.data_dir or "")
            out.perplexity = (v, path, wikitext_ids(tokenizer, path, ev.perplexity_tokens))
            continue
        if v.task not in BUILTIN_TASKS:
            raise RecipeError(f"evaluation.validation: {v.task!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}) "
                              f"or {PERPLEXITY_TASK}")
        try:
            task = resolve_task(TaskSpec(name=v.task, data_dir=v.data_dir))
            sets = load_evaluation(task, task.evaluation_split, v.max_samples or ev.max_samples)
        except RecipeError as exc:  # name the --validate entry, not the main task's settings
            raise RecipeError([f"evaluation.validation {v.task} (--validate): {p}" for p in exc.problems]) from exc
        except DataError as exc:
            raise DataError(f"evaluation.validation {v.task} (--validate {v.task}={v.data_dir}): {exc}") from exc
        wanted = v.templates or [t.name for t in task.held_out_templates()] or list(sets)
        unknown = [n for n in wanted if n not in sets]
        if unknown:
            raise RecipeError(f"evaluation.validation {v.task}: no template(s) {unknown} (its templates: "
                              f"{', '.join(sets)})")
        out.tasks.append((v, task, {n: sets[n] for n in wanted}))
    return out


def score_validation(model, tokenizer, validation: Validation, recipe: Recipe, progress: bool,
              cached_as: ModelSpec | None = None) -> dict[str, Any]:
    """Every validation benchmark's result (TaskResult, or PerplexityResult for wikitext); the dense model's
    read from / saved to the cache like its task scores."""
    out: dict[str, Any] = {}
    for v, task, sets in validation.tasks:
        out[v.task] = score_task(model, tokenizer, sets, task, recipe, progress, cached_as)
    if validation.perplexity is not None and recipe.evaluation.enabled:
        v, path, ids = validation.perplexity
        window, key = validation.window, ""
        if cached_as is not None and recipe.calibration.cache and cache.usable():
            key = cache.cache_key({
                "perplexity": file_sha256(path), "tokens": ids.numel(), "window": window,
                "model": cache.model_fingerprint(cached_as.name_or_path, cached_as.revision), "dtype": cached_as.dtype,
                "versions": key_versions(),
            })
        found = cache.load_perplexity(key) if key else None
        if found is not None:
            log.info("dense perplexity from cache %s", cache.cache_dir())
        else:
            if progress:
                tqdm.write(f"evaluate: {PERPLEXITY_TASK} perplexity over {ids.numel()} tokens", file=sys.stderr)
            found = perplexity(model, ids, window)
            if key:
                cache.save_perplexity(key, found)
        out[v.task] = found
    return out


def validation_report(validation: Validation, dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """report.json's `validation`: each task's accuracy_report, and the perplexity, dense beside pruned."""
    if not (validation.tasks or validation.perplexity):
        return {}
    out: dict[str, Any] = {"tasks": [
        {"task": v.task, "data_dir": str(Path(v.data_dir).expanduser().resolve()) if v.data_dir else None,
         **accuracy_report(task, dense.get(v.task), pruned.get(v.task))}
        for v, task, _ in validation.tasks
    ]}
    if validation.perplexity is not None:
        v, path, ids = validation.perplexity
        d, p = dense.get(v.task), pruned.get(v.task)
        out["perplexity"] = {
            "task": v.task, "file": str(path), "tokens": int(ids.numel()),
            "tokens_scored": d.tokens_scored if d else None, "window": validation.window,
            "dense": d.ppl if d else None, "pruned": p.ppl if p else None,
        }
    return out


def accuracy_report(task: TaskSpec, dense: TaskResult | None, pruned: TaskResult | None) -> dict[str, Any]:
    """report.json's accuracy: the headline (held-out template mean), each template, and both means."""
    held = dense.held_out if dense else [t.name for t in task.held_out_templates()]
    acc = lambda r, name: r.by_template[name].accuracy if r else None  # noqa: E731
    shares = lambda r, name: r.by_template[name].label_shares() if r else None  # noqa: E731
    norm = lambda r, name: r.by_template[name].accuracy_norm if r else None  # noqa: E731
    mean = lambda r, h, n=False: r.mean(h, n) if r else None  # noqa: E731
    hits = lambda r, h: r.hits(h) if r else None  # noqa: E731
    names = list(dense.by_template) if dense else [t.name for t in task.templates]
    texts = {t.name: t.template for t in task.templates}
    return {
        "metric": {
            "name": "accuracy",
            "split": task.evaluation_split,
            "n": dense.n if dense else None,
            "of": "held-out templates (mean)" if held else "calibration templates (mean)",
            "dense": dense.headline if dense else None,
            "pruned": pruned.headline if pruned else None,
            "majority_class": dense.majority if dense else None,
            "kind": task.kind,
            "dense_acc_norm": mean(dense, bool(held), True),  # lm-eval's acc_norm, same templates
            "pruned_acc_norm": mean(pruned, bool(held), True),
            **retained(hits(dense, bool(held)), hits(pruned, bool(held))),
            "right_prob": right_prob_report(dense, pruned, bool(held)),
        },
        "template_means": {
            kind: {"dense": mean(dense, h), "pruned": mean(pruned, h),
                   "dense_acc_norm": mean(dense, h, True), "pruned_acc_norm": mean(pruned, h, True),
                   **retained(hits(dense, h), hits(pruned, h)), "right_prob": right_prob_report(dense, pruned, h)}
            for kind, h in (("calibration", False), ("held_out", True))
        },
        "templates": [
            {"name": n, "held_out": n in held, "template": texts[n], "dense": acc(dense, n), "pruned": acc(pruned, n),
             "dense_acc_norm": norm(dense, n), "pruned_acc_norm": norm(pruned, n),
             **retained(_template_hits(dense, n), _template_hits(pruned, n)),
             "predicted": {"dense": shares(dense, n), "pruned": shares(pruned, n)},
             "hits": {"dense": hit_string(dense, n), "pruned": hit_string(pruned, n)},
             "right_probs": {"dense": right_prob_list(dense, n), "pruned": right_prob_list(pruned, n)}}
            for n in names
        ],
    }


def right_prob_report(dense: TaskResult | None, pruned: TaskResult | None, held_out: bool) -> dict[str, Any]:
    """The mean probability of the right answer, dense and pruned, and pruned / dense with its interval: unlike
    accuracy it moves with every answer's sureness, so it still tells models apart where their answers agree."""
    mean = lambda r: r.mean_right_prob(held_out) if r else None  # noqa: E731
    probs = lambda r: r.right_probs(held_out) if r else None  # noqa: E731
    return {"dense": mean(dense), "pruned": mean(pruned), **retained(probs(dense), probs(pruned))}


def retained(dense_hits: torch.Tensor | None, pruned_hits: torch.Tensor | None) -> dict[str, Any]:
    """Pruned over dense mean accuracy and its 95% interval (a paired bootstrap over the examples: how much of a
    "% of dense" the evaluation split can tell apart). Hits: (templates, examples), 1 where right (or any
    per-example score, such as the probability of the right answer)."""
    if dense_hits is None or pruned_hits is None or not dense_hits.any():
        return {"retained": None, "retained_ci95": None}
    interval = retained_interval(dense_hits, pruned_hits)  # 10 decimals: a "% of dense" shown to 0.1 is rounded once
    return {"retained": round(float(pruned_hits.double().mean() / dense_hits.double().mean()), 10),
            "retained_ci95": None if interval is None else [round(v, 10) for v in interval]}


def hit_string(result: TaskResult | None, name: str) -> str | None:
    """One template's answers as report.json keeps them, "1" right and "0" wrong per example in order: what a
    paired comparison of two checkpoints scored on the same examples needs (`read_hits` reads it back)."""
    hits = result.by_template[name].hits if result else None
    return None if hits is None else "".join("1" if h else "0" for h in hits.tolist())


def right_prob_list(result: TaskResult | None, name: str) -> list[float] | None:
    """One template's probability of the right answer per example, in order, to 4 decimals: a paired comparison
    by it moves with every answer's sureness, not only where an answer flips (`read_right_probs` reads it back)."""
    probs = result.by_template[name].right_probs if result else None
    return None if probs is None else [round(p, 4) for p in probs.tolist()]


def read_hits(entries: list[dict[str, Any]], model: str, held_out: bool) -> torch.Tensor | None:
    """(templates, examples) hits of `model` ("dense" or "pruned") from report.json's `templates` entries, over
    the held-out or the calibration templates; None if any is missing (a report from before they were kept)."""
    rows = _template_rows(entries, "hits", model, held_out)
    if rows is None or any(not isinstance(r, str) for r in rows):
        return None
    return torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool)


def read_right_probs(entries: list[dict[str, Any]], model: str, held_out: bool) -> torch.Tensor | None:
    """(templates, examples) probabilities of the right answer, as `read_hits` reads the hits."""
    rows = _template_rows(entries, "right_probs", model, held_out)
    if rows is None or any(not isinstance(r, list) or not all(is_number(v) for v in r) for r in rows):
        return None
    return torch.tensor(rows, dtype=torch.float64)


def _template_rows(entries: list[dict[str, Any]], key: str, model: str, held_out: bool) -> list[Any] | None:
    """`model`'s per-example entry under `key` for each held-out (or calibration) template; None when one is
    missing or their lengths differ (untrusted input: a report from before, or a damaged one)."""
    field = lambda e: e.get(key) if isinstance(e.get(key), dict) else {}  # noqa: E731
    rows = [field(e).get(model) for e in entries if isinstance(e, dict) and e.get("held_out") == held_out]
    if not rows or any(not isinstance(r, (str, list)) or len(r) != len(rows[0]) for r in rows):
        return None
    return rows


def _template_hits(result: TaskResult | None, name: str) -> torch.Tensor | None:
    hits = result.by_template[name].hits if result else None
    return None if hits is None else hits[None]


def score(model, tokenizer, sets: dict[str, list[Example]], task: TaskSpec, validation: Validation, recipe: Recipe,
          progress: bool, cached_as: ModelSpec | None = None, lm_eval: bool = True) -> Scores:
    """The task, the validation benchmarks and (`lm_eval`) the lm-eval tasks of one model (`cached_as`: the dense
    model's spec, see score_task)."""
    return Scores(score_task(model, tokenizer, sets, task, recipe, progress, cached_as),
                  score_validation(model, tokenizer, validation, recipe, progress, cached_as),
                  score_lm_eval(model, tokenizer, recipe, cached_as, progress) if lm_eval else None)
