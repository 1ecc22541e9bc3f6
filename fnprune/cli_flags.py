"""The `compress` flags, built from the recipe's field metadata (fnprune.recipe.flag), and the recipe overrides
their values give. A recipe field gets a flag by its metadata alone; see RECIPE_ONLY for those without one."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from . import data
from .data import BUILTIN_TASKS
from .errors import FnpruneError
from .recipe import Recipe, TaskSpec
from .tasks import task_overrides

__all__ = [
    "FLAGS", "FLAG_BY_DECL", "PARSERS", "RECIPE_ONLY", "TASK_NAMES", "RecipeFlag", "compress_options",
    "flag_overrides", "parse_data_files", "parse_device_map", "parse_lm_eval_tasks", "parse_max_memory",
    "parse_validate",
    "recipe_flags", "shown_default",
]

TASK_NAMES = ", ".join(BUILTIN_TASKS)


def _pair(text: str, expected: str, flag: str) -> tuple[str, str]:
    """KEY=VALUE, both sides stripped and not empty."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise click.BadParameter(f"{text!r}: expected {expected}", param_hint=flag)
    return key.strip(), value.strip()


def parse_data_files(value: str | None) -> dict[str, str] | None:
    """`train=a.tsv,validation=b.tsv` as {split: path}."""
    if not value:
        return None
    try:
        return data.parse_data_files(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data-files") from exc


def parse_max_memory(value: str | None) -> dict[str, str] | None:
    """`0=20GiB,cpu=32GiB` as {device: size}."""
    if not value:
        return None
    return dict(_pair(part, "DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=32GiB", "--max-memory") for part in value.split(","))


def parse_device_map(value: str | None) -> str | dict | None:
    """`auto`, `cpu`, ... as is; a JSON object ({"model.layers.9": "disk", ...}) as a mapping."""
    if not value or not value.lstrip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not a JSON object of module names to devices: {exc}",
                                 param_hint="--device-map") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("expected a JSON object of module names to devices", param_hint="--device-map")
    return parsed


def parse_validate(values: tuple[str, ...]) -> list[dict[str, str]] | None:
    """`--validate NAME=PATH`: a built-in task with its data folder, or wikitext with its raw file (or folder)."""
    if not values:
        return None
    out = []
    for value in values:
        name, path = _pair(value, "TASK=PATH, e.g. boolq=../shared/data/superglue_boolq", "--validate")
        where = "file" if name == "wikitext" and not Path(path).expanduser().is_dir() else "data_dir"
        out.append({"task": name, where: path})
    return out


def parse_lm_eval_tasks(value: str | None) -> list[str] | None:
    """`sst2,boolq` as ["sst2", "boolq"] (empty parts dropped); None or "": not given."""
    tasks = [t.strip() for t in (value or "").split(",") if t.strip()]
    return tasks or None


# Recipe fields no flag sets: they are set in a recipe YAML. tests/test_cli.py fails on a field that is neither
# here nor given a flag (fnprune.recipe.flag), so a new recipe field cannot go without a decision. The task's own
# definition (everything but the name and the data location) comes from the recipe or the built-in task.
RECIPE_ONLY = frozenset({
    "model.revision",
    "calibration.max_length", "calibration.store_dtype", "calibration.raw_share",
    "networks.max_iter", "networks.tol", "networks.relevance_within_template",
    "selection.answer_weight",
    "evaluation.batch_size",
    "recovery.warmup", "recovery.lora_rank", "recovery.answer_weight", "recovery.label_weight", "recovery.label_target",
    "recovery.top_k", "recovery.evaluate_before", "recovery.seed",
    *(f"task.{f.name}" for f in dataclasses.fields(TaskSpec) if "flag" not in f.metadata),
})

# What a flag's text becomes in its field, where the field is not a plain number, string or switch.
PARSERS: dict[str, Callable[[Any], Any]] = {
    "--data-files": parse_data_files,
    "--device-map": parse_device_map,
    "--max-memory": parse_max_memory,
    "--validate": parse_validate,
    "--lm-eval-tasks": parse_lm_eval_tasks,
}
# click types a flag needs beyond what its field's type and metadata say.
_CLICK_TYPES: dict[str, click.ParamType] = {"--offload-folder": click.Path(file_okay=False),
                                            "--lm-eval-include": click.Path(file_okay=False)}
_NOT_CLICK = ("flag", "help", "choices", "strict")  # metadata keys read here; the others go to click.option


