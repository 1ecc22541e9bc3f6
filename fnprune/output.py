"""Stage 7, save: the pruned checkpoint folder as save_pretrained writes it, plus the resolved recipe, the
networks, report.json and the model card."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .cache import hub_commit
from .calibration import Calibration
from .card import CardInfo, model_card
from .checkpoint import (
    CARD_FILE,
    NETWORKS_FILE,
    NETWORKS_META_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    save_networks,
    write_json,
    write_per_layer_code,
)
from .hub import base_license, license_file
from .inputs import Inputs
from .lm_eval_backend import lm_eval_files, lm_eval_report
from .models import checkpoint_bytes, checkpoint_format
from .provenance import data_provenance, file_sha256, versions
from .recipe import EvaluationSpec, ModelSpec, Recipe, TaskSpec, dump_recipe
from .tokens import save_tokenizer
from .validation import Scores, Validation, accuracy_report, validation_report

__all__ = ["resolved_recipe", "build_report", "write_output"]


def _absolute_model(spec: ModelSpec) -> ModelSpec:
    """Local model paths made absolute and a Hub model's revision pinned to the commit it loaded, so a saved
    recipe reruns the same compression from any directory, after the Hub's branch has moved. A saved recipe never
    runs the model's own code on its own (a recipe downloaded with a checkpoint): the rerun asks again."""
    spec = dataclasses.replace(spec, trust_remote_code=False)
    if spec.offload_folder:
        spec = dataclasses.replace(spec, offload_folder=str(Path(spec.offload_folder).expanduser().resolve()))
    path = Path(spec.name_or_path).expanduser()
    if path.exists():
        return dataclasses.replace(spec, name_or_path=str(path.resolve()))
    return dataclasses.replace(spec, revision=hub_commit(spec.name_or_path, spec.revision) or spec.revision)


def _absolute_data(task: TaskSpec) -> TaskSpec:
    return dataclasses.replace(
        task,
        data_dir=str(Path(task.data_dir).expanduser().resolve()) if task.data_dir else None,
        data_files={k: str(Path(v).expanduser().resolve()) for k, v in task.data_files.items()},
    )


def _absolute_validation(evaluation: EvaluationSpec) -> EvaluationSpec:
    """Validation benchmarks' local folders and files, and the lm-eval task folder, made absolute, like the task's
    data."""
    absolute = lambda p: str(Path(p).expanduser().resolve()) if p else p  # noqa: E731
    tasks = [dataclasses.replace(v, data_dir=absolute(v.data_dir), file=absolute(v.file))
             for v in evaluation.validation]
    return dataclasses.replace(evaluation, validation=tasks, lm_eval_include=absolute(evaluation.lm_eval_include))


def _validation_provenance(validation: Validation) -> dict[str, Any]:
    """The --validate benchmarks' files and sha256, beside the task's: a rerun warns when they changed."""
    out = {f"{v.task} (--validate)": data_provenance(_absolute_data(t), [t.evaluation_split])[t.evaluation_split]
           for v, t, _ in validation.tasks}
    if validation.perplexity is not None:
        v, path, _ = validation.perplexity
        out[f"{v.task} (--validate)"] = {"file": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}
    return out


def _lm_eval_provenance(evaluation: EvaluationSpec) -> dict[str, Any]:
    """The lm-eval task folder's files (YAMLs, utils.py) and the data files its YAMLs name, with sha256."""
    if not evaluation.lm_eval_tasks or not evaluation.lm_eval_include:
        return {}
    root = Path(evaluation.lm_eval_include).expanduser().resolve()
    return {f"lm-eval {p.relative_to(root) if p.is_relative_to(root) else p.name}":
            {"file": str(p), "sha256": file_sha256(p)} for p in lm_eval_files(str(root))}


def resolved_recipe(inputs: Inputs) -> Recipe:
    """The recipe as saved beside the checkpoint: task and automatic values resolved, paths absolute, versions
    and data hashes recorded, so it reruns the same compression from anywhere."""
    recipe, task, scored = inputs.recipe, _absolute_data(inputs.task), bool(inputs.evaluation)
    return Recipe(
        model=_absolute_model(recipe.model), task=task, calibration=recipe.calibration,
        networks=recipe.networks, selection=inputs.selection, recovery=recipe.recovery,
        evaluation=_absolute_validation(recipe.evaluation),
        # a rerun never replaces or pushes without being asked again (--overwrite, --push-to-hub)
        output=dataclasses.replace(recipe.output, streamed=recipe.streamed(), overwrite=False, push_to_hub=None,
                                   private=False),
        provenance={
            "versions": versions(),
            "data": {**data_provenance(task, [task.calibration_split, *[task.evaluation_split] * scored]),
                     **_validation_provenance(inputs.validation),
                     **(_lm_eval_provenance(recipe.evaluation) if scored else {})},
        },
    )


