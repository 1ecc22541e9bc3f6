"""Task kinds and data mapping: multiple choice scored as lm-eval scores it, nested paths and filters, seeded
disjoint splits of one labelled file, every built-in task reading files shaped like the real ones, bad data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fnprune import fields
from fnprune.data import (
    BUILTIN_TASKS,
    RAW,
    check_disjoint,
    example_key,
    load_evaluation,
    load_sample,
    load_split,
    resolve_task,
)
from fnprune.errors import DataError
from fnprune.evaluate import encode_pair, evaluate_choices, evaluate_templates, scored
from fnprune.recipe import PromptTemplate, TaskSpec

WORDS = ["film", "movie", "story", "plot", "cast", "great", "dull", "funny", "bad", "warm", "flat", "smart"]


def _arc_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice([3, 4, 5])
        labels = "ABCDE"[:k] if i % 3 else "12345"[:k]
        choices = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))), "label": lab}
                   for lab in labels]
        rows.append({"id": f"q{i}", "question": {"stem": f"question {i} about the {rng.choice(WORDS)}?",
                                                 "choices": choices}, "answerKey": rng.choice(labels)})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("arc")
    _write_jsonl(d / "ARC-Easy-Dev.jsonl", _arc_rows(24, 1))
    _write_jsonl(d / "ARC-Easy-Test.jsonl", _arc_rows(20, 2))
    return d


@pytest.fixture(scope="module")
def copa_dir(tmp_path_factory) -> Path:
    rng = random.Random(3)
    rows = [{"premise": f"The {rng.choice(WORDS)} was {rng.choice(WORDS)} {i}.",
             "choice1": f"It was {rng.choice(WORDS)}.", "choice2": f"Everyone liked the {rng.choice(WORDS)}.",
             "question": rng.choice(["cause", "effect"]),
             "label": i % 2, "idx": i} for i in range(30)]
    d = tmp_path_factory.mktemp("copa")
    _write_jsonl(d / "val.jsonl", rows)
    return d


@pytest.fixture(scope="module")
def llama(model_dir):
    path = model_dir("llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_field_paths_and_filters():
    row = {"q": {"stem": " Why? ", "choices": [{"text": "A b", "label": "A"}, {"text": "c.", "label": "B"}]},
           "s": "the word here", "start": 4, "end": 8, "kind": "cause"}
    assert fields.resolve(row, "q.stem") == "Why?"
    assert fields.resolve(row, "q.choices[].text") == ["A b", "c."]
    assert fields.resolve(row, "q.choices[1].label") == "B"
    assert fields.resolve(row, "s[start:end]") == "word"
    assert fields.resolve(row, "q.choices[].text | lower_first") == ["a b", "c."]
    assert fields.resolve(row, "q.choices[1].text|strip_period|upper_first") == "C"
    assert fields.resolve(row, "kind|map(cause=because,effect=therefore)") == "because"
    assert fields.resolve(row, "stem", {"stem": "q.stem"}) == "Why?"
    for bad, match in [("q.nope", "no field 'nope'"), ("kind|map(effect=x)", "is not one of"),
                       ("s|shout", "unknown filter"), ("q", "is a mapping"), ("s[kind:end]", "slice bound")]:
        with pytest.raises(DataError, match=match):
            fields.resolve(row, bad)
    with pytest.raises(DataError, match="not a field path"):
        fields.check_expression("a..b")


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ctx, cont = encode_pair(tok, "Review: a film\nSentiment: ", "positive")
    assert ctx == tok("Review: a film\nSentiment:")["input_ids"]
    whole = tok("Review: a film\nSentiment: positive")["input_ids"]
    assert ctx + cont == whole and cont


def test_multiple_choice_scores_are_continuation_log_likelihoods(llama, arc_dir):
    model, tok = llama
    task = resolve_task(TaskSpec(name="arc_easy", data_dir=str(arc_dir)))
    assert task.kind == "multiple_choice"
    examples = load_evaluation(task, "test")["lm-eval"]
    assert {len(e.choices) for e in examples} == {3, 4, 5}  # choices differ per example
    result = evaluate_choices(model, tok, examples, batch_size=3, progress=False)
    for i in (0, 7):
        e = examples[i]
        for j, choice in enumerate(e.choices):  # one unpadded forward pass per choice
            ctx, cont = encode_pair(tok, e.prompt, " " + choice)
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            want = sum(logp[len(ctx) - 1 + t, c].item() for t, c in enumerate(cont))
            assert result.scores[i, j].item() == pytest.approx(want, abs=1e-4)
        assert torch.isinf(result.scores[i, len(e.choices):]).all()
    gold = [int(e.label) for e in examples]
    acc = sum(int(result.scores[i].argmax()) == g for i, g in enumerate(gold)) / len(gold)
    norm = [max(range(len(e.choices)), key=lambda j, i=i, e=e: result.scores[i, j].item() / len(e.choices[j]))
            for i, e in enumerate(examples)]
    assert result.accuracy == acc
    assert result.accuracy_norm == sum(n == g for n, g in zip(norm, gold)) / len(gold)
    for i in (0, 7):  # the right choice's share among the example's own choices (padding gets none)
        own = result.scores[i, : len(examples[i].choices)].softmax(0)
        assert result.right_probs[i].item() == pytest.approx(own[gold[i]].item(), abs=1e-12)


def test_right_probability_is_the_right_labels_softmax_share():
    """Two rows answered alike (both right) still differ in how sure the model was: the soft score sees it."""
    from fnprune.data import Example

    scores = torch.tensor([[-1.0, -3.0], [-2.0, -2.5], [-4.0, -0.5]], dtype=torch.float64)
    examples = [Example("a", "0"), Example("b", "0"), Example("c", "0")]
    result = scored(scores, examples, ["0", "1"], torch.ones(3, 2), 0.0)
    assert result.hits.tolist() == [True, True, False]
    want = torch.sigmoid(torch.tensor([2.0, 0.5, -3.5], dtype=torch.float64))
    assert torch.allclose(result.right_probs, want)


def test_right_probability_of_a_row_without_finite_scores_is_zero_not_nan():
    """report.json must stay valid JSON (no NaN) even if a model scores every class -inf."""
    from fnprune.data import Example

    scores = torch.tensor([[-1.0, -3.0], [float("-inf"), float("-inf")]], dtype=torch.float64)
    result = scored(scores, [Example("a", "0"), Example("b", "1")], ["0", "1"], torch.ones(2, 2), 0.0)
    assert result.right_probs[1].item() == 0.0
    json.dumps(result.right_probs.tolist(), allow_nan=False)


def test_an_example_without_a_finite_score_is_counted_wrong(caplog):
    """NaN scores (a broken model) never win: argmax picked the first class on a NaN row, so an all-NaN model
    scored label 0's share of the split."""
    from fnprune.data import Example

    examples = [Example("a", "0"), Example("b", "1"), Example("c", "0"), Example("d", "1")]
    nan = float("nan")
    scores = torch.tensor([[nan, nan], [nan, nan], [nan, -2.0], [-1.0, nan]], dtype=torch.float64)
    result = scored(scores, examples, ["0", "1"], torch.ones(4, 2), 0.0)
    assert result.hits.tolist() == [False, False, False, False] and result.accuracy == 0.0
    assert result.accuracy_norm == 0.0 and result.predictions[2:] == ["1", "0"]
    assert "2 of 4 examples have no finite score" in caplog.text


