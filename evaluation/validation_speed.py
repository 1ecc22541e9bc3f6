"""fnprune's validation throughput (examples/s of `evaluate_templates`, the scorer compress and `fnprune
evaluate` use) beside a plain batched forward pass over the same token sequences, as a user would write it:
batches in file order, padded, one `model(...)` call each and nothing else. Used by `bench_speed.py
--validation-tasks`.
"""

from __future__ import annotations

import time

import torch

from fnprune.data import load_evaluation
from fnprune.evaluate import choice_requests, evaluate_templates
from fnprune.recipe import TaskSpec
from fnprune.tasks import resolve_task
from fnprune.tokens import context_length, encode, make_batch

__all__ = ["validation_throughput"]


def _sequences(model, tokenizer, task: TaskSpec, sets: dict) -> tuple[list[list[int]], bool]:
    """The token sequences the scorer runs (its own encoders and length limits, evaluate_templates' defaults),
    and whether every position's logits are needed (choices)."""
    examples = [e for group in sets.values() for e in group]
    length = context_length(model, tokenizer)  # the scorer's limit
    if task.kind == "multiple_choice":
        return choice_requests(tokenizer, examples, length)[0], True
    return encode(tokenizer, [e.prompt for e in examples], length), False


@torch.inference_mode()
def _plain_forward(model, seqs: list[list[int]], batch_size: int, all_logits: bool) -> float:
    """Seconds for batches in file order (right padded for choices, left padded for next-token prompts)."""
    start = time.perf_counter()
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        batch = make_batch(chunk, list(range(len(chunk))), "right" if all_logits else "left")
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=0 if all_logits else 1)
    return time.perf_counter() - start


def validation_throughput(model, tokenizer, task_name: str, data_dir: str, batch_size: int,
                          max_samples: int | None, repeats: int) -> dict:
    """Best-of-`repeats` examples/s of fnprune's scorer and of the plain forward pass, taking turns."""
    task = resolve_task(TaskSpec(name=task_name, data_dir=data_dir))
    sets = load_evaluation(task, task.evaluation_split, max_samples)
    seqs, all_logits = _sequences(model, tokenizer, task, sets)
    n = sum(len(v) for v in sets.values())
    best_scorer = best_plain = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_templates(model, tokenizer, sets, task, batch_size, progress=False)
        best_scorer = min(best_scorer, time.perf_counter() - start)
        best_plain = min(best_plain, _plain_forward(model, seqs, batch_size, all_logits))
    return {"task": task_name, "kind": task.kind, "templates": len(sets), "examples": n, "sequences": len(seqs),
            "scorer_ex_s": round(n / best_scorer, 1), "plain_forward_ex_s": round(n / best_plain, 1),
            "scorer_over_plain": round(best_plain / best_scorer, 3)}
