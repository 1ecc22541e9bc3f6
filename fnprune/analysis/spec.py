"""What one analysis runs on and how: the recipe's model, task, calibration and networks sections, plus the
settings only the experiments have. The `fnprune analyze` flags map one to one onto these fields."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from ..data import parse_data_files
from ..errors import RecipeError
from ..recipe import CalibrationSpec, ModelSpec, NetworksSpec, Recipe, TaskSpec, seed_problems
from ..tasks import set_fields

__all__ = ["AnalysisSpec", "parse_scales", "spec_command", "task_from_arg"]

# Flat setting (the CLI flag's name) -> the recipe section that holds it; `seed` seeds both sections.
RECIPE_SETTINGS = {
    "num_samples": "calibration", "max_tokens": "calibration", "batch_size": "calibration", "cache": "calibration",
    "components": "networks", "threshold": "networks", "max_iter": "networks", "tol": "networks",
}


def _calibration() -> CalibrationSpec:
    # Fewer examples and tokens than compress: the experiments run many more forward passes afterwards.
    # The group ICA concatenates every layer's tokens, so the sample is kept as tokens, not moments.
    return CalibrationSpec(num_samples=256, max_tokens=4096, sample_store="tokens")


def _networks() -> NetworksSpec:
    # One ICA per layer, as the paper analyses them: compress pools several runs' networks (networks.runs), which
    # repeat one another, so the analysed networks and their random controls would include copies.
    return NetworksSpec(runs=1)


@dataclass
class AnalysisSpec:
    """Every setting of one analysis. `calibration.seed` seeds every sample and control, `networks.seed`
    every ICA (the CLI's --seed sets both)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    calibration: CalibrationSpec = field(default_factory=_calibration)
    networks: NetworksSpec = field(default_factory=_networks)
    also_tasks: list[TaskSpec] = field(default_factory=list)  # extra tasks for the recurrence experiment
    group_tokens: int = 2048  # calibration tokens used for the group ICA (all layers concatenated)
    recurrence_groups: int = 12  # small groups of held-out samples, per task
    group_size: int = 8  # samples per group
    iou_threshold: float = 0.2
    top_networks: int = 8  # per-layer networks analyzed, ranked by task relevance
    control_networks: int = 2  # random per-layer networks analyzed as controls
    seeds: int = 3  # random-neuron control seeds
    scales: tuple[float, ...] = (0.0, 0.5, 1.5, 2.0, 3.0)
    group_mask: int = 10  # top group networks masked together (the paper's test); 0 = skip
    eval_samples: int = 300  # evaluation subset (evaluation split, seeded sample)
    eval_batch_size: int = 32
    output: str = ""
    overwrite: bool = False

    @classmethod
    def from_settings(cls, seed: int | None = None, **settings: Any) -> AnalysisSpec:
        """A spec from flat settings (the CLI's names): recipe settings go into their section."""
        sections = {"calibration": _calibration(), "networks": _networks()}
        for name in [n for n in settings if n in RECIPE_SETTINGS]:
            setattr(sections[RECIPE_SETTINGS[name]], name, settings.pop(name))
        if seed is not None:
            sections["calibration"].seed = sections["networks"].seed = seed
        return cls(**sections, **settings)

    @property
    def seed(self) -> int:
        """The seed of every sample and control (examples, tokens, groups, halves, random neurons)."""
        return self.calibration.seed

    def input_paths(self) -> list[str | None]:
        """The model and every task's data folder and files: what the output folder may not replace."""
        tasks = (self.task, *self.also_tasks)
        return [self.model.name_or_path, *(p for t in tasks for p in (t.data_dir, *t.data_files.values()))]

    def recipe(self, task: TaskSpec) -> Recipe:
        """The recipe whose calibration and per-layer networks the experiments start from."""
        return Recipe(model=self.model, task=task, calibration=self.calibration, networks=self.networks)

    def problems(self) -> list[str]:
        out = []
        for name in ("group_tokens", "group_size", "eval_batch_size", "seeds"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 2:  # each half needs an example, or its accuracy is NaN
            out.append(f"eval_samples: must be >= 2 (the examples are split into two halves), got {self.eval_samples}")
        for name in ("recurrence_groups", "top_networks", "control_networks", "group_mask"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.group_tokens <= self.networks.components:  # else the group ICA fails after calibration
            out.append(f"group_tokens: must be above components ({self.networks.components}): the group ICA finds "
                       f"that many components in these tokens, got {self.group_tokens}")
        if self.top_networks + self.control_networks < 1:
            out.append("top_networks + control_networks: analyze at least one network")
        if not 0 < self.iou_threshold < 1:
            out.append(f"iou_threshold: must be in (0, 1), got {self.iou_threshold}")
        if not self.scales or not all(math.isfinite(s) and s >= 0 for s in self.scales):
            out.append(f"scales: need at least one factor, all finite and >= 0, got {list(self.scales)}")
        elif all(s == 1 for s in self.scales):
            out.append("scales: 1 leaves a network as it is; give at least one other factor, e.g. 0,2")
        elif len(set(self.scales)) < len(self.scales):
            out.append(f"scales: each factor once, got {list(self.scales)}")
        if not self.model.name_or_path:
            out.append("model: required")
        names = [self.task.name, *(t.name for t in self.also_tasks)]
        if len(set(names)) < len(names):  # one name, two sources: merged in the tables, and rows drawn twice
            out.append(f"also_tasks: each must be a task other than --task and the others, got {', '.join(names)}")
        unread = [name for name in ("raw_share", "choices")
                  if getattr(self.calibration, name) != getattr(CalibrationSpec(), name)]
        if unread:  # compress's mix of prompts; analyze calibrates under the first calibration template
            out.append(f"calibration.{', calibration.'.join(unread)}: analyze does not read "
                       f"{'them' if len(unread) > 1 else 'it'} (its calibration prompts are the task's first "
                       "calibration template, as the paper's one prompt); leave the default")
        if self.calibration.sample_store != "tokens":
            out.append(f"calibration.sample_store: analyze needs 'tokens' (the group ICA concatenates every "
                       f"layer's tokens), got {self.calibration.sample_store!r}")
        return (out + self.model.check() + self.task.check() + [p for t in self.also_tasks for p in t.check()]
                + self.calibration.check() + self._networks_problems())

    def _networks_problems(self) -> list[str]:
        """The networks section's problems; recurrence group g's ICA is seeded networks.seed + g, so with more
        groups than runs the seed check says so (not "runs", which --recurrence-groups does not set)."""
        groups, runs = self.recurrence_groups, self.networks.runs
        if groups <= runs or runs < 1:
            return self.networks.check()
        own = self.networks.check()
        seed = seed_problems("networks.seed", self.networks.seed, runs)
        return ([p for p in own if p not in seed]
                + seed_problems("networks.seed", self.networks.seed, groups, "ICAs, one per recurrence group"))

    def validate(self) -> AnalysisSpec:
        problems = self.problems()
        if problems:
            raise RecipeError(problems)
        return self


def task_from_arg(value: str) -> TaskSpec:
    """`NAME`, `NAME:DIR` or `NAME:SPLIT=PATH,SPLIT=PATH` (the --also-task syntax) -> TaskSpec."""
    name, _, data = value.partition(":")
    if not name:
        raise RecipeError(f"--also-task {value!r}: expected NAME, NAME:DIR or NAME:SPLIT=PATH,...")
    if "=" not in data:
        return TaskSpec(name=name, data_dir=data or None)
    try:
        return TaskSpec(name=name, data_files=parse_data_files(data))
    except ValueError as exc:
        raise RecipeError(f"--also-task {value!r}: {exc}") from exc


def parse_scales(value: str | None) -> tuple[float, ...] | None:
    """'0,0.5,2' -> (0.0, 0.5, 2.0); None stays None."""
    if value is None:
        return None
    if not value.strip():
        raise RecipeError("--scales '': expected numbers separated by commas, e.g. 0,0.5,2")
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as exc:
        raise RecipeError(f"--scales {value!r}: expected numbers separated by commas, e.g. 0,0.5,2") from exc


def _task_arg(task: TaskSpec) -> str:
    if task.data_files:
        return task.name + ":" + ",".join(f"{k}={v}" for k, v in task.data_files.items())
    return task.name + (f":{task.data_dir}" if task.data_dir else "")


# flag -> where its value sits in the spec, in the order the command line lists them
_FLAGS = {
    "--num-samples": ("calibration", "num_samples"), "--max-tokens": ("calibration", "max_tokens"),
    "--components": ("networks", "components"), "--threshold": ("networks", "threshold"),
    "--seed": ("calibration", "seed"), "--group-tokens": (None, "group_tokens"),
    "--recurrence-groups": (None, "recurrence_groups"), "--group-size": (None, "group_size"),
    "--iou": (None, "iou_threshold"), "--top-networks": (None, "top_networks"),
    "--control-networks": (None, "control_networks"), "--seeds": (None, "seeds"),
    "--group-mask": (None, "group_mask"), "--eval-samples": (None, "eval_samples"),
}


def _value(spec: AnalysisSpec, section: str | None, name: str) -> Any:
    return getattr(getattr(spec, section) if section else spec, name)


def spec_command(spec: AnalysisSpec) -> str:
    """The `fnprune analyze` command line that reruns exactly this spec."""
    args = ["fnprune", "analyze", "--task", spec.task.name, "--model", spec.model.name_or_path]
    if spec.task.data_dir:  # both may be given: the files name some splits, the folder holds the others
        args += ["--data-dir", spec.task.data_dir]
    if spec.task.data_files:
        args += ["--data-files", ",".join(f"{k}={v}" for k, v in spec.task.data_files.items())]
    for t in spec.also_tasks:
        args += ["--also-task", _task_arg(t)]
    defaults = AnalysisSpec()
    for flag, (section, name) in _FLAGS.items():
        if _value(spec, section, name) != _value(defaults, section, name):
            args += [flag, str(_value(spec, section, name))]
    if tuple(spec.scales) != defaults.scales:
        args += ["--scales", ",".join(f"{s:g}" for s in spec.scales)]
    if not spec.calibration.cache:
        args.append("--no-cache")
    if spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    args += ["--output", spec.output or "DIR"]
    if spec.overwrite:
        args.append("--overwrite")
    unsaid = _api_only(spec)
    return shlex.join(args) + (f"  # set from Python, no flag: {', '.join(unsaid)}" if unsaid else "")


def _api_only(spec: AnalysisSpec) -> list[str]:
    """The spec's settings that differ from the CLI's and that no `fnprune analyze` flag sets."""
    defaults, cli = AnalysisSpec(), AnalysisSpec.from_settings(seed=spec.calibration.seed)
    pairs = {"networks.seed": (spec.networks.seed, cli.networks.seed),
             "eval_batch_size": (spec.eval_batch_size, defaults.eval_batch_size)}
    pairs |= {f"model.{k}": (getattr(spec.model, k), getattr(defaults.model, k))
              for k in ("dtype", "revision", "device_map", "offload_folder")}
    pairs |= {f"calibration.{k}": (getattr(spec.calibration, k), getattr(defaults.calibration, k))
              for k in ("batch_size", "max_length", "store_dtype")}
    pairs |= {f"networks.{k}": (getattr(spec.networks, k), getattr(defaults.networks, k))
              for k in ("max_iter", "tol", "runs", "engine")}
    unsaid = [f"{name}={value}" for name, (value, default) in pairs.items() if value != default]
    tasks = {"task": spec.task} | {f"also_tasks[{i}]": t for i, t in enumerate(spec.also_tasks)}
    return unsaid + [s for prefix, task in tasks.items() for s in _task_api_only(prefix, task)]


def _task_api_only(prefix: str, task: TaskSpec) -> list[str]:
    """A task's fields set beyond what --task / --also-task say (name, folder, files): scalars with their value,
    templates, label words and the other lists by name (too long for a one-line comment)."""
    out = []
    for name in [n for n in set_fields(task) if n not in ("data_dir", "data_files")]:
        value = getattr(task, name)
        by_name = name == "template" or isinstance(value, (list, dict))
        out.append(f"{prefix}.{name}" + ("" if by_name else f"={value}"))
    return out
