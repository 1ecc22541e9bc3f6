"""The sequential refit (selection.refit): its least squares, every architecture in the support table, and a
compress run with it (reloads with the same logits, byte-identical rerun)."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import fnprune
from fnprune.arch import MLP_LAYOUTS, adds_to_residual, get_module, layer_blocks, layout_for, mlp_widths
from fnprune.compensation import refit_linear
from fnprune.errors import RecipeError
from fnprune.models import load_model
from fnprune.pruning import resolve_selection
from fnprune.recipe import ModelSpec, SelectionSpec, apply_overrides, load_recipe, recipe_from_dict
from fnprune.refit import LayerwiseRefit
from fnprune.report_text import report_lines
from fnprune.surgery import prune_mlp
from fnprune.tokens import batches, encode, forward

PROMPTS = ["Review: a wonderful and moving film\nSentiment:", "Review: dull , boring mess\nSentiment:",
           "Review: fresh\nSentiment:", "a slow , quiet and oddly funny picture", "the plot is thin"] * 4
ARCHS = sorted(MLP_LAYOUTS)


def test_refit_linear_solves_least_squares_and_its_ridge_pulls_toward_w0():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    w_true, b_true = torch.randn(6, 3, generator=gen), torch.randn(3, generator=gen)
    y = x @ w_true + b_true
    w0 = torch.zeros(6, 3)
    w, b = refit_linear(x, y, w0, torch.zeros(3), ridge=0.0)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, b_true, atol=1e-4, rtol=1e-4)
    w_far, _ = refit_linear(x, y, w_true + 1, torch.zeros(3), ridge=1e6)
    torch.testing.assert_close(w_far, w_true + 1, atol=1e-3, rtol=1e-3)  # a huge ridge keeps the old weights
    w_zero, b_zero = refit_linear(x, x @ w_true, w0, None, ridge=0.0)  # through zero: no intercept
    assert b_zero is None
    torch.testing.assert_close(w_zero, w_true, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ridge"):
        refit_linear(x, y, w0, None, ridge=-1)


def test_zero_inputs_do_not_dilute_the_refits_ridge():
    """A padded layout's zero neurons entered the ridge's scale (the mean input variance): padded to twice the
    width, the same kept neurons got half the ridge and other weights (logits moved by 0.3 on a tiny GPT-2)."""
    gen = torch.Generator().manual_seed(0)
    x, w0 = torch.randn(100, 6, generator=gen) * 3, torch.randn(6, 3, generator=gen)
    y = x @ torch.randn(6, 3, generator=gen) + 1
    padded = torch.cat([x, torch.zeros(100, 6)], dim=1)
    w0_padded = torch.cat([w0, torch.randn(6, 3, generator=gen)])
    for b0 in (torch.zeros(3), None):
        w, b = refit_linear(x, y, w0, b0, ridge=1.0)
        w_padded, b_padded = refit_linear(padded, y, w0_padded, b0, ridge=1.0)
        torch.testing.assert_close(w_padded[:6], w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_padded[6:], w0_padded[6:])  # a zero input keeps its old weights
        assert (b is None) == (b_padded is None) and (b is None or torch.allclose(b, b_padded, atol=1e-5))


def _block_outputs(model, layout, seqs):
    """Every block's output at the real tokens, per layer (a plain forward pass with hooks)."""
    blocks = layer_blocks(model, layout)
    outs = [[] for _ in blocks]
    mask = []
    handles = [b.register_forward_hook(
        lambda m, a, o, i=i: outs[i].append((o[0] if isinstance(o, tuple) else o).reshape(*mask[0].shape, -1)[mask[0]]))
        for i, b in enumerate(blocks)]
    for batch in batches(seqs, 4):
        mask[:] = [batch.attention_mask.bool()]
        forward(model, batch, all_logits=False)
    for h in handles:
        h.remove()
    return [torch.cat(o) for o in outs]


def _errors(model, dense_model, layout, seqs):
    return [float((o - r).square().sum(1).mean())
            for o, r in zip(_block_outputs(model, layout, seqs), _block_outputs(dense_model, layout, seqs))]


