"""Benchmark rows (dicts) as result files: PREFIX.json with the command, PREFIX.md with the same as a table,
PREFIX.csv for spreadsheets and plotting; and the one "% of dense" their columns use."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def with_extension(prefix: Path, extension: str) -> Path:
    """PREFIX + extension; unlike Path.with_suffix, a dot inside the prefix (`..._k0.25`) is kept."""
    return prefix.parent / (prefix.name + extension)


def percent_of_dense(score: float, dense: float, digits: int | None = 1) -> float | None:
    """A mean score in % of dense's, rounded to `digits` (None: not rounded, for averaging); None where dense
    scored nothing, as a tiny model can."""
    if not dense:
        return None
    return 100 * score / dense if digits is None else round(100 * score / dense, digits)


def write_rows(prefix: Path, command: str, rows: list[dict[str, Any]]) -> str:
    """Write PREFIX.json, PREFIX.md and PREFIX.csv; returns the markdown table (columns in first-seen order, None
    blank). Columns named `_...` (unrounded values kept for averaging) go to the JSON only."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with_extension(prefix, ".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    cols = list(dict.fromkeys(c for r in rows for c in r if not c.startswith("_")))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    with_extension(prefix, ".md").write_text(f"Command: `{command}`\n\n{table}\n")
    with with_extension(prefix, ".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return table
