"""Task data: built-in and custom tasks, local formats, and clear errors for bad data."""

from __future__ import annotations

import json

import pytest

from fnprune.data import check_disjoint, example_key, load_sample, load_split, resolve_task, sample
from fnprune.errors import DataError
from fnprune.recipe import TaskSpec


def test_builtin_sst2_from_data_dir(task_data):
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    train = load_split(task, "train")
    dev = load_split(task, "validation")  # found as dev.tsv
    assert len(train) == 64 and len(dev) == 32
    assert train[0].prompt.startswith("Review: ") and train[0].prompt.endswith("\nSentiment:")
    assert {e.label for e in train} == {"0", "1"}
    check_disjoint(train, dev)


def test_custom_task_from_jsonl_and_csv(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        "\n".join(json.dumps({"q": f"is {i} even", "a": "yes" if i % 2 == 0 else "no"}) for i in range(6))
    )
    (tmp_path / "v.csv").write_text("q,a\nis 11 even,no\nis 12 even,yes\n")
    task = resolve_task(TaskSpec(
        name="parity", data_files={"train": str(tmp_path / "t.jsonl"), "validation": str(tmp_path / "v.csv")},
        template="Q: {q}?\nA:", label_column="a", label_words={"yes": " yes", "no": " no"},
    ))
    assert [e.label for e in load_split(task, "train")] == ["yes", "no"] * 3
    assert load_split(task, "validation")[1].prompt == "Q: is 12 even?\nA:"


def test_overlap_refused(task_data):
    task = resolve_task(TaskSpec(name="sst2", data_files={"train": str(task_data / "dev.tsv"),
                                                          "validation": str(task_data / "dev.tsv")}))
    with pytest.raises(DataError, match="must not overlap"):
        check_disjoint(load_split(task, "train"), load_split(task, "validation"))


def test_rows_in_both_files_stay_evaluation_rows(task_data, model_dir, tmp_path, caplog):
    """CoLA's train and dev files share six sentences: they are left out of the calibration with a warning, so the
    default run starts (it was refused) and calibration and evaluation still share nothing; a train file that is
    the dev file is still refused."""
    from fnprune.inputs import calibrated_on, calibration_prompts
    from fnprune.recipe import CalibrationSpec, recipe_from_dict

    dev = (task_data / "dev.tsv").read_text(encoding="utf-8").splitlines()
    train = (task_data / "train.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(train + dev[1:4]) + "\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(tmp_path)))
    evaluation = load_split(task, "validation")
    held = {example_key(e) for e in evaluation}
    spec = CalibrationSpec(num_samples=1000)
    with caplog.at_level("WARNING", logger="fnprune"):
        prompts = calibration_prompts(task, spec, held)
    assert "3 row(s) of the 'train' split also appear in the evaluation split" in caplog.text
    assert len(prompts) == len(train) - 1 and not {example_key(e) for e in prompts} & held
    check_disjoint(prompts, evaluation)
    recipe = recipe_from_dict({"task": {"name": "sst2", "data_dir": str(tmp_path)},
                               "calibration": {"num_samples": 1000}})
    assert calibrated_on(recipe, evaluation) == 0  # evaluate reads the run's calibration as the run drew it
    import fnprune  # the product's own wiring: compress leaves them out and runs (it refused)

    out = tmp_path.parent / f"{tmp_path.name}-out"  # beside the data folder, not inside it
    recipe = recipe_from_dict({"model": {"name_or_path": str(model_dir("llama"))}, "task": {"name": "sst2",
                               "data_dir": str(tmp_path)}, "calibration": {"num_samples": 1000, "max_tokens": 300},
                               "evaluation": {"enabled": False}, "output": {"dir": str(out)}})
    caplog.clear()
    with caplog.at_level("WARNING", logger="fnprune"):
        assert fnprune.compress(recipe, progress=False).report["calibration"]["samples"] == len(train) - 1
    assert "3 row(s) of the 'train' split also appear in the evaluation split" in caplog.text
    same = resolve_task(TaskSpec(name="sst2", data_files={"train": str(task_data / "dev.tsv"),
                                                          "validation": str(task_data / "dev.tsv")}))
    with pytest.raises(DataError, match="must not overlap"):
        calibration_prompts(same, spec, {example_key(e) for e in load_split(same, "validation")})


