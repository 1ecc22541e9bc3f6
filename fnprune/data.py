"""Examples of a task: where its rows come from, how each row becomes a prompt under a template, samples.

Data comes from local files (read by fnprune.data_files) or, online, from Hugging Face `datasets`. The
built-in tasks and the completion of a recipe's task live in fnprune.tasks (their names are importable from
here too). No model internals here.
"""

from __future__ import annotations

import hashlib
import logging
import random
import string
import unicodedata
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import fields as rowfields
from .data_files import SUFFIXES, file_format, read_rows
from .errors import DataError, MissingSplitFile, first_line
from .hub import hub_offline
from .recipe import PromptTemplate, TaskSpec
from .tasks import (
    BUILTIN_TASKS,
    SPLIT_FILE_STEMS,
    parse_data_files,
    resolve_task,
    task_fields,
    template_fields,
    uses_fields,
)

__all__ = [
    "BUILTIN_TASKS", "Example", "resolve_task", "load_split", "load_sample", "left_out", "load_evaluation",
    "template_fields", "task_fields", "sample", "check_disjoint", "comparable", "example_key", "label_keys",
    "parse_data_files", "fill_template", "prompts_text", "prompts_digest",
]

log = logging.getLogger("fnprune")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Example:
    """One labelled example: the filled-in prompt, the label's key in `label_words`, the template's name."""

    prompt: str
    label: str
    texts: tuple[str, ...] = ()  # the row's text fields, in order: the input of a classifier head
    template: str = ""
    choices: tuple[str, ...] = ()  # multiple choice: each choice as written (label: the answer's index)
    delimiter: str = ""  # what joins the prompt and each choice (lm-eval's target_delimiter)


def _template(task: TaskSpec, name: str | None) -> PromptTemplate:
    """A template by name; None: the first calibration template."""
    if name is None:
        return task.calibration_templates()[0]
    for t in task.templates:
        if t.name == name:
            return t
    known = ", ".join(t.name for t in task.templates)
    raise DataError(f"task {task.name!r} has no template {name!r} (its templates: {known})")


def _split_file(task: TaskSpec, split: str) -> Path | None:
    if split in task.data_files:
        return Path(task.data_files[split]).expanduser()
    if task.data_dir:
        directory = Path(task.data_dir).expanduser()
        if not directory.is_dir():
            raise DataError(f"task.data_dir {directory} is not a directory")
        if split in task.split_files:
            named = directory / task.split_files[split]
            if not named.is_file():
                raise DataError(f"no file {task.split_files[split]!r} for split {split!r} in {directory}")
            return named
        found = _stem_file(directory, split)
        if found is None:
            looked = ", ".join(s + x for s in SPLIT_FILE_STEMS.get(split, (split,)) for x in SUFFIXES)
            raise MissingSplitFile(f"no file for split {split!r} in {directory} (looked for {looked})",
                                   _carve_hint(task, split, directory))
        return found
    if task.data_files and not task.dataset:
        given = ", ".join(task.data_files)
        raise MissingSplitFile(f"no file for split {split!r}", f": --data-files gives {given}; add {split}=FILE")
    return None


def _stem_file(directory: Path, split: str) -> Path | None:
    """The split's file in a data folder by its usual names (dev.tsv for validation, ...), or None."""
    names = (directory / f"{stem}{suffix}" for stem in SPLIT_FILE_STEMS.get(split, (split,)) for suffix in SUFFIXES)
    return next((p for p in names if p.is_file()), None)


def _carve_hint(task: TaskSpec, split: str, directory: Path) -> str:
    """What to do when the folder has the evaluation split's file but not the calibration split's (AG News)."""
    evaluation = _stem_file(directory, task.evaluation_split)
    if split != task.calibration_split or task.split_of or evaluation is None:
        return ""
    return (f"; to calibrate on a seeded half of {evaluation.name} instead (the other half evaluated), set "
            f"task.split_of: {task.evaluation_split} in a recipe (task: {{name: {task.name}, data_dir: {directory}, "
            f"split_of: {task.evaluation_split}}}) and run compress --recipe FILE (a --task naming another task would "
            f"replace the recipe's), or give a calibration file: --data-files "
            f"{task.calibration_split}=FILE,{task.evaluation_split}={evaluation}")


