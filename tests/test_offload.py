"""Big models: capture on an accelerate-offloaded model (CPU + disk), streamed surgery from the source files
== in-memory prune_mlp + save_pretrained, bounded memory, and compress() end to end with a device map."""

from __future__ import annotations

import copy
import json
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fnprune
from fnprune import stream_surgery
from fnprune.arch import get_module, layout_for, mlp_widths
from fnprune.capture import capture_activations
from fnprune.errors import ModelError, RecipeError
from fnprune.models import count_parameters, load_model, tied_aliases
from fnprune.recipe import ModelSpec, apply_overrides, recipe_from_dict
from fnprune.stream_surgery import stream_prune
from fnprune.surgery import prune_mlp, supports_bias_compensation
from fnprune.tokens import encode, forward, make_batch

pytestmark = pytest.mark.slow  # full compress runs

PROMPTS = ["Review: a wonderful and moving film\nSentiment:", "Review: dull , boring mess\nSentiment:",
           "Review: fresh\nSentiment:"]


def _offload_map(model) -> dict[str, str]:
    """Every top-level module and layer 0 on the CPU, layer 1 on disk (the realistic offload on a CPU-only
    machine), e.g. {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", ...}."""
    layers = layout_for(model).layers
    base, _, attr = layers.rpartition(".")
    out = {name: "cpu" for name, _ in model.named_children() if name != base}
    for name, _ in get_module(model, base).named_children():
        if name != attr:
            out[f"{base}.{name}"] = "cpu"
    for i in range(len(get_module(model, layers))):
        out[f"{layers}.{i}"] = "disk" if i == 1 else "cpu"
    return out


def _keep(widths: list[int], n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(w, generator=gen)[:n].sort().values for w in widths]


def _real_logits(model, tok) -> torch.Tensor:
    seqs = encode(tok, PROMPTS, 64)
    batch = make_batch(seqs, list(range(len(seqs))))
    return forward(model, batch)[batch.attention_mask.bool()]


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def offloaded(model_dir, tmp_path):
    """offloaded(model_type) -> (dense model, offloaded model, tokenizer)."""

    def load(model_type: str):
        path = str(model_dir(model_type))
        dense, tok = load_model(ModelSpec(name_or_path=path))
        spec = ModelSpec(name_or_path=path, device_map=_offload_map(dense), offload_folder=str(tmp_path / "off"))
        model, _ = load_model(spec)
        return dense, model, tok

    return load


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_on_offloaded_model_matches_dense(arch, offloaded):
    dense, model, tok = offloaded(arch)
    layer1 = layout_for(model).layers + ".1"
    assert model.hf_device_map[layer1] == "disk"
    assert any(p.device.type == "meta" for p in model.parameters()), "test needs really offloaded weights"
    seqs = encode(tok, PROMPTS, 64)
    kw = dict(max_tokens=20, batch_size=2, seed=0, progress=False)
    want = capture_activations(dense, layout_for(dense), seqs, **kw)
    got = capture_activations(model, layout_for(model), seqs, **kw)
    for a, b in zip(want, got):
        assert b.tokens.device.type == "cpu" and b.decision.device.type == "cpu"
        torch.testing.assert_close(b.tokens, a.tokens)
        torch.testing.assert_close(b.decision, a.decision)
        torch.testing.assert_close(b.mean, a.mean)
    torch.testing.assert_close(_real_logits(model, tok), _real_logits(dense, tok))
    assert count_parameters(model) == count_parameters(dense)


def test_weight_norms_on_offloaded_model(offloaded):
    from fnprune.arch import neuron_weight_norms

    dense, model, _ = offloaded("llama")
    for a, b in zip(neuron_weight_norms(dense, layout_for(dense)), neuron_weight_norms(model, layout_for(model))):
        torch.testing.assert_close(b["out"], a["out"])
        torch.testing.assert_close(b["in"], a["in"])