def test_answer_can_be_a_label_letter_or_an_index(arc_dir, copa_dir):
    arc = resolve_task(TaskSpec(name="arc_easy", data_dir=str(arc_dir)))
    rows = [json.loads(line) for line in (arc_dir / "ARC-Easy-Test.jsonl").read_text().splitlines()]
    examples = load_evaluation(arc, "test")["qa"]
    for row, e in zip(rows, examples):
        labels = [c["label"] for c in row["question"]["choices"]]
        assert e.label == str(labels.index(row["answerKey"]))
        assert e.prompt == f"Q: {row['question']['stem']}\nA:"
    copa = resolve_task(TaskSpec(name="copa", data_dir=str(copa_dir)))
    e = load_evaluation(copa, "validation")["lm-eval"][0]
    rows = {r["premise"]: r for r in map(json.loads, (copa_dir / "val.jsonl").read_text().splitlines())}
    row = rows[next(t for t in e.texts if t in rows)]
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    assert e.prompt == row["premise"][:-1] + " " + connector  # lm-eval's copa doc_to_text
    assert e.choices == tuple(" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"]))
    assert e.delimiter == " " and e.label == str(row["label"])


def test_one_labelled_file_is_split_seeded_and_disjoint(copa_dir):
    task = resolve_task(TaskSpec(name="copa", data_dir=str(copa_dir)))
    cal = load_sample(task, task.calibration_split, 1000, seed=0)
    ev = next(iter(load_evaluation(task, task.evaluation_split).values()))
    assert len(cal) + len(ev) == 30 and len(cal) == 15
    check_disjoint(cal, ev)
    again = load_sample(task, task.calibration_split, 1000, seed=5)
    assert sorted(e.texts for e in again) == sorted(e.texts for e in cal)  # the cut depends on split_seed only
    other = resolve_task(TaskSpec(name="copa", data_dir=str(copa_dir), split_seed=1))
    assert [e.texts for e in load_sample(other, "train", 1000, 0)] != [e.texts for e in cal]
    assert {e.template for e in cal} <= {t.name for t in task.calibration_templates()}
    assert all(e.label in ("0", "1") and e.choices for e in cal)  # calibration labels: the answer's index


