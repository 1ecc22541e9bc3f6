"""Table of bad inputs: each fails before heavy work with a message naming the problem, output untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fnprune.cli import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory, model_dir, task_data, tokenizer_dir):
    """A folder of broken inputs, built once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bad")
    files = {
        "empty/train.tsv": "sentence\tlabel\n", "empty/dev.tsv": "sentence\tlabel\nok\t1\n",
        "nocol/train.tsv": "text\tlabel\nhi\t1\n", "nocol/dev.tsv": "text\tlabel\nho\t0\n",
        "badlabel/train.tsv": "sentence\tlabel\nhi\tpositive\n", "badlabel/dev.tsv": "sentence\tlabel\nho\t0\n",
        "nodev/train.tsv": "sentence\tlabel\nhi\t1\n",
        "recipe_unknown.yaml": "selection:\n  keeep: 0.5\n",
        "recipe_type.yaml": "calibration:\n  num_samples: many\n",
        "recipe_broken.yaml": "selection: [\n",
        "recipe_list.yaml": "- 1\n- 2\n",
        "recipe_unsafe.yaml": "model: !!python/object/apply:os.system ['true']\n",
        "recipe_task.yaml": "task:\n  name: mine\n  data_dir: x\n",
        "notafolder/readme.txt": "nothing here\n",
        "outfile": "i am a file\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin1").mkdir()
    (root / "latin1/train.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    (root / "latin1/dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    (root / "existing").mkdir()
    (root / "existing/keep.txt").write_text("precious")
    cfg = AutoConfig.for_model("bloom", vocab_size=384, hidden_size=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "bloom")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "bloom")
    cfg = AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "smallvocab")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "smallvocab")
    shutil.copytree(model_dir("llama"), root / "notokenizer")
    for f in (root / "notokenizer").glob("tokenizer*"):
        f.unlink()
    shutil.copytree(model_dir("llama"), root / "pickled")
    (root / "pickled/model.safetensors").rename(root / "pickled/pytorch_model.bin")
    return root


