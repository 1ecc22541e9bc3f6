"""Evaluate a checkpoint on a task, as `fnprune evaluate` does: which examples (the folder's own task and data
unless another task is named) and their accuracy under every template. The Python API of that command."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .checkpoint import RECIPE_FILE
from .data import Example, load_evaluation, resolve_task
from .errors import FnpruneError, RecipeError
from .evaluate import TaskResult, evaluate_templates
from .inputs import calibrated_on
from .models import load_model, local_model_dir, model_dtype
from .recipe import ModelSpec, Recipe, TaskSpec, load_recipe, recipe_from_dict
from .tasks import task_overrides

__all__ = ["model_path", "recorded_recipe", "evaluation_examples", "model_dtype", "evaluate_model"]

log = logging.getLogger("fnprune")


def model_path(model: str | Path) -> str:
    """A local folder or .gguf file as given; a Hub id: its snapshot folder (cached when offline)."""
    path = str(model)
    if not Path(path).expanduser().exists() and not path.lower().endswith(".gguf"):
        path = str(local_model_dir(path))
    return path


def _task_spec(compressed: Recipe | None, task: str | None, data_dir: str | None,
               data_files: dict[str, str] | None) -> TaskSpec:
    """The folder's recorded task (also when `task` names it), else `task`; the data given replaces its data:
    the files give the splits they name, the folder (given, or recorded) the others."""
    recorded = compressed.task if compressed is not None else None
    if task is None and recorded is None:
        raise FnpruneError("--task is required (the model folder has no recipe.yaml to take it from)")
    from_folder = recorded is not None and task in (None, recorded.name)
    data = dataclasses.asdict(recorded if from_folder else TaskSpec(name=str(task)))
    gone = [p for p in [data.get("data_dir"), *(data.get("data_files") or {}).values()]
            if p and not Path(p).expanduser().exists()]
    if from_folder and gone and not (data_dir or data_files):  # a checkpoint from the Hub, or another machine
        if not data.get("dataset"):
            raise FnpruneError(f"the folder's recipe.yaml reads its {data['name']} data from {gone[0]}, which is not "
                               "here: pass --data-dir or --data-files")
        log.info("the folder's recipe.yaml reads %s, which is not here: scoring the Hub dataset %s", gone[0],
                 data["dataset"])
        data["data_dir"], data["data_files"] = None, {}
    for key, value in task_overrides(None, data_dir, data_files).items():
        data[key.removeprefix("task.")] = value
    return recipe_from_dict({"task": data}).task


def recorded_recipe(model: str | Path, task: str | None = None) -> Recipe | None:
    """The folder's recipe.yaml (None: there is none). One that cannot be read stops the command, unless a task is
    named: then only the check for the folder's own calibration rows is lost, and a warning says so."""
    saved = Path(model).expanduser() / RECIPE_FILE
    if not saved.is_file():
        return None
    try:
        return load_recipe(saved)
    except RecipeError as exc:
        if task is None:
            raise
        log.warning("%s cannot be read (%s); evaluating %s without it: its calibration rows are not checked",
                    saved, " ".join(exc.problems), task)
        return None


_READ = "read"  # evaluation_examples' default: read the folder's recipe.yaml itself


def evaluation_examples(model: str | Path, task: str | None = None, data_dir: str | None = None,
                        data_files: dict[str, str] | None = None, split: str | None = None,
                        max_samples: int | None = None, templates: list[str] | None = None,
                        recorded: Recipe | None | str = _READ) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """The resolved task and its examples by template name. Warns when they include the folder's own calibration
    rows (its recipe.yaml, `recorded`): the accuracy is then not held out."""
    compressed = recorded_recipe(model, task) if isinstance(recorded, str) else recorded
    resolved = resolve_task(_task_spec(compressed, task, data_dir, data_files))
    sets = load_evaluation(resolved, split or resolved.evaluation_split, max_samples)
    if templates:
        unknown = [t for t in templates if t not in sets]
        if unknown:
            raise FnpruneError(f"--template {', '.join(unknown)}: not a template of {resolved.name} "
                               f"(its templates: {', '.join(sets)})")
        sets = {t: sets[t] for t in templates}
    rows = next(iter(sets.values()))
    if compressed is not None and (n := calibrated_on(compressed, rows)):
        log.warning("%d of these %d examples are among %s's calibration examples (its recipe.yaml): not held out",
                    n, len(rows), model)
    _note_report_sample(compressed, resolved, split, max_samples, len(rows))
    return resolved, sets


def _note_report_sample(compressed: Recipe | None, resolved: TaskSpec, split: str | None, max_samples: int | None,
                        n: int) -> None:
    """compress scored the first `evaluation.max_samples` examples: say so when all of them are scored here."""
    scored = compressed.evaluation.max_samples if compressed is not None else None
    same = compressed is not None and compressed.task.name == resolved.name
    if same and scored and split in (None, resolved.evaluation_split) and max_samples is None and n > scored:
        log.warning("scoring all %d examples; the folder's report scored the first %d (evaluation.max_samples): "
                    "--max-samples %d gives its numbers", n, scored, scored)  # shown with --quiet too


def evaluate_model(model: str | Path, task: str | None = None, *, data_dir: str | None = None,
                   data_files: dict[str, str] | None = None, split: str | None = None,
                   max_samples: int | None = None, templates: list[str] | None = None, batch_size: int = 32,
                   dtype: str | None = None, trust_remote_code: bool = False, progress: bool = True) -> TaskResult:
    """Zero-shot accuracy of a checkpoint (folder, Hub id or .gguf file) under each template of its task:
    `.headline` is the held-out templates' mean, `.by_template` each template's `EvalResult`. `dtype`: default
    the one the folder was compressed in."""
    sizes = {"batch_size": batch_size, "max_samples": max_samples}
    bad = [f"{name}: must be >= 1, got {value}" for name, value in sizes.items() if value is not None and value < 1]
    if bad:
        raise RecipeError(bad)
    path = model_path(model)
    recorded = recorded_recipe(path, task)
    resolved, sets = evaluation_examples(path, task, data_dir, data_files, split, max_samples, templates, recorded)
    spec = ModelSpec(name_or_path=path, trust_remote_code=trust_remote_code, dtype=model_dtype(recorded, dtype))
    loaded, tokenizer = load_model(spec, prunable=False)
    return evaluate_templates(loaded, tokenizer, sets, resolved, batch_size, progress)
