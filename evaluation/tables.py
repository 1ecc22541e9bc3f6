"""Benchmark rows (dicts) as result files: PREFIX.json with the command, PREFIX.md with the same as a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_rows(prefix: Path, command: str, rows: list[dict[str, Any]]) -> str:
    """Write PREFIX.json and PREFIX.md; returns the markdown table (columns in first-seen order, None blank)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    prefix.with_suffix(".md").write_text(f"Command: `{command}`\n\n{table}\n")
    return table
