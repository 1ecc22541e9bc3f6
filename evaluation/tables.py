"""Benchmark rows (dicts) as result files: PREFIX.json with the command, PREFIX.md with the same as a table,
PREFIX.csv for spreadsheets and plotting; and the one "% of dense" their columns use."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fnprune.checkpoint import atomic_output_file


def with_extension(prefix: Path, extension: str) -> Path:
    """PREFIX + extension; unlike Path.with_suffix, a dot inside the prefix (`..._k0.25`) is kept."""
    return prefix.parent / (prefix.name + extension)


def percent_of_dense(score: float, dense: float, digits: int | None = 1) -> float | None:
    """A mean score in % of dense's, rounded to `digits` (None: not rounded, for averaging); None where dense
    scored nothing, as a tiny model can."""
    if not dense:
        return None
    return 100 * score / dense if digits is None else round(100 * score / dense, digits)


def write_file(path: Path, text: str) -> None:
    """`path` replaced in one step (written beside it, then renamed): a run stopped while writing, or another one
    writing the same prefix, never leaves a truncated table or one file of a set half old."""
    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")  # as given: the CSV ends its lines in \r\n


def write_rows(prefix: Path, command: str, rows: list[dict[str, Any]]) -> str:
    """Write PREFIX.json, PREFIX.md and PREFIX.csv; returns the markdown table (columns in first-seen order, None
    blank). Columns named `_...` (unrounded values kept for averaging) go to the JSON only."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(c for r in rows for c in r if not c.startswith("_")))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    spreadsheet = io.StringIO(newline="")
    writer = csv.DictWriter(spreadsheet, cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_file(with_extension(prefix, ".json"), json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    write_file(with_extension(prefix, ".md"), f"Command: `{command}`\n\n{table}\n")
    write_file(with_extension(prefix, ".csv"), spreadsheet.getvalue())
    return table
