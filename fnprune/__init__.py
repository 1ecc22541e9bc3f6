"""fnprune: keep the MLP neurons a task needs (scored on task data, or by its functional networks), physically
remove the others, and write a smaller checkpoint."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DataError, FnpruneError, ModelError, OutputError, RecipeError  # noqa: E402
from .evaluate_checkpoint import evaluate_model  # noqa: E402
from .models import PrunedModel, load_pruned  # noqa: E402
from .pipeline import CompressResult, compress  # noqa: E402
from .recipe import Recipe, apply_overrides, dump_recipe, load_recipe  # noqa: E402

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
