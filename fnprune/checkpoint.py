"""Write and read pruned checkpoints: HF layout + recipe.yaml + report.json + networks + model card.

Output is written into a temporary sibling directory and renamed into place at the end, so an interrupted
run never leaves a half-written checkpoint, and an existing directory is replaced only with `overwrite`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .arch import layout_for
from .choices import NETWORK_METHODS
from .errors import FnpruneError, OutputError
from .lm_eval_backend import lm_eval_metrics

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
    "retained_text",
    "chance_text",
    "interval_text",
    "is_number",
]

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
NETWORKS_FILE = "networks.safetensors"
NETWORKS_META_FILE = "networks.json"
CARD_FILE = "README.md"


def check_disk_space(path: Path, needed_bytes: int) -> None:
    """Refuse early when the output's filesystem cannot hold the checkpoint (estimated from its size)."""
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed_bytes:
        raise OutputError(
            f"not enough disk space for {path}: about {needed_bytes / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free"
        )


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not os.path.lexists(parent):
        parent = parent.parent
    return parent


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(path: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Fail before any heavy work if the output cannot be written, or if writing it (which replaces the whole
    folder with --overwrite) would destroy the current directory or a local input (`inputs`: model and data
    paths; Hub ids and None are skipped)."""
    target = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, target):
        raise OutputError(
            f"output {path} is the current directory or contains it; give a new folder, e.g. {path / 'pruned'}"
        )
    for item in inputs:
        if not item or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if _inside(target, source) or _inside(source, target):
            where = "is" if target == source else "is inside" if _inside(target, source) else "contains"
            raise OutputError(
                f"output {path} {where} the input {item}; choose another output folder"
            )
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it")
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    parent = _existing_ancestor(path)
    if not parent.is_dir():
        raise OutputError(f"cannot create output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}")


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_modes(directory: Path) -> None:
    """Give every file the mode a plain write gives (0666 minus the umask): safetensors writes its files 0600
    (through a private temp file), so another user or a non-root container could not read the weights."""
    mode = 0o666 & ~umask()
    for f in directory.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


def _rename_if_absent(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` only if nothing is at `dst` (False otherwise). A directory rename never replaces a
    non-empty directory or a file (POSIX), so an output that appears between the check and the rename is kept;
    only an empty directory could be replaced."""
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


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
    """Yield a temporary directory; on success it replaces `path`, on any failure it is deleted.

    Without `overwrite`, an output that another run created meanwhile is never replaced: this run's finished
    checkpoint is then kept beside it (`<name>.fnprune-<pid>`, named in the OutputError), so no work is lost.
    """
    check_output_dir(path, overwrite)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.absolute().parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        _ordinary_modes(tmp)
        if overwrite and os.path.lexists(path):
            old = tmp.with_suffix(".old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
            return
        placed = _rename_if_absent(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not placed:
        kept = path.absolute().parent / f"{path.name}.fnprune-{os.getpid()}"
        if not _rename_if_absent(tmp, kept):
            kept = tmp
        raise OutputError(
            f"output {path} appeared while this run was writing it (another run?) and was left as it is; this "
            f"run's checkpoint is in {kept}: move it into place, or rerun with --overwrite"
        )


def read_report(directory: Path) -> dict[str, Any]:
    """An output folder's report.json, read as untrusted input: it must be a non-empty JSON object (its fields
    may still be missing or of the wrong type; readers check each one)."""
    path = directory / REPORT_FILE
    if not path.is_file():
        raise FnpruneError(f"{directory} has no {REPORT_FILE}: not an fnprune output folder")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FnpruneError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(report, dict):
        raise FnpruneError(f"{path}: a JSON {type(report).__name__}, not fnprune's report object")
    if not report:
        raise FnpruneError(f"{path}: an empty object, not an fnprune report")
    return report


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
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SHIM_FILE).write_text(shim_source(base), encoding="utf-8")
    model.config.auto_map = {layout_for(model).head: "modeling_fnprune.FnpruneModel"}


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
    return (f"{found} {info.keep:.0%} of the MLP neurons of every layer with the `{info.method}` criterion and "
            f"physically removed the others.{refit}")


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
            f"{rec['settings']['params']} weights, {rec['seconds']:.0f} s) on the calibration prompts only; the "
            f"table shows the recovered model.{scores}\n")


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

fnprune {fnprune_version} {_selection_sentence(info, r['calibration']['samples'])} The checkpoint loads with
plain `AutoModelForCausalLM.from_pretrained`.

| | dense | pruned |
|---|---|---|
{_accuracy_rows(info.task, r)}
{_validation_rows(r)}{_lm_eval_rows(r)}| parameters | {params['dense']:,} | {params['pruned']:,} |
| MLP width per layer | {r['widths']['dense']} | {r['widths']['pruned'][0]} |
| weights file | {mib(size['dense'])} | {mib(size['pruned'])} |

Evaluation is zero-shot (label-word log-probabilities) on a split the calibration never saw. The headline is
the mean over held-out prompt templates, which were never used for calibration or for choosing settings:
how the model does under a prompt of your own.
{_recovery_note(r)}
## Run it elsewhere

llama.cpp / Ollama: `fnprune export DIR --format gguf --outtype f16 --output model.gguf` (per-layer widths are
written as llama.cpp's `deci` architecture). vLLM: `fnprune export DIR --format deci --output DIR-deci` (FFN
widths must be multiples of 256: compress with `--round-to 256`).

## Recipe

Rerun with `fnprune compress --recipe recipe.yaml --output DIR`:

```yaml
{info.recipe_yaml.rstrip()}
```
"""
