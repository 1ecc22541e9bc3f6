"""Nothing unsafe is loaded: no pickle, no unsafe YAML, no remote code unless the user asks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).parent.parent / "fnprune").rglob("*.py"))
UNSAFE = {
    "torch.load": re.compile(r"torch\.load\("),
    "pickle": re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b"),
    "yaml.load": re.compile(r"yaml\.(load|unsafe_load|full_load)\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_unsafe_loading(path):
    text = path.read_text()
    for name, pattern in UNSAFE.items():
        assert not pattern.search(text), f"{path.name}: {name}"
    for node in ast.walk(ast.parse(text)):  # remote code is only ever what the user passed
        for kw in getattr(node, "keywords", []):
            if kw.arg == "trust_remote_code":
                assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), path.name


def test_remote_code_is_off_by_default():
    from fnprune.recipe import ModelSpec

    assert ModelSpec().trust_remote_code is False


def _needs_its_own_code(model_dir, dest: Path) -> Path:
    """The tiny llama whose config names a model type only its own code (auto_map) defines."""
    import json
    import shutil

    shutil.copytree(model_dir("llama"), dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="fnprune_custom", auto_map={"AutoConfig": "custom.Config",
                                                         "AutoModelForCausalLM": "custom.Model"})
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "custom.py").write_text("raise RuntimeError('remote code ran')\n")
    return dest


def test_a_model_that_needs_its_own_code_says_how_to_allow_it(model_dir, tmp_path):
    from fnprune.errors import ModelError
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    with pytest.raises(ModelError, match="needs its own code .*pass --trust-remote-code") as info:
        load_model(ModelSpec(name_or_path=str(_needs_its_own_code(model_dir, tmp_path / "custom"))))
    assert len(str(info.value).splitlines()) == 1


def test_a_saved_recipe_never_runs_remote_code_on_its_own(model_dir, task_data, tmp_path):
    """`--trust-remote-code` is the user's choice for one run: the recipe saved beside the checkpoint (which others
    download and rerun) does not carry it, as it carries neither --overwrite nor --push-to-hub."""
    from fnprune import Recipe, compress
    from fnprune.recipe import CalibrationSpec, ModelSpec, OutputSpec, SelectionSpec, TaskSpec, load_recipe

    recipe = Recipe(model=ModelSpec(name_or_path=str(model_dir("llama")), trust_remote_code=True),
                    task=TaskSpec(name="sst2", data_dir=str(task_data)),
                    calibration=CalibrationSpec(num_samples=16, max_tokens=64, cache=False),
                    selection=SelectionSpec(method="flap", keep=0.5, refit=False),
                    output=OutputSpec(dir=str(tmp_path / "o")))
    recipe.evaluation.enabled = False
    result = compress(recipe, progress=False)
    assert load_recipe(result.output_dir / "recipe.yaml").model.trust_remote_code is False
