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


def _evaluate(model: Path, task_data: Path, include: Path, task: str = "sst2", lm_eval_task: str = "tiny_sst2") -> dict:
    result = CliRunner().invoke(main, [
        "evaluate", "--model", str(model), "--task", task, "--data-dir", str(task_data), "--template", "lm-eval",
        "--lm-eval-tasks", lm_eval_task, "--lm-eval-include", str(include), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    line = next(x for x in reversed(result.output.splitlines()) if '{"model"' in x)  # stderr's bars share lines
    return json.loads(line[line.index('{"model"'):])


def test_lm_eval_scores_equal_fnprunes_on_the_same_prompt(model_dir, task_data, tmp_path, offline):
    out = _evaluate(model_dir("llama"), task_data, _include(tmp_path, task_data))
    got = out["lm_eval"]["results"]["tiny_sst2"]
    assert got["n"] == out["n"] == 32
    assert got["acc"] == pytest.approx(out["templates"]["lm-eval"])
    assert got["acc_norm"] == pytest.approx(out["templates_acc_norm"]["lm-eval"])


def test_acc_norm_equals_lm_evals_with_answers_of_different_lengths(model_dir, task_data, tmp_path, offline):
    """acc_norm divides each answer's log-likelihood by its length in characters: with "negative"/"positive" (both
    8) no division can change an answer, so answers of other lengths ("no" against "yes") check it."""
    from fnprune.data import load_split, resolve_task
    from fnprune.evaluate import evaluate_accuracy
    from fnprune.lm_eval_backend import run_lm_eval
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec, TaskSpec

    include = tmp_path / "tasks"
    include.mkdir()
    yaml_text = YAML.format(dev=task_data / "dev.tsv").replace('["negative", "positive"]', '["no", "yes"]')
    (include / "tiny_sst2.yaml").write_text(yaml_text, encoding="utf-8")
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    examples = load_split(resolve_task(TaskSpec(name="sst2", data_dir=str(task_data))), "validation", "lm-eval")
    ours = evaluate_accuracy(model, tok, examples, {"0": " no", "1": " yes"}, progress=False)
    theirs = run_lm_eval(model, tok, ["tiny_sst2"], str(include), progress=False)["results"]["tiny_sst2"]
    assert theirs["acc"] == pytest.approx(ours.accuracy) and theirs["acc_norm"] == pytest.approx(ours.accuracy_norm)
    assert ours.accuracy_norm != ours.accuracy  # the lengths move answers here: the division itself is compared


def _short_answer_arc_rows(n: int, seed: int) -> list[dict]:
    """ARC-shaped questions with 3-5 choices of 1 to 15 characters: dividing by the length moves answers (an
    off-by-one in the length, e.g. counting the space before a choice, moves some of them again)."""
    import random

    rng = random.Random(seed)
    texts = ["a", "b", "no", "ok", "yes", "film", "cast", "the plot", "dull film", "a warm cast", "funny story"]
    rows = []
    for i in range(n):
        labels = "ABCDE"[: rng.choice([3, 4, 5])]
        rows.append({"id": f"q{i}", "answerKey": rng.choice(labels), "question": {
            "stem": f"question {i} about the {rng.choice(texts)}?",
            "choices": [{"text": t, "label": lab} for t, lab in zip(rng.sample(texts, len(labels)), labels)]}})
    return rows


def test_multiple_choice_equals_lm_evals_arc_easy_with_choices_of_different_lengths(model_dir, tmp_path, offline):
    """The shipped fnp_arc_easy task (lm-eval's arc_easy prompt, evaluation/lm_eval_tasks) over a tiny ARC file
    whose questions have 3-5 choices of different lengths: fnprune's multiple-choice acc and acc_norm equal
    lm-eval's."""
    data = tmp_path / "arc"
    data.mkdir()
    for name, rows in (("Dev", _short_answer_arc_rows(24, 1)), ("Test", _short_answer_arc_rows(40, 2))):
        (data / f"ARC-Easy-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    shipped = Path(__file__).resolve().parents[1] / "evaluation" / "lm_eval_tasks"
    include = tmp_path / "tasks"
    include.mkdir()
    yaml_text = (shipped / "fnp_arc_easy.yaml").read_text(encoding="utf-8")
    dev_line = "validation: ../shared/data/arc_easy/ARC-Easy-Dev.jsonl"
    assert dev_line in yaml_text
    (include / "fnp_arc_easy.yaml").write_text(
        yaml_text.replace(dev_line, f"validation: {data / 'ARC-Easy-Test.jsonl'}"), encoding="utf-8")
    (include / "utils.py").write_text((shipped / "utils.py").read_text(encoding="utf-8"), encoding="utf-8")
    # acc_norm divides by each choice's characters: the texts, and so the lengths, are lm-eval's own per question
    # (an aggregate alone misses an off-by-one in the length, which moves no answer on a tiny model)
    from lm_eval.tasks import TaskManager, get_task_dict

    from fnprune.data import load_evaluation, resolve_task
    from fnprune.evaluate import choice_lengths
    from fnprune.recipe import TaskSpec

    lm_task = get_task_dict(["fnp_arc_easy"], TaskManager(include_path=str(include), include_defaults=False))
    lm_task = lm_task["fnp_arc_easy"]
    docs = list(lm_task.validation_docs())
    ours = load_evaluation(resolve_task(TaskSpec(name="arc_easy", data_dir=str(data))), "test")["lm-eval"]
    lengths = choice_lengths(ours, None)
    assert len(docs) == len(ours) == 40
    for doc, e, length in zip(docs, ours, lengths):
        choices = lm_task.doc_to_choice(doc)
        assert (e.prompt, e.choices, e.delimiter) == (lm_task.doc_to_text(doc), tuple(choices),
                                                      lm_task.config.target_delimiter)
        assert length[: len(choices)].tolist() == [float(len(c)) for c in choices]
        assert int(e.label) == lm_task.doc_to_target(doc)
    out = _evaluate(model_dir("llama"), data, include, task="arc_easy", lm_eval_task="fnp_arc_easy")
    theirs = out["lm_eval"]["results"]["fnp_arc_easy"]
    assert theirs["n"] == out["n"] == 40
    assert theirs["acc"] == pytest.approx(out["templates"]["lm-eval"])
    assert theirs["acc_norm"] == pytest.approx(out["templates_acc_norm"]["lm-eval"])
    assert out["templates_acc_norm"]["lm-eval"] != out["templates"]["lm-eval"]  # lengths moved answers


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


def test_an_unparsable_task_yaml_is_named_not_reported_as_no_such_task(model_dir, tmp_path, offline):
    """lm-eval skips a YAML it cannot parse without a word; the error names the file and line."""
    (tmp_path / "t.yaml").write_text("task: tiny_bad\ndataset_path: csv\n  bad: [unclosed\n", encoding="utf-8")
    (tmp_path / "ok.yaml").write_text("task: tiny_ok\nprocess: !function utils.x\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama")), "--lm-eval-tasks",
                                       "tiny_bad", "--lm-eval-include", str(tmp_path)])
    assert result.exit_code != 0 and f"{tmp_path / 't.yaml'}, line 3 is not valid YAML" in result.output


