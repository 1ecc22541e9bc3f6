"""`fnprune compress | evaluate | inspect`: a thin click shell over the Python API."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from safetensors import SafetensorError

from . import __version__
from .cli_flags import (
    FLAG_BY_DECL,
    TASK_NAMES,
    compress_options,
    flag_overrides,
    parse_data_files,
    parse_device_map,
    parse_lm_eval_tasks,
    parse_max_memory,
)
from .errors import FnpruneError, RecipeError, first_line
from .interrupt import InterruptedAfterWrite
from .recipe import DTYPES, Recipe, TaskSpec, apply_overrides, load_recipe
from .report_text import evaluated, report_field, report_lines, widths_span
from .tasks import set_fields


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a container stop) cleans up as Ctrl-C does


def _friendly(fn: Callable) -> Callable:
    """User errors print one clear message (no traceback); Ctrl-C or SIGTERM says nothing was written (the temp
    output is deleted on the way out)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()  # signals reach only that one
        previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except FnpruneError as exc:
            raise click.ClickException(str(exc)) from exc
        except BrokenPipeError:  # `fnprune ... | head`: the reader has gone; say nothing more, as shell tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (OSError, SafetensorError) as exc:  # a full disk, a permission: the environment, the user fixes
            raise click.ClickException(f"{type(exc).__name__}: {first_line(exc)}") from exc
        except KeyboardInterrupt as exc:
            _close_bars()
            written = isinstance(exc, InterruptedAfterWrite)
            said = f"{exc}" if written else "no output was written" + (f"; {exc}" if str(exc) else "")
            click.echo(f"interrupted: {said}", err=True)  # e.g. capture saved its progress
            sys.exit(130)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _close_bars() -> None:
    """Progress bars left open by the interrupted step, closed so the message starts its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _setup_logging(quiet: bool) -> None:
    if quiet:  # bars other libraries draw with tqdm's defaults (transformers' GGUF reader); read when tqdm loads
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_flush_denormal(True)  # denormal floats slow CPU inference more than tenfold on some CPUs
    # fnprune's own logger only: other libraries' warnings keep their own handlers (or Python's last resort), not
    # printed twice or with an "fnprune:" prefix that is not fnprune's
    log = logging.getLogger("fnprune")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fnprune: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a message comes (click's test runner swaps it for every command)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@click.group()
@click.version_option(__version__, prog_name="fnprune")
def main() -> None:
    """Compress a transformer LM for one task: keep the MLP neurons it needs and physically remove the others."""


@main.command()
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="Recipe YAML; flags override it.")
@compress_options
@click.option("--quiet", is_flag=True, help="Only warnings and the result.")
@_friendly
def compress(recipe_path: str | None, sparsity: float | None, quiet: bool, **values: Any) -> None:
    """Score the MLP neurons on task data, remove the unneeded ones, save and evaluate the smaller model."""
    _setup_logging(quiet)  # before the imports that load tqdm, which reads TQDM_DISABLE once
    from .pipeline import compress as run

    if values["keep"] is not None and sparsity is not None:
        raise FnpruneError("give --keep or --sparsity, not both")
    base = load_recipe(recipe_path) if recipe_path else Recipe()
    overrides = flag_overrides(values, sparsity)
    if recipe_path:
        _recipe_task_overrides(base.task, values, overrides)
    if recipe_path and "task" in overrides and base.provenance:
        base.provenance = {}
    recipe = apply_overrides(base, overrides)
    result = run(recipe, progress=not quiet)
    _print_summary(result.report, result.output_dir)


def _recipe_task_overrides(recorded: TaskSpec, values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """--task naming the recipe's own task keeps its definition (templates, label words); another name replaces
    it, and --data-dir alone its data files: both said, never silent."""
    task, log = values.get("task"), logging.getLogger("fnprune")
    if task and task == recorded.name:
        overrides.pop("task")
    elif task and (dropped := set_fields(recorded)):
        log.warning("--task %s replaces the recipe's task %s (its %s)", task, recorded.name, ", ".join(dropped))
    if values.get("data_dir") and not values.get("data_files") and recorded.data_files and "task" not in overrides:
        log.warning("--data-dir replaces the recipe's task.data_files (%s); give them again with --data-files",
                    ", ".join(f"{k}={v}" for k, v in recorded.data_files.items()))


def _print_summary(report: dict, where: Path | str) -> None:
    from .card import chance_text, retained_text

    m = report["metric"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    click.echo(f"wrote {where}")
    lines = report_lines(report, str(where))
    for line in lines[:2]:  # method and parameters, as `fnprune inspect` shows them
        click.echo(line)
    if not evaluated(report):
        click.echo(lines[2])  # the same "not evaluated" line
        return
    click.echo(f"  {report['task']} {m['name']} on {m['n']} {m['split']} examples, {m.get('of', '')}: "
               f"dense {fmt(m['dense'])}, pruned {fmt(m['pruned'])}")
    if text := retained_text(m):
        click.echo(f"    pruned: {text}, a paired bootstrap over the examples")
    soft = report_field(report, "metric.right_prob", dict) or {}
    if soft.get("dense") is not None:
        kept = f", {text}" if (text := retained_text(soft)) else ""
        click.echo(f"    probability of the right answer, {m.get('of', '')}: dense {fmt(soft['dense'])}, "
                   f"pruned {fmt(soft.get('pruned'))}{kept}")
    templates = report.get("templates", [])
    if any(t.get("held_out") for t in templates):
        cal = report.get("template_means", {}).get("calibration", {})
        click.echo(f"    calibration templates (mean): dense {fmt(cal.get('dense'))}, pruned {fmt(cal.get('pruned'))}")
    for t in templates:
        kind = "held out" if t.get("held_out") else "calibration"
        click.echo(f"    {t.get('name')} ({kind}): dense {fmt(t.get('dense'))}, pruned {fmt(t.get('pruned'))}")
    if m.get("majority_class") is not None:
        warn = f"; {note}" if (note := chance_text(m)) else ""
        click.echo(f"    always the most frequent label: {fmt(m['majority_class'])} (chance level{warn})")
    validation = report.get("validation", {})
    for v in validation.get("tasks", []):
        vm = v["metric"]
        norm = (f"; acc_norm dense {fmt(vm.get('dense_acc_norm'))}, pruned {fmt(vm.get('pruned_acc_norm'))}"
                if vm.get("kind") == "multiple_choice" else "")
        kept = f"; {text}" if (text := retained_text(vm)) else ""
        click.echo(f"  validate {v['task']} accuracy on {vm['n']} {vm['split']} examples, {vm.get('of', '')}: "
                   f"dense {fmt(vm['dense'])}, pruned {fmt(vm['pruned'])}{norm}{kept}")
    ppl = validation.get("perplexity")
    if ppl:
        click.echo(f"  validate {ppl['task']} perplexity ({ppl['tokens']} tokens, windows of {ppl['window']}): "
                   f"dense {fmt(ppl['dense'])}, pruned {fmt(ppl['pruned'])}")
    _print_lm_eval(report.get("lm_eval"), fmt)
    _print_recovery(report.get("recovery"), fmt)


def _print_lm_eval(section: dict | None, fmt) -> None:
    """lm-evaluation-harness's metrics per task, dense beside pruned."""
    from .lm_eval_backend import lm_eval_metrics

    limit = f", limit {section['limit']}" if section and section.get("limit") else ""
    for task, entry in ((section or {}).get("tasks") or {}).items():
        shown = "; ".join(f"{m} dense {fmt(d)}, pruned {fmt(p)}" for m, d, p in lm_eval_metrics(entry))
        click.echo(f"  lm-eval {task} on {entry.get('n')} documents{limit}: {shown}")


