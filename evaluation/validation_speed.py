"""fnprune's validation throughput (examples/s of `evaluate_templates`, the scorer compress and `fnprune
evaluate` use) beside a plain batched forward pass over the same token sequences, as a user would write it:
batches in file order, padded, one `model(...)` call each and nothing else. Used by `bench_speed.py
--validation-tasks`.
"""

from __future__ import annotations

import time

import torch

from fnprune.data import load_evaluation
from fnprune.evaluate import encode_pair, evaluate_templates
from fnprune.recipe import TaskSpec
from fnprune.tasks import resolve_task

__all__ = ["validation_throughput"]


def _sequences(tokenizer, task: TaskSpec, sets: dict) -> tuple[list[list[int]], bool]:
    """The token sequences the scorer runs, and whether every position's logits are needed (choices)."""
    if task.kind == "multiple_choice":
        seqs = []
        for examples in sets.values():
            for e in examples:
                for choice in e.choices:
                    ctx, cont = encode_pair(tokenizer, e.prompt, e.delimiter + choice)
                    seqs.append((ctx + cont)[:-1])
        return seqs, True
    prompts = [e.prompt for examples in sets.values() for e in examples]
    return tokenizer(prompts, add_special_tokens=True)["input_ids"], False


@torch.inference_mode()
def _plain_forward(model, seqs: list[list[int]], batch_size: int, all_logits: bool, pad_id: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        length = max(map(len, chunk))
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):  # right padded for choices, left padded for next-token prompts
            span = slice(0, len(s)) if all_logits else slice(length - len(s), length)
            ids[row, span], mask[row, span] = torch.tensor(s), 1
        model(input_ids=ids, attention_mask=mask, logits_to_keep=0 if all_logits else 1)
    return time.perf_counter() - start


def validation_throughput(model, tokenizer, task_name: str, data_dir: str, batch_size: int,
                          max_samples: int | None, repeats: int) -> dict:
    """Best-of-`repeats` examples/s of fnprune's scorer and of the plain forward pass, taking turns."""
    task = resolve_task(TaskSpec(name=task_name, data_dir=data_dir))
    sets = load_evaluation(task, task.evaluation_split, max_samples)
    seqs, all_logits = _sequences(tokenizer, task, sets)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = sum(len(v) for v in sets.values())
    best_scorer = best_plain = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_templates(model, tokenizer, sets, task, batch_size, progress=False)
        best_scorer = min(best_scorer, time.perf_counter() - start)
        best_plain = min(best_plain, _plain_forward(model, seqs, batch_size, all_logits, pad))
    return {"task": task_name, "kind": task.kind, "templates": len(sets), "examples": n, "sequences": len(seqs),
            "scorer_ex_s": round(n / best_scorer, 1), "plain_forward_ex_s": round(n / best_plain, 1),
            "scorer_over_plain": round(best_plain / best_scorer, 3)}