def test_a_calibration_file_given_for_a_carved_task_is_read_and_nothing_is_cut(copa_dir, tmp_path):
    """COPA (and BoolQ, CB, WiC, QNLI, MRPC) carve calibration out of their one labelled file; a train file given
    with --data-files was accepted and never read. It is the calibration split now, and the evaluation file is
    scored whole."""
    rows = [json.loads(line) for line in (copa_dir / "val.jsonl").read_text().splitlines()]
    own = _write_jsonl(tmp_path / "mine.jsonl", [{**r, "premise": "Mine: " + r["premise"]} for r in rows[:6]])
    task = resolve_task(TaskSpec(name="copa", data_dir=str(copa_dir), data_files={"train": str(own)}))
    assert task.split_of is None
    cal = load_sample(task, task.calibration_split, 1000, seed=0)
    assert len(cal) == 6 and all("Mine:" in e.prompt for e in cal)
    assert len(next(iter(load_evaluation(task, task.evaluation_split).values()))) == 30
    kept = resolve_task(TaskSpec(name="copa", data_dir=str(copa_dir), data_files={"validation": str(own)}))
    assert kept.split_of == "validation"  # a file for the carved split itself: still cut


def test_rows_sharing_a_text_stay_on_one_side(tmp_path):
    rows = [{"question": f"q{i // 2}", "passage": "p", "label": "true" if i % 3 else "false"} for i in range(40)]
    _write_jsonl(tmp_path / "val.jsonl", rows)
    task = resolve_task(TaskSpec(name="boolq", data_dir=str(tmp_path)))
    cal = load_sample(task, "train", 100, 0)
    ev = load_evaluation(task, "validation")["lm-eval"]
    check_disjoint(cal, ev)
    assert len(cal) + len(ev) == 40