def _in_memory(model, layout, keep, means, width_layout, dest, shard="5GB", fills=None):
    pruned = prune_mlp(copy.deepcopy(model), layout, keep, means, width_layout, fills)
    pruned.save_pretrained(dest, max_shard_size=shard)
    return pruned


@pytest.mark.parametrize(("arch", "compensate", "width_layout", "reconstruct"), [
    ("llama", False, "uniform", False), ("llama", True, "uniform", False), ("llama", True, "padded", False),
    ("gpt2", True, "uniform", False), ("gpt2", False, "padded", False), ("phi3", False, "uniform", False),
    ("opt", True, "padded", False),
    ("llama", True, "uniform", True), ("llama", False, "padded", True), ("gpt2", True, "padded", True),
    ("phi3", False, "uniform", True),
])
def test_streamed_equals_in_memory(arch, compensate, width_layout, reconstruct, model_dir, tmp_path):
    source = model_dir(arch)
    model, tok = load_model(ModelSpec(name_or_path=str(source)))
    layout = layout_for(model)
    widths = mlp_widths(model, layout)
    keep = _keep(widths, 40, seed=1) if width_layout == "uniform" else [
        k[: 24 + 16 * i] for i, k in enumerate(_keep(widths, 40, seed=1))]
    assert compensate <= supports_bias_compensation(layout, model)
    gen = torch.Generator().manual_seed(2)
    means = [torch.randn(w, generator=gen) for w in widths] if compensate else None
    fills = None
    if reconstruct:
        fills = [0.1 * torch.randn(len(k), w - len(k), generator=gen) for k, w in zip(keep, widths)]
    pruned = _in_memory(model, layout, keep, means, width_layout, tmp_path / "memory", fills=fills)
    result = stream_prune(source, tmp_path / "stream", model.config, layout, keep, means, width_layout,
                          dtype=torch.float32, fill_maps=fills)
    want, got = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)
    cfg_want = json.loads((tmp_path / "memory" / "config.json").read_text())
    cfg_got = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert cfg_got == cfg_want and cfg_got[layout.width_key] == max(len(k) for k in keep)
    assert count_parameters(model) + result.parameters_delta == count_parameters(pruned)
    assert result.widths == mlp_widths(pruned, layout)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    torch.testing.assert_close(_real_logits(reloaded, tok), _real_logits(pruned, tok), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shard", ["40KB", "1KB"])  # 1KB: most tensors are bigger than a shard
def test_streamed_sharded_output(shard, model_dir, tmp_path):
    source = model_dir("qwen2")
    model, tok = load_model(ModelSpec(name_or_path=str(source)))
    layout = layout_for(model)
    keep = _keep(mlp_widths(model, layout), 64)
    pruned = _in_memory(model, layout, keep, None, "uniform", tmp_path / "memory", shard=shard)
    result = stream_prune(source, tmp_path / "stream", model.config, layout, keep, max_shard_size=shard)
    out = tmp_path / "stream"
    assert len(result.files) > 1 and result.files[0] == f"model-00001-of-{len(result.files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.files)
    sizes = {}
    for name in result.files:
        with safe_open(str(out / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes[name] = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
            assert all(index["weight_map"][k] == name for k in f.keys())
            assert sizes[name] <= int(shard[:-2]) * 1000 or len(f.keys()) == 1  # only a tensor bigger stands alone
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # the files save_pretrained writes, byte for byte: tensors bigger than a shard split as huggingface_hub does
    assert index == json.loads((tmp_path / "memory" / "model.safetensors.index.json").read_text())
    assert all((out / n).read_bytes() == (tmp_path / "memory" / n).read_bytes() for n in result.files)
    want, got = _tensors(tmp_path / "memory"), _tensors(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_real_logits(reloaded, tok), _real_logits(pruned, tok), atol=1e-5, rtol=1e-5)


def test_checkpoint_keys_without_base_model_prefix(model_dir, tmp_path):
    """GPT-2 checkpoints on the Hub store `h.0.mlp.c_fc.weight` for `transformer.h.0.mlp.c_fc.weight`."""
    src = tmp_path / "src"
    src.mkdir()
    for f in model_dir("gpt2").iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir("gpt2") / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    model, tok = load_model(ModelSpec(name_or_path=str(src)))
    layout = layout_for(model)
    keep = _keep(mlp_widths(model, layout), 32)
    means = [torch.randn(w) for w in mlp_widths(model, layout)]
    pruned = prune_mlp(copy.deepcopy(model), layout, keep, means)
    stream_prune(src, tmp_path / "out", model.config, layout, keep, means)
    assert "h.0.mlp.c_fc.weight" in _tensors(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_real_logits(reloaded, tok), _real_logits(pruned, tok), atol=1e-5, rtol=1e-5)


def test_a_tied_source_storing_both_embeddings_streams_the_file_save_pretrained_writes(model_dir, tmp_path):
    """A tied checkpoint that also stores `lm_head.weight` (a copy of the embeddings): the alias is left out,
    as save_pretrained leaves it out of the in-memory surgery's file, and the output is byte-identical."""
    src = tmp_path / "src"
    shutil.copytree(model_dir("llama"), src)
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, src / "model.safetensors",
              metadata={"format": "pt"})
    model, tok = load_model(ModelSpec(name_or_path=str(src)))
    layout = layout_for(model)
    keep = _keep(mlp_widths(model, layout), 32)
    pruned = _in_memory(model, layout, keep, None, "uniform", tmp_path / "memory")
    stream_prune(src, tmp_path / "stream", model.config, layout, keep, tied=tied_aliases(model))
    assert (tmp_path / "stream" / "model.safetensors").read_bytes() == (
        tmp_path / "memory" / "model.safetensors").read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    torch.testing.assert_close(_real_logits(reloaded, tok), _real_logits(pruned, tok), atol=1e-5, rtol=1e-5)


def test_missing_key_and_unsupported_layout_refused(model_dir, tmp_path):
    model, _ = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    layout = layout_for(model)
    keep = _keep(mlp_widths(model, layout), 32)
    with pytest.raises(ModelError, match="per-layer"):
        stream_prune(model_dir("llama"), tmp_path / "a", model.config, layout, keep, width_layout="per-layer")
    with pytest.raises(ModelError, match="model.layers.0.mlp.down_proj.weight"):
        stream_prune(model_dir("gpt2"), tmp_path / "b", model.config, layout, keep)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="model.safetensors"):
        stream_prune(empty, tmp_path / "c", model.config, layout, keep)


def test_streamed_surgery_holds_one_source_tensor_at_a_time(model_dir, tmp_path, monkeypatch):
    """Every tensor read from the source is tracked until freed: at most one is alive at any time."""
    alive = {"bytes": 0, "count": 0, "peak_count": 0, "peak_bytes": 0, "reads": 0}
    real = stream_surgery._Source.tensor

    def release(n: int) -> None:
        alive["bytes"] -= n
        alive["count"] -= 1

    def tracked(self, key):
        t = real(self, key)
        n = t.numel() * t.element_size()
        alive["bytes"] += n
        alive["count"] += 1
        alive["reads"] += 1
        alive["peak_count"] = max(alive["peak_count"], alive["count"])
        alive["peak_bytes"] = max(alive["peak_bytes"], alive["bytes"])
        weakref.finalize(t, release, n)
        return t

    monkeypatch.setattr(stream_surgery._Source, "tensor", tracked)
    source = model_dir("llama")
    model, _ = load_model(ModelSpec(name_or_path=str(source)))
    layout = layout_for(model)
    widths = mlp_widths(model, layout)
    stream_prune(source, tmp_path / "out", model.config, layout, _keep(widths, 32), [torch.ones(w) for w in widths])
    largest = max(p.numel() * 4 for p in model.parameters())
    n_source = len(load_file(source / "model.safetensors"))
    assert alive["reads"] == n_source + len(widths)  # every tensor once, output projections twice (compensation)
    assert alive["peak_count"] == 1 and alive["peak_bytes"] <= largest
    assert alive["count"] == 0


# --- recipe, CLI and compress() end to end -------------------------------------------------------------------


def test_recipe_device_map_fields_validated():
    base = {"model": {"name_or_path": "m"}, "output": {"dir": "o"}}
    ok = recipe_from_dict({**base, "model": {"name_or_path": "m", "device_map": {"model.layers.1": "disk", "x": 0},
                                             "max_memory": {"0": "2GiB", "cpu": 4_000_000}, "offload_folder": "f"}})
    assert ok.validate().streamed()
    sizes = {"0": "1.5GiB", "1": "2gib", "2": "500MB", "3": "64kB", "4": "60000", "cpu": 10}
    assert recipe_from_dict({**base, "model": {"name_or_path": "m", "device_map": "auto", "max_memory": sizes}}
                            ).validate()
    assert recipe_from_dict({**base, "model": {"name_or_path": "m", "device_map": "auto"}}).validate().streamed()
    assert not recipe_from_dict(base).validate().streamed()
    bad = [
        ({"device_map": "everywhere"}, "model.device_map: 'everywhere'"),
        ({"device_map": {"model.layers.1": "floppy"}}, "model.device_map.model.layers.1"),
        ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "model.max_memory.cpu: 'lots' is not a size"),
        # accelerate reads a lower-case b as bits (8x less), knows no TB, B or bare digit strings, no cuda:0 key
        ({"device_map": "auto", "max_memory": {"cpu": "2gb"}}, "a lower-case b means bits"),
        ({"device_map": "auto", "max_memory": {"cpu": "1TiB"}}, "model.max_memory.cpu: '1TiB' is not a size"),
        ({"device_map": "auto", "max_memory": {"cpu": "0"}}, "model.max_memory.cpu: '0' is not a size above 0"),
        ({"device_map": "auto", "max_memory": {"cpu": "0GiB"}}, "is not a size above 0"),
        ({"device_map": "auto", "max_memory": {"cuda:0": "1GiB"}}, "model.max_memory.cuda:0: not a device"),
        ({"offload_folder": "f"}, "model.offload_folder: only used with model.device_map"),
    ]
    for fields, message in bad:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({**base, "model": {"name_or_path": "m", **fields}}).validate()
    with pytest.raises(RecipeError, match="per-layer is not supported by streamed surgery"):
        recipe_from_dict({**base, "output": {"dir": "o", "layout": "per-layer", "streamed": True}}).validate()


