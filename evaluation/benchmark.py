"""Held-out-template benchmark: `fnprune.compress` for each configuration x keep (x ICA seed), read back from
the report.json each run writes, so every number is the product's own (physically pruned, the CLI's code path).

    python -m evaluation.benchmark --model ~/.cache/fnprune-models/smollm2-135m-instruct \
        --data-dir ../shared/data/sst2 --keeps 0.5,0.25 --configs default,flap+recon --seeds 0,5,10

Every setting not named by a configuration, `--set KEY=VALUE` or a flag is the recipe's default (fnprune.recipe):
this is the evaluation driver, not a second pipeline. `--wikitext FILE` adds the WikiText-2 perplexity of both
models (the recipe's `evaluation.validation`). Each run's checkpoint folder stays under --work, and a rerun skips
the runs whose report.json exists and was written by the same fnprune code (so an interrupted benchmark
continues, and a code change is measured anew). Calibration, networks and the dense
model's scores are read from fnprune's cache after the first run. Writes PREFIX.json / .md / .csv: one row per
run, PREFIX.png: the template means against keep, then PREFIX_summary: the mean and spread over seeds per
configuration and keep.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from evaluation.tables import percent_of_dense, with_extension, write_rows
from fnprune.card import interval_text
from fnprune.yaml_io import read_value

# Recipe overrides per configuration; the baselines run as published (no reconstruction, FLAP with its bias
# compensation, wanda-sp and random without). The ablations (FN_TASK_ERA) change one thing of the default they
# were measured against, fn-task's of 2026-12-01 (every prompt templated, no refit): today's default is another
# method, so they pin it. Every configuration but `default` (the recipe as a user gets it) and the recovery ones is
# training-free on every task.
N256 = {"calibration.num_samples": 256, "calibration.max_tokens": 4096}  # the calibration of earlier versions
OFF = {"recovery.enabled": False}  # recovery's default (auto) is on for multiple choice
NO_REFIT = {"selection.refit": False}  # the configurations measured before the refit existed, as they were
ON = {"recovery.enabled": True, "recovery.evaluate_before": False}  # the model before it: the row without it
FN_TASK_ERA = {"selection.method": "fn-task", "calibration.raw_share": 0.0, **NO_REFIT}
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},  # auto: flap + reconstruction + the refit for classification, + recovery for multiple choice
    "refit": {"selection.refit": True, **OFF},  # the default with the refit on for any task kind
    "fn-task": {"selection.method": "fn-task", **NO_REFIT, **OFF},
    "flap+recon": {"selection.method": "flap", **NO_REFIT, **OFF},  # the default before the refit
    "flap": {"selection.method": "flap", "selection.reconstruct": False, **NO_REFIT, **OFF},
    "wanda-sp": {"selection.method": "wanda-sp", "selection.reconstruct": False, "selection.bias_compensation": False,
                 **NO_REFIT, **OFF},
    "random": {"selection.method": "random", "selection.reconstruct": False, "selection.bias_compensation": False,
               **NO_REFIT, **OFF},
    "relevance-pooled": {"networks.relevance_within_template": False, **FN_TASK_ERA, **OFF},
    "relevance-uniform": {"selection.method": "fn-task", "networks.relevance": "uniform", **NO_REFIT, **OFF},
    "no-recon": {"selection.reconstruct": False, **FN_TASK_ERA, **OFF},
    "ridge-1": {"selection.ridge": 1.0, **FN_TASK_ERA, **OFF},
    "raw-25": {**FN_TASK_ERA, "calibration.raw_share": 0.25, **OFF},
    "answer-50": {"selection.answer_weight": 0.5, **FN_TASK_ERA, **OFF},
    "n256": {**N256, **FN_TASK_ERA, **OFF},
    "single-template-n256": {**N256, "task.template": "Review: {sentence}\nSentiment:", **FN_TASK_ERA, **OFF},
    "flap+recon-n256": {**N256, "selection.method": "flap", **NO_REFIT, **OFF},
    "answer-50-n256": {**N256, "selection.answer_weight": 0.5, **FN_TASK_ERA, **OFF},
    "recover": {**FN_TASK_ERA, **ON},  # recovery on the default of its time (fn-task); today's: flap+recon+recover
    "fn-task+recover": {"selection.method": "fn-task", **NO_REFIT, **ON},
    "flap+recon+recover": {"selection.method": "flap", **NO_REFIT, **ON},
}


def uses_ica(config: str, task: str, extra: dict[str, Any] | None = None) -> bool:
    """Whether the configuration's selection (after `extra`, the --set overrides) reads functional networks on
    this task (one run per ICA seed then): `default` is the recipe's auto method (flap, no ICA)."""
    from fnprune.recipe import Recipe, apply_overrides
    from fnprune.selection import NEEDS_NETWORKS
    from fnprune.tasks import BUILTIN_TASKS

    kind = BUILTIN_TASKS[task].kind if task in BUILTIN_TASKS else "classification"
    recipe = apply_overrides(Recipe(), {**CONFIGS[config], **(extra or {})})
    return recipe.selection.for_task(kind).method in NEEDS_NETWORKS


