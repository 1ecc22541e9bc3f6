"""The model card written beside a pruned checkpoint (its README.md), and the "% of dense" texts the CLI shares
with it. The card's sentences follow what the run wrote: its layout, widths, model family and task kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .choices import NETWORK_METHODS
from .errors import ModelError
from .lm_eval_backend import lm_eval_metrics
from .report_text import count_range, evaluated, file_size_text, kept_share, widths_span

__all__ = ["CardInfo", "model_card", "retained_text", "chance_text", "interval_text", "is_number"]


@dataclass
class CardInfo:
    base_model: str
    task: str
    method: str
    keep: float
    report: dict[str, Any]
    recipe_yaml: str
    model_type: str = "llama"  # the checkpoint's family: which runtimes fnprune export can write it for
    head: str = "AutoModelForCausalLM"  # the Auto class it loads with
    kind: str = "classification"  # the task's kind: how it was scored
    config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's config.json: what its GGUF can state
    license: dict[str, Any] = field(default_factory=dict)  # the base model card's license metadata (hub.base_license)


def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def interval_text(bounds: Any) -> str | None:
    """report.json's `retained_ci95` as "87.9-95.6" (% of dense); None when it is missing or malformed."""
    if isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(v, (int, float)) for v in bounds):
        return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}"
    return None


def retained_text(metric: dict[str, Any]) -> str:
    """"91.7% of dense (95% interval 87.9-95.6%)": report.json's pruned / dense and its interval; "" when the
    report has none."""
    ratio, interval = metric.get("retained"), interval_text(metric.get("retained_ci95"))
    if not is_number(ratio):
        return ""
    return f"{ratio:.1%} of dense" + (f" (95% interval {interval}%)" if interval else "")


def chance_text(metric: dict[str, Any]) -> str:
    """A warning when the dense model's headline is not above always answering the most frequent label: then no
    "% of dense" says whether pruning kept the task; "" otherwise."""
    dense, chance = metric.get("dense"), metric.get("majority_class")
    if not (is_number(dense) and is_number(chance)) or dense > chance:
        return ""
    return "the dense model is not above it, so no % of dense here says whether the task was kept"


def is_number(value: Any) -> bool:
    """A figure report.json may hold (it is untrusted input): an int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accuracy_rows(task: str, report: dict[str, Any]) -> str:
    """The card's accuracy rows: the headline, the two template means, then each template."""
    metric, means = report.get("metric", {}), report.get("template_means", {})
    templates = report.get("templates", [])
    n_held = sum(1 for t in templates if t.get("held_out"))
    where = f"{metric.get('n', 'n/a')} `{metric.get('split', '')}` examples"
    rows = [f"| **{task} {metric.get('name', 'accuracy')}, {metric.get('of', '')}** ({where}) | "
            f"**{_fmt(metric.get('dense'))}** | **{_fmt(metric.get('pruned'))}** |"]
    if text := retained_text(metric):
        rows.append(f"| pruned against dense (the interval: a paired bootstrap over the examples) | | {text} |")
    soft = metric.get("right_prob") if isinstance(metric.get("right_prob"), dict) else {}
    if soft.get("dense") is not None:
        kept = f"; {text}" if (text := retained_text(soft)) else ""
        rows.append(f"| probability of the right answer, {metric.get('of', '')}: it moves with every answer's "
                    f"sureness, not only where one flips | {_fmt(soft['dense'])} | {_fmt(soft.get('pruned'))}{kept} |")
    if n_held:
        cal = means.get("calibration", {})
        rows.append(f"| calibration templates (mean of {len(templates) - n_held}) | {_fmt(cal.get('dense'))} | "
                    f"{_fmt(cal.get('pruned'))} |")
    for t in templates:
        kind = "held out" if t.get("held_out") else "calibration"
        rows.append(f"| template `{t.get('name')}` ({kind}) | {_fmt(t.get('dense'))} | {_fmt(t.get('pruned'))} |")
    if metric.get("majority_class") is not None:
        warn = f": {note}" if (note := chance_text(metric)) else ""
        rows.append(f"| always the most frequent label (chance level){warn} | {_fmt(metric['majority_class'])} | |")
    return "\n".join(rows)


def _evaluation_text(info: CardInfo, scored: str) -> tuple[str, str]:
    """The results table's task rows and the paragraph under the table; after --no-eval, one row saying so."""
    if evaluated(info.report):
        held_out = any(isinstance(t, dict) and t.get("held_out") for t in info.report.get("templates") or [])
        headline = (
            "The headline is\nthe mean over held-out prompt templates, which were never used for calibration or for "
            "choosing settings:\nhow the model does under a prompt of your own." if held_out else
            "The task has no\nheld-out prompt template, so the headline is the mean over the calibration "
            "templates: it says how\nthe model does under the prompts it was calibrated on, not under one of your own.")
        return _accuracy_rows(info.task, info.report), (
            f"Evaluation is zero-shot ({scored}) on a split the calibration never saw. {headline}")
    return f"| **{info.task}: not evaluated** (compressed with `--no-eval`) | | |", (
        f"Not evaluated: `fnprune evaluate --model <this folder>` scores it zero-shot ({scored}) under\n"
        "every prompt template of the task, on a split the calibration never saw; its headline is the mean over the\n"
        "held-out templates, which were never used for calibration or for choosing settings.")