def _print_recovery(rec: dict | None, fmt) -> None:
    """The recovery stage's cost and the scores before it (the lines above are after it)."""
    if not rec:
        return
    click.echo(f"  recovered: {rec['steps']} steps in {rec['seconds']:.0f} s, distillation loss {rec['loss_first']:.4f}"
               f" -> {rec['loss_last']:.4f}; the scores above are after recovery")
    means = (rec.get("before") or {}).get("template_means")
    if means:
        click.echo(f"    before recovery: held-out templates (mean) {fmt(means['held_out']['pruned'])}, calibration "
                   f"templates (mean) {fmt(means['calibration']['pruned'])}")
    ppl = (rec.get("validation_before") or {}).get("perplexity")
    if ppl:
        click.echo(f"    before recovery: {ppl['task']} perplexity {fmt(ppl['pruned'])}")


@main.command()
@click.option("--model", required=True, help="Pruned output folder, HF folder, Hub id or .gguf file.")
@click.option("--task", help=f"Task name ({TASK_NAMES}, or custom); defaults to the model folder's recipe.yaml task.")
@click.option("--data-dir", help="Folder with GLUE-style split files.")
@click.option("--data-files", help="SPLIT=PATH pairs (tsv/csv/jsonl).")
@click.option("--split", help="Split to evaluate (default: the task's evaluation split).")
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate the first N examples only.")
@click.option("--template", help="Template name(s), comma separated (default: all of the task's templates).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompts scored per forward pass.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code (off).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Model dtype (default: the one the folder's recipe.yaml "
              "was compressed in, so the scores are its report's; else float32).")