def _load_hub_split(task: TaskSpec, split: str) -> list[dict]:
    fix = f"add {split}=FILE to --data-files" if task.data_files else "pass --data-dir or --data-files"
    try:
        import datasets
    except ImportError as exc:
        raise MissingSplitFile(f"task {task.name!r} has no local file for split {split!r} and the `datasets` "
                               "package is not installed (pip install 'fnprune[datasets]')", f"; {fix}") from exc
    try:
        ds = datasets.load_dataset(task.dataset, task.dataset_config, split=split)
    except Exception as exc:  # network, missing dataset or split: all mean "cannot get the data"
        skip = "" if hub_offline() else " (HF_HUB_OFFLINE=1 skips the Hub's retries)"
        raise MissingSplitFile(f"could not load {task.dataset}/{task.dataset_config or ''} split {split!r} from the "
                               f"Hugging Face Hub ({type(exc).__name__}: {first_line(exc)}){skip}",
                               f"; offline, {fix}") from exc
    rows = [dict(row) for row in ds]
    if rows and all(str(row.get(task.label_column)) == "-1" for row in rows):
        raise DataError(f"{task.dataset}/{task.dataset_config or ''} split {split!r} has no labels (-1 on every "
                        "row, as GLUE's test splits hide them): score its validation split")
    return rows


def data_source(task: TaskSpec, split: str) -> Path | None:
    """The local file a split is read from, or None when it comes from the Hub."""
    return _split_file(task, _carved_from(task, split))


def _checked_rows(task: TaskSpec, split: str) -> tuple[list[dict], list[str]]:
    """A split's raw rows, every column and label checked, and the template's fields; problems: DataError."""
    path = _split_file(task, split)
    rows = _load_hub_split(task, split) if path is None else read_rows(path)
    where = str(path) if path else f"{task.dataset} {split}"
    if not rows:
        raise DataError(f"{where}: split {split!r} is empty")
    fields = task_fields(task)  # parsed once: per row it was most of a large split's load
    columns = [*fields, task.label_column]
    absent = [c for c in columns if c not in rows[0]]
    if absent:
        raise DataError(f"{where}: missing column(s) {absent}; columns are {sorted(rows[0])}")
    per_row = path is None or file_format(path) == "jsonl"  # TSV and CSV rows are complete and text
    for n, row in enumerate(rows):
        for c in columns if per_row else ():  # a missing key, null, a list or an object is not text
            value = row.get(c, KeyError)
            if value is KeyError or value is None or isinstance(value, (dict, list)):
                what = "missing" if value is KeyError else "null" if value is None else f"a {type(value).__name__}"
                raise DataError(f"{where}: data row {n + 1}: column {c!r} is {what}, not text or a label")
        label = rowfields.scalar_text(row[task.label_column])
        if label not in task.label_words:
            raise DataError(
                f"{where}: data row {n + 1}: label {label!r} is not one of the label words' keys "
                f"{sorted(task.label_words)}"
            )
    return rows, fields


def _example(task: TaskSpec, row: dict, fields: list[str], template: PromptTemplate) -> Example:
    values = {c: str(row[c]).strip() for c in fields}
    label = rowfields.scalar_text(row[task.label_column])
    return Example(template.template.format(**values), label, tuple(values.values()), template.name)


# Tasks that use nested paths, filters, named columns, multiple choice, headerless or non-suffix files, or one
# labelled file carved in two are read here; classic tasks keep the classic path above, unchanged.


def _carved_from(task: TaskSpec, split: str) -> str:
    """The split whose file holds `split`: `split_of` for the two carved splits, else the split itself."""
    if task.split_of and split in (task.calibration_split, task.evaluation_split):
        return task.split_of
    return split


def _read_table(task: TaskSpec, path: Path) -> list[dict]:
    """A file's rows, in `task.file_format` (MRPC's .txt) and with `task.header` (CoLA's headerless TSV) when set."""
    return read_rows(path, task.file_format, task.header)


