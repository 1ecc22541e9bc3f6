"""Label-free distillation of a pruned model toward its dense original (the recovery stage's algorithm).

The teacher is the dense model before surgery. Its next-token distribution at every real prompt token is kept as
the top-k log-probabilities plus the mass outside them, and the student minimises the KL divergence between the
two (k + 1)-bucket distributions, which is exact for the coarsened distributions and needs k + 1 numbers per
token instead of the vocabulary. A classifier's teacher is its head's label distribution at the decision token.

A zero-shot classification prompt is decided by the ratio of its label words' probabilities at the answer
position, which can be a small share of the distribution and so of its KL. With the label words' token ids per
prompt (its template's, never its label), the teacher also keeps their log-probabilities there, and the loss can
weigh the KL between the two label distributions renormalized over those words. That target can also be the
consensus of the teacher's label distributions for the same text under every calibration template.

Only the calibration prompts reach training: the caller passes the same examples the activations were captured
on, so the evaluation split and the held-out templates never do. Whatever trains is merged into the weights
(LoRA included), so the checkpoint keeps its shapes and loads like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import MLPLayout, get_module, is_classifier, layer_blocks
from .errors import NumericalError
from .interrupt import ProgressSaver
from .lora import add_lora, merge_lora
from .offload import input_device
from .provenance import key_versions
from .recipe import RecoverySpec
from .safetensors_io import read_with_meta, write_atomic
from .tokens import batches, make_batch

__all__ = ["TeacherTargets", "RecoveryResult", "teacher_targets", "recover", "trainable_parameters", "divergences",
           "consensus_label_logprobs"]

log = logging.getLogger("fnprune")


@dataclass
class TeacherTargets:
    """The teacher's distribution at each scored position of every prompt, rows concatenated prompt by prompt:
    `offsets[i]:offsets[i + 1]` are prompt i's rows, the last of them its answer position."""

    indices: torch.Tensor  # (T, k) int64 token (or label) ids
    logprobs: torch.Tensor  # (T, k) float32 teacher log-probabilities of those ids
    offsets: torch.Tensor  # (N + 1,) int64
    # (N, C) int64 each prompt's label-word token ids (-1: the prompt has none) and (N, C) float32 the teacher's
    # log-probabilities of them at its answer position (or the templates' consensus for its text, fnprune.recovery);
    # C = 0 when no prompt has label words
    label_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    label_logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "logprobs": self.logprobs, "offsets": self.offsets,
                "label_ids": self.label_ids, "label_logprobs": self.label_logprobs}


@dataclass
class RecoveryResult:
    steps: int
    seconds: float
    loss_first: float  # mean distillation loss over the first 10% of steps
    loss_last: float  # and over the last 10%
    trained_parameters: int
    teacher_bytes: int
    resumed_at: int = 0
    progress_file: str | None = None  # kept (keep_progress) until the caller has saved what the training made


def _scored_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of every position (LMs, (B, L, V)) or the head's (classifiers, (B, 1, C))."""
    device = input_device(model)
    kwargs = {} if is_classifier(model) else {"use_cache": False}
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    return logits[:, None, :] if logits.dim() == 2 else logits


def _positions(mask: torch.Tensor, classifier: bool) -> list[torch.Tensor]:
    """Per row, the positions whose distribution is distilled: every real token, or the one head output."""
    if classifier:
        return [torch.zeros(1, dtype=torch.long) for _ in range(mask.shape[0])]
    return [row.nonzero().flatten() for row in mask.bool()]


