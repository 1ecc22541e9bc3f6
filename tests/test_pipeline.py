"""compress() end to end on tiny models: files, reload, reproducibility, atomic output."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import fnprune
from fnprune.cli import main
from fnprune.data import load_evaluation, resolve_task
from fnprune.errors import OutputError, RecipeError
from fnprune.evaluate import evaluate_templates
from fnprune.recipe import apply_overrides, load_recipe, recipe_from_dict

pytestmark = pytest.mark.slow  # full compress runs

EXPECTED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.json",
                  "README.md", "networks.safetensors", "networks.json"}


def _recipe(model_path, data_dir, out, **selection):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_path)},
        "task": {"name": "sst2", "data_dir": str(data_dir)},
        "calibration": {"num_samples": 48, "max_tokens": 400, "batch_size": 8},
        "networks": {"components": 8},
        "selection": {"keep": 0.5, **selection},
        "output": {"dir": str(out)},
    })


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama_run(model_dir, task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "llama"
    return fnprune.compress(_recipe(model_dir("llama"), task_data, out, method="fn-task"), progress=False)


def test_output_folder_and_report(llama_run):
    out = llama_run.output_dir
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*partial*"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one
    saved = json.loads((out / "report.json").read_text())
    assert saved["widths"] == {"dense": 128, "pruned": [64, 64]}
    assert saved["parameters"]["pruned"] < saved["parameters"]["dense"]
    assert saved["metric"]["n"] == 32 and 0 <= saved["metric"]["pruned"] <= 1
    assert saved["bias_compensation"] is True  # auto: llama can hold an MLP bias
    assert set(saved["timings_seconds"]) >= {"load", "capture", "networks", "selection", "reconstruct", "surgery"}
    assert llama_run.report == saved  # the API's report is the file's (later stages' timings were added to it)
    assert saved["reconstruct"] is True and saved["ridge"] == 0.1
    card = (out / "README.md").read_text()
    assert "tags:\n- fnprune\n- pruned" in card and "| parameters |" in card
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.provenance["versions"]["fnprune"] == fnprune.__version__
    assert len(recipe.provenance["data"]["train"]["sha256"]) == 64
    assert recipe.task.template is None  # resolved into the template list, not left to defaults
    assert recipe.task.templates[0].template == "Review: {sentence}\nSentiment:"
    assert [t.held_out for t in recipe.task.templates] == [False] * 4 + [True] * 3
    assert saved["metric"]["of"] == "held-out templates (mean)"
    assert [t["name"] for t in saved["templates"]] == [t.name for t in recipe.task.templates]
    held = [t["pruned"] for t in saved["templates"] if t["held_out"]]
    assert saved["metric"]["pruned"] == pytest.approx(sum(held) / len(held))
    assert "held out" in card and "`lm-eval`" in card and "fnprune export DIR --format gguf" in card
    assert recipe.selection.fn_boost == 16.0 and recipe.selection.bias_compensation is True  # auto values resolved
    assert recipe.task.data_dir.startswith("/") and recipe.model.name_or_path.startswith("/")  # rerun anywhere
    # fn-task: a summary of the networks it found, the same as the networks files hold
    layers = json.loads((out / "networks.json").read_text())["layers"]
    networks = saved["networks"]
    assert networks["per_layer"] == [len(layer["network_sizes"]) for layer in layers]
    assert networks["converged_layers"] == sum(layer["converged"] for layer in layers)
    assert networks["median_size"] == np.median([s for layer in layers for s in layer["network_sizes"]])
    assert f"ICA found {networks['per_layer'][0]} networks per layer" in card and "`networks.json`" in card
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert f"networks {networks['per_layer'][0]} per layer, median size {networks['median_size']:g}" in shown


def test_reloads_with_vanilla_transformers_and_same_accuracy(llama_run, task_data):
    out = llama_run.output_dir
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.intermediate_size == 64 and model.config.mlp_bias is True
    assert sum(p.numel() for p in model.parameters()) == llama_run.report["parameters"]["pruned"]
    task = resolve_task(llama_run.recipe.task)
    result = evaluate_templates(model, AutoTokenizer.from_pretrained(out), load_evaluation(task, "validation"),
                                task, progress=False)
    assert result.headline == llama_run.report["metric"]["pruned"]
    assert [r.accuracy for r in result.by_template.values()] == [t["pruned"] for t in llama_run.report["templates"]]
    loaded = fnprune.load_pruned(out)
    assert loaded.report["method"] == "fn-task" and loaded.recipe.selection.keep == 0.5


def test_same_recipe_gives_identical_checkpoint(llama_run, tmp_path):
    again = load_recipe(llama_run.output_dir / "recipe.yaml")  # rerun without the cache: a fresh capture and ICA
    again = apply_overrides(again, {"output.dir": str(tmp_path / "again"), "calibration.cache": False})
    result = fnprune.compress(again, progress=False)
    name = "model.safetensors"
    assert _sha(result.output_dir / name) == _sha(llama_run.output_dir / name)
    assert _sha(result.output_dir / "networks.safetensors") == _sha(llama_run.output_dir / "networks.safetensors")
    assert result.report["metric"] == llama_run.report["metric"]


def test_existing_output_refused_and_untouched(llama_run, model_dir, task_data):
    out = llama_run.output_dir
    before = {p.name: _sha(p) for p in out.iterdir()}
    with pytest.raises(OutputError, match="--overwrite"):
        fnprune.compress(_recipe(model_dir("llama"), task_data, out), progress=False)
    assert {p.name: _sha(p) for p in out.iterdir()} == before


def test_failure_during_save_leaves_nothing(model_dir, task_data, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        fnprune.compress(_recipe(model_dir("llama"), task_data, out), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces(model_dir, task_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's output (--overwrite replaces only those)
    (out / "stale.txt").write_text("old")
    recipe = apply_overrides(_recipe(model_dir("gpt2"), task_data, out), {"output.overwrite": True})
    fnprune.compress(recipe, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.n_inner == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("method", ["fn", "random", "magnitude", "wanda-sp", "flap"])
def test_every_method_prunes_to_the_same_budget(method, model_dir, task_data, tmp_path):
    recipe = _recipe(model_dir("qwen2"), task_data, tmp_path / method, method=method, keep=0.25)
    recipe = apply_overrides(recipe, {"evaluation.enabled": False})
    result = fnprune.compress(recipe, progress=False)
    assert result.report["widths"]["pruned"] == [32, 32]
    assert result.report["bias_compensation"] is False  # qwen2 MLPs have no bias
    assert result.report["metric"]["dense"] is None


def test_methods_select_different_neurons(model_dir, task_data, tmp_path):
    from safetensors.torch import load_file

    kept = {}
    for method in ("fn-task", "random", "wanda-sp"):
        recipe = _recipe(model_dir("llama"), task_data, tmp_path / method, method=method)
        fnprune.compress(apply_overrides(recipe, {"evaluation.enabled": False}), progress=False)
        kept[method] = load_file(tmp_path / method / "networks.safetensors")
    assert not torch.equal(kept["fn-task"]["layers.0.kept"], kept["random"]["layers.0.kept"])
    assert not torch.equal(kept["wanda-sp"]["layers.0.kept"], kept["random"]["layers.0.kept"])
    assert not torch.equal(kept["fn-task"]["layers.0.kept"], kept["fn-task"]["layers.1.kept"])


def test_bias_compensation_refused_where_impossible(model_dir, task_data, tmp_path):
    recipe = _recipe(model_dir("mistral"), task_data, tmp_path / "o", bias_compensation=True)
    with pytest.raises(RecipeError, match="bias_compensation"):
        fnprune.compress(recipe, progress=False)
    assert not (tmp_path / "o").exists()


def test_keep_one_leaves_the_model_as_it_was(model_dir, task_data, tmp_path):
    """Keep 1 with the default bias compensation, reconstruction and refit: the dense weights, bit for bit."""
    recipe = apply_overrides(_recipe(model_dir("llama"), task_data, tmp_path / "o", keep=1.0, refit=True),
                             {"evaluation.enabled": False})
    report = fnprune.compress(recipe, progress=False).report
    assert report["parameters"]["pruned"] == report["parameters"]["dense"] and "refit" not in report
    dense = AutoModelForCausalLM.from_pretrained(model_dir("llama")).state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    assert set(pruned) == set(dense) and all(torch.equal(pruned[k], v) for k, v in dense.items())


def test_sharded_output_reloads(model_dir, task_data, tmp_path):
    recipe = apply_overrides(_recipe(model_dir("qwen2"), task_data, tmp_path / "o"),
                             {"output.max_shard_size": "40KB", "evaluation.enabled": False})
    result = fnprune.compress(recipe, progress=False)
    shards = sorted(p.name for p in result.output_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (result.output_dir / "model.safetensors.index.json").is_file()
    assert result.report["file_bytes"]["pruned"] == sum((result.output_dir / s).stat().st_size for s in shards)
    assert AutoModelForCausalLM.from_pretrained(result.output_dir).config.intermediate_size == 64


@pytest.mark.parametrize("engine", ["torch", "sklearn"])
def test_both_ica_engines(engine, model_dir, task_data, tmp_path):
    recipe = apply_overrides(_recipe(model_dir("llama"), task_data, tmp_path / "o"),
                             {"networks.engine": engine, "evaluation.enabled": False})
    result = fnprune.compress(recipe, progress=False)
    assert result.recipe.networks.engine == engine and result.report["widths"]["pruned"] == [64, 64]
    meta = json.loads((result.output_dir / "networks.json").read_text())
    assert all(sum(layer["network_sizes"]) > 0 for layer in meta["layers"])


def test_token_sample_or_its_moments_give_the_same_model(model_dir, task_data, tmp_path):
    """The reconstruction needs only the sample's second moments: keeping them instead of the tokens gives the
    same pruned weights (to float32 rounding); "auto" picks moments when they are smaller (width 128 <= 400)."""
    weights = {}
    for store in ("tokens", "moments", "auto"):
        recipe = apply_overrides(_recipe(model_dir("llama"), task_data, tmp_path / store, method="flap"),
                                 {"calibration.sample_store": store, "evaluation.enabled": False})
        result = fnprune.compress(recipe, progress=False)
        assert result.report["calibration"]["tokens_for_ica"] == 400
        weights[store] = AutoModelForCausalLM.from_pretrained(result.output_dir).state_dict()
    for name, tensor in weights["tokens"].items():
        torch.testing.assert_close(weights["moments"][name], tensor, atol=2e-5, rtol=1e-4)
        assert torch.equal(weights["auto"][name], weights["moments"][name])


def test_reconstruction_brings_the_pruned_model_closer_to_dense(model_dir, task_data, tmp_path):
    """On the calibration prompts, the least-squares fill must track the dense model better than the mean."""
    from fnprune.data import load_sample, resolve_task
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec
    from fnprune.tokens import encode, forward, make_batch

    outs = {}
    for reconstruct in (False, True):
        recipe = _recipe(model_dir("llama"), task_data, tmp_path / str(reconstruct), reconstruct=reconstruct,
                         refit=False)
        outs[reconstruct] = fnprune.compress(recipe, progress=False).output_dir
    dense, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    task = resolve_task(_recipe(model_dir("llama"), task_data, tmp_path / "x").task)
    cal = recipe.calibration
    prompts = [e.prompt for e in load_sample(task, task.calibration_split, cal.num_samples, cal.seed)[:16]]
    batch = make_batch(encode(tok, prompts, 64), list(range(len(prompts))))
    mask = batch.attention_mask.bool()
    want = forward(dense, batch)[mask]
    err = {}
    for reconstruct, out in outs.items():
        pruned = AutoModelForCausalLM.from_pretrained(out).eval()
        err[reconstruct] = (forward(pruned, batch)[mask] - want).pow(2).mean().item()
    assert err[True] < 0.9 * err[False], err


def test_no_token_sample_when_nothing_needs_it(model_dir, task_data, tmp_path):
    """FLAP without reconstruction needs neither ICA nor the sample's moments: capture skips the sample (and its
    d x d products), the statistics and kept neurons are the same as with it, and the sample-less activations
    get their own cache entry, so a later run that needs the sample does not pick them up."""
    from fnprune.data import load_sample
    from fnprune.models import load_model
    from fnprune.pipeline import calibrate, select_neurons

    plain = _recipe(model_dir("llama"), task_data, tmp_path / "flap", method="flap", reconstruct=False)
    result = fnprune.compress(apply_overrides(plain, {"evaluation.enabled": False}), progress=False)
    assert result.report["calibration"]["tokens_for_ica"] == 0
    assert "networks" not in result.report["timings_seconds"]

    model, tok = load_model(plain.model)
    task = resolve_task(plain.task)
    examples = load_sample(task, "train", plain.calibration.num_samples, plain.calibration.seed)
    runs = {w: calibrate(model, tok, examples, task.label_words, plain, with_networks=False, progress=False,
                         with_sample=w) for w in (True, False)}
    assert runs[True].activations[0].sampled == 400 and runs[False].activations[0].sampled == 0
    for a, b in zip(runs[True].activations, runs[False].activations):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var) and torch.equal(a.decision, b.decision)
    kept = [select_neurons(model, runs[w], "flap", 0.5, 8, 0, None) for w in (True, False)]
    assert all(torch.equal(x, y) for x, y in zip(*kept))
    with pytest.raises(ValueError, match="need the token sample"):
        calibrate(model, tok, examples, task.label_words, plain, with_networks=True, with_sample=False)

    # Same calibration settings, now with ICA: the cached sample-less activations must not be used.
    networks = _recipe(model_dir("llama"), task_data, tmp_path / "fn", method="fn-task", reconstruct=False)
    with_ica = fnprune.compress(apply_overrides(networks, {"evaluation.enabled": False}), progress=False)
    assert with_ica.report["calibration"]["tokens_for_ica"] == 400


def test_reconstruction_releases_each_sample_once_fitted(model_dir, task_data, monkeypatch):
    """compress drops a layer's token sample as soon as its reconstruction is fitted, so the samples and the maps
    are never all alive together (wide MLPs keep tokens: gigabytes of each); the maps are the same."""
    from fnprune import pipeline, pruning
    from fnprune.data import load_sample
    from fnprune.models import load_model

    recipe = apply_overrides(_recipe(model_dir("llama"), task_data, "unused", method="flap"),
                             {"calibration.sample_store": "tokens"})
    model, tok = load_model(recipe.model)
    task = resolve_task(recipe.task)
    examples = load_sample(task, "train", recipe.calibration.num_samples, recipe.calibration.seed)
    calib = pipeline.calibrate(model, tok, examples, task.label_words, recipe, with_networks=False, progress=False)
    kept = pipeline.select_neurons(model, calib, "flap", 0.5, 8, 0, None)
    centres = [a.mean for a in calib.activations]
    maps = pipeline.reconstruction_fills(calib, kept, centres, 0.1)  # without release: samples stay
    assert all(a.tokens is not None for a in calib.activations)

    alive, fit = [], pruning.reconstruction_map

    def spy(sample, *args):
        alive.append(sum(a.tokens is not None for a in calib.activations))
        return fit(sample, *args)

    monkeypatch.setattr(pruning, "reconstruction_map", spy)
    released = pipeline.reconstruction_fills(calib, kept, centres, 0.1, release=True)
    layers = len(calib.activations)
    assert layers > 1 and alive == list(range(layers, 0, -1))  # layer i's fit: layers before it already freed
    assert all(a.tokens is None and a.moments is None for a in calib.activations)
    assert all(torch.equal(a, b) for a, b in zip(maps, released, strict=True))


def test_mlp_wider_than_the_sample_keeps_tokens_and_finds_the_same_networks(model_dir, task_data, tmp_path):
    """100 sampled tokens < 128 neurons: "auto" keeps the tokens, whitened from their token Gram; the networks
    match those found through the neuron Gram of the same sample's moments, and the checkpoint reloads.

    FastICA does not converge on these activations, and its iterations amplify rounding (on one machine the two
    stores' maps matched 0.989-0.9994 after 10 iterations, 0.82-0.92 after 400), so the comparison stops at 3."""
    from safetensors.torch import load_file

    from fnprune.capture import resolve_sample_store
    from fnprune.networks.fastica import match_components

    assert resolve_sample_store("auto", 128, 100, "float32") == "tokens"
    maps = {}
    for store in ("auto", "moments"):
        recipe = apply_overrides(_recipe(model_dir("llama"), task_data, tmp_path / store, method="fn-task"),
                                 {"calibration.sample_store": store, "calibration.max_tokens": 100,
                                  "task.template": "Review: {sentence}\nSentiment:",
                                  "networks.max_iter": 3, "evaluation.enabled": False})
        result = fnprune.compress(recipe, progress=False)
        assert result.report["calibration"]["tokens_for_ica"] == 100
        saved = load_file(result.output_dir / "networks.safetensors")
        maps[store] = [saved[f"layers.{i}.maps"].numpy() for i in range(2)]
        AutoModelForCausalLM.from_pretrained(result.output_dir)
    for a, b in zip(maps["auto"], maps["moments"], strict=True):
        assert match_components(a, b)[0] > 0.99


def test_uniform_relevance_weights_every_network_alike_and_shares_the_ica(llama_run, tmp_path):
    """networks.relevance uniform: report.json's per-network relevance is all ones, the networks are the cached
    ones of the labels run (the weighting is not part of what ICA finds)."""
    from safetensors.torch import load_file

    from fnprune import calibration

    recipe = apply_overrides(llama_run.recipe, {"output.dir": str(tmp_path / "uniform"),
                                                "networks.relevance": "uniform", "evaluation.enabled": False})
    found = []
    real = calibration.find_all_networks
    calibration.find_all_networks = lambda *a, **k: found.append(1) or real(*a, **k)
    try:
        result = fnprune.compress(recipe, progress=False)
    finally:
        calibration.find_all_networks = real
    assert not found  # from the cache the labels run filled
    nets = json.loads((result.output_dir / "networks.json").read_text())
    assert all(r == 1.0 for layer in nets["layers"] for r in layer["relevance"])
    labels = json.loads((llama_run.output_dir / "networks.json").read_text())
    assert any(r != 1.0 for layer in labels["layers"] for r in layer["relevance"])
    assert load_file(result.output_dir / "networks.safetensors")["layers.0.maps"].equal(
        load_file(llama_run.output_dir / "networks.safetensors")["layers.0.maps"])


def test_auto_recovery_is_on_for_multiple_choice_on_a_model_it_can_train():
    from fnprune.recipe import RecoverySpec

    auto = RecoverySpec()
    assert auto.enabled == "auto" and not auto.check()
    assert auto.for_task("multiple_choice", trainable=True).enabled is True
    assert auto.for_task("multiple_choice", trainable=False).enabled is False  # offloaded weights: off, no error
    assert auto.for_task("classification", trainable=True).enabled is False
    assert RecoverySpec(enabled=True).for_task("classification", trainable=True).enabled is True  # as given
    assert RecoverySpec(enabled="yes").check() == ["recovery.enabled: 'yes' is not true, false or auto"]


def test_auto_relevance_is_labels_for_classification_and_uniform_for_multiple_choice():
    from fnprune.recipe import NetworksSpec

    auto = NetworksSpec(relevance="auto")
    assert auto.for_task("classification").relevance == "labels"
    assert auto.for_task("multiple_choice").relevance == "uniform"
    assert NetworksSpec(relevance="labels").for_task("multiple_choice").relevance == "labels"  # as given


def test_auto_method_on_classification_is_flap_byte_for_byte(model_dir, task_data, tmp_path):
    auto = fnprune.compress(_recipe(model_dir("llama"), task_data, tmp_path / "auto"), progress=False)
    assert auto.recipe.selection.method == "flap"  # the saved recipe names what auto ran
    assert "networks" not in auto.report["timings_seconds"]  # no ICA for a criterion that reads no networks
    card = (auto.output_dir / "README.md").read_text()
    assert "scored every MLP neuron" in card and "functional networks" not in card
    explicit = fnprune.compress(_recipe(model_dir("llama"), task_data, tmp_path / "flap", method="flap"),
                                progress=False)
    assert _sha(explicit.output_dir / "model.safetensors") == _sha(auto.output_dir / "model.safetensors")


def test_the_saved_tokenizer_keeps_the_sources_truncation_and_padding(model_dir, task_data, tmp_path):
    """Every call of a fast tokenizer sets its backend's truncation and padding to the call's (scoring an encoder
    cuts its inputs with truncation=True, evaluation and perplexity call it without either), and save_pretrained
    wrote them into tokenizer.json: readers of an encoder's checkpoint cut every text to the scoring length, and a
    source's own truncation or padding was lost. Checked for an encoder and a decoder, the source's tokenizer.json
    with truncation and padding of its own, and without (the encoder's source has none)."""
    import json
    import shutil

    from tokenizers import Tokenizer

    for name, own in (("bert", False), ("bert", True), ("llama", True)):
        source = tmp_path / f"{name}-{own}"
        shutil.copytree(model_dir(name), source)
        if own:
            backend = Tokenizer.from_file(str(source / "tokenizer.json"))
            backend.enable_truncation(64, direction="left")
            backend.enable_padding(pad_id=0, pad_token=backend.id_to_token(0), pad_to_multiple_of=8)
            backend.save(str(source / "tokenizer.json"))
        recipe = _recipe(source, task_data, tmp_path / f"o-{name}-{own}", method="flap")
        recipe.evaluation.max_samples = 8
        out = fnprune.compress(recipe, progress=False).output_dir
        saved, given = (json.loads((folder / "tokenizer.json").read_text()) for folder in (out, source))
        assert (saved["truncation"], saved["padding"]) == (given["truncation"], given["padding"]), (name, own)
        assert (given["truncation"] is not None) == own
