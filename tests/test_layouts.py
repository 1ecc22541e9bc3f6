"""Per-layer widths: the checkpoint loads with fnprune, and without fnprune through the saved loader."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import fnprune
from fnprune.arch import layout_for, mlp_widths
from fnprune.checkpoint import SHIM_FILE, shim_source, write_per_layer_code
from fnprune.errors import RecipeError
from fnprune.models import load_model
from fnprune.recipe import ModelSpec, recipe_from_dict
from fnprune.surgery import prune_mlp

IDS = [[5, 17, 33, 80, 2, 41]]
LOAD_WITHOUT_FNPRUNE = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
out = {}
for path in sys.argv[1:]:
    heads = AutoConfig.from_pretrained(path).auto_map
    auto = AutoModelForSequenceClassification if "AutoModelForSequenceClassification" in heads else AutoModelForCausalLM
    model = auto.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out[path] = model(torch.tensor(IDS)).logits.flatten().tolist()
assert not [m for m in sys.modules if m.split(".")[0] == "fnprune"], "fnprune was imported"
print(json.dumps(out))
""".replace("IDS", repr(IDS))


def _per_layer_checkpoint(arch, model_dir, dest):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    layout = layout_for(model)
    gen = torch.Generator().manual_seed(0)
    widths = mlp_widths(model, layout)
    keep = [torch.randperm(w, generator=gen)[: 40 - 16 * i].sort().values for i, w in enumerate(widths)]  # 40, 24
    prune_mlp(model, layout, keep, width_layout="per-layer")  # the first layer widest: the loader resizes the last
    write_per_layer_code(dest, model)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    with torch.no_grad():  # the pruned model's own logits: what every loader must give back
        return dest, model(torch.tensor(IDS)).logits.flatten()


def test_per_layer_loads_in_a_process_without_fnprune(model_dir, tmp_path):
    archs = ["llama", "gpt2", "gpt_neox", "phi3", "opt", "bert"]
    built = {str(path): logits for path, logits in (_per_layer_checkpoint(a, model_dir, tmp_path / a) for a in archs)}
    paths = list(built)
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FNPRUNE, *paths], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in paths:
        model = fnprune.load_pruned(path).model
        assert mlp_widths(model, layout_for(model)) == [40, 24]
        with torch.no_grad():
            local = model(torch.tensor(IDS)).logits.flatten()
        for loaded in (torch.tensor(remote[path]), local):  # both loaders give the pruned model back
            torch.testing.assert_close(loaded, built[path], atol=1e-5, rtol=1e-5)


def test_compress_global_allocation_per_layer_and_padded(model_dir, task_data, tmp_path):
    base = {
        "model": {"name_or_path": str(model_dir("llama"))},
        "task": {"name": "sst2", "data_dir": str(task_data), "template": "Review: {sentence}\nSentiment:"},
        "calibration": {"num_samples": 48, "max_tokens": 400},
        "networks": {"components": 8},
        "selection": {"keep": 0.5, "allocation": "global", "method": "flap"},
        "evaluation": {"max_samples": 16},
    }
    reports = {}
    for width_layout in ("per-layer", "padded"):
        recipe = recipe_from_dict({**base, "output": {"dir": str(tmp_path / width_layout), "layout": width_layout}})
        reports[width_layout] = fnprune.compress(recipe, progress=False).report
    widths = reports["per-layer"]["widths"]["pruned"]
    assert len(set(widths)) > 1 and all(w % 8 == 0 for w in widths)
    assert reports["padded"]["widths"]["pruned"] == widths  # same selection, stored differently
    assert reports["padded"]["metric"]["pruned"] == reports["per-layer"]["metric"]["pruned"]
    assert (tmp_path / "per-layer" / SHIM_FILE).is_file() and not (tmp_path / "padded" / SHIM_FILE).exists()
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded")  # vanilla config, no remote code
    assert padded.config.intermediate_size == max(widths) and not hasattr(padded.config, "fnprune_layout")
    assert reports["padded"]["parameters"]["pruned"] > reports["per-layer"]["parameters"]["pruned"]
    # each card says how its checkpoint loads and which widths it has, and only what was written
    card = (tmp_path / "per-layer" / "README.md").read_text()
    assert "fnprune.load_pruned(DIR)" in card and "trust_remote_code=True" in card and "plain" not in card
    assert f"| {min(widths)}..{max(widths)} (per layer) |" in card and "of every layer" not in card
    assert "`deci` architecture" in card and "--format deci" in card
    with pytest.raises(RuntimeError, match="mismatched"):  # plain loading, which the card no longer claims
        AutoModelForCausalLM.from_pretrained(tmp_path / "per-layer")
    card = (tmp_path / "padded" / "README.md").read_text()
    assert "loads with plain `AutoModelForCausalLM.from_pretrained`" in card and "--format deci" not in card
    assert f"stored padded to {max(widths)} with zero neurons" in card