@dataclass(frozen=True)
class _Row:
    """One row parsed once: every template field's value, the label (or answer index) and the choices."""

    values: dict[str, str]
    label: str
    choices: tuple[str, ...] = ()


def fill_template(template: str, values: dict[str, str]) -> str:
    return "".join(lit + (values[f] if f else "") for lit, f, _, _ in string.Formatter().parse(template))


def _parse_row(task: TaskSpec, row: dict, fields: list[str], where: str) -> _Row:
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a mapping of columns")
    values = {}
    for f in fields:
        value = rowfields.resolve(row, f, task.columns, where)
        if isinstance(value, list):
            raise DataError(f"{where}: template field {{{f}}} is a list; pick an item or use it in task.choices")
        values[f] = value
    answer = rowfields.resolve(row, task.label_column, None, where)
    if task.kind == "classification":
        if answer not in task.label_words:
            raise DataError(f"{where}: label {answer!r} is not one of the label words' keys {sorted(task.label_words)}")
        return _Row(values, answer)
    choices = [rowfields.resolve(row, c, None, where) for c in task.choices]
    if len(choices) == 1 and isinstance(choices[0], list):
        choices = choices[0]
    if len(choices) < 2 or any(isinstance(c, list) or not c for c in choices):
        raise DataError(f"{where}: expected at least two non-empty choices, got {choices!r}")
    if task.choice_labels:
        labels = rowfields.resolve(row, task.choice_labels, None, where)
        if not isinstance(labels, list) or len(labels) != len(choices):
            raise DataError(f"{where}: task.choice_labels {task.choice_labels!r} must give one label per choice")
        if answer not in labels:
            raise DataError(f"{where}: answer {answer!r} is not one of the choices' labels {labels}")
        index = labels.index(answer)
    else:
        if not answer.isdigit() or int(answer) >= len(choices):
            raise DataError(f"{where}: answer {answer!r} is not a choice index 0..{len(choices) - 1}")
        index = int(answer)
    return _Row(values, str(index), tuple(choices))


def _build(task: TaskSpec, row: _Row, fields: list[str], template: PromptTemplate) -> Example:
    texts = _texts(row, fields)
    choices = tuple(fill_template(template.choice, {f: rowfields.resolve({"choice": c}, f) for f in
                                           template_fields(template.choice)}) for c in row.choices)
    return Example(fill_template(template.template, row.values), row.label, texts, template.name, choices,
                   template.delimiter if task.kind == "multiple_choice" else "")


def _texts(row: _Row, fields: list[str]) -> tuple[str, ...]:
    """What makes a row the same example under any template: its field values, then its choices as given
    (ARC's Dev and Test files share two questions, with other choices)."""
    return tuple(row.values[f] for f in fields) + row.choices


def _parsed_rows(task: TaskSpec, split: str) -> tuple[list[_Row], list[str]]:
    source = _carved_from(task, split)
    path = _split_file(task, source)
    rows = _load_hub_split(task, source) if path is None else _read_table(task, path)
    where = str(path) if path else f"{task.dataset} {source}"
    if not rows:
        raise DataError(f"{where}: split {source!r} is empty")
    fields = task_fields(task)
    parsed = [_parse_row(task, row, fields, f"{where}: data row {n + 1}") for n, row in enumerate(rows)]
    if task.split_of and split in (task.calibration_split, task.evaluation_split):
        parsed = _carve(task, parsed, split == task.calibration_split)
    return parsed, fields


MIN_SHARED = 16  # characters: a shorter value (COPA's "cause", WiC's word) is shared by unrelated examples


