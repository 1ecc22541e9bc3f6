"""The lm-eval backend: lm-evaluation-harness run on a model fnprune loaded (any layout), offline, from local
task YAMLs over tiny local files; its scores equal fnprune's own under the same prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fnprune.cli import main

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (fnprune[lm-eval])")

YAML = """task: tiny_sst2
dataset_path: csv
dataset_kwargs:
  data_files:
    validation: {dev}
  delimiter: "\\t"
  quoting: 3
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _include(tmp_path: Path, task_data: Path) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "tiny_sst2.yaml").write_text(YAML.format(dev=task_data / "dev.tsv"), encoding="utf-8")
    return d


def _evaluate(model: Path, task_data: Path, include: Path) -> dict:
    result = CliRunner().invoke(main, [
        "evaluate", "--model", str(model), "--task", "sst2", "--data-dir", str(task_data), "--template", "lm-eval",
        "--lm-eval-tasks", "tiny_sst2", "--lm-eval-include", str(include), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    line = next(x for x in reversed(result.output.splitlines()) if '{"model"' in x)  # stderr's bars share lines
    return json.loads(line[line.index('{"model"'):])


def test_lm_eval_scores_equal_fnprunes_on_the_same_prompt(model_dir, task_data, tmp_path, offline):
    out = _evaluate(model_dir("llama"), task_data, _include(tmp_path, task_data))
    got = out["lm_eval"]["results"]["tiny_sst2"]
    assert got["n"] == out["n"] == 32
    assert got["acc"] == pytest.approx(out["templates"]["lm-eval"])
    assert got["acc_norm"] == pytest.approx(out["templates_acc_norm"]["lm-eval"])


def test_lm_eval_runs_on_a_per_layer_checkpoint(model_dir, task_data, tmp_path, offline):
    pruned = tmp_path / "pruned"
    made = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--num-samples", "24", "--max-tokens", "300", "--components", "6", "--allocation", "global",
        "--layout", "per-layer", "--no-eval", "--output", str(pruned), "--quiet"])
    assert made.exit_code == 0, made.output
    widths = json.loads((pruned / "report.json").read_text())["widths"]["pruned"]
    out = _evaluate(pruned, task_data, _include(tmp_path, task_data))
    assert out["lm_eval"]["results"]["tiny_sst2"]["acc"] == pytest.approx(out["templates"]["lm-eval"])
    assert len(widths) == 2


def test_unknown_lm_eval_task_is_one_clear_error(model_dir, tmp_path, offline):
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama")), "--lm-eval-tasks",
                                       "no_such_task_xyz", "--lm-eval-include", str(tmp_path)])
    assert result.exit_code != 0 and "lm-eval has no task(s) no_such_task_xyz" in result.output