def test_texts_differing_only_in_case_or_spacing_are_one_text_to_the_overlap_checks(tmp_path):
    """RTE's dev file holds a train sentence with a double space: it reached the calibration. Copies that differ
    only in case, spacing or Unicode form are the same example to every overlap check: left out of the
    calibration, and kept on one side of a carved file."""
    from fnprune.data import comparable
    from fnprune.inputs import calibration_prompts
    from fnprune.recipe import CalibrationSpec

    assert comparable(" The  Film\u00a0was\tFINE. ") == "the film was fine."
    train = ["A truly wonderful and  moving film .", "The ACTING was superb throughout it .",
             *[f"an ordinary sentence number {i} here ." for i in range(10)]]
    dev = ["a truly wonderful and moving film .", "the acting was superb throughout it ."]
    for name, rows in (("train", train), ("dev", dev)):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t1\n" for r in rows),
                                              encoding="utf-8")
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(tmp_path)))
    held = {example_key(e) for e in load_split(task, "validation")}
    prompts = calibration_prompts(task, CalibrationSpec(num_samples=100, raw_share=0), held)
    assert len(prompts) == 10 and not any("wonderful" in e.prompt or "superb" in e.prompt for e in prompts)
    passage = "A passage long enough to be shared by two questions."
    rows = [{"question": f"question {i}?", "passage": f"Passage number {i} of its own.", "label": "true"}
            for i in range(20)]
    rows += [{"question": "first?", "passage": passage, "label": "true"},
             {"question": "second?", "passage": passage.upper().replace(" ", "  "), "label": "false"}]
    _write_jsonl(tmp_path / "boolq" / "val.jsonl", rows)
    for seed in range(6):
        carved = resolve_task(TaskSpec(name="boolq", data_dir=str(tmp_path / "boolq"), split_seed=seed))
        sides = [{t for e in load_split(carved, split) for t in e.texts} for split in ("train", "validation")]
        assert all(("first?" in side) == ("second?" in side) for side in sides), seed


def _builtin_files(root: Path) -> dict[str, Path]:
    """Tiny files shaped like ../shared/data (names, headers, label conventions, BOM, no header)."""
    rng = random.Random(0)
    s = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))  # noqa: E731
    n = 16
    out = {}
    out["boolq"] = _write_jsonl(root / "boolq" / "val.jsonl", [
        {"question": s(), "passage": s(), "idx": i, "label": ["false", "true"][i % 2]} for i in range(n)]).parent
    out["cb"] = _write_jsonl(root / "cb" / "val.jsonl", [
        {"premise": s(), "hypothesis": s(), "idx": i, "label": ["entailment", "contradiction", "neutral"][i % 3]}
        for i in range(n)]).parent
    out["wic"] = _write_jsonl(root / "wic" / "val.jsonl", [
        {"word": "film", "sentence1": "the film " + s(), "sentence2": s(), "start1": 4, "end1": 8, "start2": 0,
         "end2": 1, "idx": i, "label": ["false", "true"][i % 2]} for i in range(n)]).parent
    (root / "mrpc").mkdir()
    (root / "mrpc" / "msr_paraphrase_test.txt").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        + "".join(f"{i % 2}\t{i}\t{i + 100}\t\"{s()}\t{s()}\n" for i in range(n)), encoding="utf-8")
    out["mrpc"] = root / "mrpc"
    (root / "qnli").mkdir()
    (root / "qnli" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n" + "".join(
        f"{i}\t{s()}?\t\"{s()}\" he said.\t{['entailment', 'not_entailment'][i % 2]}\n" for i in range(n)))
    out["qnli"] = root / "qnli"
    (root / "cola").mkdir()
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv"):
        (root / "cola" / name).write_text("".join(f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\t{s()}.\n"
                                                  for i in range(n)))
    out["cola"] = root / "cola"
    return out


def test_every_new_builtin_task_reads_files_shaped_like_the_real_ones(tmp_path, arc_dir, copa_dir):
    dirs = {**_builtin_files(tmp_path), "copa": copa_dir, "arc_easy": arc_dir}
    for name, d in dirs.items():
        task = resolve_task(TaskSpec(name=name, data_dir=str(d)))
        sets = load_evaluation(task, task.evaluation_split)
        cal = load_sample(task, task.calibration_split, 8, 0)
        assert set(sets) == {t.name for t in task.templates} and cal, name
        if task.split_of:
            check_disjoint(cal, next(iter(sets.values())))
        assert any(t.name == "lm-eval" and t.held_out for t in task.templates), name
    mrpc = resolve_task(TaskSpec(name="mrpc", data_dir=str(dirs["mrpc"])))
    e = load_evaluation(mrpc, "test")["lm-eval"][0]
    assert e.prompt.startswith('Sentence 1: "') and e.label in ("0", "1")  # no quoting: the quote is text
    wic = load_evaluation(resolve_task(TaskSpec(name="wic", data_dir=str(dirs["wic"]))), "validation")
    assert "the word 'film' used" in wic["lm-eval"][0].prompt  # sentence1[start1:end1]
    cola = load_evaluation(resolve_task(TaskSpec(name="cola", data_dir=str(dirs["cola"]))), "validation")
    assert len(cola["lm-eval"]) == 16  # headerless: the first line is a row
    assert "arc_challenge" in BUILTIN_TASKS