def test_cli_flags_reach_the_recipe(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from fnprune import cli

    seen = {}

    def fake(recipe, progress):
        seen["recipe"] = recipe
        raise fnprune.errors.FnpruneError("stop here")

    monkeypatch.setattr("fnprune.pipeline.compress", fake)
    result = CliRunner().invoke(cli.main, [
        "compress", "--model", "m", "--output", str(tmp_path / "o"), "--device-map", "auto",
        "--offload-folder", str(tmp_path / "off"), "--max-memory", "0=2GiB,cpu=4GiB", "--quiet",
    ])
    assert "stop here" in result.output
    spec = seen["recipe"].model
    assert spec.device_map == "auto" and spec.max_memory == {"0": "2GiB", "cpu": "4GiB"}
    assert spec.offload_folder == str(tmp_path / "off")
    result = CliRunner().invoke(cli.main, ["compress", "--model", "m", "--output", "o", "--max-memory", "cpu"])
    assert result.exit_code != 0 and "DEVICE=SIZE" in result.output


def _recipe(model_path, data_dir, out, **model):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_path), **model},
        "task": {"name": "sst2", "data_dir": str(data_dir)},
        "calibration": {"num_samples": 32, "max_tokens": 300, "batch_size": 8, "cache": False},
        "networks": {"components": 8},
        "selection": {"keep": 0.5, "refit": False},  # in memory, compared with offloaded runs (no refit there)
        "evaluation": {"max_samples": 16},
        "output": {"dir": str(out)},
    })


