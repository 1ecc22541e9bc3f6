"""Choose a setting on the calibration split alone: its rows are cut in two (`task.split_of`), the product's compress
calibrates on one part and the other part is scored under the calibration templates only. Neither the evaluation
split nor any held-out template is read, so what this picks can become a default. With `--hold-template NAME`
that calibration template is kept out of calibration too and scored beside the others: how a setting carries to
a wording it never saw, still without the task's held-out templates. Beside accuracy, the `soft_` columns score
the probability each model puts on the right answer (softmax over the choices' scores): every row moves it, not
only rows whose answer flips, so it can separate two settings that accuracy on a few hundred rows cannot.

    python -m evaluation.calibration_tune --model ~/.cache/fnprune-models/smollm2-135m-instruct --task arc_easy \
        --data-dir ../shared/data/arc_easy --vary calibration.choices=none,answer,all --keep 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evaluation.benchmark import (
    CONFIGS,
    PROBE,
    finished_here,
    mark_finished,
    numbers,
    overrides_suffix,
    parse_overrides,
)
from evaluation.compare import paired_difference
from evaluation.tables import write_rows
from fnprune.yaml_io import read_value


def _accuracies(model_path: str, task, names: list[str], max_samples: int, batch_size: int, quiet: bool
                ) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Accuracy per template `names` on the tuning part (the carved evaluation part of the calibration split), and
    each template's per-row answers and probabilities of the right answer (for paired differences)."""
    from fnprune.data import load_evaluation
    from fnprune.evaluate import evaluate_templates
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    sets = {n: ex[:max_samples] for n, ex in load_evaluation(task, task.evaluation_split).items() if n in names}
    model, tok = load_model(ModelSpec(name_or_path=model_path))
    result = evaluate_templates(model, tok, sets, task, batch_size, progress=not quiet)
    return ({n: round(r.accuracy, 4) for n, r in result.by_template.items()},
            {n: r.hits for n, r in result.by_template.items()},
            {n: r.right_probs for n, r in result.by_template.items()})


def _paired(dense: dict[str, torch.Tensor], first: dict[str, torch.Tensor], this: dict[str, torch.Tensor],
            names: list[str]) -> str | None:
    """This setting minus the first one over `names`, in points of dense with a 95% paired interval."""
    difference, interval = paired_difference(*(torch.stack([h[n] for n in names]) for h in (dense, first, this)))
    return None if difference is None or interval is None else f"{difference:+.1f} ({interval})"


def _exact(dense: dict[str, torch.Tensor], first: dict[str, torch.Tensor], this: dict[str, torch.Tensor],
           names: list[str]) -> tuple[float | None, float | None]:
    """This setting's % of dense and its difference from the first setting in points of dense over `names`,
    unrounded (what the mean over cuts averages; the tables show them rounded)."""
    mean = lambda h: torch.stack([h[n].double() for n in names]).mean().item()  # noqa: E731
    base = mean(dense)
    return (None, None) if not base else (100 * mean(this) / base, 100 * (mean(this) - mean(first)) / base)


