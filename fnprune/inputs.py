"""Stage 0, load: the task's calibration and evaluation examples, the model and tokenizer, the validation
benchmarks, and the checks that can fail before any forward pass (disjoint data, budgets, disk space)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import MLPLayout, is_classifier, layout_for, mlp_widths
from .capture import capture_memory_bytes
from .checkpoint import check_disk_space
from .data import (
    RAW,
    Example,
    check_disjoint,
    data_source,
    example_key,
    fill_template,
    load_evaluation,
    load_sample,
    load_split,
    resolve_task,
    shared_examples,
    task_fields,
)
from .errors import DataError, RecipeError
from .evaluate import label_token_ids
from .lm_eval_backend import check_lm_eval, check_lm_eval_disjoint
from .models import load_model, model_source, unique_parameters, weights_dir
from .offload import offloaded_modules
from .provenance import provenance_changes
from .pruning import resolve_selection
from .recipe import CalibrationSpec, NetworksSpec, PromptTemplate, Recipe, RecoverySpec, SelectionSpec, TaskSpec
from .selection import NEEDS_NETWORKS
from .stream_surgery import source_weight_map
from .tokens import TokenizerState, classifier_texts, tokenizer_state
from .validation import Validation, load_validation

__all__ = ["Inputs", "load_inputs", "calibration_prompts", "evaluation_texts", "calibrated_on", "check_budgets",
           "under_template"]

log = logging.getLogger("fnprune")


@dataclass
class Inputs:
    """What one compress run reads: the recipe with its task resolved and its automatic selection values filled
    in, the examples, and the dense model."""

    recipe: Recipe
    task: TaskSpec
    selection: SelectionSpec  # the recipe's, automatic values resolved
    prompts: list[Example]  # calibration prompts (calibration split, calibration templates)
    evaluation: dict[str, list[Example]]  # evaluation split, per template
    validation: Validation
    model: Any
    tokenizer: Any
    tokenizer_state: TokenizerState  # its truncation and padding as loaded: what the checkpoint saves
    layout: MLPLayout
    widths: list[int]  # dense MLP width of each layer
    source: Path | None  # the local checkpoint folder streamed surgery reads, or None (in-memory surgery)

    @property
    def with_sample(self) -> bool:
        """Whether capture keeps a token sample: the networks and the reconstruction need one (sequential
        selection fits its reconstruction on the pruned model's activations instead)."""
        sel = self.selection
        return sel.method in NEEDS_NETWORKS or sel.reconstruct and not sel.sequential


def load_inputs(recipe: Recipe) -> Inputs:
    lm_eval_tasks = {}
    if recipe.evaluation.enabled:  # lm-eval installed, its tasks known: before any data or model is loaded
        lm_eval_tasks = check_lm_eval(recipe.evaluation.lm_eval_tasks, recipe.evaluation.lm_eval_include)
    model_source(recipe.model)  # a missing local model fails now, not after the data is read
    changes = provenance_changes(recipe.provenance)
    if changes:
        log.warning("this recipe's run will not reproduce its checkpoint byte for byte: %s", "; ".join(changes))
    task = resolve_task(recipe.task)
    recipe = dataclasses.replace(  # what runs, and is saved
        recipe, networks=recipe.networks.for_task(task.kind), calibration=recipe.calibration.for_task(task.kind))
    try:
        evaluation = _evaluation_examples(task, recipe.evaluation.enabled)
    except DataError:
        calibration_prompts(task, recipe.calibration)  # a broken calibration file is named first, as it is read first
        raise
    held = {example_key(e) for e in next(iter(evaluation.values()), [])}
    prompts = calibration_prompts(task, recipe.calibration, held)  # rows in both files stay evaluation rows
    if evaluation:
        check_disjoint(prompts, next(iter(evaluation.values())))
    check_lm_eval_disjoint(lm_eval_tasks, [example_key(e) for e in prompts], recipe.evaluation.lm_eval_limit)
    if recipe.evaluation.max_samples:
        evaluation = {name: ex[: recipe.evaluation.max_samples] for name, ex in evaluation.items()}
    model, tokenizer = load_model(recipe.model)
    loaded_state = tokenizer_state(tokenizer)  # before any call sets the tokenizer's truncation and padding
    if task.kind == "classification" and not is_classifier(model):  # label words that cannot work: now, not later
        for template in task.templates:
            label_token_ids(tokenizer, template.words(task.label_words))
    if is_classifier(model):  # now, not after calibration and selection
        _classifier_can_score(task, prompts)
    trainable = not recipe.model.offload_folder and not offloaded_modules(model)
    recipe = dataclasses.replace(recipe, recovery=recipe.recovery.for_task(task.kind, trainable))
    _warn_unused_recovery(recipe.recovery)
    validation = load_validation(recipe, tokenizer)
    _check_validation(validation, prompts, model)
    layout = layout_for(model)
    source = weights_dir(recipe.model.name_or_path, recipe.model.revision) if recipe.streamed() else None
    if source is not None:
        source_weight_map(source)  # fail now, not after calibration, if the files cannot be streamed
    selection = resolve_selection(recipe.selection, layout, model, task.kind, in_memory=source is None)
    _warn_unused_settings(recipe, selection, task.kind)
    return Inputs(recipe, task, selection, prompts, evaluation, validation, model, tokenizer, loaded_state, layout,
                  mlp_widths(model, layout), source)


def _classifier_can_score(task: TaskSpec, examples: list[Example]) -> None:
    """A classifier head scores a task of one text or a text pair; multiple choice needs a language-model head."""
    if task.kind == "multiple_choice":
        raise DataError(f"a classifier checkpoint cannot score multiple-choice tasks (no language-model head): "
                        f"task {task.name!r}")
    if examples:
        classifier_texts(examples[0])


def _check_validation(validation: Validation, prompts: list[Example], model) -> None:
    """The --validate benchmarks' data shares no example with the calibration, as the task's evaluation split
    doesn't, and the perplexity window fits the model's positions (past them it scores garbage or fails)."""
    for v, task, sets in validation.tasks:
        examples = next(iter(sets.values()))  # the split's rows, under its first template
        try:
            check_disjoint(prompts, examples)
            if is_classifier(model):
                _classifier_can_score(task, examples)
        except DataError as exc:
            raise DataError(f"evaluation.validation {v.task} (--validate): {exc}") from exc
    if validation.perplexity is not None and is_classifier(model):
        raise DataError("evaluation.perplexity (--validate wikitext=...): a classifier checkpoint has no "
                        "language-model head to score perplexity with")
    positions = getattr(model.config, "max_position_embeddings", None)
    if validation.perplexity is not None and isinstance(positions, int) and validation.window > positions:
        raise RecipeError(f"evaluation.perplexity_window {validation.window} is longer than the model's {positions} "
                          f"positions; use --perplexity-window {positions} or less")


def _warn_unused_recovery(spec: RecoverySpec) -> None:
    """Recovery settings changed from their defaults while recovery is off would be ignored without a word."""
    default = RecoverySpec()
    changed = [f"recovery.{f.name}" for f in dataclasses.fields(spec)
               if f.name != "enabled" and getattr(spec, f.name) != getattr(default, f.name)]
    if not spec.enabled and changed:
        log.warning("recovery is off (--recover turns it on): %s not used", ", ".join(changed))


def _changed(spec: Any, default: Any, section: str, names: tuple[str, ...] | None = None) -> list[str]:
    """`section.field` for each field (of `names`, else all) `spec` sets off `default`'s value."""
    fields = names or tuple(f.name for f in dataclasses.fields(spec))
    return [f"{section}.{n}" for n in fields if getattr(spec, n) != getattr(default, n)]


def _warn_unused_settings(recipe: Recipe, selection: SelectionSpec, kind: str) -> None:
    """Settings the run as resolved never reads (a network setting with a method that finds no networks, a ridge
    without the reconstruction, ...), named instead of recorded in recipe.yaml as if they had been used."""
    unused: list[str] = []
    if selection.method not in NEEDS_NETWORKS:  # --seed sets networks.seed with the others: not a choice of it
        unused += [n for n in _changed(recipe.networks, NetworksSpec().for_task(kind), "networks")
                   if n != "networks.seed"]
    if selection.method != "fn-task" and selection.fn_boost is not None:  # given, not filled in (fn-task only)
        unused += ["selection.fn_boost"]
    if kind != "multiple_choice":
        unused += _changed(recipe.calibration, CalibrationSpec(), "calibration", ("choices",))
    if not selection.reconstruct:
        unused += _changed(selection, SelectionSpec(), "selection", ("ridge", "answer_weight"))
    if not selection.refit:  # sequential selection runs the refit's prompts too
        unused += _changed(selection, SelectionSpec(), "selection",
                           ("refit_ridge",) if selection.sequential else ("refit_ridge", "refit_prompts"))
    if selection.method not in NEEDS_NETWORKS and (selection.sequential or not selection.reconstruct):
        # no dense token sample is taken; sequential selection's reconstruction samples max_tokens of its own
        unused += _changed(recipe.calibration, CalibrationSpec(), "calibration",
                           ("sample_store",) if selection.reconstruct else ("max_tokens", "sample_store"))
    if unused:
        log.warning("not used by this run (method %s%s): %s", selection.method,
                    "" if selection.reconstruct else ", no reconstruction", ", ".join(unused))
    rec = recipe.recovery
    if rec.enabled and rec.steps is not None and rec.epochs != RecoverySpec().epochs:
        log.warning("recovery.steps %d sets recovery's length: recovery.epochs %d not used", rec.steps, rec.epochs)
    idle = _idle_recovery_settings(rec, kind) if rec.enabled else []
    if idle:
        log.warning("not used by this recovery (params %s, label_weight %g, %s task): %s", rec.params,
                    rec.label_weight, kind.replace("_", " "), ", ".join(idle))


def _idle_recovery_settings(rec: RecoverySpec, kind: str) -> list[str]:
    """Recovery settings given that this recovery never reads: the LoRA rank without LoRA, the label term's
    settings without that term (weight 0, or multiple choice, which has no label words)."""
    idle = _changed(rec, RecoverySpec(), "recovery", ("lora_rank",)) if rec.params != "lora" else []
    if kind == "multiple_choice":
        return idle + _changed(rec, RecoverySpec(), "recovery", ("label_weight", "label_target"))
    return idle + (_changed(rec, RecoverySpec(), "recovery", ("label_target",)) if rec.label_weight == 0 else [])


def _evaluation_examples(task: TaskSpec, scored: bool) -> dict[str, list[Example]]:
    """The evaluation split under every template; {} when `_reads_evaluation` says it is not read."""
    return load_evaluation(task, task.evaluation_split) if _reads_evaluation(task, scored) else {}


def _reads_evaluation(task: TaskSpec, scored: bool) -> bool:
    """Whether the evaluation split is read. Unscored (--no-eval) it is read only for the overlap check, and only
    from a local file: a task given no evaluation file is calibrated without one."""
    if scored:
        return True
    try:
        local = data_source(task, task.evaluation_split) is not None
    except DataError:
        local = False
    if not local:
        log.info("no local %r file: the calibration is not checked against it", task.evaluation_split)
    return local


def calibration_prompts(task: TaskSpec, spec: CalibrationSpec, exclude: Collection[tuple[str, ...]] = ()
                        ) -> list[Example]:
    """The calibration prompts of a resolved task, none of the texts in `exclude` (the evaluation split's). A
    multiple-choice question is followed by nothing, by its right choice, or (`all`) once by each choice, the way
    scoring runs it (`calibration.choices`)."""
    spec = spec.for_task(task.kind)  # raw_share auto made concrete
    sample = load_sample(task, task.calibration_split, spec.num_samples, spec.seed, spec.raw_share, exclude)
    untemplated = sum(e.template == RAW.name for e in sample)
    whole = f" (all it has; {spec.num_samples} asked; the seed draws their order)"
    log.info("calibration: %d rows of the %r split%s, %d of them without a template", len(sample),
             task.calibration_split, whole if len(sample) < spec.num_samples else "", untemplated)
    if spec.choices == "none" or task.kind != "multiple_choice":
        return sample
    picked = (lambda e: e.choices) if spec.choices == "all" else (lambda e: [e.choices[int(e.label)]])
    return [dataclasses.replace(e, prompt=e.prompt + e.delimiter + c) for e in sample for c in picked(e)]


def evaluation_texts(task: TaskSpec, scored: bool = True) -> set[tuple[str, ...]]:
    """The evaluation split's texts (`example_key`) that load_inputs keeps out of the calibration, so a script
    drawing "compress's prompts" draws those: `calibration_prompts(task, spec, evaluation_texts(task, scored))`
    (`scored`: recipe.evaluation.enabled; unscored, only a local evaluation file is read)."""
    if not _reads_evaluation(task, scored):
        return set()
    return {example_key(e) for e in load_split(task, task.evaluation_split)}  # one template: the key is its rows'


def calibrated_on(recipe: Recipe, examples: list[Example]) -> int | None:
    """How many of `examples` a compress run of `recipe` (a folder's recipe.yaml) calibrated on; None when its
    calibration data cannot be read from a local file (moved, or on the Hub)."""
    try:
        task = resolve_task(recipe.task)
        if data_source(task, task.calibration_split) is None:
            return None
        sample = calibration_prompts(task, recipe.calibration, evaluation_texts(task, scored=False))  # as drawn
    except (DataError, RecipeError):
        return None
    return len(shared_examples(sample, examples))


def check_budgets(inputs: Inputs, out_dir: Path) -> None:
    """Refuse networks the calibration cannot give and an output disk that cannot hold the checkpoint; log the
    capture's memory bound."""
    recipe, widths = inputs.recipe, inputs.widths
    if inputs.selection.method in NEEDS_NETWORKS and recipe.networks.components >= min(
            min(widths), recipe.calibration.max_tokens):
        raise RecipeError(
            f"networks.components ({recipe.networks.components}) must be below the MLP width ({min(widths)}) and "
            f"calibration.max_tokens ({recipe.calibration.max_tokens})"
        )
    param_bytes = sum(p.numel() * p.element_size() for p in unique_parameters(inputs.model))
    check_disk_space(out_dir, param_bytes + param_bytes // 10)  # the dense size bounds the pruned checkpoint
    sample_tokens = recipe.calibration.max_tokens if inputs.with_sample else 0
    log.info(
        "capture holds at most %.1f MiB of activations (%d layers x %d neurons x %d sampled tokens)",
        capture_memory_bytes(
            len(widths), max(widths), sample_tokens, len(inputs.prompts), recipe.calibration.store_dtype,
            recipe.calibration.sample_store,
        ) / 2**20,
        len(widths), max(widths), sample_tokens,
    )


def under_template(task: TaskSpec, example: Example, template: PromptTemplate) -> Example:
    """The same row's example under another template of a classification task (its text fields refilled)."""
    values = dict(zip(task_fields(task), example.texts))
    return Example(fill_template(template.template, values), example.label, example.texts, template.name)
