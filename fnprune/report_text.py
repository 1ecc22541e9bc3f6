"""The lines `fnprune inspect` (and compress's summary) print from a report.json, which is untrusted input: a
missing, null or mistyped field reads 'n/a'."""

from __future__ import annotations

from typing import Any

__all__ = ["report_field", "report_lines", "evaluated", "count_range", "widths_span", "file_size_text", "kept_share"]


def report_field(report: dict, dotted: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
    """report[a][b]... if it is there with the expected type, else None (report.json is untrusted input)."""
    node: Any = report
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, kind) and not isinstance(node, bool) else None


def widths_span(widths: list[int]) -> str:
    """One width, or the range of per-layer widths ("62..66")."""
    return f"{widths[0]}" if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)}"


def evaluated(report: dict) -> bool:
    """Whether compress scored the models (not after --no-eval, which leaves the metric's values null)."""
    metric = report_field(report, "metric", dict)
    return not metric or any(metric.get(k) is not None for k in ("n", "dense", "pruned"))


def report_lines(report: dict, where: str = "FOLDER") -> list[str]:
    """What a report says, 'n/a' wherever a field is missing, null or of the wrong type; `where`: the folder."""
    from .card import chance_text, retained_text

    na = "n/a"

    def num(dotted: str, pattern: str = "{}", scale: float = 1) -> str:
        value = report_field(report, dotted)
        return na if value is None else pattern.format(value / scale if scale != 1 else value)

    def text(dotted: str) -> str:
        return report_field(report, dotted, str) or na

    pruned = [w for w in report_field(report, "widths.pruned", list) or [] if isinstance(w, int)]
    shown = widths_span(pruned) if pruned else na
    dense, after = report_field(report, "parameters.dense", int), report_field(report, "parameters.pruned", int)
    change = 1 - after / dense if dense and after is not None else None
    fewer = "" if change is None else f" ({change:.1%} fewer)" if change >= 0 else f" ({-change:.1%} more)"
    metric = report_field(report, "metric", dict) or {}
    scored = evaluated(report)
    keep = report_field(report, "keep")
    share = na if keep is None else kept_share(report, keep)
    stages = report_field(report, "timings_seconds", dict) or {}
    shown_stages = [k for k in stages if scored or not k.startswith("evaluate")]  # older --no-eval reports list them
    timings = [f"{k} {num('timings_seconds.' + k, '{:.1f}')}s" for k in shown_stages]
    retained = f", {kept}" if (kept := retained_text(metric)) else ""
    if note := chance_text(metric):  # the dense model at or below always answering the most frequent label
        retained += f"; always the most frequent label scores {metric['majority_class']:.4f}: {note}"
    soft = retained_text(report_field(report, "metric.right_prob", dict) or {})
    retained += f"; probability of the right answer {soft}" if soft else ""
    refit = ""  # fnprune.refit ran when the report has its section
    if isinstance(report.get("sequential"), dict):
        prompts = report_field(report, "sequential.prompts", int)
        refit = " scored layer by layer on the model pruned before it" + (f" ({prompts} prompts)" if prompts else "")
    if isinstance(report.get("refit"), dict):
        prompts = report_field(report, "refit.prompts", int)
        refit += " + refit" + (f" on {prompts} prompts" if prompts else "")
    refit += " + recovery (distilled toward the dense model)" if isinstance(report.get("recovery"), dict) else ""
    of = report_field(report, "metric.of", str)
    averaged = f" ({of})" if of else ""
    score = (f"  {text('task')} {text('metric.name')} on {num('metric.n')} {text('metric.split')} examples{averaged}: "
             f"dense {num('metric.dense', '{:.4f}')}, pruned {num('metric.pruned', '{:.4f}')}{retained}")
    if not scored:  # compress --no-eval
        score = f"  {text('task')}: not evaluated (compressed with --no-eval); run `fnprune evaluate --model {where}`"
    return [
        f"  method {text('method')}{refit}, kept {share} of the MLP neurons, widths {num('widths.dense')} -> {shown} "
        "per layer",
        f"  parameters {num('parameters.dense', '{:,}')} -> {num('parameters.pruned', '{:,}')}{fewer}",
        score,
        f"  timings {', '.join(timings) or na}",
        f"  weights file {' -> '.join(file_size_text(report.get('file_bytes'), k) for k in ('dense', 'pruned'))}",
        f"  calibration {num('calibration.samples')} examples from {text('calibration.split')}, "
        f"{num('calibration.tokens_for_ica')} tokens sampled per layer",
        *_networks_line(report),
    ]


def _networks_line(report: dict) -> list[str]:
    """The networks' line (network criteria only: report["networks"])."""
    counts = [c for c in report_field(report, "networks.per_layer", list) or [] if type(c) is int]
    if not counts:
        return []
    per_layer = count_range(counts)
    size, converged = report_field(report, "networks.median_size"), report_field(report, "networks.converged_layers")
    return [f"  networks {per_layer} per layer, median size {'n/a' if size is None else f'{size:g}'} neurons, ICA "
            f"converged in {'n/a' if converged is None else converged} of {len(counts)} layers (networks.json)"]


def count_range(counts: list[int]) -> str:
    """One count when every layer has it, else the range over the layers ("24-40")."""
    return str(counts[0]) if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)}"


def file_size_text(sizes: Any, which: str) -> str:
    """"1.2 MiB", with the file's format when the two differ (a float32 or GGUF source, a bfloat16 run): the
    sizes then compare formats as well as widths."""
    if not isinstance(sizes, dict):
        return "n/a"
    size, formats = sizes.get(which), (sizes.get("dense_format"), sizes.get("pruned_format"))
    if not isinstance(size, int):
        return "n/a"
    differ = all(formats) and formats[0] != formats[1]
    return f"{size / 2**20:.1f} MiB" + (f" ({sizes.get(f'{which}_format')})" if differ else "")


def kept_share(report: dict, keep: float) -> str:
    """The share of MLP neurons kept, as counted, with the asked `keep` when rounding to --round-to moved it:
    "37.5% (asked 40%)"."""
    dense, pruned = report_field(report, "mlp_neurons.dense"), report_field(report, "mlp_neurons.pruned")
    asked = f"{keep:.1%}".replace(".0%", "%")
    if not (dense and pruned is not None):
        return asked
    kept = f"{pruned / dense:.1%}".replace(".0%", "%")
    return kept if kept == asked else f"{kept} (asked {asked})"