@pytest.mark.parametrize("rows, match", [
    ([{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
       "answerKey": "C"}], "answer 'C' is not one of the choices' labels"),
    ([{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}],
     "at least two non-empty choices"),
    ([{"question": {"stem": "x"}, "answerKey": "A"}], "no field 'choices'"),
    ([{"question": "x", "answerKey": "A"}], "no field 'stem'"),
    ([{"question": {"stem": None, "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
       "answerKey": "A"}], "'question.stem' is null"),  # not the prompt "None"
    ([{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}, {"text": None, "label": "B"}]},
       "answerKey": "A"}], "is null"),  # not a choice "None"
])
def test_bad_multiple_choice_rows_give_one_clear_error(tmp_path, rows, match):
    _write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", rows)
    task = resolve_task(TaskSpec(name="arc_easy", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=match) as info:
        load_evaluation(task, "test")
    assert "data row 1:" in str(info.value) and "\n" not in str(info.value)


def test_custom_multiple_choice_task_and_its_checks(tmp_path, llama):
    _write_jsonl(tmp_path / "validation.jsonl", [{"q": f"pick {i}", "opts": ["good", "bad", "flat"], "gold": i % 3}
                                                 for i in range(9)])
    spec = TaskSpec(name="pick", kind="multiple_choice", data_dir=str(tmp_path), label_column="gold",
                    choices=["opts"], templates=[PromptTemplate("a", "Q: {q}\nA:"),
                                                 PromptTemplate("b", "{q} ->", held_out=True, delimiter="")])
    task = resolve_task(spec)
    sets = load_evaluation(task, "validation")
    assert sets["b"][0].delimiter == "" and sets["a"][0].label == "0"
    result = evaluate_templates(*llama, sets, task, batch_size=4, progress=False)
    assert set(result.by_template) == {"a", "b"} and result.by_template["a"].accuracy_norm is not None
    with pytest.raises(DataError, match="choices"):
        resolve_task(TaskSpec(name="pick2", kind="multiple_choice", data_dir=str(tmp_path), label_column="gold",
                              template="{q}"))
    with pytest.raises(DataError, match="task.kind"):
        resolve_task(TaskSpec(name="pick3", kind="ranking", data_dir=str(tmp_path), label_column="gold",
                              template="{q}", label_words={"0": " a"}))
    with pytest.raises(DataError, match="unknown filter"):
        resolve_task(TaskSpec(name="pick4", kind="multiple_choice", data_dir=str(tmp_path), label_column="gold",
                              choices=["opts"], template="{q|shout}"))


def test_default_method_is_flap_and_recovery_is_on_for_multiple_choice(model_dir, arc_dir, tmp_path):
    """selection.method and recovery.enabled auto: the saved recipe and report name what ran (on ARC flap, so no
    networks computed, and recovery)."""
    import fnprune
    from fnprune.arch import layout_for
    from fnprune.pruning import resolve_selection
    from fnprune.recipe import SelectionSpec, apply_overrides, recipe_from_dict

    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model_dir("llama"))}, "task": {"name": "arc_easy", "data_dir": str(arc_dir)},
        "calibration": {"num_samples": 24, "max_tokens": 200, "batch_size": 8}, "networks": {"components": 4},
        "evaluation": {"max_samples": 4}, "output": {"dir": str(tmp_path / "arc")},
    })
    assert recipe.selection.method == "auto"
    result = fnprune.compress(recipe, progress=False)
    assert result.report["method"] == "flap" and result.recipe.selection.method == "flap"
    assert "networks" not in result.report["timings_seconds"]
    assert recipe.recovery.enabled == "auto" and result.recipe.recovery.enabled is True
    assert result.report["recovery"]["steps"] >= 1 and "evaluate_recovered" in result.report["timings_seconds"]
    assert "enabled: true" in (tmp_path / "arc" / "recipe.yaml").read_text()
    assert result.recipe.calibration.raw_share == 0.5  # auto: half the questions untemplated, as on classification
    explicit = apply_overrides(recipe, {"selection.method": "flap", "recovery.enabled": True,
                                        "output.dir": str(tmp_path / "explicit")})
    fnprune.compress(explicit, progress=False)  # the benchmark's flap+recon+recover is the default here
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("arc", "explicit")]
    assert weights[0] == weights[1]
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    assert resolve_selection(SelectionSpec(), layout_for(model), model).method == "flap"  # classification too


