"""Extra validation in one compress run: more tasks and WikiText perplexity, dense beside pruned in report.json,
the CLI summary and the model card; the dense results come from the cache the second time; compress on a
multiple-choice task; `fnprune evaluate` on any built-in task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_tasks import _arc_rows, _write_jsonl

import fnprune
from fnprune import validation
from fnprune.cli import main
from fnprune.errors import RecipeError
from fnprune.recipe import load_recipe, recipe_from_dict

pytestmark = pytest.mark.slow  # full compress runs

SMALL = ["--num-samples", "24", "--max-tokens", "300", "--components", "6", "--eval-samples", "10", "--quiet"]


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    _write_jsonl(root / "arc" / "ARC-Easy-Dev.jsonl", _arc_rows(30, 1))
    _write_jsonl(root / "arc" / "ARC-Easy-Test.jsonl", _arc_rows(12, 2))
    _write_jsonl(root / "copa" / "val.jsonl", [
        {"premise": f"The film {i} was long.", "choice1": "People left early.", "choice2": f"It won award {i}.",
         "question": ["cause", "effect"][i % 2], "label": i % 2, "idx": i} for i in range(24)])
    wiki = root / "wiki.test.raw"
    wiki.write_text("\r\n".join(f" = Film {i} = \r\n The film was {'good' if i % 2 else 'bad'} and the movie is a "
                                "story with a plot ." for i in range(60)), encoding="utf-8")
    return {"arc": root / "arc", "copa": root / "copa", "wiki": wiki}


def test_compress_validates_tasks_and_perplexity_dense_beside_pruned(model_dir, task_data, bench_data, tmp_path,
                                                                      monkeypatch):
    calls, ppl_calls = [], []
    real, real_ppl = validation.evaluate_templates, validation.perplexity
    monkeypatch.setattr(validation, "evaluate_templates",
                        lambda m, *a, **k: calls.append(m.config.intermediate_size) or real(m, *a, **k))
    monkeypatch.setattr(validation, "perplexity",
                        lambda m, *a, **k: ppl_calls.append(m.config.intermediate_size) or real_ppl(m, *a, **k))
    model = model_dir("llama")
    args = ["compress", "--task", "sst2", "--model", str(model), "--data-dir", str(task_data), *SMALL,
            "--validate", f"copa={bench_data['copa']}", "--validate", f"arc_easy={bench_data['arc']}",
            "--validate", f"wikitext={bench_data['wiki']}", "--perplexity-tokens", "256", "--perplexity-window", "64"]
    first = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    v = report["validation"]
    assert [t["task"] for t in v["tasks"]] == ["copa", "arc_easy"]
    for t in v["tasks"]:
        m = t["metric"]
        assert m["kind"] == "multiple_choice" and m["n"] > 0
        assert all(m[k] is not None for k in ("dense", "pruned", "dense_acc_norm", "pruned_acc_norm"))
    held = {"copa": {"lm-eval", "options"}, "arc_easy": {"lm-eval", "correct"}}  # held-out templates by default
    assert [{x["name"] for x in t["templates"]} for t in v["tasks"]] == [held["copa"], held["arc_easy"]]
    assert v["perplexity"]["tokens"] == 256 and v["perplexity"]["window"] == 64
    assert v["perplexity"]["tokens_scored"] == 4 * 63
    assert v["perplexity"]["dense"] > 1 and v["perplexity"]["pruned"] > 1
    card = (tmp_path / "a" / "README.md").read_text()
    assert "validation: copa accuracy" in card and "validation: wikitext perplexity" in card
    assert "validate arc_easy accuracy" in first.output and "validate wikitext perplexity" in first.output
    assert any(t["metric"]["dense"] for t in v["tasks"])
    for t in v["tasks"]:  # a validation task's headline has its interval too, and the summary prints it
        if t["metric"]["dense"]:
            assert f"{t['metric']['retained']:.1%} of dense (95% interval" in first.output
    dense = json.loads((model / "config.json").read_text())["intermediate_size"]
    assert calls.count(dense) == 3 and ppl_calls.count(dense) == 1  # sst2, copa, arc_easy; wikitext
    second = CliRunner().invoke(main, [*args, "--keep", "0.25", "--output", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    assert calls.count(dense) == 3 and ppl_calls.count(dense) == 1  # the dense model: all from the cache
    again = json.loads((tmp_path / "b" / "report.json").read_text())["validation"]
    assert [t["metric"]["dense"] for t in again["tasks"]] == [t["metric"]["dense"] for t in v["tasks"]]
    assert again["perplexity"]["dense"] == v["perplexity"]["dense"]
    saved = load_recipe(tmp_path / "a" / "recipe.yaml")
    assert all(Path(x.data_dir or x.file).is_absolute() for x in saved.evaluation.validation)  # reruns from anywhere
    hashed = saved.provenance["data"]  # a rerun warns when a benchmark's data changed, as for the task's
    assert {"copa (--validate)", "arc_easy (--validate)", "wikitext (--validate)"} <= set(hashed)
    assert hashed["wikitext (--validate)"]["file"] == str(bench_data["wiki"].resolve())


def test_validation_entries_are_checked(task_data):
    bad = [{"task": ""}, {"task": "wikitext"}, {"task": "boolq"}, {"task": "copa", "data_dir": "x", "max_samples": 0}]
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"evaluation": {"validation": bad}}).validate()
    text = str(info.value)
    for part in ("validation[0].task: required", "validation[1]: wikitext needs file",
                 "validation[2].data_dir: required", "validation[3].max_samples"):
        assert part in text
    with pytest.raises(RecipeError, match="expected a mapping"):
        recipe_from_dict({"evaluation": {"validation": ["boolq"]}})


@pytest.mark.parametrize("extra, message", [
    (["--data-files", "train={data}/dev.tsv,validation={data}/train.tsv", "--validate", "sst2={data}"],
     "evaluation.validation sst2 (--validate): "),  # it scores dev.tsv, the calibration's rows here
    (["--validate", "boolq={missing}"], "evaluation.validation boolq (--validate"),
    (["--validate", "wikitext={wiki}", "--perplexity-tokens", "256", "--perplexity-window", "256"],
     "longer than the model's 128 positions"),
    (["--validate", "wikitext={wiki}", "--perplexity-tokens", "100", "--perplexity-window", "64"],
     "not a multiple of the window 64; the last 36"),
    (["--perplexity-tokens", "1024"], "only used with --validate wikitext=FILE"),
])
def test_validation_problems_name_the_benchmark_before_any_work(extra, message, model_dir, task_data, bench_data,
                                                                 tmp_path):
    """A --validate benchmark may not share examples with the calibration, its errors name it (not the task's
    --data-dir), and perplexity settings are checked against the model and each other, or refused unused."""
    paths = {"data": task_data, "missing": tmp_path / "missing", "wiki": bench_data["wiki"]}
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), *SMALL, *[a.format(**paths) for a in extra],
                                       "--output", str(tmp_path / "o")])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_validation_task_is_one_clear_error(model_dir, task_data, tmp_path):
    (tmp_path / "v").mkdir()
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), *SMALL, "--validate", f"nope={tmp_path / 'v'}",
                                       "--output", str(tmp_path / "o")])
    assert result.exit_code != 0 and "'nope' is not a built-in task" in result.output


def test_compress_and_evaluate_a_multiple_choice_task(model_dir, bench_data, tmp_path):
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model_dir("llama"))},
        "task": {"name": "arc_easy", "data_dir": str(bench_data["arc"])},
        "calibration": {"num_samples": 30, "max_tokens": 300, "batch_size": 8},
        "networks": {"components": 6, "max_iter": 50},
        "output": {"dir": str(tmp_path / "arc")},
    })
    report = fnprune.compress(recipe, progress=False).report
    assert report["metric"]["kind"] == "multiple_choice" and report["metric"]["split"] == "test"
    assert report["calibration"]["samples"] == 30 and report["metric"]["pruned_acc_norm"] is not None
    out = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "arc"), "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output.strip().splitlines()[-1])
    assert got["task"] == "arc_easy" and got["accuracy"] == pytest.approx(report["metric"]["pruned"])
    assert got["acc_norm"] == pytest.approx(report["metric"]["pruned_acc_norm"])
    dense = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama")), "--task", "copa",
                                      "--data-dir", str(bench_data["copa"]), "--json", "--quiet"])
    assert dense.exit_code == 0, dense.output
    assert json.loads(dense.output.strip().splitlines()[-1])["n"] == 12  # the evaluation half of 24 rows


def test_report_keeps_each_templates_answers_for_paired_comparisons():
    """report.json's `templates[].hits`: one "1"/"0" per example, read back as the (templates, examples) matrix the
    intervals take; the comparison refuses reports that did not score the same examples with the same dense model."""
    import pytest
    import torch

    from evaluation.compare import compare
    from fnprune.evaluate import EvalResult, TaskResult
    from fnprune.recipe import PromptTemplate, TaskSpec
    from fnprune.validation import accuracy_report, read_hits, read_right_probs

    def result(rows: list[list[bool]], sure: float = 0.8) -> TaskResult:
        """Answers `rows`, putting `sure` on the right answer where right and 1 - `sure` where wrong."""
        by = {name: EvalResult(sum(r) / len(r), len(r), 0.0, ["1"] * len(r), hits=torch.tensor(r),
                               right_probs=torch.tensor([sure if h else 1 - sure for h in r], dtype=torch.float64))
              for name, r in zip(("a", "b", "c"), rows)}
        return TaskResult(by, held_out=["b", "c"])

    task = TaskSpec(name="t", templates=[PromptTemplate("a", "{x}"), PromptTemplate("b", "{x}", held_out=True),
                                         PromptTemplate("c", "{x}", held_out=True)])
    dense = [[True, True, False, True], [True, False, True, True], [False, True, True, True]]
    first = [[True, False, False, True], [True, False, False, True], [False, False, True, True]]
    second = [[True, True, False, True], [True, False, True, True], [False, True, True, False]]
    one, two = (accuracy_report(task, result(dense), result(p)) for p in (first, second))
    assert [t["hits"] for t in one["templates"]][1] == {"dense": "1011", "pruned": "1001"}
    assert read_hits(one["templates"], "pruned", True).tolist() == first[1:]
    assert read_hits(one["templates"], "dense", False).tolist() == dense[:1]
    held, calibration = compare(one, two)
    assert (held["first"], held["second"], held["difference"]) == (66.7, 83.3, 16.7)
    assert (calibration["first"], calibration["second"]) == (66.7, 100.0)
    # the probability of the right answer: 0.8 where right, 0.2 where wrong, 4 decimals in the report
    assert one["templates"][1]["right_probs"] == {"dense": [0.8, 0.2, 0.8, 0.8], "pruned": [0.8, 0.2, 0.2, 0.8]}
    assert read_right_probs(one["templates"], "pruned", True).tolist() == [[0.8, 0.2, 0.2, 0.8],
                                                                            [0.2, 0.2, 0.8, 0.8]]
    # held-out, right 6, 4 and 5 times of 8: dense 0.65 on average, first 0.5, second 0.575 -> 76.9% and 88.5%
    assert (held["soft_first"], held["soft_second"], held["soft_difference"]) == (76.9, 88.5, 11.5)
    assert held["soft_difference_ci95"] is not None
    surer = accuracy_report(task, result(dense), result(second, sure=0.9))  # same answers, surer of them
    same, _ = compare(two, surer)
    assert same["difference"] == 0.0 and same["soft_difference"] > 0
    del surer["templates"][2]["right_probs"]  # a report from before the probabilities: accuracy only
    assert compare(two, surer)[0]["soft_difference"] is None and compare(two, surer)[0]["difference"] == 0.0
    other = accuracy_report(task, result([[not h for h in r] for r in dense]), result(second))
    with pytest.raises(SystemExit, match="dense answers differ"):
        compare(one, other)
    assert read_hits([{"held_out": True, "pruned": 0.5}], "pruned", True) is None  # a report from before
    assert read_hits([{"held_out": True, "hits": "10"}, "x"], "pruned", True) is None  # or a damaged one
    assert read_right_probs([{"held_out": True, "right_probs": {"pruned": [0.5, "x"]}}], "pruned", True) is None
    assert read_right_probs([{"held_out": True, "right_probs": {"pruned": [0.5, True]}}], "pruned", True) is None


def test_what_a_classifier_cannot_score_is_refused_before_calibration(model_dir, task_data, bench_data, tmp_path,
                                                                      monkeypatch):
    """A classifier checkpoint on a multiple-choice task, or with a multiple-choice or perplexity --validate, was
    refused (or crashed) only after calibration and selection; now at load, before any forward pass."""
    from fnprune.errors import DataError
    from fnprune.inputs import load_inputs

    calibrated = []
    monkeypatch.setattr("fnprune.pipeline.calibrate", lambda *a, **k: calibrated.append(1))
    bert = str(model_dir("bert"))
    base = {"model": {"name_or_path": bert}, "output": {"dir": str(tmp_path / "o")}}
    cases = [({"task": {"name": "arc_easy", "data_dir": str(bench_data["arc"])}}, "cannot score multiple-choice"),
             ({"task": {"name": "sst2", "data_dir": str(task_data)},
               "evaluation": {"validation": [{"task": "arc_easy", "data_dir": str(bench_data["arc"])}]}},
              "evaluation.validation arc_easy .*cannot score multiple-choice"),
             ({"task": {"name": "sst2", "data_dir": str(task_data)},
               "evaluation": {"validation": [{"task": "wikitext", "file": str(bench_data["wiki"])}],
                              "perplexity_tokens": 256, "perplexity_window": 64}},
              "no language-model head to score perplexity")]
    for extra, match in cases:
        recipe = recipe_from_dict({**base, **extra})
        with pytest.raises(DataError, match=match):
            load_inputs(recipe)
        with pytest.raises(DataError, match=match):
            fnprune.compress(recipe, progress=False)
    assert not calibrated


def test_a_classifier_is_not_given_a_task_of_more_fields_than_a_pair(model_dir, tmp_path):
    """A classifier head reads one text or a pair: on WiC (the word and two sentences) it read the word and the
    first sentence, never the second, and scored near chance without a word. Refused at load; templates that read
    the pair it was fine-tuned on work."""
    from test_tasks import _builtin_files

    from fnprune.errors import DataError
    from fnprune.inputs import load_inputs

    wic = _builtin_files(tmp_path / "data")["wic"]
    base = {"model": {"name_or_path": str(model_dir("bert"))}, "output": {"dir": str(tmp_path / "o")}}
    with pytest.raises(DataError, match="a classifier head reads one text or a pair; .* read 4 fields"):
        load_inputs(recipe_from_dict({**base, "task": {"name": "wic", "data_dir": str(wic)}}))
    pair = [{"name": "pair", "template": "{sentence1} / {sentence2}"},
            {"name": "pair-held", "template": "A: {sentence1} B: {sentence2}", "held_out": True}]
    inputs = load_inputs(recipe_from_dict({**base, "task": {"name": "wic", "data_dir": str(wic), "templates": pair}}))
    assert len(inputs.prompts[0].texts) == 2
