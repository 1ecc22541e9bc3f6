"""Measure FN selection variants on a dev subset (accuracy only) and log them to results/fn_variants.md.

A variant is a sweep method spec: criterion[+bias][@b=boost][@k=components][@cut=relevance cut], e.g.
`fn-task+bias@b=4@k=16`. Rows are cached like the sweep's; a (method, keep) already measured on the full dev
set by the sweep is scored on the subset from its stored per-example results instead of re-running.

    python -m evaluation.variants --eval-samples 300 --variants flap+bias,fn-task+bias@b=4
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from .cache import RowCache
from .sweep import HERE, Bench, add_common_args, load_bench, measure, parse_method, row_key, select

log = logging.getLogger("variants")


def from_full_sweep(bench: Bench, method: str, keep: float) -> float | None:
    """Subset accuracy of a row the full sweep already measured (same calibration and settings)."""
    want = row_key(bench, method, keep)
    n = len(bench.evaluation)
    for path in (Path(bench.args.cache_dir) / "rows").glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        key, row = data["key"], data["row"]
        same = all(key.get(f) == want[f] for f in ("calibration", "components", "method", "keep", "round_to",
                                                   "seed", "fn_boost", "dev_sha", "batch_size", "threads"))
        if same and key["eval_n"] > n and "correct" in row:
            return sum(c == "1" for c in row["correct"][:n]) / n
    return None


def run(
    bench: Bench, specs: list[str], keeps: list[float], cached_only: bool = False
) -> dict[str, dict[float, float]]:
    """Subset accuracy of every variant x keep (dense first), measured or from the caches."""
    cache = RowCache(Path(bench.args.cache_dir) / "rows")
    out: dict[str, dict[float, float]] = {}
    for spec in ["dense", *specs]:
        out[spec] = {}
        for keep in [1.0] if spec == "dense" else keeps:
            info = row_key(bench, spec, keep)
            row = cache.get(info)
            acc = row["accuracy"] if row else from_full_sweep(bench, spec, keep)
            if acc is None and cached_only:
                continue
            if acc is None:
                start = time.perf_counter()
                kept, bias, fills = select(bench, spec, keep) if spec != "dense" else (None, False, None)
                row = {"method": spec, "keep": keep, **measure(bench, kept, bias, ppl=False, fill_maps=fills)}
                row["seconds"] = round(time.perf_counter() - start, 1)
                cache.put(info, row)
                acc = row["accuracy"]
            out[spec][keep] = acc
            log.info("%-28s keep %.2f  acc %.4f", spec, keep, acc)
    return out


def log_markdown(results: dict[str, dict[float, float]], keeps: list[float], command: str, n: int) -> str:
    dense = results["dense"][1.0]
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M')} UTC, first {n} SST-2 dev sentences, dense accuracy {dense:.4f}",
        f"Command: `{command}`",
        "",
        "| variant | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
    ]
    for spec, accs in results.items():
        if spec != "dense":
            cells = [f"{accs[k]:.4f}" if k in accs else "-" for k in keeps]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(eval_samples=300, ppl_tokens=0)
    p.add_argument("--variants", required=True, help="comma list of method specs")
    p.add_argument("--keeps", default="0.75,0.5,0.35,0.25")
    p.add_argument("--log", default=str(HERE / "results" / "fn_variants.md"))
    p.add_argument("--cached-only", action="store_true", help="tabulate measured rows only ('-' = not measured)")
    args = p.parse_args(argv)
    args.ppl_tokens = 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m evaluation.variants " + shlex.join(sys.argv[1:] if argv is None else argv)
    specs = [s.strip() for s in args.variants.split(",") if s.strip()]
    for s in specs:
        parse_method(s)
    keeps = [float(k) for k in args.keeps.split(",")]
    bench = load_bench(args)
    results = run(bench, specs, keeps, args.cached_only)
    md = log_markdown(results, keeps, command, len(bench.evaluation))
    log_path = Path(args.log)
    if not log_path.exists():
        log_path.write_text("# FN selection variants (SmolLM2-135M-Instruct, SST-2 dev subsets)\n\n", encoding="utf-8")
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