def test_calibration_questions_can_carry_their_choices(arc_dir, task_data):
    """calibration.choices: the question alone, followed by its right choice, or once by each choice; the
    evaluation split never reaches them and classification tasks are untouched."""
    from fnprune.inputs import calibration_prompts
    from fnprune.recipe import CalibrationSpec

    task = resolve_task(TaskSpec(name="arc_easy", data_dir=str(arc_dir)))
    alone = calibration_prompts(task, CalibrationSpec(num_samples=6))
    answer = calibration_prompts(task, CalibrationSpec(num_samples=6, choices="answer"))
    each = calibration_prompts(task, CalibrationSpec(num_samples=6, choices="all"))
    assert [e.prompt + e.delimiter + e.choices[int(e.label)] for e in alone] == [e.prompt for e in answer]
    assert [e.prompt for e in each] == [e.prompt + e.delimiter + c for e in alone for c in e.choices]
    assert [e.label for e in each] == [e.label for e in alone for _ in e.choices]
    check_disjoint(each, load_evaluation(task, task.evaluation_split)["qa"])
    sst2 = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    assert calibration_prompts(sst2, CalibrationSpec(num_samples=6, choices="all")) == calibration_prompts(
        sst2, CalibrationSpec(num_samples=6))


def test_a_raw_multiple_choice_prompt_is_the_question_and_its_choices(arc_dir):
    """Untemplated, a multiple-choice calibration prompt is the row's text as the file holds it: the question and
    then each choice, one per line; it keeps the answer's index and the choices."""
    task = resolve_task(TaskSpec(name="arc_easy", data_dir=str(arc_dir)))
    drawn = load_sample(task, task.calibration_split, 8, 0, raw_share=0.5)
    assert sum(e.template == RAW.name for e in drawn) == 4
    for e, t in zip(drawn, load_sample(task, task.calibration_split, 8, 0)):  # the same rows, all templated
        assert (e.texts, e.label, e.choices) == (t.texts, t.label, t.choices) and e.choices
        if e.template == RAW.name:
            assert e.prompt.split("\n") == [e.texts[0], *e.choices] and t.prompt != e.prompt


def test_the_log_says_when_the_calibration_split_has_fewer_rows_than_asked(arc_dir, caplog):
    """Each row is drawn at most once, so `--num-samples` above the split's size calibrates on every row: the log
    says how many were used and that it is all the split has (ARC-Easy's Dev file has 570 questions, not 1,024)."""
    import logging

    from fnprune.inputs import calibration_prompts
    from fnprune.recipe import CalibrationSpec

    task = resolve_task(TaskSpec(name="arc_easy", data_dir=str(arc_dir)))
    with caplog.at_level(logging.INFO, logger="fnprune"):
        assert len(calibration_prompts(task, CalibrationSpec(num_samples=1024))) == 24
        assert len(calibration_prompts(task, CalibrationSpec(num_samples=8))) == 8
    first, second = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration:")]
    assert first == ("calibration: 24 rows of the 'validation' split (all it has; 1024 asked; the seed draws "
                     "their order), "
                     "12 of them without a template")
    assert second == "calibration: 8 rows of the 'validation' split, 4 of them without a template"


