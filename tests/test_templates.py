"""Prompt templates: calibration templates take turns, held-out templates never reach calibration, every
template is scored and reported, multi-template recipes round-trip, the dense scores are cached."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoTokenizer

import fnprune
from fnprune import calibration, pipeline, validation
from fnprune.data import BUILTIN_TASKS, RAW, load_evaluation, load_sample, resolve_task
from fnprune.errors import DataError, RecipeError
from fnprune.recipe import TaskSpec, apply_overrides, dump_recipe, recipe_from_dict

CUSTOM = {
    "name": "polarity",
    "label_column": "label",
    "label_words": {"0": " negative", "1": " positive"},
    "templates": [
        {"name": "a", "template": "Review: {sentence}\nSentiment:"},
        {"name": "b", "template": "{sentence}\nIn short, the film is", "label_words": {"0": " bad", "1": " good"}},
        {"name": "c", "template": "Text: {sentence}\nMood:", "held_out": True},
    ],
}


def _task(**change) -> TaskSpec:
    return recipe_from_dict({"task": {**CUSTOM, **change}}).task


def _recipe(model_path, data_dir, out, task=None, **extra):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_path)},
        "task": {**(task or {"name": "sst2"}), "data_dir": str(data_dir)},
        "calibration": {"num_samples": 24, "max_tokens": 300, "batch_size": 8},
        "networks": {"components": 6, "max_iter": 50},
        "evaluation": {"max_samples": 12},
        "output": {"dir": str(out)},
        **extra,
    })


def test_every_builtin_task_has_five_templates_with_the_lm_eval_prompt_held_out():
    for name, task in BUILTIN_TASKS.items():
        resolved = resolve_task(TaskSpec(name=name, data_dir="."))
        assert len(resolved.templates) >= 5, name
        assert resolved.calibration_templates() and resolved.held_out_templates(), name
        held = {t.template for t in resolved.held_out_templates()}
        assert not held & {t.template for t in resolved.calibration_templates()}, name
        if name in ("sst2", "rte"):
            lm_eval = next(t for t in task.templates if t.name == "lm-eval")
            assert lm_eval.held_out
    sst2 = next(t for t in BUILTIN_TASKS["sst2"].templates if t.name == "lm-eval")
    assert sst2.template == "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    assert sst2.words(BUILTIN_TASKS["sst2"].label_words) == {"0": " negative", "1": " positive"}


def test_calibration_takes_turns_over_calibration_templates_only(task_data):
    task = resolve_task(_task(data_dir=str(task_data)))
    drawn = load_sample(task, "train", 30, 0)
    assert [e.template for e in drawn] == ["a", "b"] * 15
    assert all(e.prompt.startswith("Review: ") or e.prompt.endswith("the film is") for e in drawn)
    sets = load_evaluation(task, "validation")
    assert list(sets) == ["a", "b", "c"]  # calibration templates first, every template scored
    assert len({tuple(e.texts for e in v) for v in sets.values()}) == 1  # the same rows under each


def test_a_single_template_keeps_the_builtin_held_out_ones_unless_it_is_one_of_them():
    own = resolve_task(TaskSpec(name="sst2", template="Say: {sentence}\nSo:"))
    assert [t.name for t in own.calibration_templates()] == ["custom"]
    assert own.held_out_templates() == BUILTIN_TASKS["sst2"].held_out_templates()
    lm_eval = next(t for t in BUILTIN_TASKS["sst2"].templates if t.name == "lm-eval")
    same = resolve_task(TaskSpec(name="sst2", template=lm_eval.template))
    assert lm_eval.template not in {t.template for t in same.held_out_templates()}  # calibrated on: not held out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"templates": [{"name": "a", "template": "{sentence}", "held_out": True}]}, "every template is held out"),
        ({"templates": [{"name": "a", "template": "{sentence}"}, {"name": "a", "template": "x {sentence}"}]},
         "used twice"),
        ({"templates": [{"name": "a", "template": "{sentence}", "label_words": {"7": " x"}}]}, "not in task.label"),
        ({"templates": [{"name": "", "template": "{sentence}"}]}, r"templates\[0\].name: required"),
        ({"template": "{sentence}"}, "not both"),
    ],
)
def test_bad_templates_are_named(change, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"task": {**CUSTOM, **change}}).validate()


def test_multi_template_recipe_round_trips():
    recipe = recipe_from_dict({"task": CUSTOM})
    assert recipe.task.templates[1].label_words == {"0": " bad", "1": " good"}
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_template_without_a_field_is_refused():
    with pytest.raises(DataError, match="no {column} field"):
        resolve_task(_task(data_dir=".", templates=[{"name": "a", "template": "no field"}]))


def test_held_out_templates_never_reach_calibration(model_dir, task_data, tmp_path, monkeypatch, tokenizer_dir):
    """Whatever is run through the model before selection, and whatever relevance reads, comes from the
    calibration templates: no sequence captured is a held-out prompt, and the relevance groups are theirs."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    task = resolve_task(_task(data_dir=str(task_data)))
    held = [t for t in task.templates if t.held_out]
    forbidden = set()
    for split in ("train", "validation"):
        for t in held:
            forbidden |= {tuple(tok(e.prompt)["input_ids"]) for e in load_evaluation(task, split)[t.name]}
    seen: dict[str, list] = {"seqs": [], "templates": []}
    capture, groups = calibration.capture_activations, calibration.template_groups

    def spy_capture(model, layout, seqs, **kw):
        seen["seqs"] += [tuple(s) for s in seqs]
        return capture(model, layout, seqs, **kw)

    def spy_groups(examples):
        seen["templates"] += [e.template for e in examples]
        return groups(examples)

    class SpyRefit(pipeline.LayerwiseRefit):
        def __init__(self, model, layout, seqs, *args, **kw):
            seen["refit"] = [tuple(s) for s in seqs]
            super().__init__(model, layout, seqs, *args, **kw)

    monkeypatch.setattr(calibration, "capture_activations", spy_capture)
    monkeypatch.setattr(calibration, "template_groups", spy_groups)
    monkeypatch.setattr(pipeline, "LayerwiseRefit", SpyRefit)  # the refit runs the first calibration prompts
    recipe = _recipe(model_dir("llama"), task_data, tmp_path / "out", task=CUSTOM, calibration={
        "num_samples": 24, "max_tokens": 300, "batch_size": 8, "cache": False},
        selection={"method": "fn-task", "refit_prompts": 16})
    report = fnprune.compress(recipe, progress=False).report  # fn-task: relevance reads the template groups
    assert seen["seqs"] and not forbidden & set(seen["seqs"])
    assert report["refit"]["prompts"] == 16 and set(seen["refit"]) <= set(seen["seqs"])
    assert set(seen["templates"]) == {"a", "b", RAW.name}  # raw_share auto: half the prompts are the text alone
    assert [t["name"] for t in report["templates"]] == ["a", "b", "c"]
    assert report["metric"]["of"] == "held-out templates (mean)"
    assert report["metric"]["pruned"] == report["templates"][2]["pruned"]
    assert sum(report["templates"][2]["predicted"]["pruned"].values()) == pytest.approx(1)
    labels = [e.label for e in load_evaluation(resolve_task(recipe.task), "validation", 12)["a"]]
    assert report["metric"]["majority_class"] == max(labels.count("0"), labels.count("1")) / 12
    assert report["template_means"]["calibration"]["dense"] == pytest.approx(
        (report["templates"][0]["dense"] + report["templates"][1]["dense"]) / 2)
    m = report["metric"]  # pruned / dense on the headline templates, with its paired-bootstrap interval
    assert m["dense"] > 0  # the tiny model is right on some examples, so the ratio exists
    assert m["retained"] == pytest.approx(m["pruned"] / m["dense"], abs=1e-4)
    low, high = m["retained_ci95"]
    assert low <= m["retained"] <= high
    assert m == {**m, **{k: report["template_means"]["held_out"][k] for k in ("retained", "retained_ci95")}}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "of dense (95% interval" in card
    soft, held = m["right_prob"], report["templates"][2]["right_probs"]  # the probability of the right answer
    for model in ("dense", "pruned"):
        assert soft[model] == pytest.approx(sum(held[model]) / len(held[model]), abs=1e-4)
    assert 0 < soft["dense"] < 1 and soft["retained"] == pytest.approx(soft["pruned"] / soft["dense"], abs=1e-4)
    assert soft["retained_ci95"][0] <= soft["retained"] <= soft["retained_ci95"][1]
    assert soft == report["template_means"]["held_out"]["right_prob"]
    calibrated = [t["right_probs"]["pruned"] for t in report["templates"][:2]]
    assert report["template_means"]["calibration"]["right_prob"]["pruned"] == pytest.approx(
        sum(sum(p) / len(p) for p in calibrated) / 2, abs=1e-4)
    assert "probability of the right answer, held-out templates (mean)" in card and f"{soft['pruned']:.4f}" in card
    for t in report["templates"]:  # and per template, where the dense model is ever right
        assert t["retained_ci95"] is None if not t["dense"] else t["retained_ci95"][0] <= t["retained_ci95"][1]


