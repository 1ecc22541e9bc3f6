"""The report folder: report.md, one CSV per table, summary.json and the figures, written atomically."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import atomic_output_dir, check_output_dir, write_json
from ..report_text import widths_span
from .experiments import by_rank, rounded
from .figures import (
    FIGURES,
    plot_amplification,
    plot_group_layers,
    plot_group_map,
    plot_key_networks,
    plot_layer_networks,
    plot_recurrence,
)
from .spec import spec_command

SUMMARY_FILE = "summary.json"

if TYPE_CHECKING:
    from .run import Analysis

__all__ = ["REPORT", "write_csv", "write_report"]

REPORT = "report.md"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("", encoding="utf-8")
        return
    fields = list(rows[0])
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: rounded(v) for k, v in r.items()})


def _md_table(rows: list[dict], cols: list[str] | None = None, limit: int | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = cols or list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows[:limit]:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _report_md(a: Analysis, files: dict[str, str]) -> str:
    lines = (_header_md(a) + _networks_md(a, files) + _recurrence_md(a, files) + _key_networks_md(a, files)
             + _amplification_md(a, files))
    return "\n".join(lines)


def _header_md(a: Analysis) -> list[str]:
    info, spec = a.info, a.spec
    ev, cal = info["evaluation"], info["calibration"]
    return [
        f"# Functional networks of `{Path(info['model']).name}` on {info['task']}",
        "",
        f"fnprune {info['fnprune_version']} `analyze`. Exact command:",
        "",
        "```bash",
        info["command"],
        "```",
        "",
        f"- model: `{info['model']}` ({_widths_text(info)} = {info['mlp_neurons']:,} neurons{_live_text(info)})",
        f"- networks found on {cal['samples']} `{cal['split']}` examples (ICA on {cal['tokens_for_ica']} sampled "
        f"tokens per layer; group ICA on {cal['group_ica_tokens']} of them, all layers concatenated), "
        f"k = {spec.networks.components} components, member = |z| > {spec.networks.threshold:g}",
        f"- every accuracy below: {info['scoring']}, {ev['samples']} examples sampled from the `{ev['split']}` split "
        f"({ev['split_size']} rows), which the networks were not found on (checked disjoint); halves "
        f"{ev['half_sizes'][0]} + {ev['half_sizes'][1]} examples",
        f"- dense accuracy {info['dense_accuracy']:.4f} (halves {info['dense_accuracy_halves'][0]:.4f} / "
        f"{info['dense_accuracy_halves'][1]:.4f}); one example is {1 / ev['samples']:.4f} of accuracy",
        f"- wall time {sum(info['timings_seconds'].values()):.0f} s before writing the report: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in info["timings_seconds"].items())
        + f" ({info['cpu']['cores']} CPU cores; load average {info['cpu']['load_average_1_5_15_min_at_start'][0]:g} "
        f"at the start, {info['cpu']['load_average_1_5_15_min_at_end'][0]:g} at the end)",
        "",
    ]


def _networks_md(a: Analysis, files: dict[str, str]) -> list[str]:
    t = a.tables
    return [
        "## 1. Networks",
        "",
        "Per-layer ICA (compress's capture and ICA, one run per layer, on calibration prompts under the task's "
        "first calibration template, as the paper used one prompt; compress's fn-task pools several runs over "
        "every calibration template and plain text). Left: task relevance of every network (how well its "
        "activity at the last prompt token separates the labels on the calibration data; red circles = the "
        "top networks analyzed below, white squares = random control networks). Right: neurons in any network.",
        "",
        f"![per-layer networks]({files['layer_networks']})",
        "",
        "Per-layer summary (sizes = member neurons; `union_fraction`: of the layer's neurons that vary on the "
        "calibration tokens):",
        "",
        _md_table(t["layer_summary"], ["layer", "networks", "median_size", "max_size", "union_size",
                                       "union_fraction", "max_relevance", "converged"]),
        "Cross-layer (group) networks: one ICA over all layers' neurons concatenated. Where the most "
        "task-relevant ones sit (layer x neuron index; colour = member neurons per bin) and how many neurons "
        "each has per layer:",
        "",
        f"![group network map]({files['group_map']})",
        "",
        f"![group networks per layer]({files['group_layers']})",
        "",
        _md_table(sorted(t["group_networks"], key=by_rank),
                  ["network", "relevance_rank", "relevance", "size", "fraction", "layers_spanned", "top_layer"]),
    ]


def _widths_text(info: dict) -> str:
    """'30 layers x 1536 MLP neurons', or the range of a per-layer checkpoint's widths."""
    widths = info.get("mlp_widths") or [info["mlp_width"]] * info["layers"]
    if len(set(widths)) == 1:
        return f"{info['layers']} layers x {widths[0]} MLP neurons"
    return f"{info['layers']} layers of {widths_span(widths)} MLP neurons"


