"""Stage 4b, opt-in (`selection.refit`): surgery layer by layer, each pruned layer's MLP output projection refitted
right after its surgery so that its block's output matches the dense model's on the calibration prompts.

The reconstruction (fnprune.compensation) fits each layer on the dense model's activations, but in the pruned
model every layer's input has already drifted by the time it runs. Here two streams of hidden states go through
the model one block at a time: the dense one (block i run before its surgery) and the pruned one (block i run
after it, its earlier blocks already refitted). Layer i's kept neurons, as the pruned stream gives them, are
regressed on what the output projection should emit for the block output to equal the dense one:

    y = dense block output - pruned block output + the projection's current output,

which holds where the MLP output enters the residual stream unchanged (`MLPLayout.residual`). The ridge
(`selection.refit_ridge`) pulls the weights toward the reconstruction's (`compensation.refit_linear`). The cost is
about two forward passes over the prompts it is given (each block twice; `selection.refit_prompts` of the calibration
prompts); the two streams of hidden states are held in memory.

The pruned stream also serves sequential selection (`selection.sequential`): before block i is pruned, its dense MLP
run on the pruned stream gives the activations `choose` scores, so each layer is chosen on what the layers pruned
before it pass on (FLAP's code measures Wanda-SP so). Without the refit only the pruned stream runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import MLPLayout, by_neuron, get_module, layer_blocks, mlp_widths
from .capture import LayerActivations, LayerStats, sample_positions
from .compensation import refit_linear
from .errors import NumericalError
from .surgery import LayerPlan, set_output_weight
from .tokens import Batch, batches, forward

__all__ = ["LayerwiseRefit", "Choose"]

# sequential selection: (layer, its plan, its MLP activations on the pruned stream) -> the plan to prune it by
Choose = Callable[[int, LayerPlan, LayerActivations], LayerPlan]


class _Stop(Exception):
    """Raised by the catching hook once the last block's inputs are recorded: the LM head is not needed."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block is called with, positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def _real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real tokens' rows (n, features) float32 on CPU, also of a tensor flattened to (B * L, features) (OPT)."""
    return t.reshape(*mask.shape, t.shape[-1])[mask].float().cpu()


class LayerwiseRefit:
    """Drives the two streams through `model` block by block; `prune_mlp(..., on_block=refit.on_block)` calls
    `on_block(i, plan, prune)` for every layer in order: `choose` (when given) replaces the plan, and the refit runs
    block i dense, prunes it, runs it pruned and refits its output projection (`refit` off: prunes it and runs it
    pruned). `ratios`: per layer, the block output's mean squared error on the calibration tokens after the refit
    over before it."""

    def __init__(self, model: nn.Module, layout: MLPLayout, seqs: list[list[int]], ridge: float, batch_size: int,
                 progress: bool = True, refit: bool = True, choose: Choose | None = None, max_tokens: int = 0,
                 seed: int = 0, fit_bias: bool = True):
        """`choose` gets each layer's statistics over every real token of `seqs`, with a uniform sample of at most
        `max_tokens` of them (seeded, as capture draws its own) for the reconstruction. `fit_bias` off (bias
        compensation off): a bias the projection has of its own (GPT-2, OPT, ...) stays as it is; only the weights
        are refitted."""
        self.model, self.layout, self.ridge, self.fit_bias = model, layout, ridge, fit_bias
        self.refit, self.choose = refit, choose
        self.token_count = total = sum(len(s) for s in seqs)  # real tokens of the streams
        self.sampled = sample_positions(total, min(max_tokens, total), seed)  # stream indices of the sample
        self.blocks = layer_blocks(model, layout)
        self.widths = mlp_widths(model, layout)
        self.prompts = len(seqs)
        self.runs: list[Batch] = list(batches(seqs, batch_size))
        self.masks = [b.attention_mask.bool() for b in self.runs]  # the real tokens of each batch
        # per block, per batch: its inputs but the hidden states (masks, positions: what the architecture passes)
        self.inputs: list[list[tuple[tuple, dict]]] = [[] for _ in self.blocks]
        self.dense: list[torch.Tensor] = []  # the first block's hidden states, per batch
        self._catch()
        self.pruned = list(self.dense)
        self.ratios: list[float] = []
        self.progress = progress
        self.bar: tqdm | None = None  # opened at the first block, inside the surgery stage it belongs to

    def _catch(self) -> None:
        """Record every block's inputs per batch but their hidden states (only the first block's are kept). The
        first batch runs the model for real, to learn whether each block returns a tuple; after it every block is
        replaced by a stand-in that returns its input, so the catch costs little more than the embeddings."""
        returns_tuple: dict[int, bool] = {}
        last = len(self.blocks) - 1

        def record(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if i == 0:
                    self.dense.append(_hidden_in(args, kwargs))
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.inputs[i].append((args[1:] if args else None, rest))  # None: hidden states by keyword
                if i == last:
                    raise _Stop
            return hook

        def learn(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                returns_tuple[i] = isinstance(output, tuple)
            return hook

        def stand_in(i: int) -> Callable:
            def passthrough(*args: Any, **kwargs: Any) -> Any:
                hidden = _hidden_in(args, kwargs)
                return (hidden,) if returns_tuple[i] else hidden
            return passthrough

        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles += [b.register_forward_hook(learn(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        own_forward = [b.__dict__.get("forward") for b in self.blocks]
        try:
            for n, batch in enumerate(self.runs):
                if n == 1:
                    for i, b in enumerate(self.blocks):
                        b.forward = stand_in(i)
                try:
                    forward(self.model, batch, all_logits=False)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            for b, own in zip(self.blocks, own_forward):
                if own is None:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = own

    def _run(self, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block i over every batch, from the given hidden states and the caught inputs."""
        out = []
        with torch.inference_mode():
            for h, (rest, kwargs) in zip(hidden, self.inputs[i]):
                if rest is None:
                    out.append(_hidden(self.blocks[i](hidden_states=h, **kwargs)))
                else:
                    out.append(_hidden(self.blocks[i](h, *rest, **kwargs)))
        return out

    def _mlp_statistics(self, i: int) -> LayerActivations:
        """Block i's MLP activations on the pruned stream, before block i is pruned, as capture summarises them
        (batch by batch: one batch's activations held at a time, on the CPU)."""
        projection = get_module(self.blocks[i], self.layout.output)
        stats = LayerStats(self.widths[i], 0, len(self.sampled), torch.float32, None)
        batch = iter(self.masks)

        def record(module: nn.Module, args: tuple, output: Any) -> None:
            first = stats.count  # stream index of the batch's first real token
            real = _real(args[0], next(batch))
            stats.add_statistics(real, torch.empty_like(real))
            here = self.sampled[(self.sampled >= first) & (self.sampled < first + real.shape[0])] - first
            stats.add_sample(real[here])

        handle = projection.register_forward_hook(record)
        try:
            self._run(i, self.pruned)
        finally:
            handle.remove()
        return stats.finish()

    def on_block(self, i: int, plan: LayerPlan, prune: Callable[[LayerPlan], None]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=len(self.blocks), desc="refit" if self.refit else "sequential selection",
                            unit="layer", disable=not self.progress)
        if self.choose is not None:
            plan = self.choose(i, plan, self._mlp_statistics(i))
        if self.refit:
            self._refit(i, plan, prune)
        else:
            prune(plan)
            self.pruned = self._run(i, self.pruned)
        self.inputs[i] = []  # this block's inputs are no longer needed
        self.bar.update()
        if i == len(self.blocks) - 1:
            self.bar.close()
            self._release()

    def _refit(self, i: int, plan: LayerPlan, prune: Callable[[LayerPlan], None]) -> None:
        """Prune block i and refit its output projection toward the dense block output."""
        dense_out = self._run(i, self.dense)
        prune(plan)
        projection = get_module(self.blocks[i], self.layout.output)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        # a copy: some blocks add to the projection's output in place (Falcon's parallel attention: mlp_output +=)
        handle = projection.register_forward_hook(lambda m, args, output: seen.append((args[0], output.clone())))
        try:
            pruned_out = self._run(i, self.pruned)
        finally:
            handle.remove()
        x = torch.cat([_real(a, m) for (a, _), m in zip(seen, self.masks)])
        emitted = torch.cat([_real(o, m) for (_, o), m in zip(seen, self.masks)])
        target = torch.cat([_real(d - p, m) for d, p, m in zip(dense_out, pruned_out, self.masks)]) + emitted
        w0 = by_neuron(projection.weight.detach(), self.layout).float().cpu()
        b0 = None if projection.bias is None else projection.bias.detach().float().cpu()
        if b0 is not None and not self.fit_bias:  # the bias stays: the weights map x to what it leaves to emit
            w, _ = refit_linear(x, target - b0, w0, None, self.ridge)
            b = None
        else:
            w, b = refit_linear(x, target, w0, b0, self.ridge)
        if not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
            raise NumericalError(f"layer {i}: the refit of the output projection is not finite; raise --refit-ridge")
        dtype, device = projection.weight.dtype, projection.weight.device
        w, b = w.to(dtype=dtype, device=device), None if b is None else b.to(dtype=dtype, device=device)
        bias = b if b is not None else projection.bias  # after the refit (None: the projection has none)
        new = [a @ w + (0 if bias is None else bias.detach()) for a, _ in seen]  # the projection's output now
        before = (emitted - target).square().sum(1).mean()
        after = (torch.cat([_real(e, m) for e, m in zip(new, self.masks)]) - target).square().sum(1).mean()
        self.ratios.append(round(float(after / before.clamp(min=1e-12)), 4))
        # the new block output, by the same residual identity: old output - old projection output + new one
        self.pruned = [p + (e - o).reshape(p.shape) for p, e, (_, o) in zip(pruned_out, new, seen)]
        set_output_weight(projection, self.layout, w)
        if b is not None:
            projection.bias = nn.Parameter(b)
        self.dense = dense_out

    def _release(self) -> None:
        """Both streams (2 x prompts x tokens x hidden) are done after the last block: not held through recovery
        and evaluation."""
        self.dense, self.pruned, self.runs, self.masks = [], [], [], []
