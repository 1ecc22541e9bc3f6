"""lm-eval from a recipe (`evaluation.lm_eval_tasks`, `lm_eval_include`, `lm_eval_limit`): round-trip, checks, the
flags compress and evaluate share, and the one-line errors given before any work (lm-eval missing, no such
folder). Runs without lm-eval installed; the compress runs with it are in test_lm_eval_backend.py."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from fnprune import lm_eval_backend, pipeline
from fnprune.cli import main
from fnprune.errors import RecipeError
from fnprune.recipe import dump_recipe, recipe_from_dict

LM_EVAL = {"lm_eval_tasks": ["tiny_sst2", "boolq"], "lm_eval_include": "tasks", "lm_eval_limit": 8}


def test_lm_eval_fields_round_trip_and_are_checked():
    recipe = recipe_from_dict({"evaluation": LM_EVAL})
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe
    assert recipe.evaluation.lm_eval_tasks == ["tiny_sst2", "boolq"] and not recipe.evaluation.check()
    bad = {"lm_eval_tasks": ["a", "a", "b,c", ""], "lm_eval_limit": 0}
    problems = recipe_from_dict({"evaluation": bad}).evaluation.check()
    for part in ("lm_eval_tasks: a task is listed twice", "lm_eval_tasks[2]: 'b,c' is not an lm-eval task name",
                 "lm_eval_tasks[3]", "lm_eval_limit (--lm-eval-limit): must be >= 1 or null, got 0"):
        assert any(part in p for p in problems), (part, problems)
    alone = recipe_from_dict({"evaluation": {"lm_eval_include": "d", "lm_eval_limit": 3}}).evaluation.check()
    assert [p.split(":")[0] for p in alone] == ["evaluation.lm_eval_include", "evaluation.lm_eval_limit"]
    with pytest.raises(RecipeError, match="lm_eval_tasks: expected a list"):
        recipe_from_dict({"evaluation": {"lm_eval_tasks": "boolq"}})


def test_lm_eval_flags_reach_the_recipe_and_evaluate_shares_them(monkeypatch, tmp_path):
    seen = {}

    def fake(recipe, progress):
        seen["recipe"] = recipe
        raise RecipeError("stop here")

    monkeypatch.setattr("fnprune.pipeline.compress", fake)
    result = CliRunner().invoke(main, ["compress", "--lm-eval-tasks", "tiny_sst2, boolq", "--lm-eval-include",
                                       str(tmp_path), "--lm-eval-limit", "5", "--quiet"])
    assert "stop here" in result.output, result.output
    ev = seen["recipe"].evaluation
    assert (ev.lm_eval_tasks, ev.lm_eval_include, ev.lm_eval_limit) == (["tiny_sst2", "boolq"], str(tmp_path), 5)
    compress = {p.name: p for p in main.commands["compress"].params}
    evaluate = {p.name: p for p in main.commands["evaluate"].params}
    for name in ("lm_eval_tasks", "lm_eval_include", "lm_eval_limit"):  # one definition, both commands
        assert evaluate[name].opts == compress[name].opts and evaluate[name].help == compress[name].help


def _compress(model_dir, task_data, tmp_path, *extra):
    return CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--num-samples", "24", "--max-tokens", "300", "--components", "6", "--output", str(tmp_path / "o"),
        "--quiet", *extra])


@pytest.fixture()
def no_work(monkeypatch):
    """Calibration and model loading fail the test: the errors below must come before them."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the lm-eval checks")

    monkeypatch.setattr(pipeline, "calibrate", forbidden)
    monkeypatch.setattr("fnprune.inputs.load_model", forbidden)
    monkeypatch.setattr("fnprune.models.load_model", forbidden)


def test_missing_lm_eval_is_one_line_error_before_any_work(model_dir, task_data, tmp_path, monkeypatch, no_work):
    monkeypatch.setattr(lm_eval_backend, "lm_eval_available", lambda: False)
    result = _compress(model_dir, task_data, tmp_path, "--lm-eval-tasks", "boolq")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "Error: evaluation.lm_eval_tasks (--lm-eval-tasks boolq) needs lm-evaluation-harness, which is not "
        "installed: pip install 'fnprune[lm-eval]'"]
    out = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama")), "--lm-eval-tasks", "boolq"])
    assert out.exit_code == 1 and "needs lm-evaluation-harness" in out.output


def test_lm_eval_include_must_be_a_folder(model_dir, task_data, tmp_path, no_work):
    missing = tmp_path / "no-such-folder"
    result = _compress(model_dir, task_data, tmp_path, "--lm-eval-tasks", "boolq", "--lm-eval-include", str(missing))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"--lm-eval-include): {missing} is not a folder" in result.output


def test_dense_lm_eval_cache_key_follows_the_task_folder_its_data_and_the_limit(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from fnprune.lm_eval_backend import lm_eval_cache_key

    folder, data = tmp_path / "tasks", tmp_path / "dev.tsv"
    folder.mkdir()
    data.write_text("sentence\tlabel\na b\t1\n")
    yaml_file = folder / "t.yaml"
    yaml_file.write_text(f"task: t\ndataset_path: csv\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
                         "process_docs: !function utils.docs\n")
    model = recipe_from_dict({"model": {"name_or_path": str(model_dir("llama"))}}).model
    key = lambda **ev: lm_eval_cache_key(model, recipe_from_dict(  # noqa: E731
        {"evaluation": {**LM_EVAL, "lm_eval_tasks": ["t"], "lm_eval_include": str(folder), **ev}}).evaluation)
    first = key()
    assert key() == first and key(lm_eval_limit=9) != first and key(lm_eval_tasks=["t", "u"]) != first
    data.write_text("sentence\tlabel\na b\t0\n")  # the data file a YAML names
    second = key()
    assert second != first
    (folder / "utils.py").write_text("def docs(d):\n    return d\n")  # any file of the folder
    assert key() != second
