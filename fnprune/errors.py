"""Exceptions fnprune raises for problems a user can fix (bad recipe, data, model or output path)."""

from __future__ import annotations

__all__ = ["FnpruneError", "RecipeError", "DataError", "MissingSplitFile", "ModelError", "OutputError",
           "NumericalError", "first_line"]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library error's first line for a one-line message, cut at `limit` characters (some list every model type
    transformers knows)."""
    line = next(iter(str(exc).strip().splitlines()), "")
    return line if len(line) <= limit else line[:limit] + " ..."


class FnpruneError(Exception):
    """Base class: every user-facing failure; the CLI prints these without a traceback."""


class RecipeError(FnpruneError, ValueError):
    """A recipe field is unknown, of the wrong type or out of range. Lists every problem at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid recipe:\n  - " + "\n  - ".join(self.problems))


class DataError(FnpruneError, ValueError):
    """Task data is missing, malformed, or calibration and evaluation data overlap."""


class MissingSplitFile(DataError):
    """A split has no local file. The message ends in compress's remedy (its flags, a recipe); `problem` is the
    fact alone, so a command with other flags (analyze, its --also-task) can give its own remedy."""

    def __init__(self, problem: str, remedy: str):
        super().__init__(problem + remedy)
        self.problem, self.remedy = problem, remedy

    def __reduce__(self):  # pickled as its two parts (multiprocessing, pytest-xdist), not as one message
        return type(self), (self.problem, self.remedy)


class ModelError(FnpruneError, ValueError):
    """The model cannot be loaded or its architecture is not supported."""


class OutputError(FnpruneError, FileExistsError):
    """The output directory exists (and --overwrite was not given) or cannot be written."""


class NumericalError(FnpruneError, ValueError):
    """Activations or scores are NaN/inf (a broken model or dtype overflow); names the layer."""
