"""The calibrated templates' own mean in committed `calibration_tune --hold-template` files.

Until the version that wrote this script, calibration_tune's `mean`, `pct` and `vs_first` averaged every calibration
template of the task, the one held out of calibration included; the held template's own columns (`held_*`) were
right. This recomputes, from each file's per-template accuracies (stored to 4 decimals), the mean % of dense over the
calibrated templates alone, beside the committed figure:

    python -m evaluation.calibrated_means evaluation/results/calibration_tune_*.json \
        --out-prefix evaluation/results/calibrated_means_of_tuning
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from evaluation.tables import percent_of_dense, write_rows

_NOT_TEMPLATES = {"cut", "run", "mean", "pct", "folder"}


def _held_template(command: str) -> str | None:
    args = shlex.split(command)
    return args[args.index("--hold-template") + 1] if "--hold-template" in args else None


def recount(path: Path) -> list[dict[str, Any]]:
    """One row per tuned setting of a `--hold-template` file (none for a file without one)."""
    found = json.loads(path.read_text(encoding="utf-8"))
    held = _held_template(found["command"])
    if held is None:
        return []
    rows = found["rows"]
    dense = {r.get("cut", 0): r for r in rows if r["run"] == "dense"}
    out = []
    for r in rows:
        if r["run"] == "dense" or r.get("cut") == "mean":
            continue
        base = dense[r.get("cut", 0)]
        calibrated = [k for k, v in base.items() if k not in _NOT_TEMPLATES and k != held
                      and isinstance(v, float) and k in r]
        out.append({"file": path.stem, "cut": r.get("cut", 0), "run": r["run"], "held_template": held,
                    "pct_as_committed": r.get("pct"),
                    "calibrated_pct": percent_of_dense(statistics.fmean(r[k] for k in calibrated),
                                                       statistics.fmean(base[k] for k in calibrated)),
                    "held_pct": r.get("held_pct"), "calibrated_templates": " ".join(calibrated)})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="calibration_tune result files (.json)")
    p.add_argument("--out-prefix", type=Path, required=True)
    args = p.parse_args(argv)
    rows = [row for f in sorted(args.files) for row in recount(f)]
    command = "python -m evaluation.calibrated_means " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write_rows(args.out_prefix, command, rows))


if __name__ == "__main__":
    main()
