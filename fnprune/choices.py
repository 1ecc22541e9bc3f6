"""The values a recipe's choice fields can take: one definition, read by the recipe's checks and by the stages
that act on them (selection, surgery, capture). No torch, no imports."""

from __future__ import annotations

__all__ = [
    "METHODS",
    "SELECTION_METHODS",
    "NETWORK_METHODS",
    "SEQUENTIAL_METHODS",
    "ALLOCATIONS",
    "LAYOUTS",
    "STREAMED_LAYOUTS",
    "DTYPES",
    "STORE_DTYPES",
    "SAMPLE_STORES",
    "TASK_KINDS",
    "FILE_FORMATS",
    "ICA_ENGINES",
    "RELEVANCE_MODES",
    "DEVICE_MAP_STRATEGIES",
    "RECOVERY_PARAMS",
    "LABEL_TARGETS",
    "CALIBRATION_CHOICES",
]

METHODS = ("fn-task", "fn", "random", "magnitude", "wanda-sp", "flap")  # selection criteria
NETWORK_METHODS = ("fn", "fn-task")  # criteria that read functional networks
SEQUENTIAL_METHODS = ("flap", "wanda-sp")  # criteria read from activations alone: selection.sequential rescores them
# what a recipe's selection.method may say: a criterion, or auto (flap on every task kind, chosen on calibration data)
SELECTION_METHODS = ("auto", *METHODS)
# per-layer budget: same width everywhere, or one ranking across layers of each layer's scores divided by their
# mean (global), by their median (median), or standardized to zero mean and unit spread (FLAP's adaptive structure)
ALLOCATIONS = ("uniform", "global", "median", "standardized")
LAYOUTS = ("uniform", "per-layer", "padded")  # how per-layer widths are stored
STREAMED_LAYOUTS = ("uniform", "padded")  # the layouts streamed surgery writes (per-layer needs the model)
DTYPES = ("float32", "bfloat16", "float16")
STORE_DTYPES = ("float32", "float16", "bfloat16")
SAMPLE_STORES = ("auto", "tokens", "moments")
TASK_KINDS = ("classification", "multiple_choice")
FILE_FORMATS = ("tsv", "tsv-quoted", "csv", "jsonl")
ICA_ENGINES = ("sklearn", "torch")
# how networks are weighted by task relevance: label separation at the decision token, all alike, or auto
# (labels for classification, uniform for multiple choice)
RELEVANCE_MODES = ("auto", "labels", "uniform")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
RECOVERY_PARAMS = ("mlp", "all", "lora")  # which weights recovery trains
LABEL_TARGETS = ("own", "consensus")  # what recovery's label term matches (RecoverySpec.label_target)
# multiple choice: what follows the question in a calibration prompt (nothing, the right choice, each choice)
CALIBRATION_CHOICES = ("none", "answer", "all")
