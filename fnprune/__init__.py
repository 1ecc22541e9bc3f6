"""fnprune: keep the MLP neurons a task needs (scored on task data, or by its functional networks), physically
remove the others, and write a smaller checkpoint.

The API below is imported on first use (PEP 562), so `import fnprune.cli` does not load torch and transformers:
`fnprune --help` answers at once, and Ctrl-C while they load reaches the CLI's one-line message."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import DataError, FnpruneError, ModelError, OutputError, RecipeError  # noqa: E402

_API = {  # name -> the module that defines it
    "compress": "pipeline",
    "CompressResult": "pipeline",
    "load_pruned": "models",
    "PrunedModel": "models",
    "evaluate_model": "evaluate_checkpoint",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "apply_overrides": "recipe",
    "dump_recipe": "recipe",
}

if TYPE_CHECKING:
    from .evaluate_checkpoint import evaluate_model
    from .models import PrunedModel, load_pruned
    from .pipeline import CompressResult, compress
    from .recipe import Recipe, apply_overrides, dump_recipe, load_recipe

__all__ = [
    "__version__",
    "compress",
    "CompressResult",
    "load_pruned",
    "evaluate_model",
    "PrunedModel",
    "Recipe",
    "load_recipe",
    "apply_overrides",
    "dump_recipe",
    "FnpruneError",
    "RecipeError",
    "DataError",
    "ModelError",
    "OutputError",
]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'fnprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