@click.option("--device-map", help=FLAG_BY_DECL["--device-map"].settings["help"].split(". ")[0] + ".")
@FLAG_BY_DECL["--max-memory"].decorate
@FLAG_BY_DECL["--offload-folder"].decorate
@FLAG_BY_DECL["--lm-eval-tasks"].decorate  # compress's options, from the recipe's evaluation.lm_eval_* fields
@FLAG_BY_DECL["--lm-eval-include"].decorate
@FLAG_BY_DECL["--lm-eval-limit"].decorate
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="Only warnings and the result.")
@_friendly
def evaluate(model, task, data_dir, data_files, split, max_samples, template, batch_size, trust_remote_code, dtype,
             device_map, max_memory, offload_folder, lm_eval_tasks, lm_eval_include, lm_eval_limit, as_json, quiet
             ) -> None:
    """Zero-shot accuracy of a model on a task's evaluation split (and lm-eval's scores on its tasks)."""
    _setup_logging(quiet)  # before the imports that load tqdm, which reads TQDM_DISABLE once
    from .evaluate import evaluate_templates
    from .evaluate_checkpoint import evaluation_examples, model_dtype, model_path, recorded_recipe
    from .lm_eval_backend import check_lm_eval, run_lm_eval
    from .models import load_model
    from .recipe import recipe_from_dict

    given_model, model = model, model_path(model)  # a Hub id: its snapshot folder (the JSON names the id)
    harness = parse_lm_eval_tasks(lm_eval_tasks) or []
    recorded = recorded_recipe(model, task)
    placement = {"device_map": parse_device_map(device_map), "max_memory": parse_max_memory(max_memory) or {},
                 "offload_folder": offload_folder}
    checked = recipe_from_dict({
        "model": {"name_or_path": model, "trust_remote_code": trust_remote_code, "dtype": model_dtype(recorded, dtype),
                  **placement},
        "evaluation": {"lm_eval_tasks": harness, "lm_eval_include": lm_eval_include, "lm_eval_limit": lm_eval_limit},
    })
    problems = checked.model.check() + checked.evaluation.check()
    if problems:
        raise RecipeError(problems)
    lm_eval_only = task is None and recorded is None and bool(harness)  # no task named and none recorded
    given = [flag for flag, value in (("--data-dir", data_dir), ("--data-files", data_files), ("--split", split),
                                      ("--max-samples", max_samples), ("--template", template)) if value]
    if lm_eval_only and given:
        raise RecipeError(f"{', '.join(given)}: only used with a task (--task, or the folder's recipe.yaml); "
                          "lm-eval's tasks read their own data (--lm-eval-limit limits them)")
    check_lm_eval(harness, lm_eval_include)  # installed, the folder there, the tasks known: before any loading
    resolved, sets = None, None
    if not lm_eval_only:
        wanted = [t.strip() for t in template.split(",")] if template else None
        resolved, sets = evaluation_examples(model, task, data_dir, parse_data_files(data_files), split, max_samples,
                                             wanted, recorded)
    m, tok = load_model(checked.model, prunable=False)
    out: dict[str, Any] = {"model": given_model}
    result = None
    if resolved is not None:
        result = evaluate_templates(m, tok, sets, resolved, batch_size, progress=not quiet)
        out.update(_evaluation_summary(result, resolved, split or resolved.evaluation_split))
    if harness:
        out["lm_eval"] = run_lm_eval(m, tok, harness, lm_eval_include, batch_size, lm_eval_limit, progress=not quiet)
    if as_json:
        click.echo(json.dumps(out))
        return
    if result is not None:
        _echo_evaluation(result, resolved, out["split"], out["of"], model)
    for name, metrics in out.get("lm_eval", {}).get("results", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n" and "stderr" not in k)
        click.echo(f"lm-eval {name}: {shown} (n={metrics.get('n')})")


def _evaluation_summary(result: Any, resolved: Any, split: str) -> dict[str, Any]:
    """What `evaluate --json` prints for the task."""
    held, cal = result.mean(held_out=True), result.mean(held_out=False)
    return {
        "task": resolved.name, "split": split, "n": result.n,
        "accuracy": result.headline, "of": "held-out templates (mean)" if held is not None else
        "calibration templates (mean)", "held_out_mean": held, "calibration_mean": cal,
        "templates": {name: r.accuracy for name, r in result.by_template.items()},
        "kind": resolved.kind, "acc_norm": result.mean(held is not None, norm=True),
        "templates_acc_norm": {name: r.accuracy_norm for name, r in result.by_template.items()},
        "right_prob": result.mean_right_prob(held is not None),
        "templates_right_prob": {name: r.right_prob for name, r in result.by_template.items()},
        "predicted": {name: r.label_shares() for name, r in result.by_template.items()},
        "seconds": round(result.seconds, 2),
    }


def _echo_evaluation(result: Any, resolved: Any, split: str, of: str, model: str) -> None:
    from .evaluate import answered
    click.echo(f"{resolved.name} accuracy {result.headline:.4f} on {result.n} {split} examples, {of} ({model})")
    words = {t.name: t.words(resolved.label_words) for t in resolved.templates} if resolved.label_words else {}
    for name, r in result.by_template.items():
        kind = "held out" if name in result.held_out else "calibration"
        norm = f", acc_norm {r.accuracy_norm:.4f}" if resolved.kind == "multiple_choice" else ""
        said = words.get(name, {})  # what the model answered under this template, for a label key such as "0"
        predicted = ", ".join(f"{answered(label, said)} {share:.0%}" for label, share in r.label_shares().items())
        soft = "" if r.right_prob is None else f", right answer's probability {r.right_prob:.4f}"
        click.echo(f"  {name} ({kind}): {r.accuracy:.4f}{norm}{soft} (predicted: {predicted})")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@_friendly
def inspect(directory) -> None:
    """Summarize a pruned checkpoint from its report.json, checked against its config.json and weights."""
    from .checkpoint import RECIPE_FILE, read_report
    from .export import read_checkpoint

    path = Path(directory)
    report = read_report(path)
    weights = read_checkpoint(path)  # config.json and the safetensors headers: a damaged folder stops here
    recorded = report_field(report, "widths.pruned", list)
    if recorded and weights.widths and weights.layout != "padded" and recorded != weights.widths:
        raise FnpruneError(f"{path}: report.json's MLP widths are not its weights' ({widths_span(recorded)} against "
                           f"{widths_span(weights.widths)}): the report was written for another checkpoint")
    click.echo(f"{path}: {report_field(report, 'base_model', str) or 'n/a'} pruned by fnprune "
               f"{report_field(report, 'fnprune_version', str) or 'n/a'}")
    for line in report_lines(report, str(path)):
        click.echo(line)
    files = ", ".join(f.name for f in weights.files)
    checked = " and report.json's" if recorded and weights.widths else ""
    click.echo(f"  weights: {files}; their MLP widths are config.json's{checked}" if weights.widths else
               f"  weights: {files}; config.json states no MLP width to check them against")
    click.echo(f"  recipe: {path / RECIPE_FILE if (path / RECIPE_FILE).is_file() else 'n/a (no ' + RECIPE_FILE + ')'}")


@main.command()
@click.option("--task", required=True, help=f"Task name (built in: {TASK_NAMES}).")
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
@click.option("--cache/--no-cache", default=None,
              help="Reuse calibration activations, networks and finished evaluation runs (default on).")
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

    _setup_logging(quiet)  # before the imports that load tqdm, which reads TQDM_DISABLE once
    from .analysis import AnalysisSpec, parse_scales, task_from_arg
    from .analysis import analyze as run
    from .recipe import ModelSpec

    start = time.perf_counter()
    files = parse_data_files(data_files)
    spec_task = TaskSpec(name=task, data_dir=data_dir, data_files=files or {})
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
        fewer = f" (only {r['random_size']} neurons)" if r["random_size"] < r["size"] else ""
        click.echo(f"  mask {r['network']:>8} ({r['kind']}, {r['size']} neurons): acc {r['masked_fn_acc']:.4f}, "
                   f"random same layer{fewer} {r['random_acc_mean']:.4f}"
                   + (f" +- {r['random_acc_std']:.4f}" if r["random_acc_std"] != "" else " (one seed)"))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["gguf", "deci"]), required=True,
              help="gguf: one file for llama.cpp / Ollama; deci: a DeciLM (Nemotron-NAS) folder for vLLM.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True,
              help="gguf: tensor type of the weight matrices (norms and biases stay f32).")