def _live_text(info: dict) -> str:
    """The live neurons, where some never vary (ReLU-dead, padding): only those are in networks and controls."""
    if info["live_neurons"] == info["mlp_neurons"]:
        return ""
    return (f", of which {info['live_neurons']:,} vary on the calibration tokens; the others (ReLU-dead or padding) "
            "are in no network and no random control")


def _groups_run(recurrence: list[dict]) -> str:
    """How many groups each task's recurrence ran (fewer than asked when its held-out examples ran out)."""
    by_task = {r["task"]: r["groups"] for r in recurrence}
    if len(set(by_task.values())) == 1:
        return str(next(iter(by_task.values())))
    return ", ".join(f"{n} ({task})" for task, n in by_task.items())


def _recurrence_md(a: Analysis, files: dict[str, str]) -> list[str]:
    t, spec = a.tables, a.spec
    lines = ["## 2. Recurrence", ""]
    if t["recurrence"]:
        rec = t["recurrence"]
        lines += [
            f"Templates = the group networks above. For each task, {_groups_run(rec)} groups of "
            f"{spec.group_size} examples not used for calibration (or from the other task's calibration split) "
            f"were run through the model and given their own ICA (all layers concatenated); a template *recurs* "
            f"in a group when some map of that group's ICA has IoU > {spec.iou_threshold:g} with it (thresholded "
            "maps). Null: the group maps' members shuffled within each layer (same sizes).",
            "",
            f"![recurrence]({files['recurrence']})",
            "",
        ]
        for task_name in dict.fromkeys(r["task"] for r in rec):
            rows = [r for r in rec if r["task"] == task_name]
            lines.append(f"- {task_name}: templates recurring in at least half of the groups: "
                         f"{sum(r['recurrence_rate'] >= 0.5 for r in rows)} of {len(rows)}; mean recurrence rate "
                         f"{np.mean([r['recurrence_rate'] for r in rows]):.3f} (null "
                         f"{np.mean([r['null_rate'] for r in rows]):.3f})")
        lines += ["", _md_table(sorted(rec, key=lambda r: (r["task"], -r["relevance"])),
                                ["task", "template", "template_size", "relevance", "groups", "recurrence_rate",
                                 "mean_best_iou", "null_rate", "null_mean_best_iou"])]
    else:
        lines += ["_(skipped: --recurrence-groups 0 or too few held-out examples)_", ""]
    return lines


def _key_networks_md(a: Analysis, files: dict[str, str]) -> list[str]:
    t, spec = a.tables, a.spec
    key = t["key_networks"]
    top = [r for r in key if r["kind"] == "top"]
    sig = [r for r in top if r["excess_ci_low"] > 0]
    lines = [
        "## 3. Key networks",
        "",
        f"Each network's neurons zeroed in its own layer only (checked for each network: the hooks zero exactly "
        f"those neurons and pass every other neuron of every layer through unchanged; the layers before it are "
        f"untouched), vs the same number of random live neurons of the same layer "
        f"({spec.seeds} seeds). `excess_drop` = random-masked accuracy minus network-masked accuracy, with a 95% "
        f"bootstrap interval over the examples (paired) and the random draws (one seed: the examples only). "
        f"Top {spec.top_networks} networks by relevance, plus "
        f"{spec.control_networks} random networks as controls.",
        "",
        f"![key networks]({files['key_networks']})",
        "",
        _md_table(key, ["network", "kind", "relevance_rank", "relevance", "size", "random_size", "masked_fn_acc",
                        "fn_drop",
                        "random_acc_mean", "random_acc_std", "excess_drop", "excess_ci_low", "excess_ci_high",
                        "fn_drop_half_a", "fn_drop_half_b"]),
        f"Measured: {len(sig)} of {len(top)} top networks hurt accuracy more than random neurons of their layer "
        "with the 95% interval above zero; largest single-network drop "
        f"{max((r['fn_drop'] for r in key), default=0):.4f}.",
        "",
        *_short_controls(key, "size", "random_size"),
    ]
    if t["group_mask"]:
        g = t["group_mask"][0]
        lines += [
            f"The paper's test: the top {g['networks']} group networks masked together ({g['neurons']} neurons = "
            f"{g['fraction_of_live_neurons']:.2%} of the live MLP neurons, in {g['layers']} layers) vs the same "
            "number of random live neurons in each of those layers:",
            "",
            _md_table(t["group_mask"], ["networks", "neurons", "random_neurons", "fraction_of_live_neurons",
                                        "dense_acc", "masked_fn_acc", "random_acc_mean", "random_acc_std",
                                        "random_accs", "excess_drop", "excess_ci_low", "excess_ci_high"]),
            *_short_controls(t["group_mask"], "neurons", "random_neurons"),
        ]
    return lines


