"""The CLI end to end on tiny models, and its messages for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fnprune.cli import main

SMALL = ["--num-samples", "40", "--max-tokens", "300", "--components", "8", "--quiet"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compress_evaluate_inspect(model_dir, task_data, tmp_path):
    out = tmp_path / "out"
    result = _run("compress", "--task", "sst2", "--model", model_dir("llama"), "--data-dir", task_data,
                  "--keep", "0.5", "--output", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "pruned" in result.output
    report = json.loads((out / "report.json").read_text())
    # evaluate takes the task (and its data) from the folder's recipe.yaml
    result = _run("evaluate", "--model", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output.strip().splitlines()[-1])
    assert evaluated["accuracy"] == report["metric"]["pruned"] and evaluated["n"] == 32
    assert evaluated["templates"] == {t["name"]: t["pruned"] for t in report["templates"]}
    one = _run("evaluate", "--model", out, "--template", "lm-eval", "--quiet")
    lm_eval = next(t["pruned"] for t in report["templates"] if t["name"] == "lm-eval")
    assert f"accuracy {lm_eval:.4f}" in one.output and "held-out templates (mean)" in one.output
    bad = CliRunner().invoke(main, ["evaluate", "--model", str(out), "--template", "nope"])
    assert bad.exit_code != 0 and "not a template of sst2" in bad.output
    result = _run("inspect", out)
    assert result.exit_code == 0 and "128 -> 64" in result.output and "timings" in result.output


def test_recipe_plus_flag_overrides(model_dir, task_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model_dir('gpt2')}\ntask:\n  name: sst2\n  data_dir: {task_data}\n"
                      "selection:\n  keep: 0.5\n  method: flap\n")
    out = tmp_path / "o"
    result = _run("compress", "--recipe", recipe, "--sparsity", "0.75", "--output", out, "--no-eval",
                  "--sample-store", "tokens", *SMALL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["keep"] == 0.25 and report["method"] == "flap" and report["widths"]["pruned"] == [32, 32]
    assert "sample_store: tokens" in (out / "recipe.yaml").read_text()
    assert "not evaluated (--no-eval)" in result.output and "None" not in result.output


def test_data_files_flag(model_dir, task_data, tmp_path):
    out = tmp_path / "o"
    files = f"train={task_data / 'train.tsv'},validation={task_data / 'dev.tsv'}"
    result = _run("compress", "--task", "sst2", "--model", model_dir("opt"), "--data-files", files,
                  "--output", out, "--eval-samples", "8", *SMALL)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["metric"]["n"] == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep", "0.5", "--sparsity", "0.5"], "not both"),
        (["--keep", "1.5"], "selection.keep: must be in (0, 1]"),
        (["--method", "magic"], "selection.method: 'magic' is not one of"),
        (["--data-files", "train.tsv"], "expected SPLIT=PATH"),
        (["--components", "0"], "networks.components: must be >= 1"),
        (["--recipe", "/nonexistent/recipe.yaml"], "recipe file not found"),
    ],
)
def test_bad_flags(model_dir, task_data, tmp_path, extra, message):
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o"), *extra])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_bad_model_and_data(model_dir, task_data, tmp_path):
    cases = [
        (["--model", tmp_path / "missing", "--data-dir", task_data], "model path not found"),
        (["--model", tmp_path / "notamodel", "--data-dir", task_data], "no config.json"),
        (["--model", model_dir("llama"), "--data-dir", tmp_path / "nodata"], "not a directory"),
        (["--model", tmp_path / "m.gguf", "--data-dir", task_data], "GGUF file not found"),
    ]
    (tmp_path / "notamodel").mkdir()
    for args, message in cases:
        result = CliRunner().invoke(main, ["compress", "--task", "sst2", *map(str, args),
                                           "--output", str(tmp_path / "o"), "--quiet"])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)


def test_unsupported_architecture_names_the_supported(tmp_path, tokenizer_dir, task_data):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("bloom", vocab_size=384, hidden_size=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "bloom")
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(tmp_path / "bloom"),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "'bloom' is not supported" in result.output and "llama" in result.output and "gpt2" in result.output


def test_existing_output_refused(model_dir, task_data, tmp_path):
    (tmp_path / "o").mkdir()
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_evaluate_needs_a_task(model_dir):
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama"))])
    assert result.exit_code == 1 and "--task is required" in result.output
