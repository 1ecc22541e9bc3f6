"""`fnprune compress | evaluate | inspect`: a thin click shell over the Python API."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import FnpruneError, RecipeError


def _parse_data_files(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    from .data import parse_data_files

    try:
        return parse_data_files(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _parse_device_map(value: str | None) -> str | dict | None:
    """`auto`, `cpu`, ... as is; a JSON object ({"model.layers.9": "disk", ...}) as a mapping."""
    if not value or not value.lstrip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not a JSON object of module names to devices: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("expected a JSON object of module names to devices")
    return parsed


def _parse_validate(values: tuple[str, ...]) -> list[dict[str, str]] | None:
    """`--validate NAME=PATH`: a built-in task with its data folder, or wikitext with its raw file (or folder)."""
    if not values:
        return None
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise click.BadParameter(f"{value!r}: expected TASK=PATH, e.g. boolq=../shared/data/superglue_boolq")
        name, path = name.strip(), path.strip()
        where = "file" if name == "wikitext" and not Path(path).expanduser().is_dir() else "data_dir"
        out.append({"task": name, where: path})
    return out


def _parse_max_memory(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    out = {}
    for part in value.split(","):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise click.BadParameter(f"{part!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=32GiB")
        out[device.strip()] = size.strip()
    return out


_TASKS = ("sst2, rte, ag_news, boolq, cb, copa, wic, mrpc, qnli, cola, arc_easy, arc_challenge")
_DEVICE_MAP_HELP = ("Spread the model over GPUs, CPU and disk with accelerate: auto, balanced, sequential, cpu, or "
                    "a JSON object of module names to devices. Surgery then streams from the source files.")


def _friendly(fn: Callable) -> Callable:
    """User errors print one clear message (no traceback); Ctrl-C says nothing was written."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FnpruneError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # a full disk, a permission: the environment, which the user fixes
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except KeyboardInterrupt as exc:
            saved = f"; {exc}" if str(exc) else ""  # e.g. capture saved its progress
            click.echo(f"interrupted: no output was written{saved}", err=True)
            sys.exit(130)

    return wrapper


def _setup_logging(quiet: bool) -> None:
    import torch

    torch.set_flush_denormal(True)  # denormal floats slow CPU inference more than tenfold on some CPUs
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="fnprune: %(message)s")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _task_overrides(task: str | None, data_dir: str | None, data_files: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if task:
        out["task"] = {"name": task}
    if data_dir:
        out["task.data_dir"] = data_dir
        out["task.data_files"] = {}
    if data_files:
        out["task.data_files"] = data_files
        out["task.data_dir"] = None
    return out


@click.group()
@click.version_option(__version__, prog_name="fnprune")
def main() -> None:
    """Compress a transformer LM for one task by keeping its task functional networks."""


@main.command()
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="Recipe YAML; flags override it.")
@click.option("--task", help=f"Task name (built in: {_TASKS}; or defined in the recipe).")
@click.option("--model", help="Hub id, local Hugging Face folder, or .gguf file.")
@click.option("--data-dir", help="Folder with GLUE-style split files (train.tsv, dev.tsv, ...).")
@click.option("--data-files", help="SPLIT=PATH pairs, e.g. train=a.tsv,validation=b.tsv (tsv/csv/jsonl).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Model dtype (default float32).")
@click.option("--keep", type=float, help="Fraction of MLP neurons kept in every layer (default 0.5).")
@click.option("--sparsity", type=float, help="Fraction of MLP neurons removed (= 1 - keep).")
@click.option("--method", help="Selection criterion: fn-task (default), fn, random, magnitude, wanda-sp, flap.")
@click.option("--round-to", type=int, help="Round kept widths to a multiple of this (default 8).")
@click.option("--fn-boost", type=float,
              help="fn-task: weight of task-network membership (default 16; with --no-reconstruct 1 at keep >= 0.75).")
@click.option("--allocation", type=click.Choice(["uniform", "global"]),
              help="uniform: same width per layer (default); global: one ranking across layers.")
@click.option("--layout", "width_layout", type=click.Choice(["uniform", "per-layer", "padded"]),
              help="How per-layer widths are saved (default uniform; global allocation needs per-layer/padded).")
@click.option("--components", type=int, help="ICA components per layer (default 32).")
@click.option("--ica-engine", type=click.Choice(["sklearn", "torch"]),
              help="ICA implementation: torch (default; all layers batched) or sklearn (the reference).")
