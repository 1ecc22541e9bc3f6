"""The recipe: every setting of one compression run, as typed dataclasses that round-trip through YAML.

A recipe saved beside a checkpoint is fully resolved (task fields, defaults, seeds, versions, data hashes),
so `fnprune compress --recipe out/recipe.yaml` reproduces the run. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .choices import (
    ALLOCATIONS,
    CALIBRATION_CHOICES,
    DTYPES,
    FILE_FORMATS,
    ICA_ENGINES,
    LABEL_TARGETS,
    LAYOUTS,
    RECOVERY_PARAMS,
    RELEVANCE_MODES,
    SAMPLE_STORES,
    SELECTION_METHODS,
    STORE_DTYPES,
    TASK_KINDS,
)
from .device_maps import device_map_problems
from .errors import RecipeError
from .yaml_io import DuplicateKeyError, read_yaml

__all__ = [
    "ModelSpec",
    "PromptTemplate",
    "TaskSpec",
    "CalibrationSpec",
    "NetworksSpec",
    "SelectionSpec",
    "RecoverySpec",
    "EvaluationSpec",
    "ValidationTask",
    "OutputSpec",
    "Recipe",
    "load_recipe",
    "dump_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "flag",
]

_SHARD_SIZE = re.compile(r"\d+\s*[KMG]i?B", re.IGNORECASE)  # what save_pretrained parses: a whole number, no TB
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4, 3E+2, .5e-3


def flag(name: str, help: str, **cli: Any) -> dict[str, Any]:
    """Field metadata: the `fnprune compress` flag that sets this field, so the CLI is built from the recipe.

    In `help`, `{default}` and `{choices}` (the choices, the default marked) are filled in from the field, and
    `{tasks}` with the built-in task names. `cli` holds what the field's type does not say: `choices` (offered as
    a click choice; `strict=False` leaves the check and its message to check()), and click.option keywords such
    as `metavar`. A flag given to several fields (`--seed`) sets them all. fnprune.cli_flags builds the options.
    """
    return {"flag": name, "help": help, **cli}


_SEED = flag("--seed", "Seed for calibration sampling, ICA and random selection (default {default}).")


MAX_SEED = 2**32 - 1  # NumPy's and scikit-learn's seeds are 32-bit


def count_problems(where: str, value: int | None, nullable: bool = False) -> list[str]:
    """A count (prompts, runs, steps) must be >= 1; `nullable`: None (the field's "all" or default) is allowed too."""
    if (value is None and nullable) or (value is not None and value >= 1):
        return []
    return [f"{where}: must be >= 1{' or null' if nullable else ''}, got {value}"]


def seed_problems(where: str, seed: int, count: int = 1, seeds: str = "runs") -> list[str]:
    """Seeds `seed .. seed + count - 1` (of `count` `seeds`) must all be valid NumPy seeds: refused up front, not
    after calibration."""
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED - (count - 1):
        extra = f" - {count - 1} (it seeds {count} {seeds}: seed, seed + 1, ...)" if count > 1 else ""
        return [f"{where}: must be between 0 and 2**32 - 1{extra}, got {seed}"]
    return []


@dataclass
class ModelSpec:
    """Which model to compress: a Hub id, a local HF folder, or a .gguf file.

    `device_map` (with `max_memory`, `offload_folder`) is passed to from_pretrained, so a model larger than a
    GPU or than RAM is spread over GPUs, CPU and disk (accelerate); it also switches surgery to the streamed
    path (fnprune.stream_surgery), which never holds a second copy of the weights.
    """

    name_or_path: str = field(default="", metadata=flag("--model", "Hub id, local Hugging Face folder, or .gguf file."))
    revision: str | None = None
    dtype: str = field(default="float32", metadata=flag("--dtype", "Model dtype (default {default}).", choices=DTYPES))
    trust_remote_code: bool = field(default=False, metadata=flag(
        "--trust-remote-code", "Allow the model's own code ({default})."))
    # "auto", "cpu", or {module name: device}
    device_map: str | dict[str, str | int] | None = field(default=None, metadata=flag(
        "--device-map", "Spread the model over GPUs, CPU and disk with accelerate: auto, balanced, balanced_low_0, "
        "sequential, one device (cpu, cuda, cuda:0, mps), or a JSON object of module names to devices. Surgery "
        "then streams from the source files."))
    # {"0": "20GiB", "cpu": "32GiB"}
    max_memory: dict[str, str | int] = field(default_factory=dict, metadata=flag(
        "--max-memory", "With --device-map: memory per device, e.g. 0=20GiB,cpu=32GiB."))
    # where disk-offloaded weights go
    offload_folder: str | None = field(default=None, metadata=flag(
        "--offload-folder", "With --device-map: disk offload folder."))

    def check(self) -> list[str]:
        problems = []
        if not self.name_or_path:
            problems.append("model.name_or_path: required (a Hub id, an HF folder or a .gguf file)")
        if self.dtype not in DTYPES:
            problems.append(f"model.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        return problems + device_map_problems(self.device_map, self.max_memory, self.offload_folder)


@dataclass
class PromptTemplate:
    """One wording of a task's prompt. `held_out` templates are never used for calibration, relevance or any
    setting choice: like the evaluation split, they only measure whether the pruned model keeps the task
    under prompts it was not calibrated with."""

    name: str = ""
    template: str = ""
    label_words: dict[str, str] = field(default_factory=dict)  # empty: the task's label words
    held_out: bool = False
    # multiple choice: each choice as scored after the prompt (fields: {choice}, filters allowed, e.g.
    # {choice|lower_first}) and what joins prompt and choice (lm-eval's target_delimiter)
    choice: str = "{choice}"
    delimiter: str = " "

    def words(self, task_words: dict[str, str]) -> dict[str, str]:
        """This template's label words, in the task's label order."""
        return {label: self.label_words.get(label, word) for label, word in task_words.items()}


@dataclass
class TaskSpec:
    """A task scored zero-shot: `classification` by label-word log-probabilities, `multiple_choice` by each
    per-example choice's log-likelihood after the prompt (acc and length-normalized acc_norm, as lm-eval).

    `name` picks a built-in task whose fields fill whatever is left empty here; a task with a new name must
    give every field (data, templates or template, label words or choices). Text columns are the `{fields}` of
    the templates (nested paths and filters: fnprune.fields; `columns` names them). `template` is shorthand for
    one calibration template; `templates` lists several, some held out.

    A task that ships one labelled file sets `split_of` to that split: its rows are cut, seeded by
    `split_seed`, into a calibration part (`calibration_share` of the distinct texts) and an evaluation part,
    disjoint by construction and checked like any other split.
    """

    name: str = field(default="sst2", metadata=flag(
        "--task", "Task name (built in: {tasks}; default {default}). With --recipe: the recipe's own task when it "
        "names it, else a built-in task replacing the recipe's."))
    dataset: str | None = None
    dataset_config: str | None = None
    data_dir: str | None = field(default=None, metadata=flag(
        "--data-dir", "Folder with GLUE-style split files (train.tsv, dev.tsv, ...); replaces a recipe's "
        "task.data_files unless --data-files is given too."))
    data_files: dict[str, str] = field(default_factory=dict, metadata=flag(
        "--data-files", "SPLIT=PATH pairs, e.g. train=a.tsv,validation=b.tsv; --data-dir gives the other splits."))
    template: str | None = None
    templates: list[PromptTemplate] = field(default_factory=list)
    label_column: str | None = None
    label_words: dict[str, str] = field(default_factory=dict)
    calibration_split: str = "train"
    evaluation_split: str = "validation"
    kind: str = "classification"  # classification | multiple_choice
    columns: dict[str, str] = field(default_factory=dict)  # template field -> row expression (fnprune.fields)
    choices: list[str] = field(default_factory=list)  # multiple choice: one expression per choice, or one list
    choice_labels: str | None = None  # expression of the choices' labels the answer names (else: an index)
    file_format: str | None = None  # tsv (GLUE: no quoting) | tsv-quoted (CSV quoting) | csv | jsonl; None: suffix
    header: list[str] = field(default_factory=list)  # column names of a file without a header line
    split_files: dict[str, str] = field(default_factory=dict)  # split -> file name inside data_dir
    split_of: str | None = None  # the one labelled split calibration and evaluation are carved from
    calibration_share: float = 0.5
    split_seed: int = 0

    def check(self) -> list[str]:
        problems = []
        if not self.name:
            problems.append("task.name: required")
        if self.kind not in TASK_KINDS:
            problems.append(f"task.kind: {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if self.kind == "multiple_choice" and self.label_words:
            problems.append("task.label_words: a multiple_choice task takes its choices from `choices`")
        if self.kind == "classification" and self.choices:
            problems.append("task.choices: only for kind multiple_choice")
        if self.file_format is not None and self.file_format not in FILE_FORMATS:
            problems.append(f"task.file_format: {self.file_format!r} is not one of {', '.join(FILE_FORMATS)}")
        if not 0 < self.calibration_share < 1:
            problems.append(f"task.calibration_share: must be in (0, 1), got {self.calibration_share}")
        if self.calibration_split == self.evaluation_split:
            problems.append(f"task.calibration_split and task.evaluation_split are both {self.calibration_split!r}: "
                            "calibration data must never be evaluation data")
        if self.label_words and len(set(self.label_words.values())) != len(self.label_words):
            problems.append("task.label_words: two labels share the same word")
        for split in self.data_files:
            if not isinstance(self.data_files[split], str):
                problems.append(f"task.data_files.{split}: must be a file path")
        return problems + seed_problems("task.split_seed", self.split_seed) + _template_problems(self)

    def calibration_templates(self) -> list[PromptTemplate]:
        return [t for t in self.templates if not t.held_out]

    def held_out_templates(self) -> list[PromptTemplate]:
        return [t for t in self.templates if t.held_out]


def _template_problems(task: TaskSpec) -> list[str]:
    problems, names = [], [t.name for t in task.templates]
    if task.template and task.templates:
        problems.append("task.template and task.templates: give one template or a list, not both")
    for i, t in enumerate(task.templates):
        where = f"task.templates[{i}]"
        if not t.name:
            problems.append(f"{where}.name: required (a short name for reports)")
        if not t.template:
            problems.append(f"{where}.template: required (the prompt with {{column}} fields)")
        extra = sorted(set(t.label_words) - set(task.label_words)) if task.label_words else []
        if extra:
            problems.append(f"{where}.label_words: labels {extra} are not in task.label_words")
        words = t.words(task.label_words) if task.label_words else t.label_words
        if len(set(words.values())) != len(words):
            problems.append(f"{where}.label_words: two labels share the same word")
    duplicated = sorted({n for n in names if n and names.count(n) > 1})
    if duplicated:
        problems.append(f"task.templates: names {duplicated} are used twice")
    if task.templates and not task.calibration_templates():
        problems.append("task.templates: every template is held out; at least one must be for calibration")
    return problems


@dataclass
class CalibrationSpec:
    """Task data run through the model to record MLP activations (from the calibration split only)."""

    num_samples: int = field(default=1024, metadata=flag(
        "--num-samples", "Calibration rows, each drawn once (default {default}; all the split has if fewer)."))
    max_tokens: int = field(default=16384, metadata=flag(
        "--max-tokens", "Tokens sampled per layer for ICA and reconstruction (default {default})."))
    batch_size: int = field(default=16, metadata=flag("--batch-size", "Calibration batch size (default {default})."))
    max_length: int = 256
    store_dtype: str = "float32"
    # How the token sample is kept for ICA and reconstruction: its d x d float32 second moments ("moments"),
    # the tokens ("tokens"), or whichever is smaller per layer ("auto": moments when d <= max_tokens).
    sample_store: str = field(default="auto", metadata=flag(
        "--sample-store", "Keep the token sample itself or only its d x d second moments (default {default}: the "
        "smaller).", choices=SAMPLE_STORES))
    # draws the rows (a split used whole: their order, so which are plain text and each one's template) and tokens
    seed: int = field(default=0, metadata=_SEED)
    cache: bool = field(default=True, metadata=flag(
        "--cache/--no-cache",
        "Reuse calibration activations and networks, the dense model's scores and recovery's teacher from "
        "$FNPRUNE_CACHE_DIR; --no-cache also leaves nothing to resume from after an interruption (default {default})."))
    # share of calibration prompts that are the row's text alone, without any template (auto: 0.5 on every task
    # kind, chosen on the calibration split with a template held out; RESULTS 0.0.2, 0.0.3 and 0.0.13)
    raw_share: float | str = "auto"
    # multiple choice: the question alone ("none"), followed by its right choice, or once followed by each choice
    choices: str = field(default="none", metadata=flag(
        "--calibration-choices", "Multiple choice: what follows each calibration question (default {default}).",
        choices=CALIBRATION_CHOICES))

    def for_task(self, kind: str) -> CalibrationSpec:
        """This spec with `raw_share: auto` made concrete for a task of `kind` (the same share for every kind)."""
        return dataclasses.replace(self, raw_share=0.5) if self.raw_share == "auto" else self

    def check(self) -> list[str]:
        problems = []
        for name in ("num_samples", "max_tokens", "batch_size", "max_length"):
            problems += count_problems(f"calibration.{name}", getattr(self, name))
        if self.store_dtype not in STORE_DTYPES:
            problems.append(f"calibration.store_dtype: {self.store_dtype!r} is not one of {STORE_DTYPES}")
        if self.sample_store not in SAMPLE_STORES:
            problems.append(f"calibration.sample_store: {self.sample_store!r} is not one of {SAMPLE_STORES}")
        share = self.raw_share
        if share != "auto" and not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share < 1):
            problems.append(f"calibration.raw_share: must be auto or in [0, 1), got {self.raw_share!r}")
        if self.choices not in CALIBRATION_CHOICES:
            problems.append(f"calibration.choices: {self.choices!r} is not one of {CALIBRATION_CHOICES}")
        return problems + seed_problems("calibration.seed", self.seed)


@dataclass
class NetworksSpec:
    """Per-layer spatial ICA: k components, maps z-scored across neurons, |z| > threshold = member."""

    components: int = field(default=32, metadata=flag("--components", "ICA components per layer (default {default})."))
    threshold: float = field(default=3.0, metadata=flag(
        "--threshold", "|z| above which a neuron belongs to a network (default {default})."))
    max_iter: int = 400
    tol: float = 1e-4
    seed: int = field(default=0, metadata=_SEED)
    # torch (fnprune.networks: all layers' runs batched) or sklearn (numpy whitening + scikit-learn FastICA, the
    # reference); both start FastICA from scikit-learn's matrix for the seed.
    engine: str = field(default="torch", metadata=flag(
        "--ica-engine", "ICA implementation: torch (default; all layers batched) or sklearn (the reference).",
        choices=ICA_ENGINES))
    # FastICA runs per layer (seeds seed, seed + 1, ...), networks pooled (5: chosen by a removed sweep, RESULTS 1)
    runs: int = field(default=5, metadata=flag(
        "--ica-runs", "ICA runs per layer (seeds) whose networks are pooled (default {default})."))
    # Relevance from decision activity z-scored within each calibration template (wording is no label evidence)
    relevance_within_template: bool = True
    # labels: by how well a network's decision-token activity separates the labels; uniform: all alike
    relevance: str = field(default="labels", metadata=flag("--relevance", "How task networks are weighted: "
                           "{choices} (auto: labels, or uniform for multiple choice).", choices=RELEVANCE_MODES))

    def for_task(self, kind: str) -> NetworksSpec:
        """This spec with `relevance: auto` made concrete for a task of `kind`."""
        mc = kind == "multiple_choice"
        return dataclasses.replace(self, relevance="uniform" if mc else "labels") if self.relevance == "auto" else self

    def check(self) -> list[str]:
        problems = []
        if self.relevance not in RELEVANCE_MODES:
            problems.append(f"networks.relevance: {self.relevance!r} is not one of {', '.join(RELEVANCE_MODES)}")
        if self.engine not in ICA_ENGINES:
            problems.append(f"networks.engine: {self.engine!r} is not one of {', '.join(ICA_ENGINES)}")
        for name in ("runs", "components", "max_iter"):
            problems += count_problems(f"networks.{name}", getattr(self, name))
        for name in ("threshold", "tol"):  # `not 0 < x`: NaN fails too
            if not 0 < getattr(self, name) < math.inf:
                problems.append(f"networks.{name}: must be a finite number > 0, got {getattr(self, name)}")
        return problems + seed_problems("networks.seed", self.seed, max(self.runs, 1))


@dataclass
class SelectionSpec:
    """Which MLP neurons to keep: a criterion (`method`) and a budget (`keep` fraction, uniform per layer)."""

    # an unknown method is refused by check(); auto: flap, which beat fn-task on halves of the calibration split
    # for classification and multiple choice alike (evaluation/RESULTS.md 0.0 and 0.0.1)
    method: str = field(default="auto", metadata=flag(
        "--method", "Selection criterion: {choices} (default auto: flap; fn-task selects by functional networks).",
        choices=SELECTION_METHODS, strict=False))
    keep: float = field(default=0.5, metadata=flag(
        "--keep", "Fraction of MLP neurons kept: in every layer, or overall with --allocation, up to each layer's "
        "rounding (default {default})."))
    round_to: int = field(default=8, metadata=flag(
        "--round-to", "Round kept widths to a multiple of this (default {default})."))
    # uniform: same width in every layer; global / median / standardized: one ranking across layers
    allocation: str = field(default="uniform", metadata=flag(
        "--allocation", "uniform (default): same width per layer; global (scores over their layer's mean), median "
        "(over its median) or standardized (z-scored per layer, as FLAP): one ranking across layers.",
        choices=ALLOCATIONS))
    # None: on where the architecture allows it
    bias_compensation: bool | None = field(default=None, metadata=flag(
        "--bias-compensation/--no-bias-compensation",
        "Fold the removed neurons' mean output into the MLP bias (default: when the model allows)."))
    # least-squares fill of removed neurons from kept ones (fnprune.compensation)
    reconstruct: bool = field(default=True, metadata=flag(
        "--reconstruct/--no-reconstruct",
        "Rebuild removed neurons from kept ones by least squares, folded into the weights (default {default})."))
    ridge: float = field(default=0.1, metadata=flag(
        "--ridge", "Ridge of that least-squares fit, relative to the kept neurons' mean variance (default {default})."))
    # share of the reconstruction's objective given to the calibration prompts' last tokens (the answer position)
    answer_weight: float = 0.0
    # fnprune.refit; None (auto): on for classification in memory where the family allows (RESULTS.md 0.0.8)
    refit: bool | None = field(default=None, metadata=flag("--refit/--no-refit", "Refit each MLP output projection "
        "toward the dense block outputs (default: on for classification where the model allows it)."))
    # pulls the refit toward the reconstruction's weights, relative as `ridge` (RESULTS.md 0.0.10)
    refit_ridge: float = field(default=1.0, metadata=flag(
        "--refit-ridge", "Ridge of the refit toward the reconstruction's weights, relative (default {default})."))
    # the refit costs two forward passes over the first n calibration prompts (any prefix has every calibration
    # template and plain text in turn); None: all. 512 of 1,024: RESULTS.md 0.0.11. Sequential selection runs them too
    refit_prompts: int | None = field(default=512, metadata=flag(
        "--refit-prompts", "Calibration prompts the refit runs, the first N (default {default})."))
    # each layer scored on its activations in the model pruned before it (fnprune.refit), as FLAP's code runs
    # Wanda-SP; flap and wanda-sp; in memory; the widths stay the one-shot selection's
    sequential: bool = field(default=False, metadata=flag("--sequential/--no-sequential", "Score each layer on the "
        "model pruned before it, as FLAP's code runs Wanda-SP (flap, wanda-sp; default {default})."))
    # fn-task: weight of task-network membership; None = default_fn_boost
    fn_boost: float | None = field(default=None, metadata=flag(
        "--fn-boost", "fn-task: weight of task-network membership (default 16; with --no-reconstruct 1 at keep >= "
        "0.75)."))
    seed: int = field(default=0, metadata=_SEED)

    def for_task(self, kind: str) -> SelectionSpec:
        """This spec with `method: auto` made concrete for a task of `kind` (flap for every kind today; `kind`
        stays so that the choice can differ per kind when the tuning says so)."""
        return dataclasses.replace(self, method="flap") if self.method == "auto" else self

    def check(self) -> list[str]:
        problems = []
        if self.method not in SELECTION_METHODS:
            problems.append(f"selection.method: {self.method!r} is not one of {', '.join(SELECTION_METHODS)}")
        if not 0 < self.keep <= 1:
            problems.append(f"selection.keep: must be in (0, 1], got {self.keep}")
        problems += count_problems("selection.round_to", self.round_to)
        if self.allocation not in ALLOCATIONS:
            problems.append(f"selection.allocation: {self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        for name, value in (("fn_boost", self.fn_boost), ("ridge", self.ridge), ("refit_ridge", self.refit_ridge)):
            if value is not None and not 0 <= value < math.inf:
                problems.append(f"selection.{name}: must be a finite number >= 0, got {value}")
        problems += count_problems("selection.refit_prompts", self.refit_prompts, nullable=True)
        if not 0 <= self.answer_weight < 1:
            problems.append(f"selection.answer_weight: must be in [0, 1), got {self.answer_weight}")
        return problems + seed_problems("selection.seed", self.seed)


def default_fn_boost(keep: float, reconstruct: bool = True) -> float:
    """fn-task's membership boost when none is given (evaluation/RESULTS.md). With least-squares
    reconstruction: 16 at every budget (chosen on a held-out split of SST-2 train; best at 4 of 5 levels).
    Without it: 1 for mild pruning (keep >= 0.75), where the FLAP order is already good, 16 below."""
    if reconstruct:
        return 16.0
    return 1.0 if keep >= 0.75 else 16.0


@dataclass
class RecoverySpec:
    """Optional distillation after surgery (fnprune.recovery): the pruned model is trained toward the dense
    model's next-token distributions on the calibration prompts only (no labels), then saved with the same
    shapes. `params`: which weights train (the MLP projections, everything, or LoRA adapters on the MLP
    projections merged back before saving)."""

    # auto: on for multiple choice (whose scores are the answers' token log-likelihoods, what distillation
    # matches), off for classification and for models whose device map offloads weights
    enabled: bool | str = field(default="auto", metadata=flag(
        "--recover/--no-recover", "After surgery, distil the pruned model toward the dense one on the calibration "
        "prompts (default {default}: on for multiple-choice tasks)."))
    epochs: int = field(default=1, metadata=flag("--recover-epochs", "Recovery passes over the calibration prompts "
                                                 "(default {default})."))
    steps: int | None = field(default=None, metadata=flag(
        "--recover-steps", "Recovery optimisation steps (default: --recover-epochs passes)."))
    batch_size: int = field(default=8, metadata=flag("--recover-batch-size", "Prompts per recovery step "
                                                     "(default {default})."))
    lr: float = field(default=3e-4, metadata=flag(
        "--recover-lr", "Peak learning rate of recovery (AdamW, warm-up then cosine decay; default {default})."))
    warmup: float = 0.05  # share of the steps spent warming up
    params: str = field(default="mlp", metadata=flag(
        "--recover-params", "Weights recovery trains: {choices} (LoRA adapters merged into the weights).",
        choices=RECOVERY_PARAMS))
    lora_rank: int = 16
    answer_weight: float = 0.5  # share of the loss given to each prompt's answer position
    # weight of the KL between the label words' renormalized distributions at the answer position (added to the
    # loss; classification prompts of a template whose label words are one token each)
    label_weight: float = 1.0
    # what the label term matches: "own", the teacher under the prompt's own template; "consensus", the mean over
    # every calibration template of the teacher's label distribution for the same text, each template's average
    # prediction first made uniform (no labels read), so every wording is taught the dense model's best reading
    label_target: str = "consensus"
    top_k: int = 64  # teacher log-probabilities kept per token (plus the mass of all other tokens)
    evaluate_before: bool = True  # also score the pruned model before recovery (report.json `recovery.before`)
    seed: int = 0

    def for_task(self, kind: str, trainable: bool) -> RecoverySpec:
        """This spec with `enabled: auto` made concrete for a task of `kind` and a model recovery can train."""
        on = kind == "multiple_choice" and trainable
        return dataclasses.replace(self, enabled=on) if self.enabled == "auto" else self

    def check(self) -> list[str]:
        problems = [] if self.enabled in (True, False, "auto") else [
            f"recovery.enabled: {self.enabled!r} is not true, false or auto"]
        for name in ("epochs", "batch_size", "lora_rank", "top_k"):
            problems += count_problems(f"recovery.{name}", getattr(self, name))
        problems += count_problems("recovery.steps", self.steps, nullable=True)
        if not 0 < self.lr < math.inf:
            problems.append(f"recovery.lr: must be a finite number > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            problems.append(f"recovery.warmup: must be in [0, 1), got {self.warmup}")
        if not 0 <= self.answer_weight <= 1:
            problems.append(f"recovery.answer_weight: must be in [0, 1], got {self.answer_weight}")
        if not 0 <= self.label_weight < math.inf:
            problems.append(f"recovery.label_weight: must be a finite number >= 0, got {self.label_weight}")
        if self.label_target not in LABEL_TARGETS:
            problems.append(f"recovery.label_target: {self.label_target!r} is not one of {', '.join(LABEL_TARGETS)}")
        if self.params not in RECOVERY_PARAMS:
            problems.append(f"recovery.params: {self.params!r} is not one of {', '.join(RECOVERY_PARAMS)}")
        return problems + seed_problems("recovery.seed", self.seed)


PERPLEXITY_TASK = "wikitext"


@dataclass
class ValidationTask:
    """One more benchmark scored dense and pruned in the same run: a built-in task on its evaluation split
    (under `templates`, default its held-out ones), or `wikitext`: perplexity of a WikiText-2 raw file (`file`,
    or wiki.test.raw in `data_dir`) over `evaluation.perplexity_tokens` tokens in fixed windows."""

    task: str = ""
    data_dir: str | None = None
    file: str | None = None
    templates: list[str] = field(default_factory=list)
    max_samples: int | None = None  # None: evaluation.max_samples

    def problems(self, where: str) -> list[str]:
        found = [] if self.task else [f"{where}.task: required (a built-in task or {PERPLEXITY_TASK})"]
        if self.task == PERPLEXITY_TASK and not (self.file or self.data_dir):
            found.append(f"{where}: {PERPLEXITY_TASK} needs file (or data_dir holding wiki.test.raw)")
        if self.task != PERPLEXITY_TASK and not self.data_dir:
            found.append(f"{where}.data_dir: required (the folder with the task's files)")
        found += count_problems(f"{where}.max_samples", self.max_samples, nullable=True)
        return found


@dataclass
class EvaluationSpec:
    """Zero-shot accuracy on the evaluation split, dense and pruned (`max_samples: null` = all), and the
    `validation` benchmarks and lm-evaluation-harness tasks (`lm_eval_tasks`) beside it."""

    enabled: bool = field(default=True, metadata=flag(
        "--eval/--no-eval", "Evaluate dense and pruned models (default {default})."))
    max_samples: int | None = field(default=None, metadata=flag(
        "--eval-samples", "Evaluate on the first N evaluation examples only."))
    batch_size: int = 32
    validation: list[ValidationTask] = field(default_factory=list, metadata=flag(
        "--validate", "Also score this benchmark dense and pruned: a built-in task and its data folder, or "
        "wikitext=FILE (perplexity). Repeatable.", multiple=True, metavar="TASK=PATH"))
    # WikiText-2 tokens scored (the model's own tokens), first ones of the file
    perplexity_tokens: int = field(default=16384, metadata=flag(
        "--perplexity-tokens", "WikiText tokens read with --validate wikitext; each window's first token is context "
        "only (default {default})."))
    # non-overlapping windows; each window's first token is context only
    perplexity_window: int = field(default=512, metadata=flag(
        "--perplexity-window", "Window of that perplexity, in tokens (default {default})."))
    # lm-evaluation-harness on the dense and the pruned model (fnprune.lm_eval_backend; `fnprune evaluate` too)
    lm_eval_tasks: list[str] = field(default_factory=list, metadata=flag(
        "--lm-eval-tasks", "Also run lm-evaluation-harness on these tasks, comma separated (needs fnprune[lm-eval]; "
        "in compress, on the dense and the pruned model); the model is loaded by fnprune, so every layout works.",
        metavar="TASK[,TASK]"))
    lm_eval_include: str | None = field(default=None, metadata=flag(
        "--lm-eval-include", "Folder of lm-eval task YAMLs (e.g. evaluation/lm_eval_tasks over local files).",
        metavar="DIR"))
    lm_eval_limit: int | None = field(default=None, metadata=flag(
        "--lm-eval-limit", "lm-eval: the first N documents of each task only (default: all)."))

    def check(self) -> list[str]:
        problems = []
        problems += count_problems("evaluation.max_samples", self.max_samples, nullable=True)
        problems += count_problems("evaluation.batch_size", self.batch_size)
        names = [v.task for v in self.validation]
        for i, v in enumerate(self.validation):
            problems.extend(v.problems(f"evaluation.validation[{i}]"))
        if len(set(names)) != len(names):
            problems.append(f"evaluation.validation: a task is listed twice ({', '.join(names)})")
        if self.perplexity_window < 2 or self.perplexity_tokens < self.perplexity_window:
            problems.append("evaluation.perplexity_window: must be >= 2 and at most evaluation.perplexity_tokens")
        elif self.perplexity_tokens % self.perplexity_window:
            problems.append(f"evaluation.perplexity_tokens: {self.perplexity_tokens} is not a multiple of the window "
                            f"{self.perplexity_window}; the last {self.perplexity_tokens % self.perplexity_window} "
                            "would not be scored")
        default = EvaluationSpec()
        if PERPLEXITY_TASK not in names and (self.perplexity_tokens, self.perplexity_window) != (
                default.perplexity_tokens, default.perplexity_window):
            problems.append("evaluation.perplexity_tokens/_window: only used with --validate wikitext=FILE")
        return problems + _lm_eval_problems(self)


def _lm_eval_problems(ev: EvaluationSpec) -> list[str]:
    """The lm-eval fields (whether lm-eval is installed and the include folder exists: at load time)."""
    problems = []
    for i, name in enumerate(ev.lm_eval_tasks):
        if not isinstance(name, str) or not name.strip() or "," in name or name != name.strip():
            problems.append(f"evaluation.lm_eval_tasks[{i}]: {name!r} is not an lm-eval task name")
    if len(set(ev.lm_eval_tasks)) != len(ev.lm_eval_tasks):
        problems.append(f"evaluation.lm_eval_tasks: a task is listed twice ({', '.join(map(str, ev.lm_eval_tasks))})")
    problems += count_problems("evaluation.lm_eval_limit (--lm-eval-limit)", ev.lm_eval_limit, nullable=True)
    if ev.lm_eval_include is not None and not ev.lm_eval_include:
        problems.append("evaluation.lm_eval_include: an empty path; give the folder of task YAMLs or null")
    if not ev.lm_eval_tasks:
        for name in ("lm_eval_include", "lm_eval_limit"):
            if getattr(ev, name) is not None:
                problems.append(f"evaluation.{name}: only used with evaluation.lm_eval_tasks (--lm-eval-tasks)")
    return problems


@dataclass
class OutputSpec:
    """Where the pruned checkpoint goes; an existing directory is replaced only with `overwrite`."""

    dir: str = field(default="", metadata=flag("--output", "Output directory for the pruned checkpoint."))
    overwrite: bool = field(default=False, metadata=flag("--overwrite", "Replace an existing output directory."))
    # uniform | per-layer | padded (how per-layer widths are stored)
    layout: str = field(default="uniform", metadata=flag(
        "--layout", "How per-layer widths are saved (default {default}; other allocations need per-layer/padded).",
        choices=LAYOUTS))
    # Hub repo id to upload the output folder to
    push_to_hub: str | None = field(default=None, metadata=flag(
        "--push-to-hub", "Upload the output folder to this Hub repo.", metavar="REPO"))
    private: bool = field(default=False, metadata=flag("--private", "Create the Hub repo as private."))
    # safetensors shards of at most this size (save_pretrained's format)
    max_shard_size: str = field(default="5GB", metadata=flag(
        "--max-shard-size", "Split model.safetensors into shards of at most this size, e.g. 2GB (default {default})."))
    # surgery from the source files, tensor by tensor (always on with model.device_map)
    streamed: bool = field(default=False, metadata=flag(
        "--streamed", "Streamed surgery from the source files without --device-map (never two copies in memory)."))

    def check(self) -> list[str]:
        problems = [] if self.dir else ["output.dir: required (--output DIR on the command line)"]
        if self.layout not in LAYOUTS:
            problems.append(f"output.layout: {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if not isinstance(self.max_shard_size, str) or not _SHARD_SIZE.fullmatch(self.max_shard_size):
            problems.append(f"output.max_shard_size: {self.max_shard_size!r} is not a size saving accepts (a whole "
                            "number of KB, MB, GB, KiB, MiB or GiB, like 5GB, 500MB)")
        if self.private and not self.push_to_hub:
            problems.append("output.private (--private): only used with output.push_to_hub (--push-to-hub REPO)")
        return problems


@dataclass
class Recipe:
    """One compression run. `provenance` is filled in when the run is saved (versions, data hashes)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    networks: NetworksSpec = field(default_factory=NetworksSpec)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    provenance: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        found: list[str] = []
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                found.extend(section.check())
        if self.streamed() and self.output.layout == "per-layer":
            found.append("output.layout per-layer is not supported by streamed surgery (model.device_map or "
                         "output.streamed): use uniform or padded")
        dm, recover = self.model.device_map, self.recovery.enabled is True  # auto: off with offload
        if recover and (self.model.offload_folder or isinstance(dm, dict) and "disk" in dm.values()):
            found.append("recovery trains the pruned weights in place: it does not run with disk offload "
                         "(model.device_map entries 'disk', model.offload_folder)")
        for name in ("refit", "sequential"):
            if getattr(self.selection, name) is True and self.streamed():
                found.append(f"selection.{name} runs the pruned model in memory: it does not run with streamed "
                             "surgery (model.device_map or output.streamed)")
        if self.selection.allocation != "uniform" and self.output.layout == "uniform":
            found.append(f"selection.allocation {self.selection.allocation!r} gives layers different widths: "
                         "set output.layout to per-layer or padded")
        return found

    def streamed(self) -> bool:
        """Surgery from the source checkpoint files (model.device_map set, or output.streamed)."""
        return self.model.device_map is not None or self.output.streamed

    def validate(self) -> Recipe:
        """Raise one RecipeError listing every problem, or return self."""
        problems = self.problems()
        if problems:
            raise RecipeError(problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if (value is None or (value == "auto" and bool in args)) and type(None) in args:  # a switch's auto: unset
            return None
        inner = [a for a in args if a is not type(None)]
        if float in inner and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)  # `raw_share: 1e-1` (PyYAML reads it as a string) is the number, not a word
        matching = [a for a in inner if isinstance(value, typing.get_origin(a) or a)]  # str | dict: by kind
        return _coerce(value, (matching or inner)[0], where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return []
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return [_coerce(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return {}
        out = {}
        for k, v in value.items():
            if tp is not dict and typing.get_args(tp)[1] is str:
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    problems.append(f"{where}.{k}: expected a string, got {type(v).__name__}")
                    continue
                v = str(v)
            out[str(k)] = v
        return out
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 3e-4 as a string: it needs a dot, 3.0e-4
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            problems.append(f"{where + '.' if where else ''}{key}: unknown field (allowed: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        sub = f"{where + '.' if where else ''}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], sub, problems)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, sub, problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        problems.append(f"{where}: {exc}")
        return cls()


def recipe_from_dict(data: Any) -> Recipe:
    """Build a Recipe from plain data, reporting unknown keys and wrong types all at once."""
    problems: list[str] = []
    recipe = _build(Recipe, data, "", problems)
    if problems:
        raise RecipeError(problems)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe with a safe loader (yaml.safe_load's, which refuses duplicate keys)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    try:
        return recipe_from_dict(data)
    except RecipeError as exc:  # which file: a folder's recipe.yaml, or the --recipe given
        raise RecipeError([f"{path}: {problem}" for problem in exc.problems]) from exc


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of the recipe, keys in declaration order so equal recipes give equal text."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=False)


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Return a copy with dotted-key overrides (`selection.keep`) applied; None values are skipped."""
    data = recipe.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            if not isinstance(node.get(p), dict):
                raise RecipeError(f"{dotted}: {'.'.join(parents[:i + 1])} is not a recipe section (sections: "
                                  f"{', '.join(k for k, v in node.items() if isinstance(v, dict))})")
            node = node[p]
        node[leaf] = value
    return recipe_from_dict(data)