def test_compress_with_offload_device_map(model_dir, task_data, tmp_path):
    device_map = _offload_map(load_model(ModelSpec(name_or_path=str(model_dir("llama"))))[0])
    recipe = _recipe(model_dir("llama"), task_data, tmp_path / "offload", device_map=device_map,
                     offload_folder=str(tmp_path / "off"))
    result = fnprune.compress(recipe, progress=False)
    dense = fnprune.compress(_recipe(model_dir("llama"), task_data, tmp_path / "dense"), progress=False)
    out = result.output_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.json", "README.md",
            "networks.safetensors", "networks.json"} <= {p.name for p in out.iterdir()}
    saved = fnprune.load_recipe(out / "recipe.yaml")
    assert saved.model.device_map == device_map and saved.output.streamed
    assert saved.model.offload_folder == str(tmp_path / "off")
    report = json.loads((out / "report.json").read_text())
    # Same calibration, selection and weights as the in-memory run: offloading changes where, not what.
    for key in ("parameters", "widths", "metric", "mlp_neurons"):
        assert report[key] == dense.report[key], key
    assert report["file_bytes"]["pruned"] == (out / "model.safetensors").stat().st_size
    want, got = _tensors(dense.output_dir), _tensors(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 64 and reloaded.config.mlp_bias is True
    assert sum(p.numel() for p in reloaded.parameters()) == report["parameters"]["pruned"]
    from click.testing import CliRunner

    from fnprune import cli

    run = CliRunner().invoke(cli.main, [
        "evaluate", "--model", str(out), "--max-samples", "16", "--json", "--quiet", "--device-map", "auto",
        "--max-memory", "cpu=60000", "--offload-folder", str(tmp_path / "off2"),
    ])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output.strip().splitlines()[-1])["accuracy"] == report["metric"]["pruned"]