@click.option("--threshold", type=float, help="|z| above which a neuron belongs to a network (default 3).")
@click.option("--ica-runs", type=int, help="ICA runs per layer (seeds) whose networks are pooled (default 5).")
@click.option("--num-samples", type=int, help="Calibration examples from the train split (default 1024).")
@click.option("--max-tokens", type=int, help="Tokens sampled per layer for ICA and reconstruction (default 16384).")
@click.option("--sample-store", type=click.Choice(["auto", "tokens", "moments"]),
              help="Keep the token sample itself or only its d x d second moments (default auto: the smaller).")
@click.option("--batch-size", type=int, help="Calibration batch size (default 16).")
@click.option("--seed", type=int, help="Seed for calibration sampling, ICA and random selection.")
@click.option("--bias-compensation/--no-bias-compensation", default=None,
              help="Fold the removed neurons' mean output into the MLP bias (default: when the model allows).")
@click.option("--reconstruct/--no-reconstruct", default=None,
              help="Rebuild removed neurons from kept ones by least squares, folded into the weights (default on).")
@click.option("--ridge", type=float, help="Ridge of that least-squares fit, relative (default 0.1).")
@click.option("--eval/--no-eval", "do_eval", default=None, help="Evaluate dense and pruned models (default on).")
@click.option("--eval-samples", type=int, help="Evaluate on the first N evaluation examples only.")
@click.option("--validate", multiple=True, metavar="TASK=PATH",
              help="Also score this benchmark dense and pruned: a built-in task and its data folder, or "
                   "wikitext=FILE (perplexity). Repeatable.")
@click.option("--perplexity-tokens", type=int, help="WikiText tokens scored with --validate wikitext (default 16384).")
@click.option("--perplexity-window", type=int, help="Window of that perplexity, in tokens (default 512).")
@click.option("--cache/--no-cache", default=None,
              help="Reuse calibration activations and networks from $FNPRUNE_CACHE_DIR (default on).")
@click.option("--output", help="Output directory for the pruned checkpoint.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output directory.")
@click.option("--max-shard-size", help="Split model.safetensors into shards of at most this size, e.g. 2GB.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", help="Upload the output folder to this Hub repo.")
@click.option("--private", is_flag=True, default=None, help="Create the Hub repo as private.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow the model's own code (off).")
@click.option("--device-map", help=_DEVICE_MAP_HELP)
@click.option("--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,cpu=32GiB.")
@click.option("--offload-folder", type=click.Path(file_okay=False), help="With --device-map: disk offload folder.")
@click.option("--streamed", is_flag=True, default=None,
              help="Streamed surgery from the source files without --device-map (never two copies in memory).")
@click.option("--quiet", is_flag=True, help="Only warnings and the result.")
@_friendly
def compress(recipe_path, task, model, data_dir, data_files, dtype, keep, sparsity, method, round_to, fn_boost,
             allocation, width_layout, components, ica_engine, threshold, ica_runs, num_samples, max_tokens,
             sample_store, batch_size, seed, bias_compensation, reconstruct, ridge,
             do_eval, eval_samples, validate, perplexity_tokens, perplexity_window, cache, output, overwrite,
             max_shard_size, push_to_hub, private, trust_remote_code,
             device_map, max_memory, offload_folder, streamed, quiet) -> None:
    """Find task networks, prune the other MLP neurons, save and evaluate the smaller model."""
    from .pipeline import compress as run
    from .recipe import Recipe, apply_overrides, load_recipe

    _setup_logging(quiet)
    if keep is not None and sparsity is not None:
        raise RecipeError("give --keep or --sparsity, not both")
    base = load_recipe(recipe_path) if recipe_path else Recipe()
    overrides: dict[str, Any] = _task_overrides(task, data_dir, _parse_data_files(data_files))
    overrides.update({
        "model.name_or_path": model,
        "model.trust_remote_code": trust_remote_code,
        "model.dtype": dtype,
        "model.device_map": _parse_device_map(device_map),
        "model.max_memory": _parse_max_memory(max_memory),
        "model.offload_folder": offload_folder,
        "output.streamed": streamed,
        "selection.keep": (1 - sparsity) if sparsity is not None else keep,
        "selection.method": method,
        "selection.round_to": round_to,
        "selection.fn_boost": fn_boost,
        "selection.allocation": allocation,
        "output.layout": width_layout,
        "output.push_to_hub": push_to_hub,
        "output.max_shard_size": max_shard_size,
        "output.private": private,
        "selection.bias_compensation": bias_compensation,
        "selection.reconstruct": reconstruct,
        "selection.ridge": ridge,
        "networks.components": components,
        "networks.threshold": threshold,
        "networks.engine": ica_engine,
        "networks.runs": ica_runs,
        "calibration.num_samples": num_samples,
        "calibration.max_tokens": max_tokens,
        "calibration.sample_store": sample_store,
        "calibration.batch_size": batch_size,
        "calibration.cache": cache,
        "evaluation.enabled": do_eval,
        "evaluation.max_samples": eval_samples,
        "evaluation.validation": _parse_validate(validate),
        "evaluation.perplexity_tokens": perplexity_tokens,
        "evaluation.perplexity_window": perplexity_window,
        "output.dir": output,
        "output.overwrite": overwrite,
    })
    if seed is not None:
        overrides.update({f"{s}.seed": seed for s in ("calibration", "networks", "selection")})
    if recipe_path and "task" in overrides and base.provenance:
        base.provenance = {}
    recipe = apply_overrides(base, overrides)
    result = run(recipe, progress=not quiet)
    _print_summary(result.report, result.output_dir)