def test_calibration_rows_sharing_a_sentence_with_an_evaluation_row_are_left_out(tmp_path, caplog):
    """RTE's official train and dev files pair one premise with other hypotheses on both sides: such train rows stay
    out of the calibration as rows in both files do; a short shared value does not tie rows together."""
    from fnprune.inputs import calibration_prompts
    from fnprune.recipe import CalibrationSpec

    premise = "A premise long enough to be a sentence of its own."
    train = [(premise if i < 3 else f"Train premise number {i} about something.", f"Hypothesis {i} holds here.",
              str(i % 2)) for i in range(12)] + [("Another train premise, long enough.", "Yes.", "0")]
    dev = [(premise, "A different hypothesis on the dev side.", "1"), ("A dev premise of some length here.", "Yes.",
                                                                       "1")]
    for name, rows in (("train", train), ("dev", dev)):
        (tmp_path / f"{name}.tsv").write_text("sentence1\tsentence2\tlabel\n" + "".join(
            "\t".join(r) + "\n" for r in rows), encoding="utf-8")
    task = resolve_task(TaskSpec(name="rte", data_dir=str(tmp_path), file_format="tsv"))
    held = {example_key(e) for e in load_split(task, "validation")}
    with caplog.at_level("WARNING", logger="fnprune"):
        prompts = calibration_prompts(task, CalibrationSpec(num_samples=100, raw_share=0), held)
    assert "3 row(s) of the 'train' split also appear in the evaluation split, or share a text" in caplog.text
    assert len(prompts) == 10 and not any(premise in e.texts for e in prompts)  # "Yes." (4 characters) ties nothing


def test_tsv_with_csv_quoting_is_read_as_pandas_writes_it(tmp_path):
    """The shared RTE export quotes fields that hold quotes, as pandas writes TSV: `tsv-quoted` reads them
    (plain `tsv`, GLUE's, keeps the quote marks as text); the built-in rte declares it."""
    from fnprune.data import BUILTIN_TASKS

    (tmp_path / "t.tsv").write_text('s\tlabel\n"He said ""go""\tnow."\tyes\nplain\tno\n', encoding="utf-8")
    spec = dict(name="q", template="{s}", label_column="label", label_words={"yes": " yes", "no": " no"},
                data_files={"train": str(tmp_path / "t.tsv")})
    quoted = load_split(resolve_task(TaskSpec(**spec, file_format="tsv-quoted")), "train")
    assert [e.prompt for e in quoted] == ['He said "go"\tnow.', "plain"]
    with pytest.raises(DataError, match="3 field"):
        load_split(resolve_task(TaskSpec(**spec, file_format="tsv")), "train")
    assert BUILTIN_TASKS["rte"].file_format == "tsv-quoted"


def test_sample_is_seeded_subset(task_data):
    examples = load_split(resolve_task(TaskSpec(name="sst2", data_dir=str(task_data))), "train")
    a, b = sample(examples, 10, 3), sample(examples, 10, 3)
    assert a == b and len(set(a)) == 10 and sample(examples, 10, 4) != a
    assert sample(examples, 1000, 0) == examples


def test_load_sample_is_sample_of_split(task_data):
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    examples = load_split(task, "train")
    names = [t.name for t in task.calibration_templates()]
    for n, seed in [(10, 3), (1, 0), (64, 1), (1000, 0)]:
        drawn = load_sample(task, "train", n, seed)
        texts = [e.texts for e in sample(examples, n, seed)]
        assert [e.texts for e in drawn] == texts or n >= len(examples)  # the same rows (a whole split reordered)
        assert sorted(e.texts for e in drawn) == sorted(texts)
        assert [e.template for e in drawn] == [names[j % len(names)] for j in range(len(drawn))]  # taking turns


def test_load_sample_seed_orders_a_split_used_whole(task_data):
    """Asked for more rows than the split has, the seed still draws which row is plain text and which template
    each of the others gets: otherwise every seed calibrates on the same prompts."""
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    whole = [load_sample(task, "train", 1000, seed, raw_share=0.5) for seed in (0, 1)]
    assert sorted(e.texts for e in whole[0]) == sorted(e.texts for e in whole[1])
    assert [e.prompt for e in whole[0]] != [e.prompt for e in whole[1]]
    assert [e.prompt for e in whole[0]] == [e.prompt for e in load_sample(task, "train", 1000, 0, raw_share=0.5)]