def run_one(
    args: argparse.Namespace, config: str, keep: float, seed: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One compress (or its saved report when the run is already done); `extra`: recipe overrides applied after
    the configuration's (from --set and --wikitext), which give the run folder a suffix of their own."""
    import fnprune

    out, recipe = run_recipe(args, config, keep, seed, extra)
    if not finished_here(out, recipe):
        fnprune.compress(recipe, progress=not args.quiet)
        mark_finished(out, recipe)
    report = json.loads((out / "report.json").read_text())
    return row_of(config, keep, seed, report)


def run_recipe(args: argparse.Namespace, config: str, keep: float, seed: int, extra: dict[str, Any] | None):
    """A run's folder and recipe: the configuration's overrides, then `extra`'s."""
    from fnprune.recipe import Recipe, apply_overrides

    out = Path(args.work) / f"{args.task}-{config}-k{keep}-s{seed}{overrides_suffix(extra)}"
    return out, apply_overrides(Recipe(), {
        "model.name_or_path": args.model, "task.name": args.task, "task.data_dir": args.data_dir,
        "calibration.num_samples": args.num_samples, "output.dir": str(out), "output.overwrite": True,
        "selection.keep": keep, "networks.seed": seed, **CONFIGS[config], **(extra or {}),
    })


CODE_MARK = "benchmark_code.txt"  # in a run folder: digests of the fnprune code and of the recipe that wrote it


@functools.cache
def code_digest() -> str:
    """sha256 of fnprune's source files, read once per process: a default that changes meaning (an `auto`
    resolved otherwise) changes it."""
    import fnprune

    root = Path(fnprune.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


PROBE: dict[str, str] = {}  # calibration_tune.main_with_prompts: the digest of the probe that makes the prompts


def _inputs(recipe) -> dict[str, Any]:
    """The run's inputs beyond its recipe's text: the model's and every data path's files (size, modification and
    change times, as fnprune's cache keys them: weights or data replaced in place are new), the versions of the
    libraries that change the numbers, and a probe's code."""
    from fnprune.cache import model_fingerprint
    from fnprune.provenance import key_versions

    ev = recipe.evaluation
    paths = [recipe.task.data_dir, *recipe.task.data_files.values(), ev.lm_eval_include,
             *(p for v in ev.validation for p in (v.data_dir, v.file))]
    return {"model": model_fingerprint(recipe.model.name_or_path, recipe.model.revision),
            "data": {p: model_fingerprint(p, None)["files"] for p in paths if p and Path(p).expanduser().exists()},
            "versions": key_versions(), **PROBE}


def run_mark(recipe) -> str:
    """What a finished run folder records: the code's digest, its recipe's (model, data, settings; not the
    folder) and its inputs' (`_inputs`), so a run with another input in the same folder is made again, never
    reported as this one."""
    data = recipe.to_dict()
    data["output"] = {k: v for k, v in data["output"].items() if k not in ("dir", "overwrite")}
    digest = lambda d: hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()  # noqa: E731
    return f"{code_digest()}\n{digest(data)}\n{digest(_inputs(recipe))}\n"


def finished_here(out: Path, recipe) -> bool:
    """Whether `out` holds a finished run of `recipe` written by this code (anything else is made again)."""
    mark = out / CODE_MARK
    return (out / "report.json").is_file() and mark.is_file() and mark.read_text() == run_mark(recipe)


def mark_finished(out: Path, recipe) -> None:
    (out / CODE_MARK).write_text(run_mark(recipe))


def overrides_suffix(extra: dict[str, Any] | None) -> str:
    """'' without overrides, else '-' and a short hash of them (runs with other settings get other folders)."""
    if not extra:
        return ""
    return "-" + hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]


def numbers(p: argparse.ArgumentParser, flag: str, text: str, kind: type) -> list:
    """A comma-separated list of `kind` (int or float), or a usage error naming the flag."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        p.error(f"{flag}: {text!r} is not a comma-separated list of {'integers' if kind is int else 'numbers'}")


def parse_overrides(sets: list[str], wikitext: str | None) -> dict[str, Any]:
    """`--set selection.ridge=1.0` (values read as YAML) and `--wikitext FILE` as dotted recipe overrides."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with a dotted recipe key, e.g. selection.ridge=1.0")
        out[key.strip()] = read_value(value, f"--set {key.strip()}")
    if wikitext:
        out["evaluation.validation"] = [{"task": "wikitext", "file": str(Path(wikitext).expanduser().resolve())}]
    return out