def _print_summary(report: dict, where: Path | str) -> None:
    m, p = report["metric"], report["parameters"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    click.echo(f"wrote {where}")
    pruned = report["widths"]["pruned"]
    shown = f"{pruned[0]} per layer" if len(set(pruned)) == 1 else f"{min(pruned)}..{max(pruned)} per layer"
    click.echo(f"  method {report['method']}, keep {report['keep']}, widths {report['widths']['dense']} -> {shown}")
    click.echo(f"  parameters {p['dense']:,} -> {p['pruned']:,} ({1 - p['ratio']:.1%} fewer)")
    if m["n"] is None:
        click.echo(f"  {report['task']}: not evaluated (--no-eval); run `fnprune evaluate --model {where}`")
        return
    click.echo(f"  {report['task']} {m['name']} on {m['n']} {m['split']} examples, {m.get('of', '')}: "
               f"dense {fmt(m['dense'])}, pruned {fmt(m['pruned'])}")
    templates = report.get("templates", [])
    if any(t.get("held_out") for t in templates):
        cal = report.get("template_means", {}).get("calibration", {})
        click.echo(f"    calibration templates (mean): dense {fmt(cal.get('dense'))}, pruned {fmt(cal.get('pruned'))}")
    for t in templates:
        kind = "held out" if t.get("held_out") else "calibration"
        click.echo(f"    {t.get('name')} ({kind}): dense {fmt(t.get('dense'))}, pruned {fmt(t.get('pruned'))}")
    if m.get("majority_class") is not None:
        click.echo(f"    always the most frequent label: {fmt(m['majority_class'])} (chance level)")
    validation = report.get("validation", {})
    for v in validation.get("tasks", []):
        vm = v["metric"]
        norm = (f"; acc_norm dense {fmt(vm.get('dense_acc_norm'))}, pruned {fmt(vm.get('pruned_acc_norm'))}"
                if vm.get("kind") == "multiple_choice" else "")
        click.echo(f"  validate {v['task']} accuracy on {vm['n']} {vm['split']} examples, {vm.get('of', '')}: "
                   f"dense {fmt(vm['dense'])}, pruned {fmt(vm['pruned'])}{norm}")
    ppl = validation.get("perplexity")
    if ppl:
        click.echo(f"  validate {ppl['task']} perplexity ({ppl['tokens']} tokens, windows of {ppl['window']}): "
                   f"dense {fmt(ppl['dense'])}, pruned {fmt(ppl['pruned'])}")


@main.command()
@click.option("--model", required=True, help="Pruned output folder, HF folder, Hub id or .gguf file.")
@click.option("--task", help=f"Task name ({_TASKS}, or custom); defaults to the model folder's recipe.yaml task.")
@click.option("--data-dir", help="Folder with GLUE-style split files.")
@click.option("--data-files", help="SPLIT=PATH pairs (tsv/csv/jsonl).")
@click.option("--split", help="Split to evaluate (default: the task's evaluation split).")
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate the first N examples only.")
@click.option("--template", help="Template name(s), comma separated (default: all of the task's templates).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code (off).")
@click.option("--device-map", help=_DEVICE_MAP_HELP.split(". ")[0] + ".")
@click.option("--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,cpu=32GiB.")
@click.option("--offload-folder", type=click.Path(file_okay=False), help="With --device-map: disk offload folder.")
@click.option("--lm-eval-tasks", help="Also run lm-evaluation-harness on these tasks, comma separated (needs "
                                     "fnprune[lm-eval]); the model is loaded by fnprune, so every layout works.")
@click.option("--lm-eval-include", type=click.Path(exists=True, file_okay=False),
              help="Folder of lm-eval task YAMLs (e.g. evaluation/lm_eval_tasks over local files).")
@click.option("--lm-eval-limit", type=int, help="lm-eval: the first N documents of each task only.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True)
@_friendly
def evaluate(model, task, data_dir, data_files, split, max_samples, template, batch_size, trust_remote_code, device_map,
             max_memory, offload_folder, lm_eval_tasks, lm_eval_include, lm_eval_limit, as_json, quiet) -> None:
    """Zero-shot accuracy of a model on a task's evaluation split (and lm-eval's scores on its tasks)."""
    from .checkpoint import RECIPE_FILE
    from .data import load_evaluation, resolve_task
    from .evaluate import evaluate_templates
    from .models import load_model, local_model_dir
    from .recipe import TaskSpec, load_recipe, recipe_from_dict

    _setup_logging(quiet)
    if not Path(model).expanduser().exists() and not model.endswith(".gguf"):
        model = str(local_model_dir(model))  # a Hub id: its snapshot folder (cached when offline)
    saved = Path(model).expanduser() / RECIPE_FILE
    harness = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
    if task is None and saved.is_file():
        spec = load_recipe(saved).task
    elif task is None and harness:
        spec = None  # lm-eval only
    elif task is None:
        raise RecipeError("--task is required (the model folder has no recipe.yaml to take it from)")
    else:
        spec = TaskSpec(name=task)
    resolved = sets = None
    if spec is not None:
        overrides = _task_overrides(None, data_dir, _parse_data_files(data_files))
        data = dataclasses.asdict(spec)
        for key, value in overrides.items():
            data[key.split(".", 1)[1]] = value
        spec = recipe_from_dict({"task": data}).task
        resolved = resolve_task(spec)
        sets = load_evaluation(resolved, split or resolved.evaluation_split, max_samples)
        if template:
            wanted = [t.strip() for t in template.split(",")]
            unknown = [t for t in wanted if t not in sets]
            if unknown:
                raise RecipeError(f"--template {', '.join(unknown)}: not a template of {resolved.name} "
                                  f"(its templates: {', '.join(sets)})")
            sets = {t: sets[t] for t in wanted}
    placement = {"device_map": _parse_device_map(device_map), "max_memory": _parse_max_memory(max_memory) or {},
                 "offload_folder": offload_folder}
    model_spec = recipe_from_dict({"model": {"name_or_path": model, "trust_remote_code": trust_remote_code,
                                             **placement}}).model
    problems = model_spec.check()
    if problems:
        raise RecipeError(problems)
    m, tok = load_model(model_spec)
    out: dict[str, Any] = {"model": model}
    if resolved is not None:
        result = evaluate_templates(m, tok, sets, resolved, batch_size, progress=not quiet)
        held, cal = result.mean(held_out=True), result.mean(held_out=False)
        out.update({
            "task": resolved.name, "split": split or resolved.evaluation_split, "n": result.n,
            "accuracy": result.headline, "of": "held-out templates (mean)" if held is not None else
            "calibration templates (mean)", "held_out_mean": held, "calibration_mean": cal,
            "templates": {name: r.accuracy for name, r in result.by_template.items()},
            "kind": resolved.kind, "acc_norm": result.mean(held is not None, norm=True),
            "templates_acc_norm": {name: r.accuracy_norm for name, r in result.by_template.items()},
            "predicted": {name: r.label_shares() for name, r in result.by_template.items()},
            "seconds": round(result.seconds, 2),
        })
    if harness:
        from .lm_eval_backend import run_lm_eval

        out["lm_eval"] = run_lm_eval(m, tok, harness, lm_eval_include, batch_size, lm_eval_limit)
    if as_json:
        click.echo(json.dumps(out))
        return
    if resolved is not None:
        click.echo(f"{resolved.name} accuracy {result.headline:.4f} on {result.n} {out['split']} examples, "
                   f"{out['of']} ({model})")
        for name, r in result.by_template.items():
            kind = "held out" if name in result.held_out else "calibration"
            norm = f", acc_norm {r.accuracy_norm:.4f}" if resolved.kind == "multiple_choice" else ""
            predicted = ", ".join(f"{label} {share:.0%}" for label, share in r.label_shares().items())
            click.echo(f"  {name} ({kind}): {r.accuracy:.4f}{norm} (predicted: {predicted})")
    for name, metrics in out.get("lm_eval", {}).get("results", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n" and "stderr" not in k)
        click.echo(f"lm-eval {name}: {shown} (n={metrics.get('n')})")


def _field(report: dict, dotted: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
    """report[a][b]... if it is there with the expected type, else None (report.json is untrusted input)."""
    node: Any = report
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, kind) and not isinstance(node, bool) else None


def _report_lines(report: dict) -> list[str]:
    """What a report says, 'n/a' wherever a field is missing, null or of the wrong type."""
    na = "n/a"

    def num(dotted: str, pattern: str = "{}", scale: float = 1) -> str:
        value = _field(report, dotted)
        return na if value is None else pattern.format(value / scale if scale != 1 else value)

    def text(dotted: str) -> str:
        return _field(report, dotted, str) or na

    pruned = [w for w in _field(report, "widths.pruned", list) or [] if isinstance(w, int)]
    shown = na if not pruned else str(pruned[0]) if len(set(pruned)) == 1 else f"{min(pruned)}..{max(pruned)}"
    dense, after = _field(report, "parameters.dense", int), _field(report, "parameters.pruned", int)
    fewer = f" ({1 - after / dense:.1%} fewer)" if dense and after is not None else ""
    timings = [f"{k} {num('timings_seconds.' + k, '{:.1f}')}s" for k in _field(report, "timings_seconds", dict) or {}]
    mib = "{:.1f} MiB"
    return [
        f"  method {text('method')}, keep {num('keep')}, widths {num('widths.dense')} -> {shown} per layer",
        f"  parameters {num('parameters.dense', '{:,}')} -> {num('parameters.pruned', '{:,}')}{fewer}",
        f"  {text('task')} {text('metric.name')} on {num('metric.n')} {text('metric.split')} examples: "
        f"dense {num('metric.dense', '{:.4f}')}, pruned {num('metric.pruned', '{:.4f}')}",
        f"  timings {', '.join(timings) or na}",
        f"  weights file {num('file_bytes.dense', mib, 2**20)} -> {num('file_bytes.pruned', mib, 2**20)}",
        f"  calibration {num('calibration.samples')} examples from {text('calibration.split')}, "
        f"{num('calibration.tokens_for_ica')} tokens for ICA",
    ]


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@_friendly
def inspect(directory) -> None:
    """Summarize a pruned checkpoint from its report.json and recipe.yaml."""
    from .checkpoint import RECIPE_FILE, read_report

    path = Path(directory)
    report = read_report(path)
    click.echo(f"{path}: {_field(report, 'base_model', str) or 'n/a'} pruned by fnprune "
               f"{_field(report, 'fnprune_version', str) or 'n/a'}")
    for line in _report_lines(report):
        click.echo(line)
    click.echo(f"  recipe: {path / RECIPE_FILE if (path / RECIPE_FILE).is_file() else 'n/a (no ' + RECIPE_FILE + ')'}")


@main.command()
@click.option("--task", required=True, help=f"Task name (built in: {_TASKS}).")
@click.option("--model", required=True, help="Hub id, local Hugging Face folder, or .gguf file.")
@click.option("--data-dir", help="Folder with GLUE-style split files (train.tsv, dev.tsv, ...).")
@click.option("--data-files", help="SPLIT=PATH pairs, e.g. train=a.tsv,validation=b.tsv (tsv/csv/jsonl).")
@click.option("--also-task", multiple=True,
              help="Another task for the recurrence experiment: NAME, NAME:DIR or NAME:SPLIT=PATH,... (repeatable).")
@click.option("--components", type=int, help="ICA components, per layer and cross-layer (default 32).")
@click.option("--threshold", type=float, help="|z| above which a neuron belongs to a network (default 3).")
@click.option("--num-samples", type=int, help="Calibration examples from the calibration split (default 256).")
@click.option("--max-tokens", type=int, help="Token activations kept per layer for ICA (default 4096).")
@click.option("--group-tokens", type=int, help="Tokens used for the cross-layer group ICA (default 2048).")
@click.option("--recurrence-groups", type=int, help="Held-out sample groups per task for recurrence (default 12).")
@click.option("--group-size", type=int, help="Samples per recurrence group (default 8).")
@click.option("--iou", type=float, help="IoU above which a template recurs (default 0.2).")
@click.option("--top-networks", type=int, help="Per-layer networks analyzed, by task relevance (default 8).")
@click.option("--control-networks", type=int, help="Random per-layer networks analyzed as controls (default 2).")
@click.option("--seeds", type=int, help="Random-neuron control seeds (default 3).")
@click.option("--scales", help="Amplification factors, comma separated (default 0,0.5,1.5,2,3).")
@click.option("--group-mask", type=int, help="Top group networks masked together, 0 = skip (default 10).")
@click.option("--eval-samples", type=int, help="Evaluation examples, sampled from the evaluation split (default 300).")
@click.option("--seed", type=int, help="Seed for sampling, ICA and controls (default 0).")
@click.option("--cache/--no-cache", default=None, help="Reuse calibration activations and networks (default on).")
@click.option("--output", required=True, help="Output folder for report.md, figures and CSVs.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing output folder.")
@click.option("--trust-remote-code", is_flag=True, default=False, help="Allow the model's own code (off).")
@click.option("--quiet", is_flag=True, help="Only warnings and the result.")
@_friendly
def analyze(task, model, data_dir, data_files, also_task, components, threshold, num_samples, max_tokens,
            group_tokens, recurrence_groups, group_size, iou, top_networks, control_networks, seeds, scales,
            group_mask, eval_samples, seed, cache, output, overwrite, trust_remote_code, quiet) -> None:
    """Functional-network experiments (networks, recurrence, key networks, amplification) with a report."""
    import time

    from .analysis import AnalysisSpec, parse_scales, task_from_arg
    from .analysis import analyze as run
    from .recipe import ModelSpec, TaskSpec

    _setup_logging(quiet)
    start = time.perf_counter()
    files = _parse_data_files(data_files)
    spec_task = TaskSpec(name=task, data_dir=None if files else data_dir, data_files=files or {})
    values = {
        "components": components, "threshold": threshold, "num_samples": num_samples, "max_tokens": max_tokens,
        "group_tokens": group_tokens, "recurrence_groups": recurrence_groups, "group_size": group_size,
        "iou_threshold": iou, "top_networks": top_networks, "control_networks": control_networks, "seeds": seeds,
        "scales": parse_scales(scales), "group_mask": group_mask, "eval_samples": eval_samples, "seed": seed,
        "cache": cache,
    }
    spec = AnalysisSpec.from_settings(
        model=ModelSpec(name_or_path=model, trust_remote_code=trust_remote_code), task=spec_task,
        also_tasks=[task_from_arg(v) for v in also_task], output=output, overwrite=overwrite,
        **{k: v for k, v in values.items() if v is not None},
    )
    result = run(spec, progress=not quiet)
    info = result.info
    click.echo(f"wrote {output} ({time.perf_counter() - start:.0f} s)")
    click.echo(f"  {info['task']} dense accuracy {info['dense_accuracy']:.4f} on {info['evaluation']['samples']} "
               f"{info['evaluation']['split']} examples")
    for r in result.tables["key_networks"]:
        click.echo(f"  mask {r['network']:>8} ({r['kind']}, {r['size']} neurons): acc {r['masked_fn_acc']:.4f}, "
                   f"random same layer {r['random_acc_mean']:.4f} +- {r['random_acc_std']:.4f}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["gguf", "deci"]), required=True,
              help="gguf: one file for llama.cpp / Ollama; deci: a DeciLM (Nemotron-NAS) folder for vLLM.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True,
              help="gguf: tensor type of the weight matrices (norms and biases stay f32).")
@click.option("--gguf-arch", type=click.Choice(["auto", "llama", "deci"]), default="auto", show_default=True,
              help="gguf: llama.cpp architecture; auto = the family's, deci for per-layer widths.")
@click.option("--output", required=True, help="Output .gguf file (gguf) or folder (deci).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="Only warnings and the result.")
@_friendly
def export(directory, fmt, outtype, gguf_arch, output, overwrite, quiet) -> None:
    """Write a checkpoint as GGUF (llama.cpp) or as a DeciLM folder (vLLM), per-layer widths included."""
    from .export import export as run

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="fnprune: %(message)s")
    info = run(directory, fmt, output, outtype=outtype, gguf_arch=gguf_arch, overwrite=overwrite)
    widths = info["widths"]
    shown = f"{widths[0]}" if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)}"
    kind = f"GGUF arch {info['arch']}, {info['outtype']}" if fmt == "gguf" else "DeciLM (nemotron-nas) folder"
    click.echo(f"wrote {info['path']} ({kind}, FFN widths {shown})")


if __name__ == "__main__":  # pragma: no cover
    main()