@dataclasses.dataclass(frozen=True)
class RecipeFlag:
    """A `compress` option built from recipe field metadata, and the dotted fields it sets."""

    decl: str  # "--keep", "--cache/--no-cache"
    fields: tuple[str, ...]  # ("selection.keep",); --seed sets three
    settings: dict[str, Any]  # click.option keyword arguments

    @property
    def name(self) -> str:
        """The keyword the option's value reaches the command under."""
        return self.decl.split("/")[0].lstrip("-").replace("-", "_")

    def decorate(self, fn: Callable) -> Callable:
        return click.option(self.decl, self.name, **self.settings)(fn)


def _scalar(annotation: Any) -> Any:
    """int, float, bool or str for `int`, `float | None`, ...; bool for a switch whose recipe value may also be a
    word (`bool | str`: true, false or auto); None for mappings, lists and other mixed unions."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    if set(args) == {bool, str}:
        return bool
    return args[0] if len(args) == 1 and args[0] in (int, float, bool, str) else None


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as help text says it: on/off, 3 for 3.0."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag_settings(decl: str, f: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    meta, default = f.metadata, shown_default(f)
    choices = [f"{c} (default)" if c == default else c for c in meta.get("choices", ())]
    settings = {"help": meta["help"].format(default=default, choices=", ".join(choices), tasks=TASK_NAMES)}
    settings |= {key: value for key, value in meta.items() if key not in _NOT_CLICK}
    kind = _scalar(annotation)
    if kind is bool:  # --x/--no-x, or --x alone; None when not given, so the recipe's value stays
        settings["default"] = None
        if "/" not in decl:
            settings["is_flag"] = True
    elif meta.get("choices") and meta.get("strict", True):
        settings["type"] = click.Choice(list(meta["choices"]))
    elif kind in (int, float):
        settings["type"] = kind
    if decl in _CLICK_TYPES:
        settings["type"] = _CLICK_TYPES[decl]
    return settings


def recipe_flags() -> list[RecipeFlag]:
    """Every field's flag, in recipe order (sections, then fields), from the `flag` metadata in fnprune.recipe."""
    found: dict[str, RecipeFlag] = {}
    for section in dataclasses.fields(Recipe):
        spec = typing.get_type_hints(Recipe)[section.name]
        if not dataclasses.is_dataclass(spec):
            continue
        hints = typing.get_type_hints(spec)
        for f in dataclasses.fields(spec):
            if "flag" not in f.metadata:
                continue
            decl, dotted = f.metadata["flag"], f"{section.name}.{f.name}"
            if decl in found:  # --seed: one option for several fields
                found[decl] = dataclasses.replace(found[decl], fields=(*found[decl].fields, dotted))
            else:
                found[decl] = RecipeFlag(decl, (dotted,), _flag_settings(decl, f, hints[f.name]))
    return list(found.values())


FLAGS = recipe_flags()
FLAG_BY_DECL = {flag.decl: flag for flag in FLAGS}
_TASK_FLAGS = ("task", "data_dir", "data_files")  # set by task_overrides: the whole task, or its data


def compress_options(fn: Callable) -> Callable:
    """Decorate `compress` with every recipe flag (--sparsity beside --keep), in recipe order."""
    sparsity = click.option("--sparsity", type=float, help="Fraction of MLP neurons removed (= 1 - keep).")
    for flag in reversed(FLAGS):
        fn = sparsity(fn) if flag.decl == "--keep" else fn
        fn = flag.decorate(fn)
    return fn


def flag_overrides(values: dict[str, Any], sparsity: float | None = None) -> dict[str, Any]:
    """Dotted recipe overrides (`selection.keep`) from the recipe flags' values; None: the flag was not given."""
    files = parse_data_files(values.get("data_files"))
    overrides = task_overrides(values.get("task"), values.get("data_dir"), files)  # first: --task replaces all
    for flag in FLAGS:
        if flag.name not in _TASK_FLAGS:
            parse = PARSERS.get(flag.decl)
            value = values.get(flag.name)
            overrides.update(dict.fromkeys(flag.fields, parse(value) if parse else value))
    if sparsity is not None:
        if not 0 <= sparsity < 1:  # checked here: selection.keep's own message would name keep's value
            raise FnpruneError(f"--sparsity: must be in [0, 1), got {sparsity}")
        overrides["selection.keep"] = float(Decimal(1) - Decimal(str(sparsity)))  # --keep 0.3 for 0.7, not 0.300..04
    return overrides