def _short_controls(rows: list[dict], size: str, control: str) -> list[str]:
    """A warning line when some random control is smaller than its network (too few other live neurons)."""
    short = [r for r in rows if r[control] != "" and r[control] < r[size]]
    if not short:
        return []
    return [f"**Smaller controls:** {len(short)} random control(s) have fewer neurons than their network (the layer "
            f"has too few other live neurons): see `{control}`; their comparison is not at the same number of neurons.",
            ""]


def _amplification_md(a: Analysis, files: dict[str, str]) -> list[str]:
    t, spec = a.tables, a.spec
    amp = t["amplification_summary"]
    gains = [r for r in amp if r["cv_gain_on_a"] > 0 and r["cv_gain_on_b"] > 0]
    return [
        "## 4. Amplification",
        "",
        f"Each analyzed network's neurons multiplied by {', '.join(f'{s:g}' for s in spec.scales)}. `best_*` "
        "picks the factor on all evaluation examples (optimistic); `cv_*` picks it on one half and measures the "
        "gain on the other half (honest). Random control: the same number of random live neurons of the same layer "
        "scaled by the best factor (only when the best gain is positive).",
        "",
        f"![amplification]({files['amplification']})",
        "",
        _md_table(amp),
        *_short_controls(amp, "size", "random_size"),
        f"Measured: {len(gains)} of {len(amp)} networks gain on both held-out halves when the factor is chosen "
        "on the other half.",
        "",
        "## Files",
        "",
        "Every figure's data is a CSV in this folder: "
        + ", ".join(f"`{name}.csv`" for name in sorted(t)) + "; settings and timings in `summary.json`.",
        "",
    ]


def write_report(analysis: Analysis, output: str | Path, overwrite: bool = False, checked: bool = False) -> Path:
    """report.md, PNG figures, one CSV per table and summary.json, written atomically into `output`. `checked`:
    the caller checked `output` before its work (`analyze`); an output that appeared since is left as it is and
    this report kept beside it (`atomic_output_dir`), as compress keeps its checkpoint, instead of being lost."""
    out = Path(output).expanduser()
    if not checked:
        check_output_dir(out, overwrite, analysis.spec.input_paths(), own_files=[SUMMARY_FILE])
    if analysis.spec.output != str(output):  # run from the API without spec.output: the command names this folder
        analysis.info["command"] = spec_command(dataclasses.replace(analysis.spec, output=str(output)))
    with atomic_output_dir(out, overwrite) as tmp:
        tables = dict(analysis.tables)
        tables["layer_relevance_grid"] = plot_layer_networks(analysis, tmp / FIGURES["layer_networks"])
        tables["group_network_map"] = plot_group_map(analysis, tmp / FIGURES["group_map"])
        plot_group_layers(analysis, tmp / FIGURES["group_layers"])
        if analysis.tables["recurrence"]:
            plot_recurrence(analysis, tmp / FIGURES["recurrence"])
        plot_key_networks(analysis, tmp / FIGURES["key_networks"])
        plot_amplification(analysis, tmp / FIGURES["amplification"])
        analysis.tables.update(tables)
        for name, rows in tables.items():
            write_csv(tmp / f"{name}.csv", rows)
        write_json(tmp / SUMMARY_FILE, analysis.info)
        (tmp / REPORT).write_text(_report_md(analysis, FIGURES), encoding="utf-8")
    return out