def test_dense_scores_come_from_the_cache_the_second_time(model_dir, task_data, tmp_path, monkeypatch):
    calls = []
    real = validation.evaluate_templates

    def spy(model, *args, **kw):
        calls.append(model.config.intermediate_size)
        return real(model, *args, **kw)

    monkeypatch.setattr(validation, "evaluate_templates", spy)
    base = _recipe(model_dir("llama"), task_data, tmp_path / "a")
    first = fnprune.compress(base, progress=False).report
    second = fnprune.compress(apply_overrides(base, {"output.dir": str(tmp_path / "b"), "selection.keep": 0.25}),
                              progress=False).report
    dense = model_dir("llama")
    width = int(__import__("json").loads((dense / "config.json").read_text())["intermediate_size"])
    assert calls.count(width) == 1 and len(calls) == 3  # dense once, each pruned model once
    assert first["metric"]["dense"] == second["metric"]["dense"]
    assert (first["metric"]["retained_ci95"] is None) == (second["metric"]["retained_ci95"] is None)  # cached hits
    assert [t["dense"] for t in first["templates"]] == [t["dense"] for t in second["templates"]]


def test_raw_share_spreads_untemplated_rows_evenly(task_data):
    task = resolve_task(_task(data_dir=str(task_data)))
    drawn = load_sample(task, "train", 12, 0, raw_share=0.25)
    assert [j for j, e in enumerate(drawn) if e.template == "(raw)"] == [3, 7, 11]
    raw = [e for e in drawn if e.template == "(raw)"]
    assert all(e.prompt == e.texts[0] for e in raw)
    templated = [e.template for e in drawn if e.template != "(raw)"]
    assert templated == ["a", "b"] * 4 + ["a"]
    assert [e.texts for e in drawn] == [e.texts for e in load_sample(task, "train", 12, 0)]  # same rows