@click.option("--gguf-arch", type=click.Choice(["auto", "llama", "deci"]), default="auto", show_default=True,
              help="gguf: llama.cpp architecture; auto = the family's, deci for per-layer widths.")
@click.option("--tokenizer-pre", default=None, metavar="NAME",
              help="gguf: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), for a tokenizer fnprune cannot name.")
@click.option("--output", required=True, help="Output .gguf file (gguf) or folder (deci).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="Only warnings and the result.")
@_friendly
def export(directory, fmt, outtype, gguf_arch, tokenizer_pre, output, overwrite, quiet) -> None:
    """Write a checkpoint as GGUF (llama.cpp) or as a DeciLM folder (vLLM), per-layer widths included."""
    _setup_logging(quiet)  # before the imports that load tqdm, which reads TQDM_DISABLE once
    from .export import export as run

    given = [f"--{name.replace('_', '-')}" for name in ("outtype", "gguf_arch", "tokenizer_pre")
             if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if fmt == "deci" and given:
        raise click.UsageError(f"{' and '.join(given)}: --format gguf only (deci copies the weights as they are)")
    info = run(directory, fmt, output, outtype=outtype, gguf_arch=gguf_arch, tokenizer_pre=tokenizer_pre,
               overwrite=overwrite, progress=not quiet)
    kind = f"GGUF arch {info['arch']}, {info['outtype']}" if fmt == "gguf" else "DeciLM (nemotron-nas) folder"
    click.echo(f"wrote {info['path']} ({kind}, FFN widths {widths_span(info['widths'])})")


if __name__ == "__main__":  # pragma: no cover
    main()
