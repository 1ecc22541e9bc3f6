"""Write and read pruned checkpoints: HF layout + recipe.yaml + report.json + networks + model card.

Output is written into a temporary sibling directory and renamed into place at the end, so an interrupted
run never leaves a half-written checkpoint, and an existing directory is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import OutputError

__all__ = [
    "RECIPE_FILE",
    "REPORT_FILE",
    "NETWORKS_FILE",
    "NETWORKS_META_FILE",
    "CARD_FILE",
    "check_output_dir",
    "check_disk_space",
    "atomic_output_dir",
    "save_networks",
    "write_json",
    "model_card",
]

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
NETWORKS_FILE = "networks.safetensors"
NETWORKS_META_FILE = "networks.json"
CARD_FILE = "README.md"


def check_disk_space(path: Path, needed_bytes: int) -> None:
    """Refuse early when the output's filesystem cannot hold the checkpoint (estimated from its size)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise OutputError(
            f"not enough disk space for {path}: about {needed_bytes / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free"
        )


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail before any heavy work if the output cannot be written."""
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(path: Path) -> None:
    """Delete temp dirs that a killed run (its pid no longer alive) left beside `path`."""
    for stale in path.absolute().parent.glob(f".{path.name}.*.partial"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool):
    """Yield a temporary directory; on success it replaces `path`, on any failure it is deleted."""
    check_output_dir(path, overwrite)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.absolute().parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        if path.exists():
            old = tmp.with_suffix(".old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_networks(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Functional networks and kept indices: tensors in safetensors, the rest as JSON."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / NETWORKS_FILE))
    write_json(directory / NETWORKS_META_FILE, meta)


SHIM_FILE = "modeling_fnprune.py"
_SHIM_BASE_LINE = "from transformers import PreTrainedModel as _Base  # fnprune:base-class (rewritten when saved)"


def shim_source(base_class: str) -> str:
    """The per-layer loader (fnprune/remote_code/modeling_fnprune.py) with its base class filled in."""
    text = (Path(__file__).parent / "remote_code" / SHIM_FILE).read_text(encoding="utf-8")
    if _SHIM_BASE_LINE not in text or not base_class.isidentifier():
        raise ValueError(f"cannot write the per-layer loader for {base_class!r}")
    return text.replace(_SHIM_BASE_LINE, f"from transformers import {base_class} as _Base  # fnprune:base-class")


def write_per_layer_code(directory: Path, model) -> None:
    """Save the loader beside the weights and point `auto_map` at it (loads with trust_remote_code=True)."""
    base = type(model).__name__
    classifier = base.endswith("ForSequenceClassification")
    auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SHIM_FILE).write_text(shim_source(base), encoding="utf-8")
    model.config.auto_map = {auto: "modeling_fnprune.FnpruneModel"}


@dataclass
class CardInfo:
    base_model: str
    task: str
    method: str
    keep: float
    report: dict[str, Any]
    recipe_yaml: str


def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def _accuracy_rows(task: str, report: dict[str, Any]) -> str:
    """The card's accuracy rows: the headline, the two template means, then each template."""
    metric, means = report.get("metric", {}), report.get("template_means", {})
    templates = report.get("templates", [])
    n_held = sum(1 for t in templates if t.get("held_out"))
    where = f"{metric.get('n', 'n/a')} `{metric.get('split', '')}` examples"
    rows = [f"| **{task} {metric.get('name', 'accuracy')}, {metric.get('of', '')}** ({where}) | "
            f"**{_fmt(metric.get('dense'))}** | **{_fmt(metric.get('pruned'))}** |"]
    if n_held:
        cal = means.get("calibration", {})
        rows.append(f"| calibration templates (mean of {len(templates) - n_held}) | {_fmt(cal.get('dense'))} | "
                    f"{_fmt(cal.get('pruned'))} |")
    for t in templates:
        kind = "held out" if t.get("held_out") else "calibration"
        rows.append(f"| template `{t.get('name')}` ({kind}) | {_fmt(t.get('dense'))} | {_fmt(t.get('pruned'))} |")
    return "\n".join(rows)


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


def model_card(info: CardInfo, fnprune_version: str) -> str:
    """Hugging Face model card with base_model metadata, what was done and the results table."""
    r = info.report
    params = r["parameters"]
    size = r["file_bytes"]
    mib: Callable[[int | None], str] = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    base_model_line = f"base_model: {info.base_model}\n" if "/" in info.base_model and not Path(
        info.base_model
    ).expanduser().exists() else ""
    return f"""---
{base_model_line}library_name: transformers
tags:
- fnprune
- pruned
- {info.task}
---

# {info.base_model} pruned for {info.task} with fnprune

fnprune {fnprune_version} found the model's task functional networks (per-layer ICA on MLP activations from
{r['calibration']['samples']} `{info.task}` calibration examples), kept {info.keep:.0%} of the MLP neurons of
every layer with the `{info.method}` criterion and physically removed the others. The checkpoint loads with
plain `AutoModelForCausalLM.from_pretrained`.

| | dense | pruned |
|---|---|---|
{_accuracy_rows(info.task, r)}
{_validation_rows(r)}| parameters | {params['dense']:,} | {params['pruned']:,} |
| MLP width per layer | {r['widths']['dense']} | {r['widths']['pruned'][0]} |
| weights file | {mib(size['dense'])} | {mib(size['pruned'])} |

Evaluation is zero-shot (label-word log-probabilities) on a split the calibration never saw. The headline is
the mean over held-out prompt templates, which were never used for calibration or for choosing settings:
how the model does under a prompt of your own.

## Recipe

Rerun with `fnprune compress --recipe recipe.yaml --output DIR`:

```yaml
{info.recipe_yaml.rstrip()}
```
"""