def test_untemplated_prompts_hold_no_held_out_template_text(tmp_path):
    """COPA-like: a held-out template's connector words (a filter of a column) and the columns only a held-out
    template reads never reach an untemplated calibration prompt; each text appears once, then the choices."""
    import json

    rows = [{"premise": f"The girl wanted earrings {i}.", "question": "effect", "hint": f"secret {i}",
             "choice1": f"She got her ears pierced {i}.", "choice2": f"She got a tattoo {i}.", "label": i % 2}
            for i in range(8)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = resolve_task(recipe_from_dict({"task": {
        "name": "copa-like", "kind": "multiple_choice", "label_column": "label", "choices": ["choice1", "choice2"],
        "split_files": {"validation": "val.jsonl"}, "split_of": "validation", "data_dir": str(tmp_path),
        "templates": [
            {"name": "plain", "template": "Premise: {premise}\nWhat was the {question} of this?\nAnswer:"},
            {"name": "cued", "template": "{premise|drop_last}{question|map(cause=. Because,effect=. So)}"},
            {"name": "held", "template": "{premise} {question|map(cause=because,effect=therefore)} {hint}",
             "held_out": True, "choice": " {choice|lower_first}"},
            {"name": "options", "template": '{premise} "{choice1}" or "{choice2}"?', "held_out": True},
        ]}}).task)
    raw = [e for e in load_sample(task, task.calibration_split, 8, 0, raw_share=1.0)]
    assert raw and all(e.template == RAW.name for e in raw)
    for e in raw:
        lines = e.prompt.split("\n")
        assert lines[0].startswith("The girl wanted earrings") and lines[1] == "effect"
        assert lines[2:] == list(e.texts[-2:])  # the choices once, as given
        assert "therefore" not in e.prompt and "secret" not in e.prompt and ". So" not in e.prompt


def test_raw_share_auto_is_half_for_every_task_kind():
    from fnprune.recipe import CalibrationSpec

    assert CalibrationSpec().raw_share == "auto"
    assert CalibrationSpec().for_task("classification").raw_share == 0.5
    assert CalibrationSpec().for_task("multiple_choice").raw_share == 0.5
    assert CalibrationSpec(raw_share=0.25).for_task("classification").raw_share == 0.25
    assert CalibrationSpec(raw_share=1.0).check() and CalibrationSpec(raw_share="half").check()


def test_label_words_whose_tokens_begin_another_label_word_are_refused(tokenizer_dir):
    """A summed log-probability never picks ` positively` over ` positive` (its first token plus more)."""
    from fnprune.evaluate import label_token_ids

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert label_token_ids(tok, {"0": " negative", "1": " positive"})
    with pytest.raises(DataError, match="' positive''s tokens .* begin label word ' positively''s"):
        label_token_ids(tok, {"0": " positive", "1": " positively"})