@torch.inference_mode()
def teacher_targets(model: nn.Module, seqs: list[list[int]], top_k: int, batch_size: int,
                    progress: bool = True, label_ids: list[list[int]] | None = None) -> TeacherTargets:
    """The dense model's top-k log-probabilities at every real token of each prompt (the full label
    distribution for a classifier), and at each prompt's answer position those of `label_ids[i]` (its label
    words' token ids; an empty list: none)."""
    classifier = is_classifier(model)
    per_prompt: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
    words = [] if label_ids is None or classifier else label_ids
    n_labels = max(map(len, words), default=0)
    label_tensor = torch.full((len(seqs), n_labels), -1, dtype=torch.long)
    for i, ids in enumerate(words):
        if ids and len(ids) == n_labels:
            label_tensor[i] = torch.tensor(ids, dtype=torch.long)
    label_logp = torch.zeros(len(seqs), n_labels)
    bar = tqdm(total=sum(map(len, seqs)), desc="teacher", unit="tok", disable=not progress)
    with bar:
        for batch in batches(seqs, batch_size, "right"):
            logits = _scored_logits(model, batch.input_ids, batch.attention_mask)
            k = min(top_k, logits.shape[-1])
            for row, (i, pos) in enumerate(zip(batch.index, _positions(batch.attention_mask, classifier))):
                logp = logits[row, pos.to(logits.device)].float().log_softmax(-1).cpu()  # real positions only
                values, ids = logp.topk(k, dim=-1)
                per_prompt[i] = (ids, values)
                if n_labels and label_tensor[i, 0] >= 0:
                    label_logp[i] = logp[-1, label_tensor[i]]
            bar.update(int(batch.attention_mask.sum()))
    lengths = torch.tensor([0] + [p[0].shape[0] for p in per_prompt if p is not None])
    return TeacherTargets(
        indices=torch.cat([p[0] for p in per_prompt if p is not None]),
        logprobs=torch.cat([p[1] for p in per_prompt if p is not None]),
        offsets=lengths.cumsum(0),
        label_ids=label_tensor,
        label_logprobs=label_logp,
    )


def bucket_kl(student_logp: torch.Tensor, indices: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Per row, KL(teacher || student) over the teacher's top-k ids and one bucket for all other ids.

    student_logp: (T, V) log-softmax; indices, teacher_logp: (T, k)."""
    s_top = student_logp.gather(-1, indices)
    t_top = teacher_logp
    # log of the teacher's mass outside the top k; rounding can put the top k's sum a hair above 1 (no mass left)
    t_rest = (-t_top.exp().sum(-1)).clamp(min=-1.0).log1p().clamp(min=-80.0)
    s_rest = (-s_top.exp().sum(-1)).clamp(min=-1 + 1e-6).log1p()
    top = (t_top.exp() * (t_top - s_top)).sum(-1)
    return top + t_rest.exp() * (t_rest - s_rest)


def trainable_parameters(model: nn.Module, layout: MLPLayout, which: str) -> list[nn.Parameter]:
    """The parameters `which` names: "mlp" (every MLP projection's weight and bias), "all", or "lora" (the
    adapters `add_lora` attached)."""
    if which == "all":
        return [p for p in model.parameters()]
    if which == "lora":
        return [p for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))]
    params = []
    for block in layer_blocks(model, layout):
        for path in (*layout.inputs, layout.output):
            params.extend(get_module(block, path).parameters(recurse=False))
    return params


def _learning_rate(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` share of steps, then cosine decay to zero."""
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return peak * (step + 1) / ramp
    return peak * 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))


