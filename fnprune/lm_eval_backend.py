"""lm-evaluation-harness as a second scorer (optional: pip install 'fnprune[lm-eval]').

Users judge a pruned model with lm-eval, so fnprune can run it on the checkpoint it wrote. The model is loaded
by fnprune (`load_model`: uniform, padded and per-layer layouts, the last without remote code) and handed to
lm-eval's HFLM as an object, so lm-eval never needs to know how per-layer widths are stored. Tasks come from
lm-eval's registry or from `include` (a folder of task YAMLs, e.g. evaluation/lm_eval_tasks over local files).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .errors import FnpruneError

__all__ = ["lm_eval_available", "run_lm_eval"]

log = logging.getLogger("fnprune")


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], include: str | None = None, batch_size: int = 16,
                limit: int | None = None) -> dict[str, Any]:
    """lm-eval's results per task ({"acc": ..., "acc_norm": ..., "acc_stderr": ...}) and its version."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise FnpruneError(
            "the lm-eval backend needs lm-evaluation-harness: pip install 'fnprune[lm-eval]'"
        ) from exc
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else " (add --lm-eval-include DIR for local task YAMLs)"
        raise FnpruneError(f"lm-eval has no task(s) {', '.join(unknown)}{where}")
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    finally:
        model.train(was_training)
    results: dict[str, Any] = {}
    for task, metrics in (raw or {}).get("results", {}).items():
        results[task] = {
            k.split(",")[0]: v for k, v in metrics.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        results[task]["n"] = (raw.get("n-samples", {}).get(task) or {}).get("effective")
    return {"lm_eval_version": getattr(lm_eval, "__version__", None), "tasks": tasks, "include": include,
            "limit": limit, "results": results}
