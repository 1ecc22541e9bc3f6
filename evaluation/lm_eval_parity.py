"""fnprune's own scorer against lm-evaluation-harness on the same local data and prompts (RESULTS.md, "Parity").

Runs `lm_eval` offline on the local task YAMLs in evaluation/lm_eval_tasks (lm-eval 0.4.13's prompts over the
files in ../shared/data) and fnprune's `evaluate_templates` with each task's `lm-eval` template on the same rows,
then writes PREFIX.{json,md} (default evaluation/results/lm_eval_parity): acc and acc_norm of both, and per
example the largest difference of the choices' log-likelihoods (from lm-eval's logged samples). Reused results
(--skip-lm-eval, --skip-fnprune) must be the same model's and hold every task asked for.

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 nice -n 19 env OMP_NUM_THREADS=1 \
        python -m evaluation.lm_eval_parity --model ~/.cache/fnprune-models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

try:  # as `python evaluation/lm_eval_parity.py` or `python -m evaluation.lm_eval_parity` (documented)
    from tables import with_extension, write_file
except ImportError:
    from .tables import with_extension, write_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the task YAMLs read ../shared/data from the repository root (lm-eval runs there): fnprune's side reads the same
DATA_ROOT = ROOT.parent / "shared" / "data"
TASK_DIR = HERE / "lm_eval_tasks"
OUT = HERE / "results"

# lm-eval task -> (fnprune task, data folder under ../shared/data, split, rows: None = all). The same rows as
# the YAMLs read: SST-2 dev, BoolQ val's first 500 rows, COPA val, the ARC Dev files.
TASKS = {
    "fnp_sst2": ("sst2", "sst2", "validation", None),
    "fnp_boolq": ("boolq", "superglue_boolq", "validation", 500),
    "fnp_copa": ("copa", "superglue_copa", "validation", None),
    "fnp_arc_easy": ("arc_easy", "arc_easy", "validation", None),
    "fnp_arc_challenge": ("arc_challenge", "arc_challenge", "validation", None),
    # lm-eval's prompt over the sentences as read (their trailing space kept): fnprune strips text fields, so
    # this one shows what that space does, not scorer parity; asked for by name only (--tasks)
    "fnp_sst2_raw": ("sst2", "sst2", "validation", None),
}
DEFAULT_TASKS = [t for t in TASKS if t != "fnp_sst2_raw"]


def lm_eval_command(model: str, out: Path, batch_size: int, tasks: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model},dtype=float32", "--include_path", str(TASK_DIR.relative_to(ROOT)),
        "--tasks", ",".join(tasks), "--device", "cpu", "--batch_size", str(batch_size), "--log_samples",
        "--output_path", str(out),
    ]


def run_lm_eval(model: str, out: Path, batch_size: int, tasks: list[str]) -> None:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(lm_eval_command(model, out, batch_size, tasks), cwd=ROOT, env=env, check=True)


def lm_eval_model(results: dict) -> str | None:
    """The `pretrained=` model an lm-eval results file was run on (its model_args: a dict, or a string in older
    versions)."""
    args = results.get("config", {}).get("model_args")
    if isinstance(args, str):
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    return args.get("pretrained") if isinstance(args, dict) else results.get("model_name")


def read_lm_eval(out: Path, model: str, tasks: list[str],
                 batch_size: int) -> tuple[dict[str, dict], dict[str, dict[int, list[float]]]]:
    """(task -> {acc, acc_norm}, task -> {doc_id: choice log-likelihoods}) from the lm-eval outputs under `out`,
    the newest run of each task on `model` at `batch_size` (padding moves the last digits of a log-likelihood);
    stops in one line when a task has no such run (a shared --lm-eval-out may hold other models' runs, or runs at
    another batch size: they are never read as this one's)."""
    metrics: dict[str, dict] = {}
    samples: dict[str, dict[int, list[float]]] = {}
    others: set[str] = set()
    for path in sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime):  # later runs replace earlier
        stamp = path.stem.removeprefix("results_")
        data = json.loads(path.read_text())
        batch = str(data.get("config", {}).get("batch_size"))
        if lm_eval_model(data) != model or batch != str(batch_size):
            others.add(f"{lm_eval_model(data)} at batch size {batch}")
            continue
        for task, r in data["results"].items():
            if task not in tasks:
                continue
            metrics[task] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none")}
            logged = path.parent / f"samples_{task}_{stamp}.jsonl"
            if logged.is_file():
                rows = [json.loads(line) for line in logged.read_text().splitlines() if line.strip()]
                samples[task] = {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in rows}
    missing = [t for t in tasks if t not in metrics]
    if missing:
        held = f" (it holds runs of {', '.join(sorted(others))})" if others else ""
        raise SystemExit(f"no lm-eval results of {model} for {', '.join(missing)} under {out}{held}")
    return metrics, samples


def saved_scores(path: Path, model: str, tasks: list[str], batch_size: int) -> dict[str, dict]:
    """fnprune's scores from an earlier run (--skip-fnprune), refused in one line when they are another model's,
    at another batch size, or lack a task asked for."""
    if not path.is_file():
        raise SystemExit(f"no fnprune scores at {path}: run without --skip-fnprune")
    saved = json.loads(path.read_text())
    if saved.get("model") != model:
        whose = f"of {saved['model']}" if "model" in saved else "of an unnamed model (an older version's file)"
        raise SystemExit(f"{path} holds fnprune's scores {whose}, not {model}: run without --skip-fnprune")
    if saved.get("batch_size") != batch_size:
        at = saved.get("batch_size", "unknown (an older version's file)")
        raise SystemExit(f"{path} holds fnprune's scores at batch size {at}, not {batch_size}: run without "
                         "--skip-fnprune")
    missing = [t for t in tasks if t not in saved["scores"]]
    if missing:
        raise SystemExit(f"{path} has no fnprune scores for {', '.join(missing)}: run without --skip-fnprune")
    return {t: saved["scores"][t] for t in tasks}


