"""Tasks: where the examples come from, how a prompt is built, and which word stands for each label.

Built-in tasks fill in a TaskSpec; a recipe can define a new classification task with the same fields.
Data comes from local files (GLUE-style TSV, CSV or JSON lines) or, online, from Hugging Face `datasets`.
No model internals here.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .recipe import PromptTemplate, TaskSpec

__all__ = [
    "BUILTIN_TASKS", "Example", "resolve_task", "load_split", "load_sample", "load_evaluation", "template_fields",
    "task_fields", "sample", "check_disjoint",
]

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
    ),
    "ag_news": TaskSpec(
        name="ag_news",
        dataset="ag_news",
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
}

SPLIT_FILE_STEMS = {"train": ("train",), "validation": ("validation", "dev"), "test": ("test",)}
SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class Example:
    """One labelled example: the filled-in prompt, the label's key in `label_words`, the template's name."""

    prompt: str
    label: str
    texts: tuple[str, ...] = ()  # the row's text fields, in order: the input of a classifier head
    template: str = ""


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
                f.name.endswith("_split") and values[f.name] == getattr(defaults, f.name)
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
    missing = [] if task.templates else ["template (or templates)"]
    if not task.label_column:
        missing.append("label_column")
    if not task.label_words:
        missing.append("label_words")
    if not (task.dataset or task.data_dir or task.data_files):
        missing.append("dataset, data_dir or data_files")
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
    return task


def task_fields(task: TaskSpec) -> list[str]:
    """The text columns the task's templates read, the first calibration template's in its order first."""
    ordered = [*task.calibration_templates(), *task.held_out_templates()]
    return list(dict.fromkeys(f for t in ordered for f in template_fields(t.template)))


def _template(task: TaskSpec, name: str | None) -> PromptTemplate:
    """A template by name; None: the first calibration template."""
    if name is None:
        return task.calibration_templates()[0]
    for t in task.templates:
        if t.name == name:
            return t
    known = ", ".join(t.name for t in task.templates)
    raise DataError(f"task {task.name!r} has no template {name!r} (its templates: {known})")


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise DataError(f"task.template {template!r} is not a valid format string: {exc}") from exc


def _split_file(task: TaskSpec, split: str) -> Path | None:
    if split in task.data_files:
        return Path(task.data_files[split]).expanduser()
    if task.data_dir:
        directory = Path(task.data_dir).expanduser()
        if not directory.is_dir():
            raise DataError(f"task.data_dir {directory} is not a directory")
        for stem in SPLIT_FILE_STEMS.get(split, (split,)):
            for suffix in SUFFIXES:
                candidate = directory / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
        raise DataError(
            f"no file for split {split!r} in {directory} (looked for "
            f"{', '.join(s + x for s in SPLIT_FILE_STEMS.get(split, (split,)) for x in SUFFIXES)})"
        )
    return None


_FIELD_LIMIT = 2**31 - 1  # csv's default limit (131,072 characters) is below one long document


def _json_rows(path: Path, text: str) -> list[dict]:
    """JSON lines (one object per line); a .json file may instead hold one array of objects, or one object."""
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: not valid JSON ({exc})") from exc
        else:
            items = whole if isinstance(whole, list) else [whole]
            for n, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DataError(f"{path}: item {n} is {type(item).__name__}, not a JSON object (one per row)")
            return items
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not a JSON object ({exc})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: {type(row).__name__}, not a JSON object (one object per line)")
        rows.append(row)
    return rows


def _table_rows(path: Path, text: str) -> list[dict[str, str]]:
    """CSV with its quoting, or TSV as GLUE writes it: one row per line, tabs between fields and quoting off (as
    csv.QUOTE_NONE), so a quote is text and a sentence starting with one cannot swallow the next lines. Every
    row has the header's number of fields; blank lines are skipped; header names lose surrounding spaces."""
    tsv = path.suffix == ".tsv"
    if tsv:
        records = ((n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.split("\n"), 1) if line.strip())
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        records = ((reader.line_num, fields) for fields in reader)
    header: list[str] | None = None
    rows = []
    previous = csv.field_size_limit(_FIELD_LIMIT)
    try:
        for line, fields in records:
            if header is None:
                if any(f.strip() for f in fields):
                    header = [f.strip() for f in fields]
                continue
            if len(fields) != len(header):
                if not any(f.strip() for f in fields):
                    continue
                raise DataError(
                    f"{path}:{line}: {len(fields)} field(s), the header has {len(header)} ({', '.join(header)})"
                    + ("; TSV fields are separated by tabs, without quoting" if tsv else "")
                )
            rows.append(dict(zip(header, fields)))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: cannot parse the CSV ({exc})") from exc
    finally:
        csv.field_size_limit(previous)
    if header is not None and len(set(header)) != len(header):
        raise DataError(f"{path}: the header names a column twice: {header}")
    return rows