M, D = "{model}", "{data}"
BASE = ["--task", "sst2", "--model", M, "--data-dir", D]
CASES = [
    # recipe values and flags
    ("keep-zero", [*BASE, "--keep", "0"], "selection.keep: must be in (0, 1]"),
    ("keep-above-one", [*BASE, "--keep", "1.5"], "selection.keep: must be in (0, 1]"),
    ("keep-negative", [*BASE, "--keep", "-0.2"], "selection.keep: must be in (0, 1]"),
    ("sparsity-one", [*BASE, "--sparsity", "1"], "--sparsity: must be in [0, 1), got 1.0"),
    ("keep-and-sparsity", [*BASE, "--keep", "0.5", "--sparsity", "0.5"], "not both"),
    ("method", [*BASE, "--method", "magic"], "selection.method: 'magic' is not one of"),
    ("round-to", [*BASE, "--round-to", "0"], "selection.round_to: must be >= 1"),
    ("components-zero", [*BASE, "--components", "0"], "networks.components: must be >= 1"),
    ("components-too-many", [*BASE, "--method", "fn-task", "--components", "500"],
     "networks.components (500) must be below"),
    ("threshold-zero", [*BASE, "--threshold", "0"], "networks.threshold: must be a finite number > 0"),
    ("threshold-negative", [*BASE, "--threshold", "-1"], "networks.threshold: must be a finite number > 0"),
    ("threshold-nan", [*BASE, "--threshold", "nan"], "networks.threshold: must be a finite number > 0, got nan"),
    ("num-samples", [*BASE, "--num-samples", "0"], "calibration.num_samples: must be >= 1"),
    ("max-tokens", [*BASE, "--max-tokens", "0"], "calibration.max_tokens: must be >= 1"),
    ("batch-size", [*BASE, "--batch-size", "0"], "calibration.batch_size: must be >= 1"),
    ("eval-samples", [*BASE, "--eval-samples", "0"], "evaluation.max_samples: must be >= 1"),
    ("no-model", ["--task", "sst2", "--data-dir", D], "model.name_or_path: required"),
    ("recipe-missing", [*BASE, "--recipe", "{bad}/nope.yaml"], "recipe file not found"),
    ("recipe-unknown-key", [*BASE, "--recipe", "{bad}/recipe_unknown.yaml"], "selection.keeep: unknown field"),
    ("recipe-wrong-type", [*BASE, "--recipe", "{bad}/recipe_type.yaml"],
     "calibration.num_samples: expected an integer"),
    ("recipe-not-yaml", [*BASE, "--recipe", "{bad}/recipe_broken.yaml"], "not valid YAML"),
    ("recipe-not-mapping", [*BASE, "--recipe", "{bad}/recipe_list.yaml"], "recipe: expected a mapping"),
    ("recipe-unsafe-tag", [*BASE, "--recipe", "{bad}/recipe_unsafe.yaml"], "not valid YAML"),
    ("custom-task-incomplete", ["--model", M, "--recipe", "{bad}/recipe_task.yaml"], "a custom task must set"),
    # task data
    ("data-dir-missing", ["--task", "sst2", "--model", M, "--data-dir", "{bad}/nowhere"], "is not a directory"),
    ("no-dev-file", ["--task", "sst2", "--model", M, "--data-dir", "{bad}/nodev"], "no file for split 'validation'"),
    ("empty-split", ["--task", "sst2", "--model", M, "--data-dir", "{bad}/empty"], "split 'train' is empty"),
    ("missing-column", ["--task", "sst2", "--model", M, "--data-dir", "{bad}/nocol"], "missing column(s) ['sentence']"),
    ("label-outside", ["--task", "sst2", "--model", M, "--data-dir", "{bad}/badlabel"], "label 'positive' is not one"),
    ("not-utf8", ["--task", "sst2", "--model", M, "--data-dir", "{bad}/latin1"], "not UTF-8"),
    ("data-files-syntax", ["--task", "sst2", "--model", M, "--data-files", "train.tsv"], "expected SPLIT=PATH"),
    ("data-file-missing", ["--task", "sst2", "--model", M, "--data-files", "train={bad}/x.tsv,validation={bad}/y.tsv"],
     "data file not found"),
    ("overlap", ["--task", "sst2", "--model", M, "--data-files", f"train={D}/dev.tsv,validation={D}/dev.tsv"],
     "must not overlap"),
    ("unknown-task", ["--task", "nosuchtask", "--model", M, "--data-dir", D], "'nosuchtask' is not built in"),
    ("local-task-without-files", ["--task", "arc_easy", "--model", M],
     "task 'arc_easy' reads local files only (no Hugging Face dataset is set for it): give --data-dir with its files "
     "(ARC-Easy-Dev.jsonl, ARC-Easy-Test.jsonl)"),
    # model
    ("model-missing", ["--task", "sst2", "--model", "{bad}/nomodel", "--data-dir", D], "model path not found"),
    ("model-no-config", ["--task", "sst2", "--model", "{bad}/notafolder", "--data-dir", D], "no config.json"),
    ("gguf-missing", ["--task", "sst2", "--model", "{bad}/m.gguf", "--data-dir", D], "GGUF file not found"),
    ("unsupported-arch", ["--task", "sst2", "--model", "{bad}/bloom", "--data-dir", D], "'bloom' is not supported"),
    ("vocab-mismatch", ["--task", "sst2", "--model", "{bad}/smallvocab", "--data-dir", D],
     "tokenizer and model do not match"),
    ("no-tokenizer", ["--task", "sst2", "--model", "{bad}/notokenizer", "--data-dir", D],
     "could not load a tokenizer"),
    ("pickled-weights", ["--task", "sst2", "--model", "{bad}/pickled", "--data-dir", D], "never loads pickled"),
    ("ridge-negative", ["--task", "sst2", "--model", "{model}", "--data-dir", D, "--ridge", "-1"], "selection.ridge"),
    ("bias-impossible", ["--task", "sst2", "--model", "{mistral}", "--data-dir", D, "--bias-compensation"],
     "selection.bias_compensation"),
]


def _fill(args, bad, model_dir, task_data):
    values = {"model": model_dir("llama"), "data": task_data, "bad": bad, "mistral": model_dir("mistral")}
    return [a.format(**values) for a in args]


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize(("name", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, args, message, bad, model_dir, task_data, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*_fill(["compress", *args], bad, model_dir, task_data), "--output", str(out)])
    assert result.exit_code in (1, 2), result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_problems_leave_it_untouched(bad, model_dir, task_data, overwrite):
    existing, before = bad / "existing", _tree_digest(bad / "existing")
    target = bad / "outfile" if overwrite else existing
    args = ["compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
            "--output", str(target)] + (["--overwrite"] if overwrite else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert ("not a directory" if overwrite else "already exists; pass --overwrite") in result.output
    assert _tree_digest(existing) == before and (bad / "outfile").read_text() == "i am a file\n"


def test_not_enough_disk_space(bad, model_dir, task_data, tmp_path, monkeypatch):
    import collections

    import fnprune.checkpoint as checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not enough disk space" in result.output
    assert not (tmp_path / "o").exists()


def test_nan_activations_name_the_layer(model_dir, task_data, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir("llama"), broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, :] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(broken), "--data-dir",
                                       str(task_data), "--output", str(tmp_path / "o"), "--no-cache"])
    assert result.exit_code == 1, result.output
    assert "layer 1: NaN or inf MLP activations" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