def fnprune_scores(model_dir: str, data_root: Path, batch_size: int, tasks: list[str]) -> dict[str, dict]:
    """fnprune's acc, acc_norm and per-example scores under each task's `lm-eval` template, same rows."""
    import torch

    from fnprune.data import load_evaluation, resolve_task
    from fnprune.evaluate import evaluate_templates
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec, TaskSpec

    torch.set_flush_denormal(True)
    model, tokenizer = load_model(ModelSpec(name_or_path=model_dir))
    out = {}
    for name in tasks:
        task_name, folder, split, rows = TASKS[name]
        task = resolve_task(TaskSpec(name=task_name, data_dir=str(data_root / folder)))
        task = dataclasses.replace(task, split_of=None)  # the whole file (or its first rows), as lm-eval reads it
        sets = {"lm-eval": load_evaluation(task, split, rows)["lm-eval"]}
        start = time.perf_counter()
        r = evaluate_templates(model, tokenizer, sets, task, batch_size, progress=False).by_template["lm-eval"]
        out[name] = {"acc": r.accuracy, "acc_norm": r.accuracy_norm, "n": r.n,
                     "seconds": round(time.perf_counter() - start, 1), "scores": r.scores.tolist()}
        print(f"{name}: fnprune acc {r.accuracy:.4f} acc_norm {r.accuracy_norm:.4f} (n={r.n})", flush=True)
    return out


def compare(ours: dict[str, dict], theirs: dict[str, dict], samples: dict[str, dict[int, list[float]]]) -> list[dict]:
    table = []
    for name, mine in ours.items():
        other = theirs.get(name, {})
        diffs, argmax_differs = [], 0
        for i, lls in samples.get(name, {}).items():
            own = [x for x in mine["scores"][i] if x != float("-inf")]
            diffs.append(max(abs(a - b) for a, b in zip(own, lls)))
            argmax_differs += own.index(max(own)) != lls.index(max(lls))
        table.append({
            "task": name, "n": mine["n"],
            "fnprune_acc": mine["acc"], "lm_eval_acc": other.get("acc"),
            "fnprune_acc_norm": mine["acc_norm"], "lm_eval_acc_norm": other.get("acc_norm"),
            "max_abs_loglik_diff": max(diffs) if diffs else None,
            "examples_compared": len(diffs), "argmax_differs": argmax_differs if diffs else None,
        })
    return table


def markdown(table: list[dict], command: str, lm_eval: str, model: str) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"fnprune's scorer vs lm-eval 0.4.13 on `{model}` (float32, CPU), same local rows and prompts.",
        "", f"Command: `{command}`", "", f"lm-eval: `{lm_eval}`", "",
        "| task | n | fnprune acc | lm-eval acc | fnprune acc_norm | lm-eval acc_norm | max abs log-lik diff |"
        " argmax differs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        diff = "n/a" if r["max_abs_loglik_diff"] is None else f"{r['max_abs_loglik_diff']:.2e}"
        lines.append(f"| {r['task']} | {r['n']} | {f(r['fnprune_acc'])} | {f(r['lm_eval_acc'])} | "
                     f"{f(r['fnprune_acc_norm'])} | {f(r['lm_eval_acc_norm'])} | {diff} | {r['argmax_differs']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"of {', '.join(TASKS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lm-eval-out", default="/tmp/fnprune-lm-eval-parity")
    ap.add_argument("--skip-lm-eval", action="store_true", help="Read an earlier lm-eval run from --lm-eval-out.")
    ap.add_argument("--skip-fnprune", action="store_true",
                    help="Read fnprune's scores saved by an earlier run in --lm-eval-out.")
    ap.add_argument("--out-prefix", default=str(OUT / "lm_eval_parity"), help="results go to PREFIX.json and PREFIX.md")
    args = ap.parse_args(argv)
    path = Path(args.model).expanduser()
    model = str(path.resolve()) if path.exists() else args.model  # lm-eval runs from the repository root
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if unknown := [t for t in tasks if t not in TASKS]:
        ap.error(f"--tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    out = Path(args.lm_eval_out).expanduser().resolve()  # where lm-eval writes it, from the repository root
    saved = out / "fnprune_scores.json"
    if args.skip_fnprune:
        ours = saved_scores(saved, model, tasks, args.batch_size)
    else:
        ours = fnprune_scores(model, DATA_ROOT, args.batch_size, tasks)
        out.mkdir(parents=True, exist_ok=True)
        write_file(saved, json.dumps({"model": model, "batch_size": args.batch_size, "scores": ours}))
    if not args.skip_lm_eval:
        run_lm_eval(model, out, args.batch_size, tasks)
    theirs, samples = read_lm_eval(out, model, tasks, args.batch_size)
    table = compare(ours, theirs, samples)
    command = "python -m evaluation.lm_eval_parity " + shlex.join(sys.argv[1:] if argv is None else argv)
    lm_eval = "python " + shlex.join(lm_eval_command(model, out, args.batch_size, tasks)[1:])
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_file(with_extension(prefix, ".json"), json.dumps(
        {"model": model, "command": command, "lm_eval_command": lm_eval, "rows": table}, indent=2) + "\n")
    write_file(with_extension(prefix, ".md"), markdown(table, command, lm_eval, model))
    print(markdown(table, command, lm_eval, model))


if __name__ == "__main__":
    main()
