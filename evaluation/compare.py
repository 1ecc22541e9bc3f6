"""Two pruned checkpoints of the same dense model, scored on the same examples: how far apart they are.

Each run's own "% of dense" interval is wide (a few hundred examples); two pruned models that answer many examples
alike differ by an amount known better than either figure. This reads the per-example answers report.json keeps
(`templates[].hits`) and bootstraps the difference with all three models resampled together.

    python -m evaluation.compare RUN_A RUN_B [--out-prefix evaluation/results/NAME]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from evaluation.tables import write_rows
from fnprune.intervals import difference_interval, retained_interval
from fnprune.validation import read_hits


def compare(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per template group (held-out, calibration): each run's % of dense and second minus first, in points
    of dense with a 95% interval. Refuses reports that did not score the same examples with the same dense model."""
    rows = []
    for group, held in (("held-out mean", True), ("calibration mean", False)):
        dense = read_hits(first.get("templates", []), "dense", held)
        if dense is None:
            continue
        other = read_hits(second.get("templates", []), "dense", held)
        if other is None or not (other.shape == dense.shape and bool((other == dense).all())):
            raise SystemExit(f"compare: the two runs' dense answers differ on the {group}: not the same examples, "
                             "templates or dense model")
        a, b = (read_hits(r.get("templates", []), "pruned", held) for r in (first, second))
        if a is None or b is None:
            raise SystemExit(f"compare: a run has no per-example answers for the {group} (report.json too old)")
        base = dense.double().mean().item()
        pct = lambda h, base=base: round(100 * h.double().mean().item() / base, 1)  # noqa: E731
        interval = difference_interval(dense, a, b)
        ci = retained_interval(dense, b)
        rows.append({"templates": group, "first": pct(a), "second": pct(b),
                     "second_ci95": None if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}",
                     "difference": round(100 * (b.double().mean().item() - a.double().mean().item()) / base, 1),
                     "difference_ci95": None if interval is None else
                     f"{100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}",
                     "examples": dense.shape[1], "templates_n": dense.shape[0]})
    if not rows:
        raise SystemExit("compare: the first run has no per-example answers (report.json too old)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="a run folder (report.json) or a report.json")
    parser.add_argument("second", type=Path)
    parser.add_argument("--out-prefix", type=Path, help="also write PREFIX.{json,md,csv}")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.first, args.second):
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"compare: no report.json at {path}")
        reports.append(json.loads(path.read_text()))
    rows = compare(*reports)
    command = "python -m evaluation.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.out_prefix:
        print(write_rows(args.out_prefix, command, rows))
    else:
        for row in rows:
            print(row)


if __name__ == "__main__":
    main()
