"""`fnprune analyze`: the paper's functional-network experiments on any supported model, with pictures.

Four experiments (`experiments`), each a table (CSV) and a figure (PNG, `figures`), gathered in `report.md`
(`report`): the networks (per-layer and cross-layer), their recurrence in other samples, key networks
(masking vs random neurons) and amplification. The spec (`spec`) is the recipe's model, task, calibration
and networks sections plus the experiments' own settings; calibration and per-layer networks come from compress's
capture and ICA, on calibration prompts under the task's first calibration template (the paper's one prompt;
compress also rotates the other templates and plain text, `calibration.raw_share`, which analyze does not read);
scores are `fnprune.evaluate`'s.

Notebook use::

    from fnprune.analysis import AnalysisSpec, run_analysis, write_report
    from fnprune.recipe import ModelSpec, TaskSpec
    spec = AnalysisSpec(model=ModelSpec("path"), task=TaskSpec("sst2", data_dir="data/sst2"), eval_samples=200)
    analysis = run_analysis(spec)          # tables: analysis.tables["key_networks"] (list of dicts), ...
    write_report(analysis, "out/analysis") # report.md + PNGs + CSVs (atomically)
"""

from __future__ import annotations

from .cross_layer import GroupNetworks, group_networks, iou_matrix, match_templates, shuffle_within_layers
from .figures import FIGURES
from .group_ica import spatial_ica
from .report import REPORT, write_report
from .run import Analysis, analyze, run_analysis
from .scoring import Scorer, verify_masking
from .spec import AnalysisSpec, parse_scales, spec_command, task_from_arg

__all__ = [
    "AnalysisSpec",
    "Analysis",
    "GroupNetworks",
    "FIGURES",
    "REPORT",
    "analyze",
    "run_analysis",
    "write_report",
    "spatial_ica",
    "group_networks",
    "iou_matrix",
    "match_templates",
    "shuffle_within_layers",
    "Scorer",
    "verify_masking",
    "spec_command",
    "task_from_arg",
    "parse_scales",
]