def _read_rows(path: Path) -> list[dict]:
    """A local file's rows (see `_table_rows`, `_json_rows`); a UTF-8 byte-order mark is skipped."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if path.suffix in (".jsonl", ".json"):
        return _json_rows(path, text)
    return _table_rows(path, text)


def _load_hub_split(task: TaskSpec, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"task {task.name!r} has no local files (give --data-dir or --data-files) and the `datasets` "
            "package is not installed (pip install 'fnprune[datasets]')"
        ) from exc
    try:
        ds = datasets.load_dataset(task.dataset, task.dataset_config, split=split)
    except Exception as exc:  # network, missing dataset or split: all mean "cannot get the data"
        raise DataError(
            f"could not load {task.dataset}/{task.dataset_config or ''} split {split!r} from the Hugging Face "
            f"Hub ({type(exc).__name__}: {exc}); offline, pass --data-dir or --data-files"
        ) from exc
    return [dict(row) for row in ds]


def data_source(task: TaskSpec, split: str) -> Path | None:
    """The local file a split is read from, or None when it comes from the Hub."""
    return _split_file(task, split)


def _checked_rows(task: TaskSpec, split: str) -> tuple[list[dict], list[str]]:
    """A split's raw rows, every column and label checked, and the template's fields; problems: DataError."""
    path = _split_file(task, split)
    rows = _load_hub_split(task, split) if path is None else _read_rows(path)
    where = str(path) if path else f"{task.dataset} {split}"
    if not rows:
        raise DataError(f"{where}: split {split!r} is empty")
    fields = task_fields(task)  # parsed once: per row it was most of a large split's load
    columns = [*fields, task.label_column]
    absent = [c for c in columns if c not in rows[0]]
    if absent:
        raise DataError(f"{where}: missing column(s) {absent}; columns are {sorted(rows[0])}")
    per_row = path is None or path.suffix in (".json", ".jsonl")  # TSV and CSV rows are complete and text
    for n, row in enumerate(rows):
        for c in columns if per_row else ():  # a missing key, null, a list or an object is not text
            value = row.get(c, KeyError)
            if value is KeyError or value is None or isinstance(value, (dict, list)):
                what = "missing" if value is KeyError else "null" if value is None else f"a {type(value).__name__}"
                raise DataError(f"{where}: row {n}: column {c!r} is {what}, not text or a label")
        label = str(row[task.label_column]).strip()
        if label not in task.label_words:
            raise DataError(
                f"{where}: row {n}: label {label!r} is not one of the label words' keys "
                f"{sorted(task.label_words)}"
            )
    return rows, fields


def _example(task: TaskSpec, row: dict, fields: list[str], template: PromptTemplate) -> Example:
    values = {c: str(row[c]).strip() for c in fields}
    return Example(template.template.format(**values), str(row[task.label_column]).strip(), tuple(values.values()),
                   template.name)


def load_split(task: TaskSpec, split: str, template: str | None = None) -> list[Example]:
    """All examples of one split under one template (default: the first calibration template); every problem
    with the data is a DataError."""
    rows, fields = _checked_rows(task, split)
    chosen = _template(task, template)
    return [_example(task, row, fields, chosen) for row in rows]


RAW = PromptTemplate("(raw)", "")  # a calibration prompt that is the row's text alone


def load_sample(task: TaskSpec, split: str, n: int, seed: int, raw_share: float = 0.0) -> list[Example]:
    """A seeded sample of n rows of a split (the whole split is still checked), the calibration templates
    taking turns over the sampled rows; a `raw_share` of them, spread evenly, is the text without a template.
    Held-out templates are never used here."""
    rows, fields = _checked_rows(task, split)
    templates, out, turn = task.calibration_templates(), [], 0
    for j, i in enumerate(_sample_indices(len(rows), n, seed)):
        if int((j + 1) * raw_share) > int(j * raw_share):
            values = tuple(str(rows[i][c]).strip() for c in fields)
            out.append(Example("\n".join(values), str(rows[i][task.label_column]).strip(), values, RAW.name))
        else:
            out.append(_example(task, rows[i], fields, templates[turn % len(templates)]))
            turn += 1
    return out


def load_evaluation(task: TaskSpec, split: str, max_samples: int | None = None) -> dict[str, list[Example]]:
    """The evaluation split under every template (calibration templates first), the same rows in each."""
    rows, fields = _checked_rows(task, split)
    rows = rows[:max_samples] if max_samples else rows
    ordered = [*task.calibration_templates(), *task.held_out_templates()]
    return {t.name: [_example(task, row, fields, t) for row in rows] for t in ordered}


def _sample_indices(total: int, n: int, seed: int) -> list[int]:
    if n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded sample of n examples without replacement (all of them, in order, when n >= len)."""
    return [examples[i] for i in _sample_indices(len(examples), n, seed)]


def check_disjoint(calibration: list[Example], evaluation: list[Example]) -> None:
    """Refuse calibration data that also appears in the evaluation data (the reference code leaked it), under
    any template: the same text is the same example whatever prompt wraps it."""
    key = lambda e: e.texts or (e.prompt,)  # noqa: E731
    shared = {key(e) for e in calibration} & {key(e) for e in evaluation}
    if shared:
        example = " / ".join(next(iter(shared)))
        raise DataError(
            f"{len(shared)} calibration example(s) also appear in the evaluation split, e.g. {example[:80]!r}; "
            "calibration and evaluation data must not overlap (use a different calibration split or file)"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