def build_report(inputs: Inputs, calib: Calibration, kept: list[torch.Tensor], tokens_for_ica: int,
                 parameters: tuple[int, int], dense: Scores, pruned: Scores, timings: dict[str, float],
                 extra: dict[str, Any]) -> dict[str, Any]:
    """report.json: what was done, the sizes, dense and pruned scores (`extra`: optional stages' sections)."""
    recipe, task, sel, widths = inputs.recipe, inputs.task, inputs.selection, inputs.widths
    validation = validation_report(inputs.validation, dense.validation, pruned.validation)
    lm_eval = lm_eval_report(dense.lm_eval, pruned.lm_eval)
    report: dict[str, Any] = {
        "fnprune_version": __version__,
        "base_model": recipe.model.name_or_path,
        "task": task.name,
        "method": sel.method,
        "allocation": sel.allocation,
        "layout": recipe.output.layout,
        "keep": sel.keep,
        "bias_compensation": sel.bias_compensation,
        "reconstruct": sel.reconstruct,
        "ridge": sel.ridge if sel.reconstruct else None,
        "calibration": {
            "split": task.calibration_split,
            "samples": len(inputs.prompts),
            "tokens_seen": calib.activations[0].count,
            "tokens_for_ica": tokens_for_ica,
        },
        "parameters": {"dense": parameters[0], "pruned": parameters[1]},
        "mlp_neurons": {"dense": sum(widths), "pruned": sum(len(k) for k in kept)},
        "widths": {"dense": max(widths), "pruned": [len(k) for k in kept]},
        "file_bytes": {"dense": checkpoint_bytes(recipe.model), "pruned": None,
                       "dense_format": checkpoint_format(recipe.model), "pruned_format": recipe.model.dtype},
        **accuracy_report(task, dense.task, pruned.task),
        **({"networks": _networks_summary(calib)} if calib.networks else {}),
        **({"validation": validation} if validation else {}),
        **({"lm_eval": lm_eval} if lm_eval else {}),
        **extra,
        "timings_seconds": dict(timings),  # as written: later stages (save, push) are not in the file
    }
    report["parameters"]["ratio"] = round(parameters[1] / parameters[0], 6)
    return report


def write_output(tmp: Path, inputs: Inputs, model, resolved: Recipe, report: dict[str, Any], calib: Calibration,
                 kept: list[torch.Tensor]) -> None:
    """Write the in-memory pruned model (None: streamed, already written) and tokenizer, the recipe, networks,
    report and model card into `tmp`."""
    recipe = inputs.recipe
    recipe_yaml = dump_recipe(resolved)
    if model is not None:  # streamed surgery has written the weights already
        if recipe.output.layout == "per-layer":
            write_per_layer_code(tmp, model)
        model.save_pretrained(tmp, max_shard_size=recipe.output.max_shard_size)
        save_tokenizer(inputs.tokenizer, inputs.tokenizer_state, tmp)
    (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    save_networks(tmp, *_networks_artifact(calib, kept))
    report["file_bytes"]["pruned"] = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
    write_json(tmp / REPORT_FILE, report)
    sel = inputs.selection
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))  # streamed: no model here
    license_meta = _with_license_file(tmp, recipe.model.name_or_path,
                                      base_license(recipe.model.name_or_path, recipe.model.revision))
    card = CardInfo(recipe.model.name_or_path, inputs.task.name, sel.method, sel.keep, report, recipe_yaml,
                    config["model_type"], inputs.layout.head, inputs.task.kind, config, license_meta)
    (tmp / CARD_FILE).write_text(model_card(card, __version__), encoding="utf-8")


def _with_license_file(tmp: Path, base: str, license_meta: dict[str, Any]) -> dict[str, Any]:
    """Copy the local base's license file a relative `license_link` names into `tmp`, at the same relative path,
    so the card's link resolves in the pruned folder (and on the Hub once pushed); a link naming one of the
    folder's own files, or no file, is dropped."""
    rel = license_file(base, license_meta)
    if rel is None:
        return license_meta
    target = tmp / rel
    if target.exists() or rel == CARD_FILE:
        return {k: v for k, v in license_meta.items() if k != "license_link"}
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(base).expanduser() / rel, target)  # the content, also where the base's file is a link
    return {**license_meta, "license_link": rel}


def _networks_summary(calib: Calibration) -> dict[str, Any]:
    """report.json's few lines on the functional networks; each layer's maps, sizes and relevance are in the
    networks files."""
    sizes = [int(s) for n in calib.networks for s in n.members.sum(axis=1)]
    return {
        "per_layer": [int(n.members.shape[0]) for n in calib.networks],
        "median_size": float(np.median(sizes)) if sizes else None,
        "converged_layers": sum(bool(n.converged) for n in calib.networks),
        "files": [NETWORKS_META_FILE, NETWORKS_FILE],
    }


def _networks_artifact(calib: Calibration, kept: list[torch.Tensor]) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {f"layers.{i}.kept": k.to(torch.int64) for i, k in enumerate(kept)}
    meta: dict[str, Any] = {"layers": []}
    for i, n in enumerate(calib.networks or []):
        tensors[f"layers.{i}.maps"] = torch.from_numpy(n.maps.astype(np.float32))
        meta["layers"].append(
            {
                "layer": i,
                "threshold": n.threshold,
                "converged": n.converged,
                "dead_neurons": n.dead_neurons,
                "network_sizes": n.members.sum(axis=1).tolist(),
                "relevance": [round(float(r), 6) for r in calib.relevance[i]] if calib.relevance else None,
            }
        )
    return tensors, meta