def _validation_rows(report: dict[str, Any]) -> str:
    """The card's rows for the extra benchmarks (report["validation"]): each task's headline, the perplexity."""
    validation, rows = report.get("validation") or {}, []
    for v in validation.get("tasks", []):
        m = v.get("metric", {})
        rows.append(f"| validation: {v.get('task')} accuracy, {m.get('of', '')} ({m.get('n', 'n/a')} "
                    f"`{m.get('split', '')}` examples) | {_fmt(m.get('dense'))} | {_fmt(m.get('pruned'))} |")
        if m.get("kind") == "multiple_choice":
            rows.append(f"| validation: {v.get('task')} acc_norm | {_fmt(m.get('dense_acc_norm'))} | "
                        f"{_fmt(m.get('pruned_acc_norm'))} |")
    ppl = validation.get("perplexity")
    if ppl:
        rows.append(f"| validation: {ppl.get('task')} perplexity ({ppl.get('tokens')} tokens, windows of "
                    f"{ppl.get('window')}) | {_fmt(ppl.get('dense'), '{:.3f}')} | "
                    f"{_fmt(ppl.get('pruned'), '{:.3f}')} |")
    return "".join(row + "\n" for row in rows)


def _lm_eval_rows(report: dict[str, Any]) -> str:
    """The card's rows for lm-evaluation-harness (report["lm_eval"]): each task's metrics, dense beside pruned."""
    section, rows = report.get("lm_eval") or {}, []
    limit = f", limit {section['limit']}" if section.get("limit") else ""
    for task, entry in (section.get("tasks") or {}).items():
        for metric, dense, pruned in lm_eval_metrics(entry):
            rows.append(f"| lm-eval {section.get('version') or ''}: {task} {metric} ({entry.get('n', 'n/a')} "
                        f"documents{limit}) | {_fmt(dense)} | {_fmt(pruned)} |")
    return "".join(row + "\n" for row in rows)


def _selection_sentence(info: CardInfo, samples: int) -> str:
    """What selection did, in the card's words: only the network criteria find functional networks."""
    found = (f"found the model's task functional networks (per-layer ICA on MLP activations from {samples} "
             f"`{info.task}` calibration examples), kept" if info.method in NETWORK_METHODS else
             f"scored every MLP neuron on {samples} `{info.task}` calibration examples, kept")
    prompts = (info.report.get("refit") or {}).get("prompts") or samples
    on = "the calibration prompts" if prompts >= samples else f"the first {prompts} calibration prompts"
    refit = (" Layer by layer, each MLP down projection was then refitted so that its block's output matches the "
             f"dense model's on {on}." if "refit" in info.report else "")
    if isinstance(sequential := info.report.get("sequential"), dict):
        first = sequential.get("prompts") or samples
        on = "the calibration prompts" if first >= samples else f"the first {first} calibration prompts"
        refit = (" Each layer's kept neurons were chosen on its activations in the model with the layers before it "
                 f"already pruned ({on}), as FLAP's code runs Wanda-SP." + refit)
    allocation = info.report.get("allocation") or "uniform"
    where = ("of every layer" if allocation == "uniform" else
             f"overall (each layer's width from one ranking across layers, `{allocation}` allocation)")
    share = kept_share(info.report, info.keep)
    return (f"{found} {share} of the MLP neurons {where} with the `{info.method}` criterion and "
            f"physically removed the others.{_networks_sentence(info.report)}{refit}")


def _networks_sentence(report: dict[str, Any]) -> str:
    """The networks found (report["networks"], network criteria only) and the files that hold them."""
    networks = report.get("networks")
    if not isinstance(networks, dict) or not networks.get("per_layer"):
        return ""
    counts = networks["per_layer"]
    per_layer = count_range(counts)
    size = networks.get("median_size")
    median = f", median {size:g} neurons each" if is_number(size) else ""
    return (f" ICA found {per_layer} networks per layer{median} (converged in {networks.get('converged_layers')} "
            f"of {len(counts)} layers); each layer's networks, their members and task relevance are in "
            f"{' and '.join(f'`{f}`' for f in networks.get('files', []))}.")


def _widths_text(report: dict[str, Any]) -> str:
    """The pruned MLP width: one number, or the range over the layers (and what a padded layout stores)."""
    widths = [w for w in (report.get("widths") or {}).get("pruned") or [] if isinstance(w, int)]
    if not widths:
        return "n/a"
    if len(set(widths)) == 1:
        return widths_span(widths)
    padded = f", stored padded to {max(widths)} with zero neurons" if report.get("layout") == "padded" else ""
    return f"{widths_span(widths)} (per layer{padded})"


