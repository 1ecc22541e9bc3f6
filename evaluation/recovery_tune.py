"""Choose recovery's settings without the evaluation split or the held-out templates: each setting trains the
product's recovery (`fnprune.distillation.recover`) on a checkpoint's own calibration prompts and is scored by
the distillation divergence from the dense model on other train-split rows (calibration templates only).

    python -m evaluation.recovery_tune --model ~/.cache/fnprune-models/smollm2-135m-instruct \
        --pruned evaluation/.runs/sst2-default-k0.5-s0 --set lr=1e-4,3e-4,1e-3

`--pruned` is a compress output without recovery; its recipe.yaml gives the task, the calibration prompts and
the recovery defaults. Writes PREFIX.json / PREFIX.md with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from evaluation.tables import write_rows
from fnprune.yaml_io import read_value


def main(argv: list[str] | None = None) -> None:
    from fnprune.arch import layout_for
    from fnprune.data import load_sample, resolve_task
    from fnprune.distillation import divergences, recover, teacher_targets
    from fnprune.inputs import calibration_prompts
    from fnprune.models import load_model
    from fnprune.recipe import load_recipe
    from fnprune.recovery import recovery_inputs, teacher

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the dense model the checkpoint was pruned from")
    p.add_argument("--pruned", required=True)
    p.add_argument("--set", action="append", default=[], help="FIELD=V1,V2 of recovery (one row per value)")
    p.add_argument("--tune-prompts", type=int, default=256)
    p.add_argument("--out-prefix", default="evaluation/results/recovery_tune_sst2")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    recipe = load_recipe(Path(args.pruned) / "recipe.yaml")
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=args.model))
    task = resolve_task(recipe.task)
    cal = recipe.calibration
    calibration = calibration_prompts(task, cal)
    seen = {e.texts for e in calibration}
    pool = load_sample(task, task.calibration_split, cal.num_samples + 4 * args.tune_prompts, cal.seed + 1)
    tune = [e for e in pool if e.texts not in seen][: args.tune_prompts]  # other rows, calibration templates
    dense, tokenizer = load_model(recipe.model)
    targets = teacher(dense, tokenizer, calibration, recipe, task, progress=True)
    tune_seqs = recovery_inputs(tokenizer, dense, tune, recipe)
    tune_targets = teacher_targets(dense, tune_seqs, recipe.recovery.top_k, cal.batch_size, progress=True)
    del dense

    def divergence(model) -> dict[str, float]:
        """Mean KL over all tokens and at the answer positions, batch by batch (one forward pass per batch)."""
        parts = []
        with torch.no_grad():
            for i in range(0, len(tune_seqs), 16):
                kl, ends = divergences(model, tune_seqs, tune_targets, list(range(i, min(i + 16, len(tune_seqs)))))
                parts.append((kl.mean().item(), kl[ends].mean().item()))
        return {"kl_tokens": round(sum(a for a, _ in parts) / len(parts), 5),
                "kl_answer": round(sum(b for _, b in parts) / len(parts), 5)}

    settings = [{}]
    for item in args.set:
        name, _, values = item.partition("=")
        kind = type(getattr(recipe.recovery, name))  # the field's type: "1e-4" is a float here, not YAML's string
        settings = [{**s, name: kind(read_value(v, name)) if kind is not type(None) else read_value(v, name)}
                    for s in settings for v in values.split(",")]
    rows = []
    pruned_spec = dataclasses.replace(recipe.model, name_or_path=str(Path(args.pruned).resolve()), revision=None)
    student, _ = load_model(pruned_spec)
    rows.append({"setting": "before recovery", **divergence(student)})
    print(json.dumps(rows[-1]), flush=True)
    train_seqs = None
    for s in settings:
        student, _ = load_model(pruned_spec)
        train_seqs = train_seqs or recovery_inputs(tokenizer, student, calibration, recipe)
        spec = dataclasses.replace(recipe.recovery, enabled=True, **s)
        start = time.perf_counter()
        result = recover(student, layout_for(student), train_seqs, targets, spec, progress=True)
        rows.append({"setting": ", ".join(f"{k}={v}" for k, v in s.items()) or "recipe defaults",
                     **divergence(student), "steps": result.steps, "loss_last": result.loss_last,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    command = "python -m evaluation.recovery_tune " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(write_rows(Path(args.out_prefix), command, rows))


if __name__ == "__main__":
    main()