def row_of(config: str, keep: float, seed: int, report: dict[str, Any]) -> dict[str, Any]:
    """One run's row: scores rounded for the tables, and under `_exact` the unrounded ones `summary` averages.
    A task without held-out templates leaves the held-out columns blank (its report's headline is then the
    calibration mean)."""
    m, means, templates = report["metric"], report["template_means"], report["templates"]
    held = [t for t in templates if t["held_out"]]
    worst = min(held, key=lambda t: t["pruned"] / t["dense"] if t["dense"] else float("inf")) if held else None
    cal = means["calibration"]
    exact = {
        "held_out_pruned": m["pruned"] if held else None,
        "held_out_pct": percent_of_dense(m["pruned"], m["dense"], None) if held else None,
        "worst_held_out_pct": percent_of_dense(worst["pruned"], worst["dense"], None) if worst else None,
        "calibration_pct": percent_of_dense(cal["pruned"], cal["dense"], None),
        "held_out_soft_pct": soft_pct(m, None) if held else None, "calibration_soft_pct": soft_pct(cal, None),
    }
    shown = {col: None if v is None else round(v, 4 if col == "held_out_pruned" else 1) for col, v in exact.items()}
    row = {
        "config": config, "keep": keep, "seed": seed, "params": report["parameters"]["ratio"],
        "held_out_dense": round(m["dense"], 4) if held else None, "held_out_pruned": shown["held_out_pruned"],
        "held_out_pct": shown["held_out_pct"], "held_out_ci95": interval_text(m.get("retained_ci95")) if held else None,
        "worst_held_out_pct": shown["worst_held_out_pct"],
        "worst_held_out_ci95": interval_text(worst.get("retained_ci95")) if worst else None,
        "calibration_dense": round(cal["dense"], 4), "calibration_pruned": round(cal["pruned"], 4),
        "calibration_pct": shown["calibration_pct"],
        "held_out_soft_pct": shown["held_out_soft_pct"], "calibration_soft_pct": shown["calibration_soft_pct"],
        "majority": None if m.get("majority_class") is None else round(m["majority_class"], 4),
        "_exact": exact,
    }
    row.update({f"{t['name']}{'*' if t['held_out'] else ''}": round(t["pruned"], 4) for t in templates})
    ppl = report.get("validation", {}).get("perplexity")
    if ppl:
        row.update(ppl_dense=round(ppl["dense"], 2), ppl_pruned=round(ppl["pruned"], 2))
    if "recovery" in report:
        rec = report["recovery"]
        row["recovery_seconds"] = round(rec["seconds"], 1)
        before = (rec.get("before") or {}).get("template_means")
        if before:
            row["held_out_before"] = round(before["held_out"]["pruned"], 4)
            row["calibration_before"] = round(before["calibration"]["pruned"], 4)
        ppl = (rec.get("validation_before") or {}).get("perplexity")
        if ppl and ppl["pruned"] is not None:
            row["ppl_before"] = round(ppl["pruned"], 2)
    row["compress_seconds"] = round(sum(v for k, v in report["timings_seconds"].items()
                                        if not k.startswith("evaluate")), 1)
    return row