def step_batches(n_prompts: int, spec: RecoverySpec) -> list[list[int]]:
    """Prompt indices of every optimisation step: seeded shuffles, epoch after epoch, cut at `spec.steps`."""
    rng = np.random.default_rng(spec.seed)
    per_epoch = -(-n_prompts // spec.batch_size)
    total = spec.steps or spec.epochs * per_epoch
    order: list[list[int]] = []
    while len(order) < total:
        perm = rng.permutation(n_prompts).tolist()
        order.extend(perm[s : s + spec.batch_size] for s in range(0, n_prompts, spec.batch_size))
    return order[:total]


def _student_rows(model: nn.Module, seqs: list[list[int]], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probabilities at every scored position of prompts `idx`, rows concatenated as in
    TeacherTargets, and which of those rows are the answer positions (each prompt's last)."""
    batch = make_batch([seqs[i] for i in idx], idx, "right")
    logits = _scored_logits(model, batch.input_ids, batch.attention_mask)
    positions = _positions(batch.attention_mask, is_classifier(model))
    # the real positions first: no float32 copy or log-softmax of the padding's logits kept for the backward pass
    rows = torch.cat([logits[r, p] for r, p in enumerate(positions)]).float().log_softmax(-1)
    ends = torch.tensor([len(p) for p in positions]).cumsum(0) - 1
    return rows, ends.to(rows.device)


def _token_kl(rows: torch.Tensor, targets: TeacherTargets, idx: list[int]) -> torch.Tensor:
    ids = torch.cat([targets.indices[targets.rows(i)] for i in idx]).to(rows.device)
    t_logp = torch.cat([targets.logprobs[targets.rows(i)] for i in idx]).to(rows.device)
    return bucket_kl(rows, ids, t_logp)


def label_kl(answer_rows: torch.Tensor, targets: TeacherTargets, idx: list[int]) -> torch.Tensor:
    """Per prompt with label words, KL(teacher || model) of the label distribution renormalized over its label
    words at the answer position; answer_rows: (len(idx), V) the model's log-probabilities there."""
    if targets.label_ids.shape[1] == 0:
        return answer_rows.new_zeros(0)
    ids = targets.label_ids[idx].to(answer_rows.device)
    has = ids[:, 0] >= 0
    t = targets.label_logprobs[idx].to(answer_rows.device)[has].log_softmax(-1)
    s = answer_rows[has].gather(-1, ids[has]).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)


def consensus_label_logprobs(per_template: torch.Tensor) -> torch.Tensor:
    """(T, N, C) label-word log-probabilities of N texts under T templates -> (N, C) one distribution per text:
    each template's renormalized over its label words and centred on its mean over the N texts (a template that
    answers one label whatever the text then says nothing), averaged over the templates."""
    logp = per_template.float().log_softmax(-1)
    return (logp - logp.mean(1, keepdim=True)).mean(0).log_softmax(-1)


def divergences(model: nn.Module, seqs: list[list[int]], targets: TeacherTargets, idx: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || model) at every scored position of prompts `idx`, and which of those rows are the answer
    positions (each prompt's last)."""
    rows, ends = _student_rows(model, seqs, idx)
    return _token_kl(rows, targets, idx), ends


def _loss(model: nn.Module, seqs: list[list[int]], targets: TeacherTargets, idx: list[int],
          spec: RecoverySpec) -> torch.Tensor:
    """(1 - answer_weight) x mean KL over all scored tokens + answer_weight x mean KL at the answer positions
    + label_weight x mean KL of the label words' distribution at the answer positions."""
    rows, ends = _student_rows(model, seqs, idx)
    kl = _token_kl(rows, targets, idx)
    loss = (1 - spec.answer_weight) * kl.mean() + spec.answer_weight * kl[ends].mean()
    if spec.label_weight:
        labels = label_kl(rows[ends], targets, idx)
        if labels.numel():
            loss = loss + spec.label_weight * labels.mean()
    return loss


def run_fingerprint(start: list[nn.Parameter], targets: TeacherTargets, seqs: list[list[int]],
                    spec: RecoverySpec) -> str:
    """What a saved recovery progress belongs to: the starting MLP weights, the teacher, the prompts, the settings."""
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for p in start:
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for t in targets.tensors().values():
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(seqs).encode())
    digest.update(json.dumps(key_versions(), sort_keys=True).encode())  # an upgrade does not resume the old run
    return digest.hexdigest()


def float32_masters(params: list[nn.Parameter]) -> list[nn.Parameter] | None:
    """float32 copies for AdamW to step when the weights are half precision (None when they are float32): in
    float16 its eps and small squared gradients round to 0, so the first step divides by zero, and in bfloat16 the
    late, small updates round away."""
    if all(p.dtype == torch.float32 for p in params):
        return None
    return [nn.Parameter(p.detach().float().clone()) for p in params]


def _step(opt: torch.optim.Optimizer, params: list[nn.Parameter], masters: list[nn.Parameter] | None) -> None:
    """One optimiser step; with float32 masters, on them from the weights' gradients, then copied to the weights."""
    if masters is None:
        opt.step()
        return
    for p, m in zip(params, masters):
        m.grad, p.grad = (None if p.grad is None else p.grad.float()), None
    opt.step()
    _follow(params, masters)


def _follow(params: list[nn.Parameter], masters: list[nn.Parameter]) -> None:
    """The weights set to their float32 masters, rounded to the weights' dtype."""
    with torch.no_grad():
        for p, m in zip(params, masters):
            p.copy_(m)


def _save_progress(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    tensors = {f"param.{i}": p.detach().cpu() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        state = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in state:
                tensors[f"adam.{i}.{name}"] = state[name].detach().cpu().reshape(-1) if name == "step" \
                    else state[name].detach().cpu()
    write_atomic(path, tensors, meta)


def _load_progress(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                   fingerprint: str) -> tuple[int, list[float], float]:
    """Restore weights and optimiser state saved for this same run; returns the steps done (0: none usable), their
    losses and the seconds they took."""
    loaded = read_with_meta(path)
    if loaded is None:
        return 0, [], 0.0
    tensors, meta = loaded
    if meta.get("fingerprint") != fingerprint:
        log.info("ignoring recovery progress %s: it was saved for another run", path)
        return 0, [], 0.0
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device))
            if f"adam.{i}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": tensors[f"adam.{i}.step"].reshape(()).clone(),
                    "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device).clone(),
                }
    return int(meta["steps_done"]), [float(x) for x in meta.get("losses", [])], float(meta.get("seconds", 0.0))


def _resume(progress_file: Path | None, params: list[nn.Parameter], masters: list[nn.Parameter] | None,
            opt: torch.optim.Optimizer, fingerprint: str, steps: int) -> tuple[int, list[float], float]:
    """The steps done, their losses and seconds of a saved run of this same training (0, [], 0 without one), its
    weights (and float32 masters) and optimiser state restored."""
    if progress_file is None:
        return 0, [], 0.0
    done, losses, earlier = _load_progress(progress_file, masters or params, opt, fingerprint)
    if done and masters:
        _follow(params, masters)
    if done:
        log.info("recovery resumes at step %d of %d from %s", done, steps, progress_file)
    return done, losses, earlier


def recover(
    model: nn.Module,
    layout: MLPLayout,
    seqs: list[list[int]],
    targets: TeacherTargets,
    spec: RecoverySpec,
    progress: bool = True,
    progress_dir: Path | None = None,
    save_every: float = 60.0,
    keep_progress: bool = False,
) -> RecoveryResult:
    """Distil `model` (pruned, in place) toward `targets` on the prompts `seqs`; merge anything trained.

    With `progress_dir`, the weights and optimiser state are saved there every `save_every` seconds and on
    Ctrl-C / SIGTERM (after the current step), and a rerun of the same run continues from them. `keep_progress`:
    the file outlives the training (named in the result), so a run stopped before it saved the model resumes near
    the end; the caller deletes it."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    # of the starting weights, before LoRA wraps them
    fingerprint = run_fingerprint(trainable_parameters(model, layout, "mlp"), targets, seqs, spec) \
        if progress_dir is not None else ""
    lora = add_lora(model, layout, spec.lora_rank, spec.seed) if spec.params == "lora" else []
    params = trainable_parameters(model, layout, spec.params)
    masters = float32_masters(params)
    trained = masters or params  # what AdamW steps and a progress file holds
    opt = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=0.0)
    plan = step_batches(len(seqs), spec)
    progress_file = progress_dir / f"recovery-{fingerprint[:40]}.partial.safetensors" if progress_dir else None
    saver = ProgressSaver("recovery", progress_file, save_every)
    done, losses, earlier = _resume(progress_file, params, masters, opt, fingerprint, len(plan))
    wanted = {id(p) for p in params}
    grad_before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    was_training = model.training
    model.eval()  # no dropout: the student's distribution is compared with the teacher's as evaluated
    try:
        bar = tqdm(total=len(plan), initial=done, desc="recover", unit="step", disable=not progress)
        with torch.enable_grad(), saver.deferring(), bar:
            for step in range(done, len(plan)):
                for group in opt.param_groups:
                    group["lr"] = _learning_rate(step, len(plan), spec.lr, spec.warmup)
                loss = _loss(model, seqs, targets, plan[step], spec)
                if not torch.isfinite(loss):
                    raise NumericalError(f"recovery loss is {loss.item()} at step {step}; lower recovery.lr "
                                         f"({spec.lr}) or recovery.label_weight ({spec.label_weight})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _step(opt, params, masters)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                meta = {"fingerprint": fingerprint, "steps_done": step + 1, "losses": losses,
                        "seconds": earlier + time.perf_counter() - start}
                saver.after_step(partial(_save_progress, progress_file, trained, opt, meta),
                                 f"{step + 1} of {len(plan)} steps", step + 1 == len(plan))
    finally:
        for p in model.parameters():
            p.requires_grad_(grad_before.get(id(p), False))
        model.train(was_training)
    merge_lora(lora)
    merged = trainable_parameters(model, layout, "mlp" if lora else spec.params)  # LoRA's, as merged
    if not all(torch.isfinite(p).all() for p in merged):  # the last step's result: no loss after it checks it
        raise NumericalError(f"recovery left non-finite weights after step {len(plan)}; lower recovery.lr ({spec.lr})")
    for p in model.parameters():
        p.grad = None
    if not keep_progress:
        saver.finished()
    tenth = max(1, len(losses) // 10)
    return RecoveryResult(
        steps=len(plan), seconds=round(earlier + time.perf_counter() - start, 3),
        loss_first=round(float(np.mean(losses[:tenth])), 6) if losses else float("nan"),
        loss_last=round(float(np.mean(losses[-tenth:])), 6) if losses else float("nan"),
        trained_parameters=sum(p.numel() for p in params), teacher_bytes=targets.nbytes, resumed_at=done,
        progress_file=str(progress_file) if keep_progress and progress_file is not None else None,
    )