def _loading_sentence(info: CardInfo) -> str:
    """How the checkpoint loads: plainly, unless its layers have their own widths (per-layer layout)."""
    if info.report.get("layout") != "per-layer":
        return f"The checkpoint loads with plain `{info.head}.from_pretrained`."
    return (f"Its layers have different MLP widths, which the `{info.model_type}` config cannot state: load it with "
            f"`fnprune.load_pruned(DIR)`, or without fnprune with `{info.head}.from_pretrained(DIR, "
            "trust_remote_code=True)` (the folder's `modeling_fnprune.py`).")


def _runtimes_text(info: CardInfo) -> str:
    """The `fnprune export` commands this checkpoint's family, layout and config allow, decided by the exporters'
    own checks on the widths as stored (a padded checkpoint stores its widest layer's width in every layer)."""
    from .export import Checkpoint
    from .export.to_deci import DECI_MULTIPLE, check_deci_layout
    from .export.to_gguf import check_gguf_config, gguf_arch_for

    layout = info.report.get("layout") or "uniform"
    widths = [w for w in (info.report.get("widths") or {}).get("pruned") or [] if isinstance(w, int)]
    stored = [max(widths)] * len(widths) if layout == "padded" and widths else widths
    lines = []
    try:
        arch = gguf_arch_for(Checkpoint(Path(), {"model_type": info.model_type}, [], stored, layout))
        check_gguf_config(info.config)
        lines.append(f"llama.cpp / Ollama: `fnprune export DIR --format gguf --outtype f16 --output model.gguf` "
                     f"(written as llama.cpp's `{arch}` architecture).")
    except ModelError:
        pass
    try:
        check_deci_layout(info.model_type, layout)
        if stored and all(w % DECI_MULTIPLE == 0 for w in stored):
            lines.append("vLLM: `fnprune export DIR --format deci --output DIR-deci`.")
        else:  # the exporter refuses these widths: say how to get ones it writes
            lines.append(f"vLLM: this checkpoint's FFN widths are not all multiples of {DECI_MULTIPLE}, which the "
                         f"DeciLM layout needs: compress again with `--round-to {DECI_MULTIPLE}`, then `fnprune export "
                         "DIR --format deci --output DIR-deci`.")
    except ModelError:
        pass
    if not lines:
        return (f"`fnprune export` (GGUF, DeciLM) does not write `{info.model_type}` checkpoints with this layout; "
                "the folder runs wherever transformers runs.")
    return "\n".join(lines)


def _recovery_note(r: dict) -> str:
    """A paragraph on the recovery stage, with the scores before it, when the run had one."""
    rec = r.get("recovery")
    if not rec:
        return ""
    before = (rec.get("before") or {}).get("template_means")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    scores = (f" Before recovery: held-out template mean {fmt(before['held_out']['pruned'])}, calibration template "
              f"mean {fmt(before['calibration']['pruned'])}." if before else "")
    return (f"\nAfter surgery the pruned model was distilled toward the dense one ({rec['steps']} steps, "
            f"{rec['settings']['params']} weights, {rec['seconds']:.0f} s) on the calibration prompts only"
            + ("; the table shows the recovered model." if evaluated(r) else " (not scored: --no-eval).")
            + f"{scores}\n")


def _front_matter(info: CardInfo) -> str:
    """The Hub's metadata as YAML (a task name may hold `:` or `#`): `base_model` for a Hub id, any id
    (`gpt2` too), never a local path; the base model's license when its card names one."""
    meta: dict[str, Any] = {}
    if not Path(info.base_model).expanduser().exists():
        meta["base_model"] = info.base_model
    meta.update(info.license)  # a derivative keeps its base model's license
    meta.update({"library_name": "transformers", "tags": ["fnprune", "pruned", info.task]})
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


def model_card(info: CardInfo, fnprune_version: str) -> str:
    """Hugging Face model card with base_model metadata, what was done and the results table."""
    r = info.report
    params = r["parameters"]
    size = r["file_bytes"]
    scored = ("each choice's log-likelihood, as lm-evaluation-harness scores multiple choice"
              if info.kind == "multiple_choice" else "label-word log-probabilities")
    accuracy_rows, evaluation_note = _evaluation_text(info, scored)
    return f"""---
{_front_matter(info)}---

# {info.base_model} pruned for {info.task} with fnprune

fnprune {fnprune_version} {_selection_sentence(info, r['calibration']['samples'])} {_loading_sentence(info)}

| | dense | pruned |
|---|---|---|
{accuracy_rows}
{_validation_rows(r)}{_lm_eval_rows(r)}| parameters | {params['dense']:,} | {params['pruned']:,} |
| MLP width per layer | {r['widths']['dense']} | {_widths_text(r)} |
| weights file | {file_size_text(size, 'dense')} | {file_size_text(size, 'pruned')} |

{evaluation_note}
{_recovery_note(r)}
## Run it elsewhere

{_runtimes_text(info)}

## Recipe

Rerun with `fnprune compress --recipe recipe.yaml --output DIR`:

```yaml
{info.recipe_yaml.rstrip()}
```
"""
