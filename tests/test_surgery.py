"""Physically pruned model == dense model with the same neurons masked, for every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fnprune.arch import CAUSAL_LM, CLASSIFIER, MLP_LAYOUTS, is_classifier, layout_for, mlp_widths
from fnprune.errors import ModelError
from fnprune.hooks import masked_neurons, mlp_input_hooks
from fnprune.models import load_model
from fnprune.recipe import ModelSpec
from fnprune.surgery import plan_layers, prune_mlp, supports_bias_compensation
from fnprune.tokens import encode, forward, make_batch

PROMPTS = ["Review: a wonderful and moving film\nSentiment:", "Review: dull , boring mess\nSentiment:",
           "Review: fresh\nSentiment:"]
ARCHS = sorted(MLP_LAYOUTS)


def _batch(tokenizer):
    seqs = encode(tokenizer, PROMPTS, 64)
    return make_batch(seqs, list(range(len(seqs))))


def _per_layer_keep(widths: list[int], keep: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(w, generator=gen)[:keep].sort().values for w in widths]


def _logits(model, batch):
    logits = forward(model, batch)
    if logits.dim() == 2:  # classifier head: (B, classes)
        return logits
    return logits[batch.attention_mask.bool()]  # real tokens only


def _auto(model):
    """The vanilla transformers auto class a user would reload this model with."""
    return AutoModelForSequenceClassification if is_classifier(model) else AutoModelForCausalLM


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_equals_masked(arch, model_dir):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    batch = _batch(tok)
    widths = mlp_widths(model, layout)
    keep = _per_layer_keep(widths, widths[0] // 2)
    assert not torch.equal(keep[0], keep[1]), "test needs different masks per layer"
    with masked_neurons(model, layout, keep):
        masked = _logits(model, batch)
    dense = _logits(model, batch)
    assert not torch.allclose(masked, dense, atol=1e-4), "masking must change the output"
    pruned_model = prune_mlp(copy.deepcopy(model), layout, keep)
    assert mlp_widths(pruned_model, layout) == [widths[0] // 2] * len(widths)
    torch.testing.assert_close(_logits(pruned_model, batch), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ARCHS if supports_bias_compensation(MLP_LAYOUTS[a])])
def test_bias_compensation_equals_mean_filled_mask(arch, model_dir, tmp_path):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    batch = _batch(tok)
    widths = mlp_widths(model, layout)
    keep = _per_layer_keep(widths, widths[0] // 4, seed=1)
    gen = torch.Generator().manual_seed(2)
    means = [torch.randn(w, generator=gen) for w in widths]
    with masked_neurons(model, layout, keep, fill=means):
        expected = _logits(model, batch)
    pruned = prune_mlp(copy.deepcopy(model), layout, keep, removed_means=means)
    torch.testing.assert_close(_logits(pruned, batch), expected, atol=1e-5, rtol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = _auto(pruned).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstruction_equals_reconstructing_mask(arch, model_dir, tmp_path):
    """Folded least-squares reconstruction == the dense model with removed neurons rebuilt from kept ones:
    centred with a bias where the architecture has one, through zero elsewhere."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    batch = _batch(tok)
    widths = mlp_widths(model, layout)
    keep = _per_layer_keep(widths, widths[0] // 4, seed=5)
    gen = torch.Generator().manual_seed(6)
    maps = [0.1 * torch.randn(len(k), w - len(k), generator=gen) for k, w in zip(keep, widths)]
    means = [torch.randn(w, generator=gen) for w in widths] if supports_bias_compensation(layout, model) else None
    with masked_neurons(model, layout, keep, fill=means):
        mean_filled = _logits(model, batch)
    with masked_neurons(model, layout, keep, fill=means, fill_map=maps):
        expected = _logits(model, batch)
    assert not torch.allclose(expected, mean_filled, atol=1e-4), "the reconstruction must change the output"
    pruned = prune_mlp(copy.deepcopy(model), layout, keep, removed_means=means, fill_maps=maps)
    torch.testing.assert_close(_logits(pruned, batch), expected, atol=1e-5, rtol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = _auto(pruned).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


def test_bias_compensation_refused_without_bias(model_dir):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("mistral"))))
    layout = layout_for(model)
    widths = mlp_widths(model, layout)
    with pytest.raises(ModelError, match="bias compensation"):
        prune_mlp(model, layout, _per_layer_keep(widths, 8), [torch.ones(w) for w in widths])