# Rows as the Hub's datasets hold them (GLUE: text columns, an int label, idx), served by a stand-in `datasets`.
HUB_ROWS = {
    ("glue", "sst2"): lambda i: {"sentence": f"a {WORDS[i % 12]} film {i}", "label": i % 2, "idx": i},
    ("glue", "rte"): lambda i: {"sentence1": f"the {WORDS[i % 12]} {i}", "sentence2": "is", "label": i % 2, "idx": i},
    ("glue", "cola"): lambda i: {"sentence": f"the {WORDS[i % 12]} is {i}", "label": i % 2, "idx": i},
}


@pytest.mark.parametrize("name", ["sst2", "rte", "cola"])
def test_tasks_with_a_hub_dataset_read_its_rows_when_no_files_are_given(name, monkeypatch):
    import sys
    import types

    asked = []

    def load_dataset(dataset, config, split):
        asked.append((dataset, config, split))
        return [HUB_ROWS[dataset, config](i + (100 if split == "validation" else 0)) for i in range(12)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = resolve_task(TaskSpec(name=name))
    calibration = load_sample(task, task.calibration_split, 8, 0, raw_share=0.5)
    evaluation = load_evaluation(task, task.evaluation_split)
    assert asked == [("glue", name, "train"), ("glue", name, "validation")]
    assert {e.label for e in calibration} == {"0", "1"} and len(calibration) == 8
    assert all(len(ex) == 12 for ex in evaluation.values())
    check_disjoint(calibration, next(iter(evaluation.values())))


def test_a_hub_split_without_labels_says_so(monkeypatch):
    """GLUE's test splits hide their labels (-1 on every row): said plainly, not "label '-1' is not one of..."."""
    import sys
    import types

    rows = [{"sentence": f"s {i}", "label": -1, "idx": i} for i in range(4)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    task = resolve_task(TaskSpec(name="sst2"))
    with pytest.raises(DataError, match="has no labels .-1 on every row, as GLUE's test splits hide them."):
        load_evaluation(task, "test")


@pytest.mark.parametrize(("name", "files"), [("ag_news", "its test split's file"),
                                              ("arc_easy", "ARC-Easy-Dev.jsonl, ARC-Easy-Test.jsonl")])
def test_tasks_without_a_hub_dataset_name_their_files(name, files):
    with pytest.raises(DataError, match=f"task '{name}' reads local files only .* give --data-dir with its files "
                       rf"\({files}\)"):
        resolve_task(TaskSpec(name=name))


def test_data_files_name_real_splits_and_every_split_read(tmp_path):
    """A misspelt split is refused when the task is resolved; a split no file gives is named, not looked up on
    the Hub (ARC has no Hub dataset) nor read from nowhere."""
    rows = [{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
             "answerKey": "A"}]
    test = str(_write_jsonl(tmp_path / "t.jsonl", rows))
    with pytest.raises(DataError, match="'valid' is not a split name.*evaluates 'test'"):
        resolve_task(TaskSpec(name="arc_easy", data_files={"test": test, "valid": test}))
    task = resolve_task(TaskSpec(name="arc_easy", data_files={"test": test}))
    assert len(load_evaluation(task, "test")["qa"]) == 1
    with pytest.raises(DataError, match="no file for split 'validation': --data-files gives test; add validation="):
        load_sample(task, "validation", 4, 0)


def test_prompts_longer_than_the_models_context_are_cut_as_lm_eval_cuts_them(model_dir):
    """Scoring cut every prompt at 2048 tokens whatever the model: a GPT-2 with fewer positions crashed on a long
    prompt. The limit is now the model's own, found as lm-eval 0.4.13 finds it, and the cut is lm-eval's."""
    from lm_eval.models.utils import resolve_max_length

    from fnprune.data import Example
    from fnprune.evaluate import evaluate_accuracy, evaluate_choices
    from fnprune.tokens import context_length

    path = model_dir("gpt2")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    limit = context_length(model, tok)
    assert limit == resolve_max_length(model.config, tok) == model.config.n_positions == 128
    long = "the film " * 100
    examples = [Example(f"Review: {long}\nSentiment:", "1", (long,)), Example("Review: fine\nSentiment:", "0")]
    assert len(tok(examples[0].prompt)["input_ids"]) > limit

    @torch.inference_mode()
    def loglikelihood(context: str, word: str) -> float:  # lm-eval's request: (ctx + cont)[-(limit + 1):][:-1]
        ctx, cont = tok(context)["input_ids"], tok(word, add_special_tokens=False)["input_ids"]
        seq = (ctx + cont)[-(limit + 1):][:-1]
        logp = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)
        return sum(float(logp[len(seq) - len(cont) + t, c]) for t, c in enumerate(cont))

    for words in ({"0": " negative", "1": " positive"}, {"0": " bad", "1": " great"}):  # one token; several
        scores = evaluate_accuracy(model, tok, examples, words, progress=False).scores
        expected = [[loglikelihood(e.prompt, w) for w in words.values()] for e in examples]
        torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    choices = [Example(e.prompt, "0", choices=("good", "bad"), delimiter=" ") for e in examples]
    assert evaluate_choices(model, tok, choices, progress=False).scores.isfinite().all()


def test_a_classifier_heads_accuracy_has_no_acc_norm(model_dir):
    """acc_norm divides a score by its label word's length: for a head's logits (which may be positive) it
    meant nothing and could flip the answer; it is None there."""
    from fnprune.data import Example
    from fnprune.evaluate import evaluate_accuracy
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("bert"))))
    examples = [Example("x", "1", ("a fine film",)), Example("y", "0", ("a dull film",))]
    result = evaluate_accuracy(model, tok, examples, {"0": " no", "1": " yes"}, progress=False)
    assert result.accuracy_norm is None and result.accuracy in (0.0, 0.5, 1.0)


