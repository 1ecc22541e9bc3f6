"""Sequential selection (selection.sequential): each layer chosen on its activations in the model pruned before
it, as FLAP's code runs Wanda-SP; every architecture in the support table, checked against plain forward passes,
and a compress run with it (report, card, reload, byte-identical rerun)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fnprune
from fnprune.arch import MLP_LAYOUTS, get_module, layer_blocks, layout_for, mlp_widths, neuron_weight_norms
from fnprune.capture import sample_positions
from fnprune.checkpoint import NETWORKS_FILE
from fnprune.errors import RecipeError
from fnprune.models import load_model
from fnprune.pruning import rechoose_layer, resolve_selection
from fnprune.recipe import ModelSpec, SelectionSpec, apply_overrides, load_recipe, recipe_from_dict
from fnprune.refit import LayerwiseRefit
from fnprune.report_text import report_lines
from fnprune.selection import top_neurons
from fnprune.surgery import prune_mlp
from fnprune.tokens import batches, encode, forward

PROMPTS = ["Review: a wonderful and moving film\nSentiment:", "Review: dull , boring mess\nSentiment:",
           "Review: fresh\nSentiment:", "a slow , quiet and oddly funny picture", "the plot is thin"] * 4


def _mlp_inputs(model, layout, seqs, layer: int) -> torch.Tensor:
    """Layer `layer`'s MLP activations at the real tokens, from a plain forward pass of the whole model."""
    projection = get_module(layer_blocks(model, layout)[layer], layout.output)
    seen = []
    handle = projection.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    masks = []
    for batch in batches(seqs, 4):
        masks.append(batch.attention_mask.bool())
        forward(model, batch, all_logits=False)
    handle.remove()
    return torch.cat([a.reshape(*m.shape, a.shape[-1])[m] for a, m in zip(seen, masks)]).double()