def test_load_sample_checks_every_row(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "ok\t1\n" * 50 + "bad\t7\n")
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="data row 51: label '7'"):
        load_sample(task, "train", 2, 0)  # the bad row is rarely drawn: the whole split is still checked


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.tsv": "sentence\tlabel\n"}, "is empty"),
        ({"train.tsv": "text\tlabel\nhello\t1\n"}, "missing column"),
        ({"train.tsv": "sentence\tlabel\nhello\t7\n"}, "label '7' is not one of"),
        ({"train.tsv": b"sentence\tlabel\n\xff\xfe\t1\n"}, "not UTF-8"),
        ({"train.jsonl": "{not json\n"}, "not a JSON object"),
    ],
)
def test_bad_files(tmp_path, files, message):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=message):
        load_split(task, "train")


def test_missing_split_and_dir(tmp_path):
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no file for split 'validation'"):
        load_split(task, "validation")
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="not a directory"):
        load_split(task, "train")
    task = resolve_task(TaskSpec(name="sst2", data_files={"train": str(tmp_path / "x.tsv")}))
    with pytest.raises(DataError, match="not found"):
        load_split(task, "train")


def test_unknown_task_lists_what_is_missing():
    with pytest.raises(DataError, match=r"not built in .* must set: template \(or templates\), label_column"):
        resolve_task(TaskSpec(name="mytask", data_dir="."))
    with pytest.raises(DataError, match="no \\{column\\} field"):
        resolve_task(TaskSpec(name="sst2", template="no fields here"))


# --- AG News ships test.csv alone: calibrate on a seeded half of it (task.split_of), or the error says how

def _ag_news_dir(root, n: int = 48):
    """An AG News-shaped folder: test.csv only, columns label,title,description, labels 1..4."""
    import csv
    import random

    rng, words = random.Random(7), ["market", "team", "chip", "vote", "shares", "match", "phone", "talks"]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "test.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "title", "description"])
        for i in range(n):
            writer.writerow([i % 4 + 1, f"Story {i}: {rng.choice(words)} news",
                             f"The {rng.choice(words)}, the {rng.choice(words)} and \"{i}\" more, said officials."])
    return root