def test_an_empty_prompt_is_scored_after_the_prefix_token_whatever_the_batch(llama):
    """An empty prompt (a `{text}` template on an empty row) was scored at whatever padding its batch had, or
    crashed alone; it is scored after BOS (else EOS), as lm-eval scores an empty context."""
    from fnprune.data import Example
    from fnprune.evaluate import evaluate_accuracy

    model, tok = llama
    empty, other = Example("", "0", ("",)), Example("a fine film", "1", ("a fine film",))
    for words in ({"0": " negative", "1": " positive"}, {"0": " bad", "1": " great"}):
        alone = evaluate_accuracy(model, tok, [empty], words, progress=False).scores
        batched = evaluate_accuracy(model, tok, [empty, other], words, progress=False).scores
        torch.testing.assert_close(alone[0], batched[0], atol=1e-6, rtol=1e-6)
        assert alone.isfinite().all()


def test_an_unnamed_placeholder_in_a_template_is_one_clear_error(task_data):
    """`{}` skipped the field check and ended in str.format's IndexError while the rows were read."""
    from fnprune.data import load_evaluation

    with pytest.raises(DataError, match="'{}' names no field"):
        task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data), template="Review: {sentence} {}\nSent:"))
        load_evaluation(task, "validation")


def test_a_carved_file_whose_rows_are_one_group_says_so(tmp_path):
    """Every row sharing one passage: the carved calibration part was empty, and the error spoke of a train file
    that does not exist."""
    passage = "One passage that every question of the file shares."
    _write_jsonl(tmp_path / "val.jsonl", [{"question": f"q{i}", "passage": passage, "label": "true"} for i in range(8)])
    task = resolve_task(TaskSpec(name="boolq", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="form 1 group.* leaves the (calibration|evaluation) part empty"):
        load_sample(task, "train", 10, 0)
        load_evaluation(task, "validation")
