"""compress(recipe): load -> calibrate -> select -> reconstruct -> surgery [+ refit] -> [recover] -> validate -> save.

`compress` reads as the table of contents; each stage is a public function of its own module (inputs,
calibration, pruning, surgery, recovery, validation, output) that notebooks can call one by one.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .arch import MLPLayout, neuron_weight_norms
from .calibration import Calibration, calibrate
from .capture import LayerActivations
from .checkpoint import REPORT_FILE, atomic_output_dir, check_output_dir
from .data import label_keys
from .distillation import TeacherTargets
from .hub import check_push, push_folder
from .inputs import Inputs, check_budgets, load_inputs
from .memory import objects_frozen, release_memory
from .models import count_parameters, load_model, tied_aliases
from .offload import check_trainable
from .output import build_report, resolved_recipe, write_output
from .pruning import rechoose_layer, reconstruction_fills, select_neurons
from .recipe import Recipe
from .recovery import recover_model, recovery_report, teacher
from .refit import Choose, LayerwiseRefit
from .selection import NEEDS_NETWORKS
from .stream_surgery import stream_prune
from .surgery import LayerPlan, prune_mlp
from .tokens import TokenizerState, encode_inputs, save_tokenizer
from .validation import Scores, score

__all__ = ["compress", "CompressResult", "Calibration", "calibrate", "select_neurons", "StageTimer"]

log = logging.getLogger("fnprune")


@dataclass
class CompressResult:
    output_dir: Path
    report: dict[str, Any]
    recipe: Recipe
    # every stage's seconds, save and push included: report.json's timings stop before writing it
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class StageTimer:
    """Each stage's seconds, logged (compress's and analyze's); with `evaluating` off (--no-eval) the evaluate
    stages, which do nothing, are neither logged nor timed."""

    def __init__(self, evaluating: bool = True) -> None:
        self.seconds: dict[str, float] = {}
        self.evaluating = evaluating

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.evaluating and name.startswith("evaluate"):
            yield
            return
        start = time.perf_counter()
        log.info("%s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("%s done in %.1f s", name, self.seconds[name])


@dataclass
class _Plan:
    """What surgery applies: kept neurons per layer, every neuron's mean activation (bias compensation folds
    the removed ones'), the reconstruction maps; and what the report needs from calibration."""

    kept: list[torch.Tensor]
    means: list[torch.Tensor] | None  # per layer, (width,): None without bias compensation
    fills: list[torch.Tensor] | None
    tokens_for_ica: int
    norms: list[dict[str, torch.Tensor]] | None = None  # the dense weights' norms, for sequential selection
    recovery_progress: str | None = None  # recovery's progress file: deleted once the checkpoint is written