def test_ag_news_without_train_file_says_how_to_carve_test(model_dir, tmp_path):
    from click.testing import CliRunner

    from fnprune.cli import main

    data = _ag_news_dir(tmp_path / "ag_news")
    result = CliRunner().invoke(main, ["compress", "--task", "ag_news", "--data-dir", str(data), "--model",
                                       str(model_dir("llama")), "--output", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert f"no file for split 'train' in {data} (looked for train.tsv" in message
    assert "to calibrate on a seeded half of test.csv instead" in message
    assert f"set task.split_of: test in a recipe (task: {{name: ag_news, data_dir: {data}, split_of: test}})" in message
    assert "a --task naming another task would replace" in message
    assert f"--data-files train=FILE,test={data / 'test.csv'}" in message
    # the hint is only for a missing calibration file beside the evaluation one
    with pytest.raises(DataError) as info:
        load_sample(resolve_task(TaskSpec(name="ag_news", data_dir=str(tmp_path))), "train", 4, 0)
    assert "split_of" not in str(info.value)


@pytest.mark.slow  # a full compress run
def test_ag_news_calibrates_on_a_seeded_half_of_its_one_file(model_dir, tmp_path):
    import yaml
    from click.testing import CliRunner

    from fnprune.cli import main

    data = _ag_news_dir(tmp_path / "ag_news")
    recipe = tmp_path / "ag_news.yaml"
    recipe.write_text(yaml.safe_dump({"task": {"name": "ag_news", "data_dir": str(data), "split_of": "test"}}))
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["compress", "--recipe", str(recipe), "--model", str(model_dir("llama")),
                                       "--num-samples", "16", "--max-tokens", "300", "--components", "6",
                                       "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "ag_news" and report["metric"]["split"] == "test"
    assert report["metric"]["n"] == 24 and report["calibration"]["samples"] == 16  # half of 48 rows is evaluated
    task = resolve_task(TaskSpec(name="ag_news", data_dir=str(data), split_of="test"))
    evaluation = load_split(task, "test")
    check_disjoint(load_split(task, "train"), evaluation)
    assert {e.label for e in evaluation} == {"1", "2", "3", "4"}
    again = CliRunner().invoke(main, ["evaluate", "--model", str(out), "--json", "--quiet"])  # the saved task
    assert again.exit_code == 0, again.output
    got = json.loads(again.output.strip().splitlines()[-1])
    assert got["n"] == 24 and got["accuracy"] == pytest.approx(report["metric"]["pruned"])


def test_declared_formats_read_rows_as_the_plain_readers_do(tmp_path):
    """task.file_format / task.header go through the same row readers: a quoted CSV newline stays in its field,
    a U+2028 in a TSV sentence does not end its row."""
    (tmp_path / "t.csv").write_text('sentence,label\n"a moving\nand funny film",1\nflat,0\n', encoding="utf-8")
    (tmp_path / "t.tsv").write_text("a moving\u2028film\t1\nflat\t0\n", encoding="utf-8")
    csv_task = resolve_task(TaskSpec(name="sst2", file_format="csv",
                                     data_files={"train": str(tmp_path / "t.csv")}))
    assert [e.texts for e in load_split(csv_task, "train")] == [("a moving\nand funny film",), ("flat",)]
    tsv_task = resolve_task(TaskSpec(name="sst2", header=["sentence", "label"],
                                     data_files={"train": str(tmp_path / "t.tsv")}))
    assert [e.texts for e in load_split(tsv_task, "train")] == [("a moving\u2028film",), ("flat",)]


def test_suffixes_in_any_case_and_an_unknown_suffix_says_so(tmp_path):
    (tmp_path / "train.TSV").write_text("sentence\tlabel\na fine film\t1\n")
    (tmp_path / "train.JSONL").write_text('{"sentence": "a fine film", "label": 1}\n')
    (tmp_path / "train.txt").write_text("sentence\tlabel\na fine film\t1\n")
    for name in ("train.TSV", "train.JSONL"):
        task = resolve_task(TaskSpec(name="sst2", data_files={"train": str(tmp_path / name)}))
        assert [e.texts for e in load_split(task, "train")] == [("a fine film",)]
    task = resolve_task(TaskSpec(name="sst2", data_files={"train": str(tmp_path / "train.txt")}))
    with pytest.raises(DataError, match="cannot tell the file format from its suffix"):
        load_split(task, "train")


def test_a_carved_file_keeps_rows_sharing_a_text_on_one_side(tmp_path):
    """BoolQ asks several questions of one passage, QNLI pairs one question with several sentences: such rows stay
    on one side of the seeded split, so no passage is calibrated on and scored; short shared values (COPA's
    "cause") do not tie rows together."""
    rows = [{"passage": f"A long passage about topic {i // 3}, read three times.", "question": f"q {i}?",
             "kind": "cause", "label": "true" if i % 2 else "false"} for i in range(60)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = resolve_task(TaskSpec(
        name="qa", template="{passage}\n{question} ({kind})", label_column="label",
        label_words={"true": " yes", "false": " no"}, data_files={"validation": str(tmp_path / "val.jsonl")},
        split_of="validation"))
    cal, ev = load_split(task, task.calibration_split), load_split(task, task.evaluation_split)
    assert len(cal) + len(ev) == 60 and len(cal) == 30  # 10 of the 20 passages, each with its three rows
    assert not {e.texts[0] for e in cal} & {e.texts[0] for e in ev}


@pytest.mark.parametrize("name", ["boolq", "wic"])
def test_json_boolean_labels_read_as_the_label_words_spell_them(name, tmp_path):
    """SuperGLUE's own BoolQ and WiC files label rows with JSON booleans; the shared copies with "true" / "false"."""
    def row(i: int) -> dict:
        text = {"passage": f"Passage {i}: the sky is blue.", "question": f"is the sky blue {i}"} if name == "boolq" \
            else {"word": "bank", "sentence1": f"He sat on the bank {i}.", "sentence2": f"The bank was closed {i}.",
                  "start1": 14, "end1": 18, "start2": 4, "end2": 8}
        return {**text, "label": i % 3 == 0, "idx": i}

    rows = [row(i) for i in range(40)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = resolve_task(TaskSpec(name=name, data_dir=str(tmp_path)))
    examples = load_split(task, task.calibration_split) + load_split(task, task.evaluation_split)
    assert sorted(e.label for e in examples) == sorted("true" if r["label"] else "false" for r in rows)
