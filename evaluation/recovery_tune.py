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
from typing import TYPE_CHECKING, Any

import torch

from evaluation.tables import write_rows
from fnprune.yaml_io import read_value

if TYPE_CHECKING:
    from fnprune.data import Example
    from fnprune.distillation import TeacherTargets
    from fnprune.recipe import Recipe, RecoverySpec, TaskSpec

# the recovery settings fnprune.recovery.teacher reads: a row that changes one needs a teacher of its own
TEACHER_FIELDS = ("top_k", "label_target", "label_weight")


def parse_settings(items: list[str], defaults: RecoverySpec) -> list[dict[str, Any]]:
    """`--set FIELD=V1,V2` (repeatable) as one dict per combination, each value of its field's type (so "1e-4" is
    a float here, not YAML's string). An unknown field or a missing `=` is one line (SystemExit)."""
    settings: list[dict[str, Any]] = [{}]
    fields = [f.name for f in dataclasses.fields(defaults)]
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"recovery_tune: --set {item!r}: expected FIELD=V1,V2, FIELD one of {', '.join(fields)}")
        kind = type(getattr(defaults, name))
        settings = [{**s, name: kind(read_value(v, name)) if kind is not type(None) else read_value(v, name)}
                    for s in settings for v in values.split(",")]
    return settings


def teacher_key(spec: RecoverySpec) -> tuple:
    return tuple(getattr(spec, name) for name in TEACHER_FIELDS)


def teachers(dense, tokenizer, calibration: list[Example], recipe: Recipe, task: TaskSpec,
             settings: list[dict[str, Any]]) -> dict[tuple, TeacherTargets]:
    """The product's teacher for each row's recovery settings, once per distinct teacher setting: a row varying
    label_target, label_weight or top_k is trained toward the targets compress would build for it."""
    from fnprune.recovery import teacher

    out: dict[tuple, TeacherTargets] = {}
    for s in settings:
        spec = dataclasses.replace(recipe.recovery, enabled=True, **s)
        if teacher_key(spec) not in out:
            out[teacher_key(spec)] = teacher(dense, tokenizer, calibration, dataclasses.replace(recipe, recovery=spec),
                                             task, progress=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from fnprune.arch import layout_for
    from fnprune.data import load_sample, resolve_task
    from fnprune.distillation import divergences, recover, teacher_targets
    from fnprune.inputs import calibration_prompts, evaluation_texts
    from fnprune.models import load_model
    from fnprune.recipe import load_recipe
    from fnprune.recovery import recovery_inputs

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
    held = evaluation_texts(task, recipe.evaluation.enabled)  # never trained or scored on here, as in compress
    calibration = calibration_prompts(task, cal, held)  # the checkpoint's own
    seen = {e.texts for e in calibration}
    pool = load_sample(task, task.calibration_split, cal.num_samples + 4 * args.tune_prompts, cal.seed + 1,
                       exclude=held)
    tune = [e for e in pool if e.texts not in seen][: args.tune_prompts]  # other rows, calibration templates
    settings = parse_settings(args.set, recipe.recovery)
    dense, tokenizer = load_model(recipe.model)
    targets = teachers(dense, tokenizer, calibration, recipe, task, settings)
    tune_seqs = recovery_inputs(tokenizer, dense, tune, recipe)  # the yardstick: the checkpoint's own top_k
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
        result = recover(student, layout_for(student), train_seqs, targets[teacher_key(spec)], spec, progress=True)
        rows.append({"setting": ", ".join(f"{k}={v}" for k, v in s.items()) or "recipe defaults",
                     **divergence(student), "steps": result.steps, "loss_last": result.loss_last,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    command = "python -m evaluation.recovery_tune " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(write_rows(Path(args.out_prefix), command, rows))


if __name__ == "__main__":
    main()
