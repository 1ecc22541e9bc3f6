"""Local data files' rows: GLUE-style TSV, TSV with CSV quoting, CSV, and JSON lines (or one JSON array).

Every problem with a file (missing, not UTF-8, a row with the wrong number of fields, broken JSON) is one
DataError that names the file and line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .choices import FILE_FORMATS
from .errors import DataError

__all__ = ["FORMATS", "SUFFIXES", "file_format", "read_rows"]

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}  # by suffix
SUFFIXES = tuple(FORMATS)

_FIELD_LIMIT = 2**31 - 1  # csv's default limit (131,072 characters) is below one long document


def _json_rows(path: Path, text: str) -> list[dict]:
    """JSON lines (one object per line); a .json file may instead hold one array of objects, or one object."""
    if path.suffix.lower() == ".json":
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


def _table_rows(path: Path, text: str, fmt: str, header: list[str] | None = None) -> list[dict[str, str]]:
    """CSV with its quoting; TSV as GLUE writes it: one row per line, tabs between fields and quoting off (as
    csv.QUOTE_NONE), so a quote is text and a sentence starting with one cannot swallow the next lines; or
    `tsv-quoted`, tabs with CSV's quoting (as pandas writes TSV, e.g. the RTE export). Every row has the header's
    number of fields (the first line's, or `header`'s for a file without one); blank lines are skipped; header
    names lose surrounding spaces."""
    tsv = fmt == "tsv"
    if tsv:
        records = ((n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.split("\n"), 1) if line.strip())
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True, delimiter="\t" if fmt == "tsv-quoted" else ",")
        records = ((reader.line_num, fields) for fields in reader)
    header = list(header) if header else None
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


def _read_text(path: Path) -> str:
    """A local data file's text; a UTF-8 byte-order mark is skipped."""
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative paths are read from {Path.cwd()})"
        raise DataError(f"data file not found: {path}{where}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def file_format(path: Path, declared: str | None = None) -> str:
    """tsv, tsv-quoted, csv or jsonl: `declared` (task.file_format), else from the file's suffix, in any case."""
    fmt = declared or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the file format from its suffix ({', '.join(FORMATS)}); set "
                        f"task.file_format ({', '.join(FILE_FORMATS)})")
    return fmt


def read_rows(path: Path, declared: str | None = None, header: list[str] | None = None) -> list[dict]:
    """A local file's rows (see `_table_rows`, `_json_rows`); `header`: the column names of a file without one."""
    if path.is_dir():  # else "cannot tell the format" or "not found", which name the wrong problem
        raise DataError(f"{path}: a folder, not a data file (a folder of split files is --data-dir; --data-files "
                        "takes SPLIT=FILE)")
    fmt = file_format(path, declared)
    text = _read_text(path)
    return _json_rows(path, text) if fmt == "jsonl" else _table_rows(path, text, fmt, header)