def test_compress_streamed_sharded_padded(model_dir, task_data, tmp_path):
    recipe = apply_overrides(_recipe(model_dir("gpt2"), task_data, tmp_path / "o", device_map="auto",
                                     max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "off")),
                             {"output.max_shard_size": "40KB", "output.layout": "padded",
                              "selection.allocation": "global", "evaluation.enabled": False})
    result = fnprune.compress(recipe, progress=False)
    shards = sorted(p.name for p in result.output_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (result.output_dir / "model.safetensors.index.json").is_file()
    assert result.report["file_bytes"]["pruned"] == sum((result.output_dir / s).stat().st_size for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert reloaded.config.n_inner == max(result.report["widths"]["pruned"])


def test_a_folder_with_both_a_single_file_and_a_shard_index_streams_the_single_file(model_dir, tmp_path):
    """from_pretrained reads model.safetensors when both are there: streaming must read the same weights."""
    from fnprune.stream_surgery import source_weight_map

    folder = tmp_path / "both"
    shutil.copytree(model_dir("llama"), folder)
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}))
    assert set(source_weight_map(folder).values()) == {folder / "model.safetensors"}
    (folder / "model.safetensors").unlink()  # the index alone: read, as untrusted input
    assert set(source_weight_map(folder).values()) == {folder / "model-00001-of-00001.safetensors"}
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "../x"}}')
    with pytest.raises(ModelError, match="not a valid shard index"):
        source_weight_map(folder)


@pytest.mark.parametrize("offload", ["o", "o/off"])
def test_an_offload_folder_that_overlaps_the_output_is_refused_before_any_work(offload, tmp_path, monkeypatch):
    """transformers creates the offload folder while loading: as the output (or inside it) the finished run found
    its output "appeared" and kept the checkpoint beside it; with --overwrite it would replace the offload."""
    import fnprune
    from fnprune.errors import OutputError

    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict({"model": {"name_or_path": "m", "device_map": "auto", "offload_folder": offload},
                               "output": {"dir": "o"}})
    with pytest.raises(OutputError, match="model.offload_folder .* overlap"):
        fnprune.compress(recipe, progress=False)
