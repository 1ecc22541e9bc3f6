"""Zero-shot task accuracy of any causal LM: which label word, or which of an example's choices, is most
likely after the prompt.

A label word's score is the sum of its tokens' log-probabilities after the prompt (prompt and word tokenized
separately, then joined). A choice is scored exactly as lm-evaluation-harness 0.4.13 scores a multiple-choice
request: continuation = delimiter + choice, whitespace at the prompt's end moved onto the continuation, the
whole text tokenized and split where the prompt's own tokens end. `acc_norm` divides each score by the
choice's length in characters (lm-eval's acc_norm; without the delimiter). Knows nothing about pruning.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import is_classifier
from .data import Example
from .errors import DataError
from .recipe import TaskSpec
from .tokens import Batch, batches, context_length, encode, encode_inputs, forward

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "TaskResult", "answered", "check_head", "choice_requests", "evaluate_accuracy",
           "evaluate_choices", "evaluate_templates", "label_token_ids", "next_token_logprobs", "encode_pair",
           "majority_share", "scored"]


@dataclass
class EvalResult:
    accuracy: float
    n: int
    seconds: float
    predictions: list[str] = field(repr=False, default_factory=list)
    scores: torch.Tensor | None = field(repr=False, default=None)  # (n, labels or choices) log-probabilities
    accuracy_norm: float | None = None  # lm-eval's acc_norm: scores divided by the choice's characters
    hits: torch.Tensor | None = field(repr=False, default=None)  # (n,) 1 where the prediction is the label
    # (n,) the right class's share of the softmax over the classes' scores: accuracy without argmax's cliff, which
    # tells apart two models that answer alike (a setting search on a few hundred rows)
    right_probs: torch.Tensor | None = field(repr=False, default=None)

    @property
    def right_prob(self) -> float | None:
        """The mean probability of the right answer; None for a result without per-example probabilities."""
        return None if self.right_probs is None else self.right_probs.double().mean().item()

    def label_shares(self) -> dict[str, float]:
        """How often each label was predicted: a model that lost the task often answers one label for all."""
        return {label: round(self.predictions.count(label) / self.n, 4) for label in sorted(set(self.predictions))}


def answered(label: str, words: dict[str, str]) -> str:
    """A predicted label as the model answered it: its word under the template with the key beside it ('"No"
    (0)'), or the key alone where there is no word (multiple choice: the choice's index) or it says the same."""
    word = words.get(label, "").strip()
    return label if not word or word.lower() == label.lower() else f'"{word}" ({label})'


def choice_lengths(examples: list[Example], label_words: dict[str, str] | None) -> torch.Tensor:
    """(n, k) characters of each choice as lm-eval counts them: the choice without the delimiter (a label word
    without its leading space, as lm-eval's " " delimiter + choice). Missing choices: 1 (their score is -inf)."""
    if label_words is not None:
        words = [w[1:] if w.startswith(" ") else w for w in label_words.values()]
        return torch.tensor([[max(len(w), 1) for w in words]], dtype=torch.float64).expand(len(examples), -1)
    width = max(len(e.choices) for e in examples)
    out = torch.ones(len(examples), width, dtype=torch.float64)
    for i, e in enumerate(examples):
        out[i, : len(e.choices)] = torch.tensor([max(len(c), 1) for c in e.choices], dtype=torch.float64)
    return out


def scored(scores: torch.Tensor, examples: list[Example], labels: list[str], lengths: torch.Tensor,
           seconds: float) -> EvalResult:
    """Accuracy and acc_norm of per-class scores (ties go to the first class, as lm-eval's argmax). A NaN score
    never wins, and an example with no finite score (a broken model, a dtype overflow) is counted wrong, not as
    the first class's answer."""
    has_score = scores.isfinite().any(dim=1)
    if not has_score.all():
        log.warning("%d of %d examples have no finite score (NaN or -inf for every answer: a broken model or a "
                    "dtype overflow); they are counted wrong", int((~has_score).sum()), len(examples))
    scores = torch.where(scores.isnan(), -math.inf, scores)
    predictions = [labels[j] for j in scores.argmax(dim=1).tolist()]
    normed = [labels[j] for j in (scores / lengths).argmax(dim=1).tolist()]
    hits = torch.tensor([p == e.label for p, e in zip(predictions, examples)], dtype=torch.bool) & has_score
    correct_norm = sum(p == e.label and ok for p, e, ok in zip(normed, examples, has_score.tolist()))
    right = torch.tensor([labels.index(e.label) if e.label in labels else -1 for e in examples])
    probs = scores.double().softmax(dim=1).gather(1, right.clamp(min=0)[:, None])[:, 0]
    usable = (right >= 0) & ~probs.isnan()  # a row with no finite score gives the right answer nothing, not NaN
    return EvalResult(int(hits.sum()) / len(examples), len(examples), seconds, predictions, scores,
                      correct_norm / len(examples), hits, torch.where(usable, probs, 0.0))


def label_token_ids(tokenizer, label_words: dict[str, str]) -> dict[str, list[int]]:
    ids = {}
    for label, word in label_words.items():
        ids[label] = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids[label]:
            raise DataError(f"label word {word!r} (label {label}) tokenizes to nothing")
    if len({tuple(v) for v in ids.values()}) != len(ids):
        raise DataError(f"two label words tokenize to the same ids: {ids}")
    for a, short in ids.items():  # summed log-probabilities: the longer word can never score above the shorter
        for b, long in ids.items():
            if a != b and long[:len(short)] == short:
                raise DataError(f"label word {label_words[a]!r}'s tokens {short} begin label word "
                                f"{label_words[b]!r}'s {long}, so {label_words[b]!r} can never be the answer; use "
                                "label words that differ in their first token")
    return ids


def next_token_logprobs(model: nn.Module, batch: Batch, ids: list[int]) -> torch.Tensor:
    """(B, len(ids)) float64 log-probabilities of the tokens `ids` right after each (left-padded) prompt: the
    score of one-token label words."""
    logp = torch.log_softmax(forward(model, batch, all_logits=False)[:, -1].double(), dim=-1)
    return logp[:, ids].cpu()


@torch.inference_mode()
def _label_scores(model, tokenizer, prompts, label_ids, batch_size, max_length, progress) -> torch.Tensor:
    contexts = [c or [_prefix_token(tokenizer)] for c in encode(tokenizer, prompts, max_length)]  # "" as lm-eval
    labels = list(label_ids)
    scores = torch.zeros(len(prompts), len(labels), dtype=torch.float64)
    single = all(len(v) == 1 for v in label_ids.values())
    runs = [None] if single else labels
    bar = tqdm(total=len(prompts) * len(runs), desc="evaluate", unit="ex", disable=not progress)
    for label in runs:
        if label is None:  # one token per label word: only the last position's logits are needed
            ids = [label_ids[lab][0] for lab in labels]
            for batch in batches(contexts, batch_size, padding_side="left"):
                scores[batch.index] = next_token_logprobs(model, batch, ids)
                bar.update(len(batch.index))
            continue
        cont = label_ids[label]
        # as lm-eval runs a continuation: cut from the left to max_length + 1, the last token only a target
        seqs = [(c + cont)[-(max_length + 1):][:-1] for c in contexts]
        for batch in batches(seqs, batch_size):
            logits = forward(model, batch)  # (B, L, V), right padded
            rows = torch.arange(len(batch.index))
            start = torch.tensor([len(seqs[i]) - len(cont) for i in batch.index])  # the position predicting cont[0]
            total = torch.zeros(len(batch.index), dtype=torch.float64)
            for t, tok in enumerate(cont):
                total += torch.log_softmax(logits[rows, start + t].double(), dim=-1)[:, tok].cpu()
            scores[batch.index, labels.index(label)] = total
            bar.update(len(batch.index))
    bar.close()
    return scores


def check_head(model: nn.Module, n_labels: int) -> None:
    """A classifier's head must have one class per label (class i stands for the i-th label of `label_words`)."""
    n_classes = model.config.num_labels
    if n_classes != n_labels:
        raise DataError(f"the model's head has {n_classes} classes but the task has {n_labels} labels")


@torch.inference_mode()
def _head_scores(model, tokenizer, examples, n_labels, batch_size, max_length, progress) -> torch.Tensor:
    """Classifier checkpoints: the head's logits; class i stands for the i-th label of `label_words`."""
    check_head(model, n_labels)
    seqs = encode_inputs(tokenizer, examples, max_length, model)
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
    max_length: int | None = None,  # None: the model's context, as lm-eval (`context_length`)
    progress: bool = True,
) -> EvalResult:
    """Accuracy of the most likely label word over `examples` (ties go to the first label); a classifier
    checkpoint is scored by its head's argmax instead."""
    if not examples:
        raise DataError("no evaluation examples")
    max_length = max_length or context_length(model, tokenizer)
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
    result = scored(scores, examples, labels, choice_lengths(examples, label_words), time.perf_counter() - start)
    if is_classifier(model):  # a head's logits over the label words' lengths mean nothing: no acc_norm
        result.accuracy_norm = None
    return result