@pytest.mark.parametrize("allocation", ["global", "median", "standardized"])
def test_uniform_layout_refuses_global_allocation(allocation):
    with pytest.raises(RecipeError, match="set output.layout to per-layer or padded"):
        recipe_from_dict({"model": {"name_or_path": "m"}, "output": {"dir": "o"},
                          "selection": {"allocation": allocation}}).validate()


def test_the_saved_loader_is_small_and_harmless():
    """Reviewed code only: what users run with trust_remote_code=True is this file and nothing else."""
    source = shim_source("LlamaForCausalLM")
    tree = ast.parse(source)
    imported = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "torch", "transformers"}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "open", "compile", "__import__", "getattr_static"}
    code_lines = [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(code_lines) < 110
    assert "from transformers import LlamaForCausalLM as _Base" in source
    with pytest.raises(ValueError):
        shim_source("os; import os")


def _compressed(model_dir, task_data, tmp_path, dtype: str = "float32"):
    """A small FLAP checkpoint of the tiny Llama, not evaluated; its folder."""
    from fnprune import Recipe, compress
    from fnprune.recipe import CalibrationSpec, OutputSpec, SelectionSpec, TaskSpec

    recipe = Recipe(model=ModelSpec(name_or_path=str(model_dir("llama")), dtype=dtype),
                    task=TaskSpec(name="sst2", data_dir=str(task_data)),
                    calibration=CalibrationSpec(num_samples=16, max_tokens=64, cache=False),
                    selection=SelectionSpec(method="flap", keep=0.5, refit=False),
                    output=OutputSpec(dir=str(tmp_path / "o")))
    recipe.evaluation.enabled = False
    return compress(recipe, progress=False).output_dir


def test_load_pruned_loads_in_the_dtype_the_recipe_ran_in(model_dir, task_data, tmp_path):
    """As `fnprune evaluate` does: a bfloat16 run's checkpoint came back in float32 (twice the memory)."""
    out = _compressed(model_dir, task_data, tmp_path, "bfloat16")
    assert fnprune.load_pruned(out).model.dtype == torch.bfloat16
    assert fnprune.load_pruned(out, dtype="float32").model.dtype == torch.float32


def test_load_pruned_loads_the_weights_when_its_recipe_or_report_cannot_be_read(model_dir, task_data, tmp_path,
                                                                                   caplog):
    """A recipe.yaml with a field of another fnprune version, or a damaged report.json, stopped the whole load;
    the weights load without them, and a warning says which file was left out."""
    out = _compressed(model_dir, task_data, tmp_path)
    with open(out / "recipe.yaml", "a", encoding="utf-8") as f:
        f.write("future_section:\n  option: 1\n")
    (out / "report.json").write_text("{}", encoding="utf-8")
    with caplog.at_level("WARNING", logger="fnprune"):
        loaded = fnprune.load_pruned(out)
    assert loaded.recipe is None and loaded.report is None and loaded.model.dtype == torch.float32
    assert "recipe.yaml cannot be read" in caplog.text and "report.json cannot be read" in caplog.text
