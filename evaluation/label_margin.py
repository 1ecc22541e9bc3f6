"""Where a two-label task's accuracy goes under each template: the threshold-free ranking (AUC of the label words'
log-odds, label 1 minus label 0) and where the decision threshold sits (their mean, the share answered label 1).

A model can keep the ranking of texts and still fall to chance under a wording whose log-odds sit near zero:
a small shift of the mean turns every answer into one label. This scores checkpoints written by
`fnprune.compress` (each folder's recipe names the task and data) and the dense model beside them, optionally
also the dense model in bfloat16, a change nobody calls a loss of the task, to show how far such a shift goes.

    python -m evaluation.label_margin --model ~/.cache/fnprune-models/smollm2-135m-instruct --bf16 \
        --pruned evaluation/.runs/sst2-default-k0.75-s0 evaluation/.runs/sst2-default-k0.5-s0 \
        --out-prefix evaluation/results/label_margin_sst2
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def margin_rows(name: str, result, sets: dict, held_out: set[str], positive: str) -> list[dict[str, Any]]:
    """One row per template: accuracy, AUC and the log-odds' mean and spread (binary tasks only; `positive` is the
    key of the second label, the scores' second column)."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for template, r in result.by_template.items():
        odds = (r.scores[:, 1] - r.scores[:, 0]).double()
        labels = [int(e.label == positive) for e in sets[template]]
        rows.append({"model": name, "template": template + ("*" if template in held_out else ""),
                     "accuracy": round(r.accuracy, 4), "auc": round(float(roc_auc_score(labels, odds.numpy())), 4),
                     "mean_log_odds": round(float(odds.mean()), 3), "sd_log_odds": round(float(odds.std()), 3),
                     "label_1_share": round(float((odds > 0).double().mean()), 4)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the dense model the checkpoints were pruned from")
    p.add_argument("--pruned", nargs="+", required=True, help="folders written by fnprune compress")
    p.add_argument("--bf16", action="store_true", help="also score the dense model in bfloat16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out-prefix", default="evaluation/results/label_margin")
    args = p.parse_args(argv)

    from evaluation.tables import write_rows
    from fnprune.data import label_keys, load_evaluation
    from fnprune.errors import FnpruneError
    from fnprune.evaluate import evaluate_templates
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec, load_recipe
    from fnprune.tasks import resolve_task

    torch.set_flush_denormal(True)
    try:
        task = resolve_task(load_recipe(Path(args.pruned[0]) / "recipe.yaml").task)
    except FnpruneError as exc:
        p.error(f"--pruned {args.pruned[0]}: {exc} (give folders written by fnprune compress)")
    if len(task.label_words) != 2 or task.kind != "classification":
        p.error(f"{task.name}: label margins need a two-label classification task")
    sets = load_evaluation(task, task.evaluation_split)
    held_out = {t.name for t in task.held_out_templates()}
    positive = label_keys(task, next(iter(sets.values())))[1]
    models = [("dense", ModelSpec(name_or_path=args.model))]
    models += [("dense bf16", ModelSpec(name_or_path=args.model, dtype="bfloat16"))] if args.bf16 else []
    models += [(Path(f).name, ModelSpec(name_or_path=str(f))) for f in args.pruned]
    rows: list[dict[str, Any]] = []
    for name, spec in models:
        model, tok = load_model(spec)
        result = evaluate_templates(model, tok, sets, task, args.batch_size, progress=False)
        rows += margin_rows(name, result, sets, held_out, positive)
        held = [r for r in rows if r["model"] == name and r["template"].endswith("*")]
        print(f"{name}: held-out accuracy {statistics.fmean(r['accuracy'] for r in held):.4f}, "
              f"AUC {statistics.fmean(r['auc'] for r in held):.4f}", flush=True)
    command = "python -m evaluation.label_margin " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(write_rows(Path(args.out_prefix), command, rows))


if __name__ == "__main__":
    main()
