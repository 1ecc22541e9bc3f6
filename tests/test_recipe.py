"""Recipes: typed, unknown keys rejected, every problem reported at once, YAML round trip is identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fnprune.data import resolve_task
from fnprune.errors import RecipeError
from fnprune.recipe import Recipe, apply_overrides, dump_recipe, load_recipe, recipe_from_dict
from fnprune.tasks import BUILTIN_TASKS

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_defaults_round_trip():
    r = Recipe()
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert [p for p in recipe.problems() if "required" not in p] == []  # model/output may come from flags
    resolve_task(recipe.task)
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_the_custom_task_example_reads_the_shared_rte_files_as_the_builtin_task_does():
    example = load_recipe(Path(__file__).parent.parent / "recipes" / "custom-task-example.yaml")
    assert "rte" in example.task.data_files["train"]
    assert example.task.file_format == BUILTIN_TASKS["rte"].file_format  # plain tsv keeps RTE's quotes in the text


def test_shipped_recipes_exist():
    assert RECIPES, "recipes/ must ship at least one recipe"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"selection": {"keeep": 0.5}}, "selection.keeep: unknown field"),
        ({"bogus": 1}, "bogus: unknown field"),
        ({"selection": {"keep": "half"}}, "selection.keep: expected a number"),
        ({"selection": {"keep": True}}, "selection.keep: expected a number"),
        ({"calibration": {"num_samples": 2.5}}, "calibration.num_samples: expected an integer"),
        ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code: expected true/false"),
        ({"task": {"label_words": {"0": ["x"]}}}, "task.label_words.0: expected a string"),
        ({"selection": 3}, "selection: expected a mapping"),
        ([1, 2], "recipe: expected a mapping"),
    ],
)
def test_schema_errors_name_the_field(data, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        recipe_from_dict(data)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("selection", {"keep": 0}, "selection.keep: must be in (0, 1]"),
        ("selection", {"keep": 1.5}, "selection.keep: must be in (0, 1]"),
        ("selection", {"method": "best"}, "selection.method: 'best' is not one of"),
        ("selection", {"round_to": 0}, "selection.round_to: must be >= 1"),
        ("networks", {"threshold": 0}, "networks.threshold: must be a finite number > 0"),
        ("networks", {"threshold": float("nan")}, "networks.threshold: must be a finite number > 0, got nan"),
        ("selection", {"ridge": float("nan")}, "selection.ridge: must be a finite number >= 0, got nan"),
        ("selection", {"refit_ridge": float("inf")}, "selection.refit_ridge: must be a finite number >= 0"),
        ("selection", {"fn_boost": float("nan")}, "selection.fn_boost: must be a finite number >= 0"),
        ("networks", {"components": 0}, "networks.components: must be >= 1"),
        ("calibration", {"num_samples": 0}, "calibration.num_samples: must be >= 1"),
        ("calibration", {"store_dtype": "int8"}, "calibration.store_dtype"),
        ("model", {"dtype": "float64"}, "model.dtype"),
        ("task", {"calibration_split": "validation"}, "calibration data must never be evaluation data"),
        ("evaluation", {"max_samples": 0}, "evaluation.max_samples"),
    ],
)
def test_range_errors(section, values, message):
    recipe = recipe_from_dict({section: values, "model": {"name_or_path": "m"}, "output": {"dir": "o"}}
                              if section != "model" else {section: {"name_or_path": "m", **values},
                                                          "output": {"dir": "o"}})
    with pytest.raises(RecipeError) as info:
        recipe.validate()
    assert any(message in p for p in info.value.problems), info.value.problems


def test_all_problems_reported_at_once():
    recipe = recipe_from_dict({"selection": {"keep": 2.0, "round_to": 0}, "networks": {"threshold": -1}})
    with pytest.raises(RecipeError) as info:
        recipe.validate()
    assert len(info.value.problems) == 5  # keep, round_to, threshold, model, output


def test_overrides_skip_none_and_revalidate_types():
    r = apply_overrides(Recipe(), {"selection.keep": 0.25, "selection.method": None})
    assert r.selection.keep == 0.25 and r.selection.method == "auto"
    with pytest.raises(RecipeError, match="expected a number"):
        apply_overrides(Recipe(), {"selection.keep": "x"})
    with pytest.raises(RecipeError, match=r"selectio.keep: selectio is not a recipe section \(sections: model, "):
        apply_overrides(Recipe(), {"selectio.keep": 0.3})
    with pytest.raises(RecipeError, match="selection.keep.x: selection.keep is not a recipe section"):
        apply_overrides(Recipe(), {"selection.keep.x": 0.3})
    with pytest.raises(RecipeError, match="task.split_seed: must be between 0 and 2"):
        apply_overrides(Recipe(), {"task.split_seed": -3}).validate()
    with pytest.raises(RecipeError, match=r"output.private \(--private\): only used with output.push_to_hub"):
        apply_overrides(Recipe(), {"output.dir": "o", "output.private": True}).validate()


def test_exponent_numbers_that_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("recovery:\n  lr: 3e-4\nselection:\n  ridge: 1E+1\n")  # PyYAML: strings (no dot)
    recipe = load_recipe(path)
    assert recipe.recovery.lr == 3e-4 and recipe.selection.ridge == 10.0
    assert apply_overrides(Recipe(), {"calibration.raw_share": "1e-1"}).calibration.raw_share == 0.1  # float | str
    with pytest.raises(RecipeError, match="recovery.lr: expected a number"):
        apply_overrides(Recipe(), {"recovery.lr": "3e-4x"})


def test_load_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("selection: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("selection: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError):
        load_recipe(unsafe)


def test_provenance_changes_name_changed_data_and_library_versions(tmp_path):
    """A saved recipe rerun reproduces its checkpoint only with the same data files and key library versions."""
    from fnprune.provenance import file_sha256, key_versions, provenance_changes

    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\na fine film\t1\n")
    recorded = {"data": {"train": {"file": str(data), "sha256": file_sha256(data)}}, "versions": key_versions()}
    assert provenance_changes(recorded) == [] and provenance_changes({}) == []
    data.write_text("sentence\tlabel\na fine movie\t1\n")
    recorded["versions"] = {**key_versions(), "torch": "0.1"}
    assert provenance_changes(recorded) == [f"the train file {data} changed since (sha256)",
                                            f"torch 0.1 -> {key_versions()['torch']}"]
    # a recipe downloaded with a checkpoint is untrusted: a malformed section is said, not a traceback
    for bad in ({"versions": 5, "data": [1]}, {"data": {"train": {"file": 3, "sha256": 4}}}, {"versions": [1]}):
        assert all(isinstance(c, str) for c in provenance_changes(bad))
    assert "not the mapping fnprune writes" in provenance_changes({"data": [1]})[0]


def test_settings_a_run_never_reads_are_named(caplog):
    """answer_weight without the reconstruction, the LoRA rank without LoRA, the label term's settings without
    that term (weight 0, or multiple choice) were accepted without a word and saved as if used."""
    import dataclasses

    from fnprune.inputs import _warn_unused_settings
    from fnprune.recipe import Recipe, RecoverySpec, SelectionSpec

    selection = SelectionSpec(method="flap", reconstruct=False, refit=False, answer_weight=0.3)
    recovery = RecoverySpec(enabled=True, params="mlp", lora_rank=8, label_weight=0.0, label_target="own")
    recipe = dataclasses.replace(Recipe(), selection=selection, recovery=recovery)
    with caplog.at_level("WARNING", logger="fnprune"):
        _warn_unused_settings(recipe, selection, "classification")
    assert "selection.answer_weight" in caplog.text
    assert "not used by this recovery (params mlp, label_weight 0, classification task): recovery.lora_rank, " \
           "recovery.label_target" in caplog.text
    caplog.clear()
    recovery = RecoverySpec(enabled=True, params="lora", lora_rank=8, label_weight=2.0)
    with caplog.at_level("WARNING", logger="fnprune"):
        _warn_unused_settings(dataclasses.replace(recipe, recovery=recovery), selection, "multiple_choice")
    assert "multiple choice task): recovery.label_weight" in caplog.text and "lora_rank" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fnprune"):
        _warn_unused_settings(dataclasses.replace(recipe, recovery=RecoverySpec()), SelectionSpec(method="flap",
                              reconstruct=True, refit=False, answer_weight=0.3), "classification")
    assert "not used" not in caplog.text  # read by the reconstruction; recovery off and untouched
