"""Built-in tasks, and how a recipe's task is completed from them and checked before any data is read.

A built-in task is a TaskSpec written out in full; a recipe names one (and may override its fields) or defines a
new classification or multiple-choice task with the same fields. Reading the rows is fnprune.data's job.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

from . import fields as rowfields
from .errors import DataError
from .recipe import PromptTemplate, TaskSpec

__all__ = ["BUILTIN_TASKS", "SPLIT_FILE_STEMS", "parse_data_files", "resolve_task", "set_fields", "task_fields",
           "task_overrides", "template_fields", "uses_fields"]

# The usual split names and the file stems a data folder holds them under (dev.tsv is GLUE's validation file)
SPLIT_FILE_STEMS = {"train": ("train",), "validation": ("validation", "dev"), "test": ("test",)}


def _templates(*rows: tuple[str, str, dict[str, str], bool]) -> list[PromptTemplate]:
    return [PromptTemplate(name, text, words, held_out) for name, text, words, held_out in rows]


# Every built-in task has calibration templates (varied wording, text position and label words) and held-out
# templates, written before any pruning result was seen; lm-evaluation-harness's prompt is always held out.
BUILTIN_TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        dataset="glue",
        dataset_config="sst2",
        templates=_templates(
            ("review", "Review: {sentence}\nSentiment:", {}, False),
            ("opinion", "Movie review: {sentence}\nIs the reviewer's opinion positive or negative? Answer:", {},
             False),
            ("instruction", "Classify the sentiment of this text as positive or negative.\nText: {sentence}\n"
             "Sentiment:", {}, False),
            ("good-bad", "{sentence}\nIn short, the film is", {"0": " bad", "1": " good"}, False),
            ("lm-eval", "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:", {}, True),
            ("critic", 'A film critic wrote: "{sentence}"\nThe critic\'s feeling about the film is', {}, True),
            ("yes-no", "Text: {sentence}\nDid the writer like the movie? Yes or no?\nAnswer:",
             {"0": " No", "1": " Yes"}, True),
        ),
        label_column="label",
        label_words={"0": " negative", "1": " positive"},
    ),
    "rte": TaskSpec(
        name="rte",
        dataset="glue",
        dataset_config="rte",
        templates=_templates(
            ("true-false", "{sentence1}\nBased on the passage above, is it true that {sentence2}\nAnswer:", {},
             False),
            ("imply", '{sentence1}\nDoes this imply that "{sentence2}"? Yes or no?\nAnswer:',
             {"0": " Yes", "1": " No"}, False),
            ("premise", "Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the hypothesis? "
             "Answer:", {"0": " yes", "1": " no"}, False),
            ("lm-eval", "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", {}, True),
            ("right-wrong", 'Given that "{sentence1}", it follows that "{sentence2}". Right or wrong?\nAnswer:',
             {"0": " Right", "1": " Wrong"}, True),
        ),
        label_column="label",
        label_words={"0": " True", "1": " False"},
        file_format="tsv-quoted",  # the shared RTE export quotes fields as CSV does (its PROVENANCE.md)
    ),
    "ag_news": TaskSpec(  # the original CSV's title and description; the Hub's ag_news has one `text` column
        name="ag_news",
        templates=_templates(
            ("article", "Article: {title}. {description}\nTopic (World, Sports, Business or Technology):", {},
             False),
            ("headline", "Headline: {title}\nSummary: {description}\nThis news is about", {}, False),
            ("section", "{title}. {description}\nNewspaper section (World, Sports, Business, Technology):", {},
             False),
            ("question", "{title}. {description}\nQuestion: Is this article about World, Sports, Business or "
             "Technology?\nAnswer:", {}, True),
            ("category", "News: {description} ({title})\nCategory:",
             {"1": " world", "2": " sports", "3": " business", "4": " technology"}, True),
        ),
        label_column="label",
        label_words={"1": " World", "2": " Sports", "3": " Business", "4": " Technology"},
        calibration_split="train",
        evaluation_split="test",
    ),
    # The tasks below read the files under ../shared/data (see each PROVENANCE.md), CoLA also the Hub. BoolQ, CB,
    # COPA, WiC, QNLI and MRPC ship one labelled file: `split_of` cuts it, seeded, into disjoint calibration and
    # evaluation halves. CoLA calibrates on in_domain_train and is evaluated on in_domain_dev; ARC calibrates on the
    # Dev file and is evaluated on the Test file. The `lm-eval` templates are lm-evaluation-harness 0.4.13's prompts
    # (over stripped text: SST-2's sentences lose the trailing space lm-eval keeps).
    "boolq": TaskSpec(
        name="boolq",
        templates=_templates(
            ("yes-no", "{passage}\nQuestion: {question}? Yes or no?\nAnswer:", {"false": " No", "true": " Yes"},
             False),
            ("true-false", "Read the passage and answer the question with true or false.\nPassage: {passage}\n"
             "Question: {question}?\nAnswer:", {"false": " false", "true": " true"}, False),
            ("question-first", "Question: {question}?\nPassage: {passage}\nAnswer (yes or no):", {}, False),
            ("lm-eval", "{passage}\nQuestion: {question}?\nAnswer:", {}, True),
            ("based-on", "Based on the following text, {question}?\n{passage}\nAnswer (yes or no):", {}, True),
        ),
        label_column="label",
        label_words={"false": " no", "true": " yes"},
        split_files={"validation": "val.jsonl"},
        split_of="validation",
    ),
    "cb": TaskSpec(
        name="cb",
        templates=_templates(
            ("infer", 'Suppose "{premise}" Can we infer that "{hypothesis}"? Yes, no, or maybe?\nAnswer:',
             {"entailment": " Yes", "contradiction": " No", "neutral": " Maybe"}, False),
            ("premise", "Premise: {premise}\nHypothesis: {hypothesis}\nIs the hypothesis true, false, or neither?"
             "\nAnswer:", {"entailment": " true", "contradiction": " false", "neutral": " neither"}, False),
            ("given", 'Given that "{premise}", is "{hypothesis}" true, false, or neither?\nAnswer:',
             {"entailment": " true", "contradiction": " false", "neutral": " neither"}, False),
            ("lm-eval", "{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:", {}, True),
            ("correct", '{premise}\nBased on that, "{hypothesis}" is correct, incorrect, or neither?\nAnswer:',
             {"entailment": " correct", "contradiction": " incorrect", "neutral": " neither"}, True),
        ),
        label_column="label",
        label_words={"entailment": " True", "contradiction": " False", "neutral": " Neither"},
        split_files={"validation": "val.jsonl"},
        split_of="validation",
    ),
    "copa": TaskSpec(
        name="copa",
        kind="multiple_choice",
        templates=[
            PromptTemplate("what-was", "Premise: {premise}\nWhat was the {question} of this?\nAnswer:"),
            PromptTemplate("question", "{premise}\nQuestion: {question|map(cause=What was the cause?,"
                           "effect=What happened as a result?)}\nAnswer:"),
            PromptTemplate("connector", "{premise|drop_last}{question|map(cause=. The reason was that,"
                           "effect=. As a consequence)}", choice="{choice|lower_first}"),
            # lm-eval: premise without its final character, " because"/" therefore", choices with a lower-case
            # first letter and a leading space, after the target delimiter " "
            PromptTemplate("lm-eval", "{premise|drop_last} {question|map(cause=because,effect=therefore)}",
                           held_out=True, choice=" {choice|lower_first}"),
            PromptTemplate("options", '{premise} Which is more likely the {question}: "{choice1}" or "{choice2}"?'
                           "\nAnswer:", held_out=True),
        ],
        label_column="label",
        choices=["choice1", "choice2"],
        split_files={"validation": "val.jsonl"},
        split_of="validation",
    ),
    "wic": TaskSpec(
        name="wic",
        templates=_templates(
            ("same-meaning", 'Does the word "{word}" mean the same thing in these two sentences?\n1. {sentence1}\n'
             "2. {sentence2}\nAnswer:", {"false": " No", "true": " Yes"}, False),
            ("sense", '{sentence1}\n{sentence2}\nIs "{target}" used with the same sense in both sentences? Answer:',
             {}, False),
            ("meaning", 'Word: {word}\nFirst use: {sentence1}\nSecond use: {sentence2}\nDoes the word have the same '
             "meaning in both? Answer:", {"false": " No", "true": " Yes"}, False),
            ("lm-eval", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word '{target}' used in "
             "the same way in the two sentences above?\nAnswer:", {}, True),
            ("two-uses", 'Here are two uses of "{word}".\nA: {sentence1}\nB: {sentence2}\nSame meaning? Answer:', {},
             True),
        ),
        label_column="label",
        label_words={"false": " no", "true": " yes"},
        columns={"target": "sentence1[start1:end1]"},
        split_files={"validation": "val.jsonl"},
        split_of="validation",
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        templates=_templates(
            ("paraphrase", 'Is "{sentence1}" a paraphrase of "{sentence2}"? Yes or no?\nAnswer:',
             {"0": " No", "1": " Yes"}, False),
            ("equivalent", "First: {sentence1}\nSecond: {sentence2}\nDo these two sentences say the same thing? "
             "Answer:", {}, False),
            ("rewording", "{sentence1}\nIn other words: {sentence2}\nIs that an accurate rewording? Answer:", {},
             False),
            ("lm-eval", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the "
             "same thing?\nAnswer:", {}, True),
            ("restated", 'Sentence: {sentence1}\nIs the following a correct restatement of it? "{sentence2}"\n'
             "Answer:", {"0": " No", "1": " Yes"}, True),
        ),
        label_column="Quality",
        label_words={"0": " no", "1": " yes"},
        columns={"sentence1": "#1 String", "sentence2": "#2 String"},
        file_format="tsv",
        split_files={"test": "msr_paraphrase_test.txt"},
        split_of="test",
        evaluation_split="test",
    ),
    "qnli": TaskSpec(
        name="qnli",
        templates=_templates(
            ("answers", "Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question? Yes or "
             "no?\nAnswer:", {"entailment": " Yes", "not_entailment": " No"}, False),
            ("contains", '{sentence}\nDoes the text above contain the answer to "{question}"? Answer:', {}, False),
            ("reading", "Context: {sentence}\nQuestion: {question}\nCan the question be answered from the context? "
             "Answer:", {}, False),
            ("lm-eval", "{question}\n{sentence}\nQuestion: Does this response answer the question?\nAnswer:", {},
             True),
            ("responds", 'Q: {question}\nA: {sentence}\nIs A an answer to Q? Yes or no?\nAnswer:',
             {"entailment": " Yes", "not_entailment": " No"}, True),
        ),
        label_column="label",
        label_words={"entailment": " yes", "not_entailment": " no"},
        file_format="tsv",
        split_files={"validation": "dev.tsv"},
        split_of="validation",
    ),
    "cola": TaskSpec(
        name="cola",
        dataset="glue",  # the Hub's rows have the local files' `sentence` and 0/1 `label`
        dataset_config="cola",
        templates=_templates(
            ("grammatical", "Sentence: {sentence}\nIs this sentence grammatically correct? Answer:",
             {"0": " No", "1": " Yes"}, False),
            ("acceptable", "{sentence}\nIs the sentence above acceptable English? Answer:", {}, False),
            ("native", 'Would a native speaker say "{sentence}"? Answer:', {}, False),
            ("lm-eval", "{sentence}\nQuestion: Does this sentence make sense?\nAnswer:", {}, True),
            ("correct-english", "Text: {sentence}\nIs this correct English? Yes or no?\nAnswer:",
             {"0": " No", "1": " Yes"}, True),
        ),
        label_column="label",
        label_words={"0": " no", "1": " yes"},
        file_format="tsv",
        header=["source", "label", "mark", "sentence"],
        split_files={"train": "in_domain_train.tsv", "validation": "in_domain_dev.tsv"},
    ),
    **{name: TaskSpec(
        name=name,
        kind="multiple_choice",
        templates=[
            PromptTemplate("qa", "Q: {question}\nA:"),
            PromptTemplate("science", "Science question: {question}\nThe answer is"),
            PromptTemplate("answer", "Answer the question.\n{question}\nAnswer:"),
            PromptTemplate("lm-eval", "Question: {question}\nAnswer:", held_out=True),
            PromptTemplate("correct", "{question}\nThe correct answer is:", held_out=True),
        ],
        label_column="answerKey",
        columns={"question": "question.stem"},
        choices=["question.choices[].text"],
        choice_labels="question.choices[].label",
        split_files={"validation": f"ARC-{part}-Dev.jsonl", "test": f"ARC-{part}-Test.jsonl"},
        calibration_split="validation",
        evaluation_split="test",
    ) for name, part in (("arc_easy", "Easy"), ("arc_challenge", "Challenge"))},
}


_DEFAULTED = {"kind", "calibration_share", "split_seed"}  # resolve_task: a default value means "not given"


def resolve_task(spec: TaskSpec) -> TaskSpec:
    """Fill empty fields from the built-in task of the same name; a new task must define everything.

    A single `template` becomes the only calibration template; a built-in task keeps its held-out templates
    beside it. The resolved task always lists its templates and has no `template`."""
    base = BUILTIN_TASKS.get(spec.name)
    values = dataclasses.asdict(spec)
    values["templates"] = list(spec.templates)
    single = values.pop("template")
    if base is not None:
        defaults = TaskSpec()
        for f in dataclasses.fields(TaskSpec):
            if f.name == "template":
                continue
            if values[f.name] in (None, {}, "", []) or (
                (f.name.endswith("_split") or f.name in _DEFAULTED) and values[f.name] == getattr(defaults, f.name)
            ):
                values[f.name] = getattr(base, f.name)
    if single:
        held_out = base.held_out_templates() if base is not None and not spec.templates else []
        own = PromptTemplate("custom", single)
        values["templates"] = [own] + [
            t for t in held_out
            if set(t.label_words) <= set(values["label_words"]) and t.template != single
        ]
    task = TaskSpec(**values)
    if (base is not None and spec.split_of is None and task.split_of and task.calibration_split in spec.data_files
            and task.calibration_split != task.split_of):  # the user's own calibration file: nothing to carve
        task = dataclasses.replace(task, split_of=None)
    missing = [] if task.templates else ["template (or templates)"]
    if not task.label_column:
        missing.append("label_column")
    if task.kind == "classification" and not task.label_words:
        missing.append("label_words")
    if task.kind == "multiple_choice" and not task.choices:
        missing.append("choices")
    if not (task.dataset or task.data_dir or task.data_files):
        missing.append("dataset, data_dir or data_files")
    if base is not None and missing == ["dataset, data_dir or data_files"]:
        files = ", ".join(dict.fromkeys(task.split_files.values())) or f"its {task.evaluation_split} split's file"
        raise DataError(f"task {task.name!r} reads local files only (no Hugging Face dataset is set for it): give "
                        f"--data-dir with its files ({files}) or --data-files SPLIT=PATH,...")
    if missing:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise DataError(
            f"task {task.name!r} is not built in ({known}); a custom task must set: {', '.join(missing)}"
        )
    problems = task.check()
    if problems:
        raise DataError("; ".join(problems))
    for t in task.templates:
        if not template_fields(t.template):
            raise DataError(f"task template {t.name!r} ({t.template!r}) has no {{column}} field for the text")
    if uses_fields(task):
        _check_expressions(task)
    _check_data_file_splits(task)
    return task


def _check_data_file_splits(task: TaskSpec) -> None:
    """A misspelt split in data_files (`valid=dev.tsv`) would be read by nothing while the split it meant is
    looked for elsewhere."""
    splits = dict.fromkeys([*SPLIT_FILE_STEMS, task.calibration_split, task.evaluation_split, *task.split_files])
    unknown = [s for s in task.data_files if s not in splits]
    if unknown:
        raise DataError(f"data_files: {', '.join(map(repr, unknown))} is not a split name (one of "
                        f"{', '.join(splits)}; task {task.name!r} calibrates on {task.calibration_split!r} and "
                        f"evaluates {task.evaluation_split!r})")


def task_overrides(task: str | None, data_dir: str | None, data_files: dict | None) -> dict[str, Any]:
    """Dotted recipe overrides for a task and its data (`task.data_dir`, ...): a task name replaces the whole task;
    a data folder replaces the data; files give the splits they name, the folder (given, or recorded) the others."""
    out: dict[str, Any] = {}
    if task:
        out["task"] = {"name": task}
    if data_dir:
        out["task.data_dir"] = data_dir
        out["task.data_files"] = {}
    if data_files:
        out["task.data_files"] = data_files
    return out


def set_fields(task: TaskSpec) -> list[str]:
    """The fields of `task`, its name aside, that differ from a plain TaskSpec of that name: what a recipe or a
    notebook gave it beyond the name (before `resolve_task` fills a built-in task's)."""
    default = TaskSpec(name=task.name)
    return [f.name for f in dataclasses.fields(TaskSpec)
            if f.name != "name" and getattr(task, f.name) != getattr(default, f.name)]


def task_fields(task: TaskSpec) -> list[str]:
    """The text columns the task's templates read, the first calibration template's in its order first."""
    ordered = [*task.calibration_templates(), *task.held_out_templates()]
    return list(dict.fromkeys(f for t in ordered for f in template_fields(t.template)))


def template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise DataError(f"task.template {template!r} is not a valid format string: {exc}") from exc
    if "" in names:  # str.format would want a positional argument: an IndexError deep in the data reader
        raise DataError(f"task.template {template!r}: '{{}}' names no field; write the column, e.g. {{sentence}} "
                        "(a literal brace is written {{ or }})")
    return names


def uses_fields(task: TaskSpec) -> bool:
    """Whether the task's rows go through data's field reader (nested paths, filters, named columns, multiple
    choice, headerless or non-suffix files, a carved file) rather than the classic column reader."""
    return bool(
        task.kind != "classification" or task.columns or task.file_format or task.header or task.split_of
        or any(not rowfields.is_plain(f) for t in task.templates for f in template_fields(t.template))
    )


def _check_expressions(task: TaskSpec) -> None:
    for name, expr in task.columns.items():
        rowfields.check_expression(expr, f"task.columns.{name}")
    for expr in [*task.choices, *([task.choice_labels] if task.choice_labels else []), task.label_column or ""]:
        rowfields.check_expression(expr, f"task {task.name}")
    for t in task.templates:
        for expr in template_fields(t.template):
            rowfields.check_expression(expr, f"template {t.name}")
        for expr in template_fields(t.choice):
            if not expr.split("|")[0].strip() == "choice":
                raise DataError(f"template {t.name}: choice {t.choice!r} may only use {{choice}} (with filters)")
            rowfields.check_expression(expr, f"template {t.name}")


def parse_data_files(value: str) -> dict[str, str]:
    """`train=a.tsv,validation=b.tsv` -> {split: path} (a TaskSpec's `data_files`); ValueError names the bad pair."""
    files = {}
    for part in value.split(","):
        split, sep, path = part.partition("=")
        if not sep or not split.strip() or not path.strip():
            raise ValueError(f"{part!r}: expected SPLIT=PATH, e.g. train=train.tsv,validation=dev.tsv")
        files[split.strip()] = path.strip()
    return files