def _groups(rows: list[_Row], choices: Collection[str]) -> list[int]:
    """Each row's group: rows sharing a text of MIN_SHARED characters or more, in any field but the `choices`
    (BoolQ's passage, QNLI's question or its sentence, MRPC's sentence on either side), are one group, so one text
    never lands on both sides; an answer two questions share ("None of the above") does not tie them. The group
    is named by its first row."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, row in enumerate(rows):
        for name, text in row.values.items():
            if len(text) < MIN_SHARED or name in choices:
                continue
            j = first_with.setdefault(comparable(text), i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(rows))]


def _carve(task: TaskSpec, rows: list[_Row], calibration: bool) -> list[_Row]:
    """The calibration or the evaluation part of one labelled file: its groups of rows sharing a text shuffled by
    `split_seed`, the first `calibration_share` of them for calibration (where no text is shared, a group is a
    distinct example)."""
    named = [_texts(rows[g], list(rows[g].values)) for g in _groups(rows, set(task.choices))]  # each row's group
    keys = list(dict.fromkeys(named))
    random.Random(task.split_seed).shuffle(keys)
    first = set(keys[: round(task.calibration_share * len(keys))])
    part = [r for r, key in zip(rows, named) if (key in first) == calibration]
    if rows and not part:  # else "every row also appears in the evaluation split", of a file that does not exist
        side = "calibration" if calibration else "evaluation"
        raise DataError(f"the {task.split_of!r} file's {len(rows)} rows form {len(keys)} group(s) of rows sharing a "
                        f"text, and cutting them by task.calibration_share {task.calibration_share} leaves the "
                        f"{side} part empty; give more rows, or a calibration file (--data-files "
                        f"{task.calibration_split}=FILE)")
    return part


def _prepared(task: TaskSpec, split: str) -> tuple[list, Callable[[object, PromptTemplate], Example]]:
    """A split's rows (every one checked) and how to make an example of a row under a template."""
    if uses_fields(task):
        parsed, fields = _parsed_rows(task, split)
        return parsed, lambda row, t: _build(task, row, fields, t)
    rows, fields = _checked_rows(task, split)
    return rows, lambda row, t: _example(task, row, fields, t)


def load_split(task: TaskSpec, split: str, template: str | None = None) -> list[Example]:
    """All examples of one split under one template (default: the first calibration template); every problem
    with the data is a DataError."""
    rows, build = _prepared(task, split)
    chosen = _template(task, template)
    return [build(row, chosen) for row in rows]


RAW = PromptTemplate("(raw)", "")  # a calibration prompt that is the row's text alone


def _raw_positions(task: TaskSpec) -> list[int]:
    """Where an example's texts hold the columns the calibration templates read as they are: an untemplated
    prompt is those (never a filtered form such as COPA's connector words, and nothing only a held-out template
    reads)."""
    fields = task_fields(task)
    read = {f for t in task.calibration_templates() for f in template_fields(t.template)}
    plain = {f for f in read if rowfields.is_plain(f)} or read  # a task whose templates filter every column
    return [k for k, f in enumerate(fields) if f in plain]


def load_sample(task: TaskSpec, split: str, n: int, seed: int, raw_share: float = 0.0,
                exclude: Collection[tuple[str, ...]] = ()) -> list[Example]:
    """A seeded sample of n rows of a split (the whole split is still checked), the calibration templates
    taking turns over the sampled rows; a `raw_share` of them, spread evenly, is the text without a template.
    Held-out templates are never used here. A multiple-choice prompt is the question alone (the decision is made
    at its end), labelled with the answer's index; untemplated, the question and its choices, one per line.
    Rows whose text is in `exclude` (the evaluation split's, `example_key`) are left out before the draw."""
    rows, build = _prepared(task, split)
    if exclude:
        first = task.calibration_templates()[0]
        rows = left_out(rows, lambda row: example_key(build(row, first)), exclude, split, len(task_fields(task)))
    templates, out, turn = task.calibration_templates(), [], 0
    raw_at, n_fields = _raw_positions(task), len(task_fields(task))
    order = _sample_indices(len(rows), n, seed)  # a split used whole: the seed still draws each row's template
    for j, i in enumerate(order if n < len(rows) else random.Random(seed).sample(order, len(order))):
        if int((j + 1) * raw_share) > int(j * raw_share):
            e = build(rows[i], templates[0])
            parts = [e.texts[k] for k in raw_at] + list(e.texts[n_fields:])  # then the choices
            raw = "\n".join(dict.fromkeys(p for p in parts if p))
            out.append(Example(raw, e.label, e.texts, RAW.name, e.choices, e.delimiter))
        else:
            out.append(build(rows[i], templates[turn % len(templates)]))
            turn += 1
    return out