def test_a_groups_documents_are_its_subtasks_and_the_include_folder_is_absolute():
    from fnprune.lm_eval_backend import _documents, lm_eval_report

    raw = {"n-samples": {"a": {"effective": 8}, "b": {"effective": 5}}, "group_subtasks": {"g": ["a", "b"]}}
    assert _documents(raw, "g") == 13 and _documents(raw, "a") == 8 and _documents(raw, "nope") is None
    cached = {"include": "/tmp/tasks", "results": {"a": {"acc": 0.5, "n": 8}}}
    assert lm_eval_report(cached, {**cached, "results": {"a": {"acc": 0.25, "n": 8}}})["include"] == "/tmp/tasks"


def test_a_task_lm_eval_cannot_build_is_one_line_before_any_work(model_dir, task_data, tmp_path, offline,
                                                                 monkeypatch):
    include = _include(tmp_path, task_data)
    (include / "tiny_sst2.yaml").write_text(YAML.format(dev=tmp_path / "missing.tsv"), encoding="utf-8")
    monkeypatch.setattr("fnprune.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama")), "--lm-eval-tasks",
                                       "tiny_sst2", "--lm-eval-include", str(include)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "Error: lm-eval cannot build task(s) tiny_sst2: FileNotFoundError"), result.output


def test_an_lm_eval_task_over_the_calibration_file_is_refused_before_the_model_loads(model_dir, task_data,
                                                                                     tmp_path, offline, monkeypatch):
    """As the task's evaluation split and the --validate benchmarks: lm-eval documents holding calibration text
    (here the task's own train file, as fnp_arc_easy reads ARC-Easy's Dev file) are refused in one line."""
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "tiny_sst2.yaml").write_text(YAML.format(dev=task_data / "train.tsv"), encoding="utf-8")
    monkeypatch.setattr("fnprune.inputs.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--num-samples", "24", "--lm-eval-tasks", "tiny_sst2", "--lm-eval-include", str(include),
        "--output", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "Error: evaluation.lm_eval_tasks: tiny_sst2's documents hold " in result.output, result.output
    assert "calibration example(s)" in result.output and not (tmp_path / "out").exists()


# --- compress: evaluation.lm_eval_tasks scored dense and pruned, report.json `lm_eval`, the dense results cached

LIMIT = 8  # lm-eval documents per task: the tests' lm-eval runs stay short


@pytest.fixture(scope="module")
def shared_include(tmp_path_factory, task_data) -> Path:
    """One task folder for the module, so the process builds lm-eval's task index once (fnprune keeps it)."""
    return _include(tmp_path_factory.mktemp("lm-eval"), task_data)


@pytest.mark.slow
def test_compress_scores_lm_eval_dense_and_pruned_and_caches_the_dense(model_dir, task_data, shared_include,
                                                                        tmp_path, offline, monkeypatch):
    from fnprune import lm_eval_backend
    from fnprune.recipe import load_recipe

    widths, real = [], lm_eval_backend.run_lm_eval
    monkeypatch.setattr(lm_eval_backend, "run_lm_eval",
                        lambda m, *a, **k: widths.append(m.config.intermediate_size) or real(m, *a, **k))
    model = model_dir("llama")
    args = ["compress", "--task", "sst2", "--model", str(model), "--data-dir", str(task_data), "--num-samples", "24",
            "--max-tokens", "300", "--components", "6", "--eval-samples", "8", "--lm-eval-tasks", "tiny_sst2",
            "--lm-eval-include", str(shared_include), "--lm-eval-limit", str(LIMIT), "--quiet"]
    first = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    section = json.loads((tmp_path / "a" / "report.json").read_text())["lm_eval"]
    assert section["version"] == lm_eval.__version__ and section["limit"] == LIMIT
    assert section["include"] == str(shared_include.resolve())
    entry = section["tasks"]["tiny_sst2"]
    assert entry["n"] == LIMIT
    for model_kind in ("dense", "pruned"):
        assert {"acc", "acc_norm", "acc_stderr"} <= set(entry[model_kind])
    dense_width = json.loads((model / "config.json").read_text())["intermediate_size"]
    assert widths[0] == dense_width and len(widths) == 2 and widths[1] < dense_width
    assert "lm-eval tiny_sst2 on 8 documents, limit 8: acc dense" in first.output, first.output
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"| lm-eval {lm_eval.__version__}: tiny_sst2 acc ({LIMIT} documents, limit {LIMIT}) |" in card
    assert "tiny_sst2 acc_norm" in card
    saved = load_recipe(tmp_path / "a" / "recipe.yaml").evaluation
    assert saved.lm_eval_tasks == ["tiny_sst2"] and saved.lm_eval_include == str(shared_include.resolve())
    assert saved.lm_eval_limit == LIMIT
    data = load_recipe(tmp_path / "a" / "recipe.yaml").provenance["data"]  # a rerun warns when these change
    assert data["lm-eval tiny_sst2.yaml"]["file"] == str((shared_include / "tiny_sst2.yaml").resolve())
    assert data["lm-eval dev.tsv"]["file"] == str((task_data / "dev.tsv").resolve())

    second = CliRunner().invoke(main, [*args, "--keep", "0.25", "--streamed", "--output", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    assert widths.count(dense_width) == 1 and len(widths) == 3  # the dense results came from the cache
    again = json.loads((tmp_path / "b" / "report.json").read_text())["lm_eval"]["tasks"]["tiny_sst2"]
    assert again["dense"] == entry["dense"] and set(again["pruned"]) == set(entry["pruned"])  # streamed: saved model

    # the written checkpoint scores as the in-memory pruned model did
    out = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "a"), "--lm-eval-tasks", "tiny_sst2",
                                    "--lm-eval-include", str(shared_include), "--lm-eval-limit", str(LIMIT),
                                    "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    line = next(x for x in reversed(out.output.splitlines()) if '{"model"' in x)
    got = json.loads(line[line.index('{"model"'):])["lm_eval"]["results"]["tiny_sst2"]
    assert got["acc"] == pytest.approx(entry["pruned"]["acc"]) and got["n"] == LIMIT


def test_lm_eval_leaves_the_tokenizer_and_random_state_as_they_were(model_dir, shared_include, offline):
    import random

    import torch

    from fnprune.lm_eval_backend import run_lm_eval
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    tok.pad_token = None
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    result = run_lm_eval(model, tok, ["tiny_sst2"], str(shared_include), limit=2)
    assert result["results"]["tiny_sst2"]["n"] == 2
    assert tok.pad_token is None and (random.random(), torch.rand(1)) == expected


def test_lm_eval_is_quiet_without_progress(model_dir, shared_include, offline, capfd):
    """compress/evaluate --quiet: no lm-eval info lines or progress bars, and lm-eval's own state restored."""
    import logging

    import lm_eval.api.task

    from fnprune.lm_eval_backend import run_lm_eval
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    bar, level = lm_eval.api.task.tqdm, logging.getLogger("lm_eval").level
    capfd.readouterr()
    run_lm_eval(model, tok, ["tiny_sst2"], str(shared_include), limit=2, progress=False)
    quiet = capfd.readouterr()
    assert "%|" not in quiet.err + quiet.out and "INFO" not in quiet.err + quiet.out
    assert lm_eval.api.task.tqdm is bar and logging.getLogger("lm_eval").level == level
    run_lm_eval(model, tok, ["tiny_sst2"], str(shared_include), limit=2)
    loud = capfd.readouterr()
    assert "%|" in loud.err + loud.out  # the bars are there when progress is on: the check above can fail


def test_a_task_scored_under_several_filters_keeps_each():
    """gsm8k-style results ("exact_match,strict-match" and "exact_match,flexible-extract") were merged into one
    "exact_match", the later filter's value (and stderr) replacing the earlier's."""
    from fnprune.lm_eval_backend import task_metrics

    raw = {"results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.30, "exact_match_stderr,strict-match": 0.02,
                  "exact_match,flexible-extract": 0.45, "exact_match_stderr,flexible-extract": 0.03},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.55}},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 20}, "arc_easy": {"original": 2376, "effective": 20}}}
    got = task_metrics(raw)
    assert got["gsm8k"] == {"exact_match,strict-match": 0.30, "exact_match_stderr,strict-match": 0.02,
                            "exact_match,flexible-extract": 0.45, "exact_match_stderr,flexible-extract": 0.03,
                            "n": 20}
    assert got["arc_easy"] == {"acc": 0.6, "acc_stderr": 0.01, "acc_norm": 0.55, "n": 20}