@pytest.mark.parametrize("arch", ARCHS)
def test_refit_brings_every_block_output_closer_to_dense(arch, model_dir):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    sel = SelectionSpec(refit=True)
    if not adds_to_residual(layout, model):
        with pytest.raises(RecipeError, match="selection.refit"):
            resolve_selection(sel, layout, model)
        return
    resolve_selection(sel, layout, model)
    seqs = encode(tok, PROMPTS, 64)
    widths = mlp_widths(model, layout)
    gen = torch.Generator().manual_seed(0)
    keep = [torch.randperm(w, generator=gen)[: w // 4].sort().values for w in widths]
    plain = prune_mlp(copy.deepcopy(model), layout, keep)
    refitted = copy.deepcopy(model)
    refit = LayerwiseRefit(refitted, layout, seqs, ridge=0.01, batch_size=4, progress=False)
    prune_mlp(refitted, layout, keep, on_block=refit.on_block)
    assert mlp_widths(refitted, layout) == [w // 4 for w in widths]  # the shapes surgery gives
    assert len(refit.ratios) == len(widths) and all(r < 1 for r in refit.ratios)
    assert not (refit.dense or refit.pruned)  # the streams freed after the last block, before anything else runs
    before, after = _errors(plain, model, layout, seqs), _errors(refitted, model, layout, seqs)
    assert all(a < b for a, b in zip(after, before)), (before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_refits_own_stream_is_what_the_refitted_model_computes(arch, model_dir):
    """The refit carries each block's pruned output forward itself; it must be the real one. Falcon's parallel
    attention adds to the projection's output in place, which the refit recorded by reference."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    if not adds_to_residual(layout, model):
        return
    seqs = encode(tok, PROMPTS, 64)
    gen = torch.Generator().manual_seed(0)
    keep = [torch.randperm(w, generator=gen)[: w // 4].sort().values for w in mlp_widths(model, layout)]
    refit = LayerwiseRefit(model, layout, seqs, ridge=0.01, batch_size=4, progress=False)
    release, refit._release = refit._release, lambda: None  # the streams kept, to compare
    prune_mlp(model, layout, keep, on_block=refit.on_block)
    carried = torch.cat([p.reshape(*m.shape, -1)[m] for p, m in zip(refit.pruned, refit.masks)])
    release()  # as the last block does: nothing of the streams held after the surgery
    assert not (refit.dense or refit.pruned or refit.runs or refit.masks) and refit.ratios
    torch.testing.assert_close(carried, _block_outputs(model, layout, seqs)[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "falcon"])
def test_without_bias_compensation_the_refit_leaves_a_familys_own_bias(arch, model_dir):
    """`--no-bias-compensation` with the refit moved GPT-2's (and OPT's, ...) own output bias: the refit fitted it
    as its intercept. It stays now; the weights alone are refitted, and the carried stream is still the model's."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    blocks = layer_blocks(model, layout)
    own = [get_module(b, layout.output).bias.detach().clone() for b in blocks]
    seqs = encode(tok, PROMPTS, 64)
    gen = torch.Generator().manual_seed(0)
    keep = [torch.randperm(w, generator=gen)[: w // 4].sort().values for w in mlp_widths(model, layout)]
    fitted = LayerwiseRefit(copy.deepcopy(model), layout, seqs, ridge=0.01, batch_size=4, progress=False)
    prune_mlp(fitted.model, layout, keep, on_block=fitted.on_block)
    assert not all(torch.equal(get_module(b, layout.output).bias, o)
                   for b, o in zip(layer_blocks(fitted.model, layout), own))  # bias fitted, as with compensation
    refit = LayerwiseRefit(model, layout, seqs, ridge=0.01, batch_size=4, progress=False, fit_bias=False)
    release, refit._release = refit._release, lambda: None
    prune_mlp(model, layout, keep, on_block=refit.on_block)
    for block, bias in zip(blocks, own):
        assert torch.equal(get_module(block, layout.output).bias, bias)
    assert all(r < 1 for r in refit.ratios)
    carried = torch.cat([p.reshape(*m.shape, -1)[m] for p, m in zip(refit.pruned, refit.masks)])
    release()
    torch.testing.assert_close(carried, _block_outputs(model, layout, seqs)[-1], atol=1e-4, rtol=1e-4)


def _same(a, b) -> bool:
    """Equal tensors, or containers of them, or equal plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


@pytest.mark.parametrize("arch", ARCHS)
def test_refit_catch_records_what_a_full_pass_gives_and_restores_the_blocks(arch, model_dir):
    """The catch runs only the first batch through the blocks (the others through stand-ins that return their
    input): every block's recorded masks and positions must still equal a real forward pass's, and afterwards
    the model must compute what it did before."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    seqs = encode(tok, PROMPTS, 64)
    blocks = layer_blocks(model, layout)
    real: list[list] = [[] for _ in blocks]

    def record(i):
        return lambda m, a, k: real[i].append((a[1:] if a else None,
                                               {n: v for n, v in k.items() if n != "hidden_states"}))

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    shapes: list[list] = [[] for _ in blocks]  # of the hidden states each block is handed
    handles += [b.register_forward_pre_hook(
        lambda m, a, k, i=i: shapes[i].append((a[0] if a else k["hidden_states"]).shape), with_kwargs=True)
        for i, b in enumerate(blocks)]
    logits = [forward(model, batch) for batch in batches(seqs, 4)]
    real_shapes, shapes = shapes, [[] for _ in blocks]  # the hooks append to the new list
    refit = LayerwiseRefit(model, layout, seqs, ridge=0.01, batch_size=4, progress=False)
    for h in handles:
        h.remove()
    assert len(refit.runs) > 1  # the stand-ins ran
    assert all(_same(refit.inputs[i], real[i][: len(refit.inputs[i])]) for i in range(len(blocks)))
    assert shapes == real_shapes  # a stand-in returns what its block's caller expects (falcon: a tuple)
    assert all("forward" not in b.__dict__ for b in blocks)
    for before, batch in zip(logits, batches(seqs, 4)):
        torch.testing.assert_close(forward(model, batch), before, rtol=0, atol=0)


def test_the_refit_progress_bar_opens_with_the_first_block(model_dir, capsys):
    """The bar belongs to the surgery stage that calls `on_block`, not to the catch before it: nothing is printed
    until the first block is refitted."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    refit = LayerwiseRefit(model, layout, encode(tok, PROMPTS, 64), ridge=0.01, batch_size=4, progress=True)
    assert "refit" not in capsys.readouterr().err
    refit.on_block(0, None, lambda plan: None)
    assert "refit:" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_refit_auto_is_on_for_classification_in_memory_where_the_family_allows(arch, model_dir):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout, auto = layout_for(model), SelectionSpec()
    assert auto.refit is None
    allowed = arch == "llama"
    assert resolve_selection(auto, layout, model, "classification").refit is allowed
    assert resolve_selection(auto, layout, model, "multiple_choice").refit is False
    assert resolve_selection(auto, layout, model, "classification", in_memory=False).refit is False
    assert resolve_selection(SelectionSpec(refit=False), layout, model, "classification").refit is False


def test_refit_refused_with_streamed_surgery():
    recipe = recipe_from_dict({"selection": {"refit": True}, "output": {"streamed": True}})
    assert any("selection.refit" in p for p in recipe.problems())
    auto = recipe_from_dict({"output": {"streamed": True}})
    assert not any("selection.refit" in p for p in auto.problems())  # auto: off with streamed surgery


def test_a_switch_left_to_its_default_may_be_written_auto():
    sel = recipe_from_dict({"selection": {"refit": "auto", "bias_compensation": "auto"}}).selection
    assert sel.refit is None and sel.bias_compensation is None
    with pytest.raises(RecipeError, match="selection.refit: expected true/false"):
        recipe_from_dict({"selection": {"refit": "sometimes"}})


def test_refit_ridge_and_prompts_are_their_own_settings_and_checked():
    assert SelectionSpec().refit_ridge != SelectionSpec().ridge  # chosen apart (RESULTS.md 0.0.10)
    assert any("selection.refit_ridge: must be a finite number >= 0" in p
               for p in recipe_from_dict({"selection": {"refit_ridge": -1}}).problems())
    assert any("selection.refit_prompts: must be >= 1" in p
               for p in recipe_from_dict({"selection": {"refit_prompts": 0}}).problems())


@pytest.mark.slow
def test_compress_with_refit_reloads_and_reruns_identically(model_dir, task_data, tmp_path):
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model_dir("llama"))},
        "task": {"name": "sst2", "data_dir": str(task_data)},
        "calibration": {"num_samples": 48, "max_tokens": 400, "batch_size": 8},
        "selection": {"keep": 0.5, "refit": True, "refit_ridge": 0.5, "refit_prompts": 20},
        "output": {"dir": str(tmp_path / "a")},
    })
    result = fnprune.compress(recipe, progress=False)
    assert "refit_inputs" in result.report["timings_seconds"]
    assert any("method flap + refit on 20 prompts," in line for line in report_lines(result.report))
    assert "refitted so that its block's output matches the dense model's on the first 20 calibration prompts" in (
        result.output_dir / "README.md").read_text()
    ratios = result.report["refit"]["block_error_after_over_before"]
    assert len(ratios) == 2 and all(0 <= r < 1 for r in ratios)
    assert result.report["refit"]["ridge"] == 0.5
    assert result.report["refit"]["prompts"] == 20  # the first 20 of the 48 calibration prompts
    assert load_recipe(result.output_dir / "recipe.yaml").selection.refit is True
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    again = fnprune.compress(apply_overrides(load_recipe(result.output_dir / "recipe.yaml"),
                                             {"output.dir": str(tmp_path / "b")}), progress=False)
    sha = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
           for d in (result.output_dir, again.output_dir)]
    assert sha[0] == sha[1]
    assert again.report["metric"] == result.report["metric"]
    without = fnprune.compress(apply_overrides(recipe, {"selection.refit": False, "output.dir": str(tmp_path / "c")}),
                               progress=False)
    assert hashlib.sha256((without.output_dir / "model.safetensors").read_bytes()).hexdigest() != sha[0]
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = fnprune.load_pruned(result.output_dir)
    torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits, atol=1e-5, rtol=1e-5)