def soft_pct(scores: dict[str, Any], digits: int | None = 1) -> float | None:
    """The probability of the right answer in % of dense's, from a report's `right_prob` (None in a report from
    before it)."""
    soft = scores.get("right_prob") or {}
    return None if soft.get("pruned") is None else percent_of_dense(soft["pruned"], soft["dense"], digits)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and min..max over seeds) of the held-out and calibration percentages per configuration and keep; the
    mean of the unrounded values (`_exact`; rows without it: the rounded ones)."""
    out = []
    for key in dict.fromkeys((r["config"], r["keep"]) for r in rows):
        group = [r for r in rows if (r["config"], r["keep"]) == key]
        entry: dict[str, Any] = {"config": key[0], "keep": key[1], "runs": len(group)}
        for col in ("held_out_pruned", "held_out_pct", "worst_held_out_pct", "calibration_pct", "held_out_soft_pct",
                    "calibration_soft_pct"):
            values = [r[col] for r in group if r.get(col) is not None]  # None: no % of a dense score of 0
            exact = [(r.get("_exact") or {}).get(col, r.get(col)) for r in group if r.get(col) is not None]
            spread = f" ({min(values)}..{max(values)})" if len(values) > 1 else ""
            mean = round(statistics.fmean(exact), 4 if col == "held_out_pruned" else 1) if values else None
            entry[col] = None if mean is None else f"{mean}{spread}"
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--keeps", default="0.75,0.5,0.35,0.25")
    p.add_argument("--configs", default="default,flap+recon,flap,wanda-sp,random")
    p.add_argument("--seeds", default="0,5,10", help="networks.seed of the ICA rows (networks.runs pooled runs each)")
    p.add_argument("--num-samples", type=int, help="calibration prompts (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. networks.engine=sklearn (repeatable)")
    p.add_argument("--wikitext", help="WikiText-2 raw file: also report both models' perplexity")
    p.add_argument("--work", default="evaluation/.runs", help="run folders (a finished one is reused only for the "
                   "same code and recipe)")
    p.add_argument("--out-prefix", default="evaluation/results/templates_sst2",
                   help="where the tables go (the default and other files under evaluation/results are committed)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    keeps, seeds = numbers(p, "--keeps", args.keeps, float), numbers(p, "--seeds", args.seeds, int)
    from fnprune.errors import FnpruneError

    try:
        extra = parse_overrides(args.set, args.wikitext)
        plan = [(keep, config, seed) for keep in keeps for config in args.configs.split(",")
                for seed in (seeds if uses_ica(config, args.task, extra) else [0])]
        for keep, config, seed in plan:  # every run's recipe checked before the first one starts
            run_recipe(args, config, keep, seed, extra)[1].validate()
        rows = []
        for keep, config, seed in plan:
            rows.append(run_one(args, config, keep, seed, extra))
            print(json.dumps(rows[-1]), flush=True)
    except FnpruneError as exc:
        raise SystemExit(f"benchmark: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("benchmark: interrupted; finished runs are kept in --work, rerun to go on") from None
    command = "python -m evaluation.benchmark " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_rows(Path(args.out_prefix), command, rows)
    plot_keeps(rows, with_extension(Path(args.out_prefix), ".png"), args.task)
    print(write_rows(Path(args.out_prefix + "_summary"), command, summary(rows)))


def plot_keeps(rows: list[dict[str, Any]], path: Path, task: str) -> None:
    """PNG: held-out and calibration template means (% of dense) against keep, one line per configuration, the
    mean over seeds with their min..max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("held_out_pct", "held-out templates"), ("calibration_pct", "calibration templates"))
    for ax, (col, title) in zip(axes, panels):
        for config in dict.fromkeys(r["config"] for r in rows):
            keeps = sorted({r["keep"] for r in rows if r["config"] == config})
            values = [[r[col] for r in rows if (r["config"], r["keep"]) == (config, k) and r[col] is not None]
                      for k in keeps]
            keeps, values = [k for k, v in zip(keeps, values) if v], [v for v in values if v]
            mean = [statistics.fmean(v) for v in values]
            spread = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
            ax.errorbar(keeps, mean, yerr=spread, marker="o", capsize=3, label=config)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("keep (fraction of MLP neurons)")
        ax.set_title(f"{task}: {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy, % of dense")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