def test_refused_compensation_leaves_the_model_untouched(model_dir):
    """The plan is made for every layer before any is cut: a refusal finds the model as it was."""
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("mistral"))))
    layout = layout_for(model)
    widths = mlp_widths(model, layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="bias compensation"):
        prune_mlp(model, layout, _per_layer_keep(widths, 8), [torch.ones(w) for w in widths])
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_plan_decides_padding_and_new_biases():
    layout = MLP_LAYOUTS["llama"]  # no MLP bias stored; the mlp_bias flag can add one
    keep = [torch.tensor([5, 1]), torch.tensor([0, 2, 4, 6])]
    means = [torch.ones(8), torch.ones(8)]
    plans = plan_layers(layout, keep, [8, 8], [False, False], means, "padded")
    assert [p.keep.tolist() for p in plans] == [[1, 5], [0, 2, 4, 6]] and [p.target for p in plans] == [4, 4]
    assert all(p.new_biases for p in plans)
    assert [p.target for p in plan_layers(layout, keep, [8, 8], [False, False], None, "per-layer")] == [2, 4]
    assert not any(p.new_biases for p in plan_layers(layout, keep, [8, 8], [True, True], means, "padded"))
    with pytest.raises(ModelError, match="bias compensation"):
        plan_layers(MLP_LAYOUTS["mistral"], keep, [8, 8], [False, False], means, "padded")