def compress(recipe: Recipe, progress: bool = True) -> CompressResult:
    """Run one compression; returns where the checkpoint went and its report."""
    recipe.validate()
    ev = recipe.evaluation
    if not ev.enabled and (ev.validation or ev.lm_eval_tasks or ev.max_samples):
        log.warning("evaluation is off (--no-eval): %s not used", ", ".join(
            name for name, value in (("--validate", ev.validation), ("--lm-eval-tasks", ev.lm_eval_tasks),
                                     ("--eval-samples", ev.max_samples)) if value))
    out_dir = Path(recipe.output.dir).expanduser()
    sources = [recipe.model.name_or_path, recipe.task.data_dir, *recipe.task.data_files.values(),
               *(p for v in ev.validation for p in (v.data_dir, v.file)), ev.lm_eval_include]
    check_output_dir(out_dir, recipe.output.overwrite, sources,  # before loading: never replaces an input
                     {"model.offload_folder": recipe.model.offload_folder}, own_files=[REPORT_FILE])
    check_push(recipe.output.push_to_hub)
    timer = StageTimer(ev.enabled)
    with timer.stage("load"):
        inputs = load_inputs(recipe)
    check_budgets(inputs, out_dir)
    if inputs.recipe.recovery.enabled:  # auto resolved by load_inputs
        check_trainable(inputs.model, "this model")  # before calibration, not after it
    # From here to surgery the model, tokenizer and imports stay alive: garbage collections skip them.
    with objects_frozen():
        measured, plan = _calibrate_and_select(inputs, timer, progress)
        with timer.stage("evaluate_dense"):
            dense_params = count_parameters(inputs.model)
            dense = _score(inputs.model, inputs, progress, cached=True)
        targets = None
        if inputs.recipe.recovery.enabled:
            with timer.stage("teacher"):
                targets = teacher(inputs.model, inputs.tokenizer, inputs.prompts, inputs.recipe, inputs.task,
                                  progress)
        _reconstruct(measured, plan, inputs, timer, progress)
    with atomic_output_dir(out_dir, recipe.output.overwrite) as tmp:
        if inputs.source is not None:  # model None: the weights are written already
            model, pruned_params, pruned, extra = _streamed(tmp, inputs, plan, targets, dense, timer, progress)
        else:
            model, pruned, extra = _in_memory(inputs, plan, targets, dense, timer, progress)
            pruned_params = count_parameters(model)
        resolved = resolved_recipe(inputs)
        report = build_report(inputs, measured, plan.kept, plan.tokens_for_ica, (dense_params, pruned_params), dense,
                              pruned, timer.seconds, extra)
        with timer.stage("save"):
            write_output(tmp, inputs, model, resolved, report, measured, plan.kept)
    if plan.recovery_progress:
        Path(plan.recovery_progress).unlink(missing_ok=True)
    if recipe.output.push_to_hub:
        with timer.stage("push"):
            push_folder(out_dir, recipe.output.push_to_hub, recipe.output.private)
    return CompressResult(out_dir, report, resolved, dict(timer.seconds))


def _calibrate_and_select(inputs: Inputs, timer: StageTimer, progress: bool) -> tuple[Calibration, _Plan]:
    """Stages 1 and 2: activations and networks (timed inside calibrate), then the kept neurons."""
    recipe, sel = inputs.recipe, inputs.selection
    measured = calibrate(
        inputs.model, inputs.tokenizer, inputs.prompts,
        dict.fromkeys(label_keys(inputs.task, inputs.prompts), ""), recipe, sel.method in NEEDS_NETWORKS,
        progress, use_cache=recipe.calibration.cache, with_sample=inputs.with_sample,
    )
    timer.seconds.update(measured.timings)
    with timer.stage("selection"):
        norms = neuron_weight_norms(inputs.model, inputs.layout)
        kept = select_neurons(inputs.model, measured, sel.method, sel.keep, sel.round_to, sel.seed, sel.fn_boost,
                              sel.allocation, norms=norms)
    means = [a.mean for a in measured.activations] if sel.bias_compensation else None
    return measured, _Plan(kept, means, None, measured.activations[0].sampled, norms if sel.sequential else None)


def _reconstruct(measured: Calibration, plan: _Plan, inputs: Inputs, timer: StageTimer, progress: bool) -> None:
    """Stage 3: the reconstruction maps (each layer's sample freed once fitted), then the rest of the sample."""
    sel = inputs.selection
    if sel.reconstruct and not sel.sequential:  # sequential selection fits each layer's map as it chooses it
        with timer.stage("reconstruct"):
            plan.fills = reconstruction_fills(measured, plan.kept, plan.means, sel.ridge, progress, release=True,
                                              answer_weight=sel.answer_weight)
    measured.release_token_sample()  # before surgery and saving, which need memory of their own
    release_memory()


def _calibration_ids(inputs: Inputs) -> list[list[int]]:
    """The calibration prompts' token ids, as capture encodes them."""
    return encode_inputs(inputs.tokenizer, inputs.prompts, inputs.recipe.calibration.max_length, inputs.model)