def _prefix_token(tokenizer) -> int:
    """lm-eval's stand-in for an empty context: the BOS token, else EOS."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise DataError("an empty prompt, and the tokenizer has no BOS or EOS token to score it after")
    return prefix


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal `_encode_pair`: trailing whitespace of the context moves to the continuation, then
    context + continuation is tokenized whole and cut where the context's own tokens end."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [_prefix_token(tokenizer)], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def choice_requests(tokenizer, examples: list[Example], max_length: int
                    ) -> tuple[list[list[int]], list[tuple[int, int, list[int]]]]:
    """The token sequence the model runs for every (example, choice), and (example, choice, continuation ids)."""
    seqs, spans = [], []
    for i, e in enumerate(examples):
        for j, choice in enumerate(e.choices):
            ctx, cont = encode_pair(tokenizer, e.prompt, e.delimiter + choice)
            if not cont:
                raise DataError(f"example {i}: choice {choice!r} tokenizes to nothing after the prompt")
            full = (ctx + cont)[-(max_length + 1):]  # lm-eval: cut from the left, the last token only a target
            seqs.append(full[:-1])
            spans.append((i, j, cont))
    return seqs, spans


@torch.inference_mode()
def _choice_scores(model, tokenizer, examples, batch_size, max_length, progress) -> torch.Tensor:
    seqs, spans = choice_requests(tokenizer, examples, max_length)
    scores = torch.full((len(examples), max(len(e.choices) for e in examples)), -math.inf, dtype=torch.float64)
    bar = tqdm(total=len(seqs), desc="evaluate", unit="choice", disable=not progress)
    for batch in batches(seqs, batch_size):  # sorted by length: little padding
        logits = forward(model, batch)  # (B, L, V), right padded
        for row, k in enumerate(batch.index):
            i, j, cont = spans[k]
            end = len(seqs[k])
            logp = torch.log_softmax(logits[row, end - len(cont):end].double(), dim=-1)
            scores[i, j] = logp[torch.arange(len(cont)), torch.tensor(cont)].sum().cpu()
        bar.update(len(batch.index))
    bar.close()
    return scores


def evaluate_choices(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int = 32,
    max_length: int | None = None,  # None: the model's context, as lm-eval (`context_length`)
    progress: bool = True,
) -> EvalResult:
    """acc and acc_norm of the most likely choice per example (each example's own choices; label = the
    answer's index), scored as lm-eval scores multiple choice."""
    if not examples:
        raise DataError("no evaluation examples")
    if is_classifier(model):
        raise DataError("a classifier checkpoint cannot score multiple-choice tasks (no language-model head)")
    max_length = max_length or context_length(model, tokenizer)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    scores = _choice_scores(model, tokenizer, examples, batch_size, max_length, progress)
    model.train(was_training)
    labels = [str(j) for j in range(scores.shape[1])]
    return scored(scores, examples, labels, choice_lengths(examples, None), time.perf_counter() - start)


@dataclass
class TaskResult:
    """Accuracy under each of a task's templates, and the means over its calibration and held-out templates.

    The headline is the held-out mean: a user scores the model with their own prompt, not with ours."""

    by_template: dict[str, EvalResult]
    held_out: list[str]  # names of the held-out templates
    majority: float | None = None  # accuracy of always answering the most frequent label: chance level

    def mean(self, held_out: bool, norm: bool = False) -> float | None:
        return self._template_mean(lambda r: r.accuracy_norm if norm else r.accuracy, held_out)

    def mean_right_prob(self, held_out: bool) -> float | None:
        """The templates' mean probability of the right answer (EvalResult.right_prob), as `mean` averages accuracy."""
        return self._template_mean(lambda r: r.right_prob, held_out)

    def _template_mean(self, value: Callable[[EvalResult], float | None], held_out: bool) -> float | None:
        values = [value(r) for name, r in self.by_template.items() if (name in self.held_out) == held_out]
        return sum(values) / len(values) if values and None not in values else None

    def hits(self, held_out: bool) -> torch.Tensor | None:
        """(templates, examples): 1 where the model answered right, over the held-out or the calibration ones."""
        return self._per_example("hits", held_out)

    def right_probs(self, held_out: bool) -> torch.Tensor | None:
        """(templates, examples): the probability the model puts on the right answer (EvalResult.right_probs)."""
        return self._per_example("right_probs", held_out)

    def _per_example(self, attribute: str, held_out: bool) -> torch.Tensor | None:
        rows = [getattr(r, attribute) for name, r in self.by_template.items() if (name in self.held_out) == held_out]
        if not rows or any(h is None or h.shape != rows[0].shape for h in rows):
            return None  # results without per-example answers, or templates over different examples
        return torch.stack(rows)

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

    @classmethod
    def of(cls, results: dict[str, EvalResult], task: TaskSpec, sets: dict[str, list[Example]]) -> TaskResult:
        """Results under `sets`' templates, with the task's held-out names and the split's chance level."""
        held = {t.name for t in task.held_out_templates()}
        return cls(results, [n for n in results if n in held], majority_share(next(iter(sets.values()))))


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
        if progress:
            tqdm.write(f"evaluate: {task.name} template {name}", file=sys.stderr)
        if task.kind == "multiple_choice":
            results[name] = evaluate_choices(model, tokenizer, examples, batch_size, progress=progress)
            continue
        words = by_name[name].words(task.label_words)
        results[name] = evaluate_accuracy(model, tokenizer, examples, words, batch_size, progress=progress)
    return TaskResult.of(results, task, sets)


def majority_share(examples: list[Example]) -> float:
    """Share of the most frequent label: what a model that ignores the text scores."""
    labels = [e.label for e in examples]
    return max(labels.count(x) for x in set(labels)) / len(labels)