def left_out(items: list[_T], key: Callable[[_T], tuple[str, ...]], exclude: Collection[tuple[str, ...]],
             split: str, fields: int | None = None) -> list[_T]:
    """`items` of a calibration split whose `key` (`example_key`) is not among the evaluation split's texts in
    `exclude`, nor shares with one of them a text of MIN_SHARED characters or more in its first `fields` texts (the
    row's fields, not its choices): rows in both files stay evaluation rows (CoLA's train and dev share six
    sentences), and so do rows sharing a sentence with one (RTE's train and dev files share premises and
    hypotheses, as one file carved in two never does, `_groups`), said."""
    shared = {t for k in exclude for t in k[:fields] if len(t) >= MIN_SHARED}
    kept = [item for item in items if (k := key(item)) not in exclude and not any(t in shared for t in k[:fields])]
    if len(kept) < len(items):
        log.warning("%d row(s) of the %r split also appear in the evaluation split, or share a text with one of its "
                    "rows: left out of the calibration", len(items) - len(kept), split)
    if not kept:
        raise DataError(f"every row of the {split!r} split also appears in the evaluation split; calibration "
                        "and evaluation data must not overlap (use a different calibration split or file)")
    return kept


def load_evaluation(task: TaskSpec, split: str, max_samples: int | None = None) -> dict[str, list[Example]]:
    """The evaluation split under every template (calibration templates first), the same rows in each."""
    rows, build = _prepared(task, split)
    rows = rows[:max_samples] if max_samples else rows
    ordered = [*task.calibration_templates(), *task.held_out_templates()]
    return {t.name: [build(row, t) for row in rows] for t in ordered}


def label_keys(task: TaskSpec, examples: list[Example]) -> list[str]:
    """The label of each class in order: the label words' keys, or a multiple-choice task's answer indices."""
    if task.kind == "multiple_choice":
        return [str(i) for i in range(max(len(e.choices) for e in examples))]
    return list(task.label_words)


def _sample_indices(total: int, n: int, seed: int) -> list[int]:
    if n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded sample of n examples without replacement (all of them, in order, when n >= len)."""
    return [examples[i] for i in _sample_indices(len(examples), n, seed)]


def comparable(text: str) -> str:
    """A text as the overlap checks compare it: Unicode-normalized (NFKC), case-folded, each run of whitespace one
    space. Two copies that differ only so (RTE's dev file has one sentence of its train file with a double space)
    are the same example."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_key(e: Example) -> tuple[str, ...]:
    """An example's identity: its text (`comparable`); the same text is the same example whatever prompt wraps
    it."""
    return tuple(comparable(t) for t in (e.texts or (e.prompt,)))


def prompts_text(examples: list[Example]) -> str:
    """Every example's label and prompt as one string: what a cache key hashes to name a list of examples."""
    return "\x00".join(f"{e.label}\x01{e.prompt}" for e in examples)


def prompts_digest(examples: list[Example]) -> str:
    """sha256 of `prompts_text`: a list of examples' name in a cache key."""
    return hashlib.sha256(prompts_text(examples).encode()).hexdigest()


def shared_examples(a: list[Example], b: list[Example]) -> set[tuple[str, ...]]:
    """The examples in both lists, by their text."""
    return {example_key(e) for e in a} & {example_key(e) for e in b}


def check_disjoint(calibration: list[Example], evaluation: list[Example]) -> None:
    """Refuse calibration data that also appears in the evaluation data (the reference code leaked it), under
    any template."""
    shared = shared_examples(calibration, evaluation)
    if shared:
        example = " / ".join(next(iter(shared)))
        raise DataError(
            f"{len(shared)} calibration example(s) also appear in the evaluation split, e.g. {example[:80]!r}; "
            "calibration and evaluation data must not overlap (use a different calibration split or file)"
        )