def _score(model, inputs: Inputs, progress: bool, cached: bool = False, lm_eval: bool = True) -> Scores:
    """The task, validation and lm-eval scores of `model`; `cached`: it is the dense model (results cached);
    `lm_eval` off: without lm-eval (the pruned model before recovery)."""
    return score(model, inputs.tokenizer, inputs.evaluation, inputs.task, inputs.validation, inputs.recipe,
                 progress, cached_as=inputs.recipe.model if cached else None, lm_eval=lm_eval)


def _in_memory(inputs: Inputs, plan: _Plan, targets: TeacherTargets | None, dense: Scores, timer: StageTimer,
               progress: bool) -> tuple[Any, Scores, dict[str, Any]]:
    """Stages 4-6 on the loaded model: surgery, then scores, with recovery (and scores after it) when asked."""
    model, recipe, sel = inputs.model, inputs.recipe, inputs.selection
    refit, one_shot = None, list(plan.kept)
    removes = any(len(k) < w for k, w in zip(plan.kept, inputs.widths))  # keep 1: nothing to refit
    if (sel.refit or sel.sequential) and removes:
        with timer.stage("refit_inputs" if sel.refit else "sequential_inputs"):  # the catch of block 0's inputs
            seqs = _calibration_ids(inputs)[:sel.refit_prompts]
            choose = _sequential_choice(inputs, plan) if sel.sequential else None
            refit = LayerwiseRefit(model, inputs.layout, seqs, sel.refit_ridge, recipe.calibration.batch_size,
                                   progress, refit=bool(sel.refit), choose=choose,
                                   max_tokens=recipe.calibration.max_tokens if choose and sel.reconstruct else 0,
                                   seed=recipe.calibration.seed, fit_bias=sel.bias_compensation)
    with timer.stage("surgery"):  # with the refit (and sequential selection) layer by layer inside it
        prune_mlp(model, inputs.layout, plan.kept, plan.means, recipe.output.layout, plan.fills,
                  on_block=refit.on_block if refit else None)
        plan.fills = None
        release_memory(collect=False)  # the dense MLP weights just freed, before evaluation and saving
    scores, extra = _recover_and_score(model, inputs, plan, targets, dense, timer, progress)
    if refit and sel.refit:  # per layer, the block output's error on the calibration tokens after over before it
        extra = {"refit": {"ridge": sel.refit_ridge, "prompts": refit.prompts,
                           "block_error_after_over_before": refit.ratios}, **extra}
    if refit and sel.sequential:  # kept_as_one_shot: per layer, the share of its kept neurons one-shot kept too
        same = [round(len(set(a.tolist()) & set(b.tolist())) / len(a), 4) for a, b in zip(plan.kept, one_shot)]
        extra = {"sequential": {"prompts": refit.prompts, "tokens": refit.token_count,
                                "tokens_sampled": len(refit.sampled), "kept_as_one_shot": same}, **extra}
    return model, scores, extra


def _sequential_choice(inputs: Inputs, plan: _Plan) -> Choose:
    """Sequential selection's `choose`: each layer's kept neurons (as many as the one-shot selection gave it), the
    centre and the reconstruction map from its activations in the model pruned before it; `plan.kept` records them
    for the report and the card."""
    sel, norms = inputs.selection, plan.norms  # of the dense weights, taken before surgery slices them

    def choose(i: int, layer: LayerPlan, acts: LayerActivations) -> LayerPlan:
        keep, centre, fill = rechoose_layer(sel.method, i, acts, norms[i], len(layer.keep), sel.seed,
                                            layer.centre is not None, sel.reconstruct, sel.ridge)
        plan.kept[i] = keep
        return dataclasses.replace(layer, keep=keep, centre=centre, fill=fill)
    return choose