def main(argv: list[str] | None = None, command: str | None = None, variant: str | None = None) -> None:
    """`command`: the command line written beside the results, when a wrapper (a probe) ran this; `variant`: what
    the probe changes outside the recipe (its run folders get names of their own)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--task", help="a built-in task (default: the --recipe's task, else sst2)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--config", default="default", choices=list(CONFIGS), help="the benchmark's configuration")
    p.add_argument("--vary", required=True, action="append", metavar="KEY=V1,V2",
                   help="a recipe key and the values to compare (repeatable: each key varied alone, dense scored once)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    p.add_argument("--recipe", help="a recipe every run starts from (e.g. a task with its own templates); the flags "
                   "above override it")
    p.add_argument("--hold-template", metavar="NAME", help="a calibration template kept out of calibration and scored")
    p.add_argument("--share", type=float, default=0.5, help="share of the calibration split's rows calibrated on")
    p.add_argument("--split-seeds", default="0", metavar="S1,S2", help="cuts of the calibration split "
                   "(task.split_seed), each run in turn, and the mean over them (default 0: one cut)")
    p.add_argument("--max-samples", type=int, default=200, help="tuning rows scored per template")
    p.add_argument("--work", default="evaluation/.runs")
    p.add_argument("--out-prefix", default="evaluation/results/calibration_tune")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from fnprune.provenance import file_sha256
    from fnprune.recipe import Recipe, apply_overrides, load_recipe

    seeds = numbers(p, "--split-seeds", args.split_seeds, int)
    torch.set_flush_denormal(True)
    if bad := [v for v in args.vary if not v.partition("=")[0] or not v.partition("=")[2]]:
        p.error(f"--vary {bad[0]!r}: expected KEY=V1,V2 (a dotted recipe key and the values to compare)")
    if not 0 < args.share < 1:
        p.error(f"--share: must be in (0, 1), got {args.share}")
    varied = [(key, value) for key, _, values in (v.partition("=") for v in args.vary) for value in values.split(",")]
    from fnprune.errors import FnpruneError

    rows: list[dict[str, Any]] = []
    try:
        fixed = parse_overrides(args.set, None)
        start = load_recipe(args.recipe) if args.recipe else Recipe()
        start_key = {"recipe": file_sha256(Path(args.recipe))[:8]} if args.recipe else {}  # runs get own folders
        start_key.update({"probe": variant} if variant else {})
        args.task = args.task or (start.task.name if args.recipe else "sst2")
        for key, value in varied:  # a mistyped key or value stops here, not after the first runs
            apply_overrides(start, {**fixed, key: read_value(value, key)})
        for seed in seeds:  # seed 0 is the task's default cut: its folders are named as before cuts were listed
            cut_fixed = {**fixed, "task.split_seed": seed} if seed else fixed
            cut = _tune_cut(args, p, start, start_key, cut_fixed, varied)
            rows += [{"cut": seed, **r} for r in cut] if len(seeds) > 1 else cut
    except FnpruneError as exc:
        raise SystemExit(f"calibration_tune: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("calibration_tune: interrupted; finished runs are kept in --work, rerun to go on") from None
    if len(seeds) > 1:
        rows += _mean_over_cuts(rows, varied, bool(args.hold_template))
    command = command or "python -m evaluation.calibration_tune " + " ".join(sys.argv[1:] if argv is None else argv)
    write_rows(Path(args.out_prefix), command, rows)
    print(json.dumps(rows, indent=1))


def print_probe_help(probe: argparse.ArgumentParser) -> None:
    """A probe's `--help`: its own flags, then this tuning's, which the probe passes on."""
    probe.print_help()
    print("\nEvery other flag is evaluation.calibration_tune's:")
    main(["--help"])


def main_with_prompts(prompts: Callable, argv: list[str], work: str, command: str, variant: str) -> None:
    """`main` with compress's calibration prompts made by `prompts(task, spec, product)`, `product` being the
    product's own `calibration_prompts` (how a probe changes them; restored afterwards). `work`: the run folder
    unless `argv` gives one; `variant`: names the change (in the run folders' names)."""
    import fnprune.inputs

    product = fnprune.inputs.calibration_prompts
    fnprune.inputs.calibration_prompts = (  # what load_inputs calls (exclude: the evaluation split's texts)
        lambda task, spec, exclude=(): prompts(task, spec, functools.partial(product, exclude=exclude)))
    probe = Path(inspect.getsourcefile(prompts) or "")  # its code marks the runs: an edited probe runs anew
    PROBE["probe"] = hashlib.sha256(probe.read_bytes() if probe.is_file() else b"").hexdigest()
    try:
        main([*argv, *([] if "--work" in argv else ["--work", work])], command=command, variant=variant)
    finally:
        fnprune.inputs.calibration_prompts = product
        PROBE.clear()


def _mean(accuracy: dict[str, float], names: list[str]) -> float:
    return round(statistics.fmean(accuracy[n] for n in names), 4)


def _tune_cut(args: argparse.Namespace, p: argparse.ArgumentParser, start, start_key: dict[str, Any],
              fixed: dict[str, Any], varied: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One cut of the calibration split: dense, then every setting, scored on the cut's tuning part."""
    import fnprune
    from fnprune.recipe import apply_overrides, load_recipe
    from fnprune.tasks import resolve_task

    base = {"model.name_or_path": args.model, "task.name": args.task, "task.data_dir": args.data_dir,
            "evaluation.enabled": False, "selection.keep": args.keep, "output.overwrite": True, **CONFIGS[args.config],
            **fixed}
    task = resolve_task(apply_overrides(start, base).task)
    if task.split_of:
        p.error(f"{task.name} carves its calibration split from one file (task.split_of {task.split_of}); the tuning "
                "cuts the calibration split in two again, which needs a task whose calibration split is its own file")
    base.update({"task.split_of": task.calibration_split, "task.calibration_share": args.share})
    names = [t.name for t in task.calibration_templates()]
    if args.hold_template:
        if args.hold_template not in names:
            p.error(f"--hold-template: {args.hold_template!r} is not a calibration template ({', '.join(names)})")
        base["task.templates"] = [{**dataclasses.asdict(t), "held_out": t.held_out or t.name == args.hold_template}
                                  for t in task.templates]
    tuning_task = resolve_task(apply_overrides(start, base).task)
    rows: list[dict[str, Any]] = []
    dense, dense_hits, dense_probs = _accuracies(args.model, tuning_task, names, args.max_samples, 32, args.quiet)
    first_hits: dict[str, torch.Tensor] = {}
    first_probs: dict[str, torch.Tensor] = {}
    held = [args.hold_template] if args.hold_template else []
    calibrated = [n for n in names if n not in held]  # mean, pct, vs_first: the held template is its own column
    rows.append({"run": "dense", **dense, "mean": _mean(dense, calibrated), "pct": 100.0})
    hold_suffix = f"-hold-{args.hold_template}" if args.hold_template else ""
    for key, value in varied:
        setting = {key: read_value(value, key)}
        out = Path(args.work) / (f"tune-{args.task}-{args.config}-k{args.keep}{hold_suffix}"
                                 f"{overrides_suffix({**start_key, **fixed, **setting})}")
        recipe = apply_overrides(start, {**base, **setting, "output.dir": str(out)})
        if not finished_here(out, recipe):
            fnprune.compress(recipe, progress=not args.quiet)
            mark_finished(out, recipe)
        saved = resolve_task(load_recipe(out / "recipe.yaml").task)
        acc, hits, probs = _accuracies(str(out), saved, names, args.max_samples, 32, args.quiet)
        first_hits, first_probs = first_hits or hits, first_probs or probs  # differences are against the first
        row: dict[str, Any] = {"run": f"{key}={value}", **acc, "mean": _mean(acc, calibrated)}
        exact: dict[str, float | None] = {}  # unrounded, from the answers: the shown columns are these rounded
        for kind, per_row in (("", (dense_hits, first_hits, hits)), ("soft_", (dense_probs, first_probs, probs))):
            exact[f"{kind}pct"], exact[f"{kind}vs_first"] = _exact(*per_row, calibrated)
            if held:
                exact[f"held_{kind}pct"], exact[f"held_{kind}vs_first"] = _exact(*per_row, held)
        for column in ("pct", "held_pct", "soft_pct", "held_soft_pct"):
            if column in exact:
                row[column] = None if exact[column] is None else round(exact[column], 1)
        for kind, per_row in (("", (dense_hits, first_hits, hits)), ("soft_", (dense_probs, first_probs, probs))):
            row[f"{kind}vs_first"] = _paired(*per_row, calibrated)
            if held:
                row[f"held_{kind}vs_first"] = _paired(*per_row, held)
        rows.append({**row, "folder": out.name, "_exact": exact})
    return rows


def _mean_over_cuts(rows: list[dict[str, Any]], varied: list[tuple[str, str]], held: bool) -> list[dict[str, Any]]:
    """Per setting, the mean over cuts of its % of dense and of its paired differences against the first setting
    (points only: the cuts' tuning parts share rows, so their intervals do not combine as independent ones)."""
    out = []
    scored_here = lambda columns: [c for c in columns if held or not c.startswith("held_")]  # noqa: E731
    for key, value in varied:
        runs = [r for r in rows if r["run"] == f"{key}={value}"]
        mean: dict[str, Any] = {"cut": "mean", "run": f"{key}={value}"}
        exact = [r.get("_exact") or {} for r in runs]  # unrounded: a mean of rounded cuts is up to 0.1 off
        for column in scored_here(("pct", "held_pct", "soft_pct", "held_soft_pct")):
            if all(e.get(column) is not None for e in exact):
                mean[column] = round(statistics.fmean(e[column] for e in exact), 1)
        for column in scored_here(("vs_first", "held_vs_first", "soft_vs_first", "held_soft_vs_first")):
            if all(e.get(column) is not None for e in exact):
                mean[column] = f"{statistics.fmean(e[column] for e in exact):+.1f}"
        out.append(mean)
    return out


if __name__ == "__main__":
    main()
