"""Two pruned checkpoints of the same dense model, scored on the same examples: how far apart they are.

Each run's own "% of dense" interval is wide (a few hundred examples); two pruned models that answer many examples
alike differ by an amount known better than either figure. This reads the per-example answers report.json keeps
(`templates[].hits`, and `templates[].right_probs` for the `soft_` columns: the probability of the right answer,
which moves with every answer's sureness, not only where one flips) and bootstraps the difference with all three
models resampled together.

    python -m evaluation.compare RUN_A RUN_B [--out-prefix evaluation/results/NAME]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from evaluation.tables import percent_of_dense, write_rows
from fnprune.card import interval_text
from fnprune.intervals import difference_interval
from fnprune.validation import read_hits, read_right_probs


def paired_difference(dense: torch.Tensor, first: torch.Tensor, second: torch.Tensor
                      ) -> tuple[float | None, str | None]:
    """Second minus first mean score in points of dense, and its paired 95% interval as "-1.1 to +10.6" (each
    None when there is no ratio to dense). Scores: (templates, examples), the same examples in all three; hits
    (accuracy) or the probabilities of the right answer."""
    mean = lambda h: h.double().mean().item()  # noqa: E731
    interval = difference_interval(dense, first, second)
    text = None if interval is None else f"{100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}"
    if not mean(dense):
        return None, text
    return round(100 * (mean(second) - mean(first)) / mean(dense), 1), text


def compare(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per template group (held-out, calibration): each run's % of dense and second minus first, in points
    of dense with a 95% interval; then the same by the probability of the right answer (`soft_` columns, None when
    a report predates them). Refuses reports that did not score the same examples with the same dense model."""
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
        means = second.get("template_means", {})
        own = means.get("held_out" if held else "calibration", {}) if isinstance(means, dict) else {}
        paired = _paired(dense, a, b)
        row = {"templates": group, "first": paired["first"], "second": paired["second"],
               "second_ci95": interval_text(own.get("retained_ci95") if isinstance(own, dict) else None),
               "difference": paired["difference"], "difference_ci95": paired["difference_ci95"]}
        probs = [read_right_probs(r.get("templates", []), model, held)
                 for r, model in ((first, "dense"), (first, "pruned"), (second, "pruned"))]
        kept = all(p is not None and p.shape == dense.shape for p in probs)  # None: a report from before them
        soft = _paired(*probs) if kept else dict.fromkeys(paired)
        rows.append({**row, **{f"soft_{k}": v for k, v in soft.items()},
                     "examples": dense.shape[1], "templates_n": dense.shape[0]})
    if not rows:
        raise SystemExit("compare: the first run has no per-example answers (report.json too old)")
    return rows


def _paired(dense: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> dict[str, Any]:
    """Each run's % of dense and second minus first in points of dense, with its paired 95% interval."""
    pct = lambda h: percent_of_dense(h.double().mean().item(), dense.double().mean().item())  # noqa: E731
    difference, difference_ci95 = paired_difference(dense, first, second)
    return {"first": pct(first), "second": pct(second), "difference": difference, "difference_ci95": difference_ci95}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a run folder (report.json) or a report.json")
    parser.add_argument("second", type=Path)
    parser.add_argument("--out-prefix", type=Path, help="also write PREFIX.{json,md,csv}")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.first, args.second):
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"compare: no report.json at {path}")
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SystemExit(f"compare: {path} is not a report.json ({exc})") from None
    rows = compare(*reports)
    command = "python -m evaluation.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.out_prefix:
        print(write_rows(args.out_prefix, command, rows))
    else:
        for row in rows:
            print(row)


if __name__ == "__main__":
    main()