def _recover_and_score(model, inputs: Inputs, plan: _Plan, targets: TeacherTargets | None, dense: Scores,
                       timer: StageTimer, progress: bool) -> tuple[Scores, dict[str, Any]]:
    """Stages 5-6 on the pruned model: its scores, or with recovery the scores after it (and before, when asked)."""
    recipe = inputs.recipe
    pruned = Scores()
    if targets is None or recipe.recovery.evaluate_before:
        with timer.stage("evaluate_pruned"):
            pruned = _score(model, inputs, progress, lm_eval=targets is None)
    if targets is None:
        return pruned, {}
    with timer.stage("recover"):
        result = recover_model(model, inputs.tokenizer, inputs.layout, inputs.prompts, targets, recipe,
                               progress)
    plan.recovery_progress = result.progress_file
    with timer.stage("evaluate_recovered"):
        recovered = _score(model, inputs, progress)
    return recovered, {"recovery": recovery_report(recipe, result, inputs.task, inputs.validation, dense, pruned)}


def _streamed(tmp: Path, inputs: Inputs, plan: _Plan, targets: TeacherTargets | None, dense: Scores, timer: StageTimer,
              progress: bool) -> tuple[Any, int, Scores, dict[str, Any]]:
    """Stages 4-6 from the source files: the pruned weights go straight into `tmp`, then the saved checkpoint
    is loaded (with the recipe's device map) and scored. The dense model is freed first (its devices, its
    offload hooks). With recovery, the loaded checkpoint is trained where the device map put it and returned,
    to be saved over the streamed weights; else None (the weights in `tmp` are final)."""
    with timer.stage("surgery"):
        pruned_params = _stream_save(inputs.model, inputs.tokenizer, inputs.tokenizer_state, inputs.source, tmp,
                                     inputs.layout, plan.kept, plan.means, plan.fills, inputs.recipe)
    inputs.model = None
    gc.collect()
    if targets is None:
        with timer.stage("evaluate_pruned"):
            pruned = _score_saved(tmp, inputs, progress)
        return None, pruned_params, pruned, {}
    model = _load_saved(tmp, inputs)
    check_trainable(model, "the pruned checkpoint")
    scores, extra = _recover_and_score(model, inputs, plan, targets, dense, timer, progress)
    for stale in [*tmp.glob("model*.safetensors"), *tmp.glob("model*.safetensors.index.json")]:
        stale.unlink()  # the streamed weights; save_pretrained writes the trained ones, sharded as it likes
    return model, pruned_params, scores, extra


def _stream_save(model, tokenizer, tokenizer_state: TokenizerState, source: Path, tmp: Path, layout: MLPLayout,
                 kept, removed_means, fill_maps, recipe: Recipe) -> int:
    """Prune from the source checkpoint files into `tmp` (never a second copy of the weights); write config,
    generation config and tokenizer as save_pretrained would. Returns the pruned parameter count."""
    written = stream_prune(
        source, tmp, model.config, layout, kept, removed_means, recipe.output.layout,
        dtype=getattr(torch, recipe.model.dtype), max_shard_size=recipe.output.max_shard_size, fill_maps=fill_maps,
        tied=tied_aliases(model),
    )
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_tokenizer(tokenizer, tokenizer_state, tmp)
    return count_parameters(model) + written.parameters_delta


def _score_saved(tmp: Path, inputs: Inputs, progress: bool) -> Scores:
    """Accuracy (and the validation benchmarks) of the checkpoint written to `tmp`, loaded with the recipe's
    device map."""
    if not inputs.recipe.evaluation.enabled:
        return Scores()
    pruned = _load_saved(tmp, inputs)
    try:
        return _score(pruned, inputs, progress)
    finally:
        del pruned
        gc.collect()


def _load_saved(tmp: Path, inputs: Inputs):
    """The checkpoint written to `tmp`, loaded as the recipe loads the base model (its device map, its dtype)."""
    return load_model(dataclasses.replace(inputs.recipe.model, name_or_path=str(tmp), revision=None))[0]