@pytest.mark.parametrize("arch", sorted(MLP_LAYOUTS))
def test_each_layer_keeps_its_top_wanda_sp_scores_in_the_model_pruned_before_it(arch, model_dir):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    dense = copy.deepcopy(model)
    seqs = encode(tok, PROMPTS, 64)
    widths = mlp_widths(model, layout)
    norms = neuron_weight_norms(model, layout)

    seen = []

    def choose(i, plan, acts):
        seen.append(acts)
        keep, centre, fill = rechoose_layer("wanda-sp", i, acts, norms[i], len(plan.keep), 0, False, False, 0.1)
        assert centre is None and fill is None
        return dataclasses.replace(plan, keep=keep)

    streams = LayerwiseRefit(model, layout, seqs, ridge=0.0, batch_size=4, progress=False, refit=False,
                             choose=choose, max_tokens=50, seed=3)
    one_shot = [torch.arange(w // 4) for w in widths]  # the widths sequential selection keeps, not its neurons
    prune_mlp(model, layout, one_shot, on_block=streams.on_block, width_layout="per-layer")
    assert mlp_widths(model, layout) == [w // 4 for w in widths]
    assert not (streams.pruned or streams.runs)  # the stream freed after the last block
    chosen, on_dense = [], []
    for i, width in enumerate(widths):  # layer i's choice, from the dense model with layers < i pruned as chosen
        reference = prune_mlp(copy.deepcopy(dense), layout, chosen + [torch.arange(w) for w in widths[i:]],
                              width_layout="per-layer")
        x = _mlp_inputs(reference, layout, seqs, i)
        score = x.square().mean(0).sqrt() * norms[i]["out_abs_mean"].double()
        chosen.append(top_neurons(score, width // 4))
        x = _mlp_inputs(dense, layout, seqs, i)
        on_dense.append(top_neurons(x.square().mean(0).sqrt() * norms[i]["out_abs_mean"].double(), width // 4))
    pruned = prune_mlp(copy.deepcopy(dense), layout, chosen, width_layout="per-layer")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned(ids).logits, atol=1e-5, rtol=1e-5)
    total = sum(len(q) for q in seqs)
    assert all(a.count == total and a.tokens.shape[0] == 50 for a in seen)  # every token counted, 50 sampled
    first = _mlp_inputs(dense, layout, seqs, 0)  # layer 0 sees the dense model's inputs: its sample is theirs
    torch.testing.assert_close(seen[0].tokens.double(), first[sample_positions(total, 50, 3)], atol=1e-5, rtol=1e-5)
    assert torch.equal(chosen[0], on_dense[0])
    assert any(not torch.equal(c, d) for c, d in zip(chosen, on_dense))  # later ones another model's


def test_on_block_must_prune_each_layer_by_a_plan_of_its_widths(model_dir):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    keep = [torch.arange(w // 2) for w in mlp_widths(model, layout)]
    with pytest.raises(RuntimeError, match="layer 0 was not pruned"):
        prune_mlp(copy.deepcopy(model), layout, keep, on_block=lambda i, plan, prune: None)
    with pytest.raises(ValueError, match="other widths"):
        prune_mlp(copy.deepcopy(model), layout, keep,
                  on_block=lambda i, plan, prune: prune(dataclasses.replace(plan, keep=plan.keep[:-1])))


def test_sequential_selection_is_refused_where_it_cannot_run(model_dir):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    for method in ("fn-task", "random", "magnitude"):
        with pytest.raises(RecipeError, match=f"selection.sequential: .* not {method}"):
            resolve_selection(SelectionSpec(method=method, sequential=True), layout, model)
    with pytest.raises(RecipeError, match="answer_weight"):
        resolve_selection(SelectionSpec(sequential=True, answer_weight=0.5), layout, model)
    assert resolve_selection(SelectionSpec(sequential=True), layout, model).method == "flap"  # auto
    streamed = recipe_from_dict({"selection": {"sequential": True}, "output": {"streamed": True}})
    assert any("selection.sequential runs the pruned model in memory" in p for p in streamed.problems())


@pytest.mark.slow
def test_compress_with_sequential_selection_reports_it_reloads_and_reruns_identically(model_dir, task_data,
                                                                                      tmp_path, caplog, monkeypatch):
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model_dir("llama"))},
        "task": {"name": "sst2", "data_dir": str(task_data)},
        "calibration": {"num_samples": 48, "max_tokens": 100, "batch_size": 8},
        "selection": {"keep": 0.5, "sequential": True, "refit_prompts": 20},  # flap + reconstruction + refit
        "output": {"dir": str(tmp_path / "a")},
    })
    passes = []  # over every MLP weight: one, shared by the one-shot selection and the rescoring

    def counted(*args):
        passes.append(1)
        return neuron_weight_norms(*args)
    for module in ("fnprune.pipeline", "fnprune.pruning"):
        monkeypatch.setattr(f"{module}.neuron_weight_norms", counted)
    with caplog.at_level("WARNING", logger="fnprune"):
        result = fnprune.compress(recipe, progress=False)
    monkeypatch.undo()
    assert len(passes) == 1
    assert "not used" not in caplog.text  # max_tokens caps the sample of its reconstruction
    report = result.report
    assert report["sequential"]["prompts"] == 20 and "refit" in report
    assert report["calibration"]["tokens_for_ica"] == 0  # no dense sample: the reconstruction samples the stream
    assert report["sequential"]["tokens_sampled"] == 100 < report["sequential"]["tokens"]
    same = report["sequential"]["kept_as_one_shot"]
    assert len(same) == 2 and all(0 <= s <= 1 for s in same) and min(same) < 1  # some neurons chosen otherwise
    assert any("method flap scored layer by layer on the model pruned before it (20 prompts) + refit on 20 prompts,"
               in line for line in report_lines(report))
    assert "kept neurons were chosen on its activations in the model with the layers before it already pruned (the " \
           "first 20 calibration prompts)" in (
        result.output_dir / "README.md").read_text()
    saved = load_file(result.output_dir / NETWORKS_FILE)
    one_shot = fnprune.compress(apply_overrides(recipe, {"selection.sequential": False, "output.dir": str(
        tmp_path / "c")}), progress=False)
    before = load_file(one_shot.output_dir / NETWORKS_FILE)
    for i, share in enumerate(same):  # the kept indices saved are the ones sequential selection chose
        a, b = set(saved[f"layers.{i}.kept"].tolist()), set(before[f"layers.{i}.kept"].tolist())
        assert len(a) == len(b) and round(len(a & b) / len(a), 4) == share
    assert load_recipe(result.output_dir / "recipe.yaml").selection.sequential is True
    again = fnprune.compress(apply_overrides(load_recipe(result.output_dir / "recipe.yaml"),
                                             {"output.dir": str(tmp_path / "b")}), progress=False)
    sha = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
           for d in (result.output_dir, again.output_dir, one_shot.output_dir)]
    assert sha[0] == sha[1] != sha[2]
    ids = torch.tensor([[5, 6, 7, 8]])
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(reloaded(ids).logits, fnprune.load_pruned(result.output_dir).model(ids).logits,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sequential_selection_without_the_refit_names_its_own_stage(model_dir, task_data, tmp_path):
    """The catch of the layer-by-layer pass's inputs is timed as `sequential_inputs` when no refit runs."""
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model_dir("llama"))},
        "task": {"name": "sst2", "data_dir": str(task_data)},
        "calibration": {"num_samples": 24, "max_tokens": 100, "batch_size": 8},
        "selection": {"keep": 0.5, "sequential": True, "refit": False, "reconstruct": False, "refit_prompts": 8},
        "evaluation": {"max_samples": 4},
        "output": {"dir": str(tmp_path / "a")},
    })
    report = fnprune.compress(recipe, progress=False).report
    assert "sequential_inputs" in report["timings_seconds"] and "refit_inputs" not in report["timings_seconds"]
    assert "refit" not in report and report["sequential"]["prompts"] == 8


def test_settings_sequential_selection_reads_are_not_called_unused(caplog):
    """It runs the refit's prompts without the refit, and samples max_tokens of them for its reconstruction."""
    from fnprune.inputs import _warn_unused_settings

    recipe = recipe_from_dict({"calibration": {"max_tokens": 100}})
    for reconstruct, unused in ((True, "selection.refit_ridge"),
                                (False, "selection.refit_ridge, calibration.max_tokens")):
        sel = SelectionSpec(method="flap", refit=False, sequential=True, refit_prompts=20, refit_ridge=0.5,
                            reconstruct=reconstruct)
        caplog.clear()
        with caplog.at_level("WARNING", logger="fnprune"):
            _warn_unused_settings(recipe, sel, "classification")
        assert caplog.text.rstrip().endswith(f": {unused}")
