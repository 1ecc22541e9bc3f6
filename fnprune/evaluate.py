"""Zero-shot task accuracy of any causal LM: which label word is most likely after the prompt.

A label word's score is the sum of its tokens' log-probabilities after the prompt (lm-eval-harness style:
prompt and word tokenized separately, then joined). Knows nothing about pruning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Example
from .errors import DataError
from .recipe import TaskSpec
from .tokens import batches, encode, encode_inputs, forward, is_classifier

__all__ = ["EvalResult", "TaskResult", "evaluate_accuracy", "evaluate_templates", "label_token_ids", "majority_share"]


@dataclass
class EvalResult:
    accuracy: float
    n: int
    seconds: float
    predictions: list[str] = field(repr=False, default_factory=list)
    scores: torch.Tensor | None = field(repr=False, default=None)  # (n, labels) log-probabilities

    def label_shares(self) -> dict[str, float]:
        """How often each label was predicted: a model that lost the task often answers one label for all."""
        return {label: round(self.predictions.count(label) / self.n, 4) for label in sorted(set(self.predictions))}


def label_token_ids(tokenizer, label_words: dict[str, str]) -> dict[str, list[int]]:
    ids = {}
    for label, word in label_words.items():
        ids[label] = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids[label]:
            raise DataError(f"label word {word!r} (label {label}) tokenizes to nothing")
    if len({tuple(v) for v in ids.values()}) != len(ids):
        raise DataError(f"two label words tokenize to the same ids: {ids}")
    return ids


@torch.inference_mode()
def _label_scores(model, tokenizer, prompts, label_ids, batch_size, max_length, progress) -> torch.Tensor:
    contexts = encode(tokenizer, prompts, max_length)
    labels = list(label_ids)
    scores = torch.zeros(len(prompts), len(labels), dtype=torch.float64)
    single = all(len(v) == 1 for v in label_ids.values())
    runs = [None] if single else labels
    bar = tqdm(total=len(prompts) * len(runs), desc="evaluate", unit="ex", disable=not progress)
    for label in runs:
        if label is None:  # one token per label word: only the last position's logits are needed
            for batch in batches(contexts, batch_size, padding_side="left"):
                logp = torch.log_softmax(forward(model, batch, all_logits=False)[:, -1].double(), dim=-1)
                for j, lab in enumerate(labels):
                    scores[batch.index, j] = logp[:, label_ids[lab][0]].cpu()
                bar.update(len(batch.index))
            continue
        cont = label_ids[label]
        for batch in batches([c + cont for c in contexts], batch_size):
            logits = forward(model, batch)  # (B, L, V), right padded
            rows = torch.arange(len(batch.index))
            start = torch.tensor([len(contexts[i]) - 1 for i in batch.index])
            total = torch.zeros(len(batch.index), dtype=torch.float64)
            for t, tok in enumerate(cont):
                total += torch.log_softmax(logits[rows, start + t].double(), dim=-1)[:, tok].cpu()
            scores[batch.index, labels.index(label)] = total
            bar.update(len(batch.index))
    bar.close()
    return scores


@torch.inference_mode()
def _head_scores(model, tokenizer, examples, n_labels, batch_size, max_length, progress) -> torch.Tensor:
    """Classifier checkpoints: the head's logits; class i stands for the i-th label of `label_words`."""
    n_classes = model.config.num_labels
    if n_classes != n_labels:
        raise DataError(f"the model's head has {n_classes} classes but the task has {n_labels} labels")
    seqs = encode_inputs(tokenizer, examples, max_length, classifier=True)
    scores = torch.zeros(len(examples), n_labels, dtype=torch.float64)
    bar = tqdm(total=len(examples), desc="evaluate", unit="ex", disable=not progress)
    for batch in batches(seqs, batch_size):
        scores[batch.index] = forward(model, batch).double().cpu()
        bar.update(len(batch.index))
    bar.close()
    return scores


def evaluate_accuracy(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    label_words: dict[str, str],
    batch_size: int = 32,
    max_length: int = 1024,
    progress: bool = True,
) -> EvalResult:
    """Accuracy of the most likely label word over `examples` (ties go to the first label); a classifier
    checkpoint is scored by its head's argmax instead."""
    if not examples:
        raise DataError("no evaluation examples")
    start = time.perf_counter()
    labels = list(label_words)
    was_training = model.training
    model.eval()
    if is_classifier(model):
        scores = _head_scores(model, tokenizer, examples, len(labels), batch_size, max_length, progress)
    else:
        label_ids = label_token_ids(tokenizer, label_words)
        scores = _label_scores(
            model, tokenizer, [e.prompt for e in examples], label_ids, batch_size, max_length, progress
        )
    model.train(was_training)
    predictions = [labels[j] for j in scores.argmax(dim=1).tolist()]
    correct = sum(p == e.label for p, e in zip(predictions, examples))
    return EvalResult(correct / len(examples), len(examples), time.perf_counter() - start, predictions, scores)


@dataclass
class TaskResult:
    """Accuracy under each of a task's templates, and the means over its calibration and held-out templates.

    The headline is the held-out mean: a user scores the model with their own prompt, not with ours."""

    by_template: dict[str, EvalResult]
    held_out: list[str]  # names of the held-out templates
    majority: float | None = None  # accuracy of always answering the most frequent label: chance level

    def mean(self, held_out: bool) -> float | None:
        values = [r.accuracy for name, r in self.by_template.items() if (name in self.held_out) == held_out]
        return sum(values) / len(values) if values else None

    @property
    def headline(self) -> float:
        """The held-out mean; the calibration mean when the task has no held-out template."""
        held = self.mean(held_out=True)
        return held if held is not None else self.mean(held_out=False)

    @property
    def n(self) -> int:
        return next(iter(self.by_template.values())).n

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.by_template.values())


def evaluate_templates(
    model: nn.Module,
    tokenizer,
    sets: dict[str, list[Example]],
    task: TaskSpec,
    batch_size: int = 32,
    progress: bool = True,
) -> TaskResult:
    """`evaluate_accuracy` under every template in `sets` (name -> the split's examples under it), each with
    its own label words. A classifier reads the raw text, not the prompt: it is scored once for all."""
    by_name = {t.name: t for t in task.templates}
    results: dict[str, EvalResult] = {}
    for name, examples in sets.items():
        if is_classifier(model) and results:
            results[name] = next(iter(results.values()))
            continue
        words = by_name[name].words(task.label_words)
        if progress:
            tqdm.write(f"evaluate: template {name}")
        results[name] = evaluate_accuracy(model, tokenizer, examples, words, batch_size, progress=progress)
    return TaskResult(results, [n for n in sets if by_name[n].held_out], majority_share(next(iter(sets.values()))))


def majority_share(examples: list[Example]) -> float:
    """Share of the most frequent label: what a model that ignores the text scores."""
    labels = [e.label for e in examples]
    return max(labels.count(x) for x in set(labels)) / len(labels)