def test_keeping_every_neuron_adds_no_bias(model_dir):
    """Nothing removed, nothing to compensate: the model keeps its parameters and config (no mlp_bias)."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    widths = mlp_widths(model, layout)
    batch = _batch(tok)
    expected = _logits(model, batch)
    before = set(model.state_dict())
    pruned = prune_mlp(model, layout, [torch.arange(w) for w in widths], [torch.ones(w) for w in widths])
    assert set(pruned.state_dict()) == before and not pruned.config.mlp_bias
    torch.testing.assert_close(_logits(pruned, batch), expected, atol=1e-6, rtol=1e-6)
    assert not any(p.new_biases or p.centre is not None
                   for p in plan_layers(layout, [torch.arange(8)] * 2, [8, 8], [False, False], [torch.ones(8)] * 2))


def test_layout_facts():
    for arch, layout in MLP_LAYOUTS.items():
        assert layout.head in (CAUSAL_LM, CLASSIFIER)
        assert layout.decision == ("first" if layout.classifier else "last"), arch
        assert layout.layers.startswith(layout.prefix + ".")
    assert {a for a, lay in MLP_LAYOUTS.items() if lay.classifier} == {"bert", "roberta", "distilbert"}
    assert MLP_LAYOUTS["llama"].bias_flag == "mlp_bias" and MLP_LAYOUTS["gpt2"].bias_flag is None
    assert MLP_LAYOUTS["gpt2"].prefix == "transformer"


def test_checkpoint_with_another_head_refused(model_dir, tmp_path):
    """A Llama classifier is not in the support table: refused, not loaded as a causal LM without its head."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir("llama"), num_labels=2, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dir("llama")).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="LlamaForSequenceClassification.*AutoModelForCausalLM"):
        load_model(ModelSpec(name_or_path=str(tmp_path)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_each_layer_gets_its_own_mask(arch, model_dir):
    """The reference code's hooks all used the last layer's mask; check what every layer really sees."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    widths = mlp_widths(model, layout)
    keep = _per_layer_keep(widths, widths[0] // 2, seed=3)
    seen: dict[int, torch.Tensor] = {}

    def make_hook(i):
        def hook(module, args):
            seen[i] = args[0].detach().reshape(-1, args[0].shape[-1]).abs().sum(0)

        return hook

    with masked_neurons(model, layout, keep), mlp_input_hooks(model, layout, make_hook):
        forward(model, _batch(tok))
    for i, k in enumerate(keep):
        alive = (seen[i] > 0).nonzero().flatten()
        assert set(alive.tolist()) <= set(k.tolist()), f"layer {i} saw neurons outside its own mask"
        assert len(alive) > len(k) // 2


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_checkpoint_reloads_with_vanilla_transformers(arch, model_dir, tmp_path):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    batch = _batch(tok)
    widths = mlp_widths(model, layout)
    prune_mlp(model, layout, _per_layer_keep(widths, 24, seed=4))
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = _auto(model).from_pretrained(tmp_path).eval()
    assert mlp_widths(reloaded, layout) == [24] * len(widths)
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-6, rtol=1e-6)


def test_unequal_widths_refused(model_dir):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    with pytest.raises(ModelError, match="--layout per-layer or padded"):
        prune_mlp(model, layout, [torch.arange(8), torch.arange(16)])


def test_bad_indices_refused(model_dir):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    with pytest.raises(ValueError, match="unique"):
        prune_mlp(model, layout, [torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])])


def _uneven_keep(widths: list[int], seed: int = 5) -> list[torch.Tensor]:
    """Different widths and different neurons per layer, the first layer the widest (a loader that resized the
    layers in another order, or only the first, would not notice ascending widths: the last is the config's)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [widths[i] // 4 + 8 * (len(widths) - 1 - i) for i in range(len(widths))]
    return [torch.randperm(w, generator=gen)[:n].sort().values for w, n in zip(widths, sizes)]


@pytest.mark.parametrize("width_layout", ["per-layer", "padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_uneven_widths_exact_save_and_reload(arch, width_layout, model_dir, tmp_path):
    import fnprune
    from fnprune.checkpoint import write_per_layer_code

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    batch = _batch(tok)
    widths = mlp_widths(model, layout)
    keep = _uneven_keep(widths)
    means = [torch.randn(w, generator=torch.Generator().manual_seed(9)) for w in widths]
    compensate = supports_bias_compensation(layout, model)
    with masked_neurons(model, layout, keep, fill=means if compensate else None):
        expected = _logits(model, batch)
    prune_mlp(model, layout, keep, means if compensate else None, width_layout)
    expected_widths = [len(k) for k in keep] if width_layout == "per-layer" else [max(len(k) for k in keep)] * 2
    assert mlp_widths(model, layout) == expected_widths
    torch.testing.assert_close(_logits(model, batch), expected, atol=1e-5, rtol=1e-5)
    if width_layout == "per-layer":
        write_per_layer_code(tmp_path, model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    if width_layout == "padded":  # a vanilla config: loads anywhere
        reloaded = _auto(model).from_pretrained(tmp_path).eval()
    else:
        reloaded = fnprune.load_pruned(tmp_path).model
    assert mlp_widths(reloaded, layout) == expected_widths
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


def test_a_per_layer_checkpoint_pruned_to_one_width_or_saved_again_still_loads(model_dir, tmp_path):
    """Pruning a per-layer checkpoint again to one width drops its stale per-layer record (the loader read the
    old widths); one loaded with its remote code and saved again (architectures: FnpruneModel) loads in fnprune."""
    from fnprune.checkpoint import write_per_layer_code

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    prune_mlp(model, layout, [torch.arange(24), torch.arange(40)], width_layout="per-layer")
    write_per_layer_code(tmp_path / "pl", model)
    model.save_pretrained(tmp_path / "pl")
    tok.save_pretrained(tmp_path / "pl")
    again, _ = load_model(ModelSpec(name_or_path=str(tmp_path / "pl")))
    prune_mlp(again, layout, [torch.arange(16), torch.arange(16)], width_layout="uniform")
    assert getattr(again.config, "fnprune_layout", None) is None and not getattr(again.config, "auto_map", None)
    again.save_pretrained(tmp_path / "u")
    tok.save_pretrained(tmp_path / "u")
    assert mlp_widths(load_model(ModelSpec(name_or_path=str(tmp_path / "u")))[0], layout) == [16, 16]
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "pl", trust_remote_code=True)
    remote.save_pretrained(tmp_path / "resaved")
    tok.save_pretrained(tmp_path / "resaved")
    assert remote.config.architectures == ["FnpruneModel"]
    assert mlp_widths(load_model(ModelSpec(name_or_path=str(tmp_path / "resaved")))[0], layout) == [24, 40]


def test_a_sources_auto_map_is_not_kept_pointing_at_files_the_output_lacks(model_dir, tmp_path):
    """Hub repos of native families can carry their own code (auto_map to configuration_X.py / modeling_X.py); the
    pruned folder holds the native class's weights and none of that code, so the entries named missing files and
    `trust_remote_code=True` loading failed. A per-layer output points auto_map at fnprune's loader alone."""
    import json
    import shutil

    from fnprune.checkpoint import write_per_layer_code

    source = tmp_path / "src"
    shutil.copytree(model_dir("llama"), source)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (source / "config.json").write_text(json.dumps(config))
    for width_layout in ("uniform", "per-layer"):
        model, tok = load_model(ModelSpec(name_or_path=str(source)))
        widths = (24, 24) if width_layout == "uniform" else (24, 40)
        prune_mlp(model, layout_for(model), [torch.arange(w) for w in widths], width_layout=width_layout)
        out = tmp_path / width_layout
        if width_layout == "per-layer":
            write_per_layer_code(out, model)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        saved = json.loads((out / "config.json").read_text()).get("auto_map")
        fnprune_loader = {"AutoModelForCausalLM": "modeling_fnprune.FnpruneModel"}
        assert saved == (None if width_layout == "uniform" else fnprune_loader)
        assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) is not None
