"""Does a task's label-separation relevance (networks.relevance: labels) carry label information? Each layer's
network relevance with the calibration prompts' true labels against the same with shuffled labels.

    python -m evaluation.relevance_null --model ~/.cache/fnprune-models/smollm2-135m-instruct \
        --task arc_easy --data-dir ../shared/data/arc_easy

Calibration and networks come from `fnprune.calibration.calibrate` with the recipe's defaults (from fnprune's
cache when an earlier run calibrated the same way): the networks a network method (`selection.method` fn-task or
fn) selects with. The default method (auto: flap) finds no networks and reads no relevance. Writes
PREFIX.{json,md,csv}: one row per layer, then the mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from evaluation.tables import write_rows
from fnprune.calibration import calibrate, template_groups
from fnprune.data import label_keys
from fnprune.inputs import load_inputs
from fnprune.networks import network_relevance
from fnprune.recipe import Recipe, apply_overrides


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--shuffles", type=int, default=5, help="label permutations per layer (seeded)")
    p.add_argument("--out-prefix", default=None, help="default evaluation/results/relevance_null_TASK")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    recipe = apply_overrides(Recipe(), {"model.name_or_path": args.model, "task.name": args.task,
                                        "task.data_dir": args.data_dir, "output.dir": "unused",
                                        "evaluation.enabled": False})
    inputs = load_inputs(recipe)
    calib = calibrate(inputs.model, inputs.tokenizer, inputs.prompts,
                      dict.fromkeys(label_keys(inputs.task, inputs.prompts), ""), inputs.recipe, progress=False,
                      use_cache=True)
    groups = template_groups(inputs.prompts) if inputs.recipe.networks.relevance_within_template else None
    rng = np.random.default_rng(0)
    rows = []
    for i, (nets, acts) in enumerate(zip(calib.networks, calib.activations)):
        decision = acts.decision.numpy()
        true = network_relevance(nets.maps, decision, calib.labels, groups)
        shuffled = [network_relevance(nets.maps, decision, rng.permutation(calib.labels), groups).mean()
                    for _ in range(args.shuffles)]
        rows.append({"layer": i, "true_mean": round(float(true.mean()), 4),
                     "shuffled_mean": round(statistics.fmean(shuffled), 4),
                     "shuffled_max": round(max(shuffled), 4),
                     "above_every_shuffle": bool(true.mean() > max(shuffled))})
    rows.append({"layer": "mean", "true_mean": round(statistics.fmean(r["true_mean"] for r in rows), 4),
                 "shuffled_mean": round(statistics.fmean(r["shuffled_mean"] for r in rows), 4),
                 "shuffled_max": None, "above_every_shuffle": sum(r["above_every_shuffle"] for r in rows)})
    prefix = Path(args.out_prefix or f"evaluation/results/relevance_null_{args.task}")
    command = "python -m evaluation.relevance_null " + " ".join(argv or sys.argv[1:])
    print(write_rows(prefix, command, rows))


if __name__ == "__main__":
    main()
