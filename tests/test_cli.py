"""The CLI end to end on tiny models, and its messages for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fnprune
from fnprune.cli import main
from fnprune.recipe import load_recipe

pytestmark = pytest.mark.slow  # full compress runs

SMALL = ["--num-samples", "40", "--max-tokens", "300", "--components", "8", "--quiet"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compress_evaluate_inspect(model_dir, task_data, tmp_path):
    out = tmp_path / "out"
    result = _run("compress", "--task", "sst2", "--model", model_dir("llama"), "--data-dir", task_data,
                  "--keep", "0.5", "--output", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "pruned" in result.output
    report = json.loads((out / "report.json").read_text())
    soft = report["metric"]["right_prob"]  # the mean probability of the right answer, beside accuracy
    assert (f"probability of the right answer, held-out templates (mean): dense {soft['dense']:.4f}, pruned "
            f"{soft['pruned']:.4f}") in result.output
    # evaluate takes the task (and its data) from the folder's recipe.yaml
    result = _run("evaluate", "--model", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output.strip().splitlines()[-1])
    assert evaluated["accuracy"] == report["metric"]["pruned"] and evaluated["n"] == 32
    assert evaluated["templates"] == {t["name"]: t["pruned"] for t in report["templates"]}
    assert evaluated["right_prob"] == pytest.approx(soft["pruned"])
    api = fnprune.evaluate_model(out, progress=False)  # the command's Python API
    assert api.headline == evaluated["accuracy"] and api.n == evaluated["n"]
    for t in report["templates"]:  # report.json keeps each example's probability to 4 decimals
        assert evaluated["templates_right_prob"][t["name"]] == pytest.approx(
            sum(t["right_probs"]["pruned"]) / len(t["right_probs"]["pruned"]), abs=1e-4)
    one = _run("evaluate", "--model", out, "--template", "lm-eval", "--quiet")
    lm_eval = next(t["pruned"] for t in report["templates"] if t["name"] == "lm-eval")
    assert f"accuracy {lm_eval:.4f}" in one.output and "held-out templates (mean)" in one.output
    assert "right answer's probability 0." in one.output
    assert '(predicted: "negative" (0) ' in one.output or '(predicted: "positive" (1) ' in one.output  # the words
    bad = CliRunner().invoke(main, ["evaluate", "--model", str(out), "--template", "nope"])
    assert bad.exit_code != 0 and "not a template of sst2" in bad.output and "invalid recipe" not in bad.output
    # naming the folder's own task, or giving one split's file, keeps the data its recipe.yaml recorded
    named = _run("evaluate", "--model", out, "--task", "sst2", "--json")  # progress on stderr: stdout is the JSON
    assert json.loads(named.stdout)["accuracy"] == evaluated["accuracy"], named.output
    one_file = _run("evaluate", "--model", out, "--data-files", f"validation={task_data / 'dev.tsv'}", "--json",
                    "--quiet")
    assert json.loads(one_file.output.strip().splitlines()[-1])["accuracy"] == evaluated["accuracy"]
    result = _run("inspect", out)
    assert result.exit_code == 0 and "128 -> 64" in result.output and "timings" in result.output
    assert "examples (held-out templates (mean)): dense" in result.output and "fewer)" in result.output
    assert f"; probability of the right answer {soft['retained']:.1%} of dense" in result.output


def test_recipe_plus_flag_overrides(model_dir, task_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model_dir('gpt2')}\ntask:\n  name: sst2\n  data_dir: {task_data}\n"
                      "selection:\n  keep: 0.5\n  method: flap\n")
    out = tmp_path / "o"
    result = _run("compress", "--recipe", recipe, "--sparsity", "0.75", "--output", out, "--no-eval",
                  "--sample-store", "tokens", *SMALL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["keep"] == 0.25 and report["method"] == "flap" and report["widths"]["pruned"] == [32, 32]
    assert "sample_store: tokens" in (out / "recipe.yaml").read_text()
    said = f"sst2: not evaluated (compressed with --no-eval); run `fnprune evaluate --model {out}`"
    assert said in result.output and "None" not in result.output
    shown = _run("inspect", out).output
    assert said in shown and "n/a validation" not in shown
    assert "tokens sampled per layer" in shown and "ICA" not in shown  # flap runs no ICA
    assert "timings load" in shown and "evaluate_dense" not in shown
    card = (out / "README.md").read_text()
    assert "**sst2: not evaluated** (compressed with `--no-eval`)" in card and "fnprune evaluate --model" in card
    assert "None" not in card and "| n/a |" not in card and "template `" not in card


def test_saved_recipe_names_its_data_files_from_anywhere(model_dir, task_data, tmp_path, monkeypatch):
    """A relative --data-dir is saved absolute in the task and in the provenance, so a rerun from another folder
    finds the files it hashed instead of warning that they are gone."""
    from fnprune.provenance import provenance_changes

    monkeypatch.chdir(task_data.parent)
    out = tmp_path / "o"
    result = _run("compress", "--task", "sst2", "--model", model_dir("llama"), "--data-dir", task_data.name,
                  "--eval-samples", "8", "--output", out, *SMALL)
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    provenance = load_recipe(out / "recipe.yaml").provenance
    assert all(Path(entry["file"]).is_absolute() for entry in provenance["data"].values())
    assert provenance_changes(provenance) == []


def test_no_eval_needs_no_evaluation_split(model_dir, task_data, tmp_path, monkeypatch):
    """--no-eval with only a calibration file: compressed; evaluate later names the split to give."""
    try:  # the Hub's validation split: refused at once, not after retries (the env var is read at import)
        import datasets
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass  # without `datasets` the message names the file to add too
    out = tmp_path / "o"
    result = _run("compress", "--task", "sst2", "--model", model_dir("llama"), "--data-files",
                  f"train={task_data / 'train.tsv'}", "--output", out, "--no-eval", *SMALL)
    assert result.exit_code == 0, result.output
    assert "validation" not in (out / "recipe.yaml").read_text().split("provenance:")[1]
    later = CliRunner().invoke(main, ["evaluate", "--model", str(out), "--quiet"])
    assert later.exit_code != 0 and "add validation=FILE" in later.output
    given = _run("evaluate", "--model", out, "--data-files", f"validation={task_data / 'dev.tsv'}", "--quiet")
    assert given.exit_code == 0 and "sst2 accuracy" in given.output and "not held out" not in given.output
    calibrated = _run("evaluate", "--model", out, "--data-files", f"validation={task_data / 'train.tsv'}")
    assert calibrated.exit_code == 0 and "40 of these 64 examples are among" in calibrated.output  # --num-samples 40


def test_data_files_flag(model_dir, task_data, tmp_path):
    out = tmp_path / "o"
    files = f"train={task_data / 'train.tsv'},validation={task_data / 'dev.tsv'}"
    result = _run("compress", "--task", "sst2", "--model", model_dir("opt"), "--data-files", files,
                  "--output", out, "--eval-samples", "8", *SMALL)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["metric"]["n"] == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep", "0.5", "--sparsity", "0.5"], "not both"),
        (["--keep", "1.5"], "selection.keep: must be in (0, 1]"),
        (["--sparsity", "1"], "--sparsity: must be in [0, 1), got 1.0"),
        (["--data-files", "valid=dev.tsv"], "data_files: 'valid' is not a split name"),
        (["--method", "magic"], "selection.method: 'magic' is not one of"),
        (["--data-files", "train.tsv"], "Invalid value for --data-files: 'train.tsv': expected SPLIT=PATH"),
        (["--max-memory", "20GiB"], "Invalid value for --max-memory: '20GiB': expected DEVICE=SIZE"),
        (["--device-map", "{1"], "Invalid value for --device-map: not a JSON object"),
        (["--validate", "boolq"], "Invalid value for --validate: 'boolq': expected TASK=PATH"),
        (["--components", "0"], "networks.components: must be >= 1"),
        (["--recipe", "/nonexistent/recipe.yaml"], "recipe file not found"),
    ],
)
def test_bad_flags(model_dir, task_data, tmp_path, extra, message):
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o"), *extra])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_bad_model_and_data(model_dir, task_data, tmp_path):
    cases = [
        (["--model", tmp_path / "missing", "--data-dir", task_data], "model path not found"),
        (["--model", tmp_path / "missing", "--data-dir", tmp_path / "nodata"], "model path not found"),  # first
        (["--model", tmp_path / "notamodel", "--data-dir", task_data], "no config.json"),
        (["--model", model_dir("llama"), "--data-dir", tmp_path / "nodata"], "not a directory"),
        (["--model", tmp_path / "m.gguf", "--data-dir", task_data], "GGUF file not found"),
    ]
    (tmp_path / "notamodel").mkdir()
    for args, message in cases:
        result = CliRunner().invoke(main, ["compress", "--task", "sst2", *map(str, args),
                                           "--output", str(tmp_path / "o"), "--quiet"])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)


def test_evaluate_a_missing_folder_is_a_path_error_not_a_hub_lookup(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: model path not found: {tmp_path / 'missing'}"


def test_unsupported_architecture_names_the_supported(tmp_path, tokenizer_dir, task_data):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("bloom", vocab_size=384, hidden_size=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "bloom")
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(tmp_path / "bloom"),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "'bloom' is not supported" in result.output and "llama" in result.output and "gpt2" in result.output


def test_existing_output_refused(model_dir, task_data, tmp_path):
    (tmp_path / "o").mkdir()
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(model_dir("llama")),
                                       "--data-dir", str(task_data), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_evaluate_needs_a_task(model_dir):
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir("llama"))])
    assert result.exit_code == 1 and "--task is required" in result.output


# --- the compress flags are built from the recipe's field metadata (fnprune.recipe.flag, fnprune.cli_flags)

FLAGS_BEFORE_GENERATION = {  # every flag `compress` had when its options were written by hand
    "--recipe", "--task", "--model", "--data-dir", "--data-files", "--dtype", "--keep", "--sparsity", "--method",
    "--round-to", "--fn-boost", "--allocation", "--layout", "--components", "--ica-engine", "--threshold",
    "--ica-runs", "--num-samples", "--max-tokens", "--sample-store", "--batch-size", "--seed", "--bias-compensation",
    "--no-bias-compensation", "--reconstruct", "--no-reconstruct", "--ridge", "--eval", "--no-eval", "--eval-samples",
    "--validate", "--perplexity-tokens", "--perplexity-window", "--cache", "--no-cache", "--output", "--overwrite",
    "--max-shard-size", "--push-to-hub", "--private", "--trust-remote-code", "--device-map", "--max-memory",
    "--offload-folder", "--streamed", "--quiet",
}
CLI_ONLY = {"recipe_path", "sparsity", "quiet"}  # compress options that are no recipe field


def _recipe_fields():
    """{"selection.keep": (field, annotation)} for every field of every recipe section."""
    import dataclasses
    import typing

    from fnprune.recipe import Recipe

    out = {}
    for section in dataclasses.fields(Recipe):
        spec = typing.get_type_hints(Recipe)[section.name]
        if dataclasses.is_dataclass(spec):
            hints = typing.get_type_hints(spec)
            out.update({f"{section.name}.{f.name}": (f, hints[f.name]) for f in dataclasses.fields(spec)})
    return out


def test_every_recipe_field_has_a_flag_or_is_recipe_only():
    from fnprune.cli_flags import FLAGS, RECIPE_ONLY

    fields, flagged = _recipe_fields(), [f for flag in FLAGS for f in flag.fields]
    missing = sorted(set(fields) - set(flagged) - RECIPE_ONLY)
    assert not missing, ("give these recipe fields a flag (fnprune.recipe.flag metadata) or list them in "
                         f"fnprune.cli_flags.RECIPE_ONLY: {missing}")
    assert not set(flagged) & RECIPE_ONLY and len(flagged) == len(set(flagged))
    assert RECIPE_ONLY <= set(fields), sorted(RECIPE_ONLY - set(fields))


def test_every_compress_option_is_a_recipe_flag():
    from fnprune.cli_flags import _CLICK_TYPES, FLAGS, PARSERS, _scalar

    params = main.commands["compress"].params
    names = [p.name for p in params]
    assert len(names) == len(set(names))
    assert set(names) - CLI_ONLY == {flag.name for flag in FLAGS}
    assert FLAGS_BEFORE_GENERATION <= {opt for p in params for opt in p.opts + p.secondary_opts}
    fields = _recipe_fields()
    assert set(PARSERS) | set(_CLICK_TYPES) <= {flag.decl for flag in FLAGS}
    for flag in FLAGS:
        assert set(flag.fields) <= set(fields), flag
        field, annotation = fields[flag.fields[0]]
        assert all(fields[f][0].metadata == field.metadata for f in flag.fields), f"{flag.decl}: one help, one default"
        assert all(fields[f][0].default == field.default for f in flag.fields), flag
        if _scalar(annotation) is None:
            assert flag.decl in PARSERS, f"{flag.decl}: {annotation} from the flag's text needs a parser in PARSERS"


def test_help_states_the_recipe_defaults_and_choices():
    import re

    from fnprune.cli_flags import FLAGS, shown_default
    from fnprune.data import BUILTIN_TASKS

    params = {p.name: p for p in main.commands["compress"].params}
    fields = _recipe_fields()
    for flag in FLAGS:
        field, help_text, option = fields[flag.fields[0]][0], flag.settings["help"], params[flag.name]
        assert "{" not in help_text and help_text == option.help
        choices = list(field.metadata.get("choices", ()))
        if choices and field.metadata.get("strict", True):
            assert list(option.type.choices) == choices, flag.decl
        elif choices:
            assert all(c in help_text for c in choices), flag.decl
        if field.default is None:  # worked out at run time: the help says how
            continue
        default = shown_default(field)
        stated = re.findall(r"\bdefault:? ([^\s;:,)]+)", help_text) + re.findall(r"(\S+) \(default[;:)]", help_text)
        assert all(value == default for value in stated), (flag.decl, stated, default)
        one_sided_switch = option.is_flag and not option.secondary_opts
        if default not in ("", "[]", "{}") and not one_sided_switch:
            assert stated, f"{flag.decl}: the help does not say the default ({default}); use {{default}}"
    assert all(name in params["task"].help for name in BUILTIN_TASKS)


def test_every_flag_reaches_its_field(monkeypatch, tmp_path):
    """Each scalar flag, given a value other than the default, lands in its recipe field(s)."""
    import click

    import fnprune
    from fnprune.cli_flags import FLAGS, PARSERS, _scalar

    fields, args, expected = _recipe_fields(), [], {}
    for flag in FLAGS:
        field, annotation = fields[flag.fields[0]]
        kind, option = _scalar(annotation), flag.decl.split("/")
        if flag.decl in PARSERS or flag.name in ("task", "data_dir"):
            continue
        if kind is bool:
            value = not field.default if field.default is not None else True
            args.append(option[0] if value else option[1])
        elif isinstance(flag.settings.get("type"), click.Choice):
            value = next(c for c in flag.settings["type"].choices if c != field.default)
            args += [option[0], value]
        else:
            value = {int: 7, float: 0.25, str: f"x-{flag.name}"}[kind]
            args += [option[0], str(value)]
        expected.update(dict.fromkeys(flag.fields, value))
    seen = {}

    def fake(recipe, progress):
        seen["recipe"] = recipe
        raise fnprune.errors.FnpruneError("stop here")

    monkeypatch.setattr("fnprune.pipeline.compress", fake)
    files = "train=a.tsv,validation=b.tsv"
    result = CliRunner().invoke(main, ["compress", *args, "--task", "rte", "--data-dir", "d", "--data-files", files,
                                       "--validate", "boolq=dir", "--device-map", '{"model.layers.0": "cpu"}',
                                       "--max-memory", "cpu=1GiB", "--quiet"])
    assert "stop here" in result.output, result.output
    recipe = seen["recipe"]
    for dotted, value in expected.items():
        section, name = dotted.split(".")
        assert getattr(getattr(recipe, section), name) == value, dotted
    assert recipe.task.name == "rte" and recipe.task.data_files == {"train": "a.tsv", "validation": "b.tsv"}
    assert recipe.task.data_dir == "d"  # the folder gives the splits --data-files does not name
    assert [(v.task, v.data_dir) for v in recipe.evaluation.validation] == [("boolq", "dir")]
    assert recipe.model.device_map == {"model.layers.0": "cpu"} and recipe.model.max_memory == {"cpu": "1GiB"}


def test_the_cli_prefixes_its_own_log_lines_only(capsys):
    """fnprune's messages once, as "fnprune: ..."; another library's warning keeps its own handler, not ours
    (huggingface_hub's offline retries came out twice, once as if fnprune had said them)."""
    import logging

    from fnprune.cli import _setup_logging

    log = logging.getLogger("fnprune")
    handlers, level = list(log.handlers), log.level
    try:
        _setup_logging(quiet=False)
        _setup_logging(quiet=False)  # a second command in the same process adds no second handler
        log.info("calibration: 4 prompts")
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s")
        err = capsys.readouterr().err
        assert err.count("fnprune: calibration: 4 prompts") == 1 and "fnprune: Retrying" not in err
        _setup_logging(quiet=True)
        log.info("not shown")
        assert "not shown" not in capsys.readouterr().err
    finally:
        log.handlers[:], log.level = handlers, level


def test_cli_starts_without_torch():
    """`fnprune --help` answers at once and Ctrl-C while torch loads reaches the one-line message: the package and
    its CLI import torch and transformers only inside a command."""
    code = "import sys, fnprune, fnprune.cli; assert not {'torch', 'transformers'} & set(sys.modules), 'loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("sizes", [{"batch_size": 0}, {"batch_size": -1}, {"max_samples": 0}, {"max_samples": -5}])
def test_evaluate_model_refuses_sizes_below_one(sizes, tmp_path):
    """The API checks what the CLI's ranges check: batch size -1 scored nothing and returned made-up 0.5s."""
    with pytest.raises(fnprune.RecipeError, match=f"{next(iter(sizes))}: must be >= 1"):
        fnprune.evaluate_model(tmp_path / "never-loaded", **sizes)


def test_quiet_silences_bars_other_libraries_draw():
    """--quiet reaches tqdm bars fnprune does not own (transformers' GGUF de-quantizing bar): they read tqdm's
    defaults, which `_setup_logging` sets before torch loads tqdm."""
    code = ("import os; os.environ.pop('TQDM_DISABLE', None); from fnprune.cli import _setup_logging; "
            "_setup_logging(quiet=True); from tqdm.auto import tqdm; assert tqdm(range(2)).disable, 'drawn'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluate_loads_the_dtype_the_folder_was_compressed_in(model_dir, task_data, tmp_path, caplog):
    """A bfloat16 run's scores are reproduced by evaluate without --dtype; the sample report.json scored is said."""
    out = tmp_path / "bf16"
    result = _run("compress", "--task", "sst2", "--model", model_dir("llama"), "--data-dir", task_data, "--keep",
                  "0.5", "--dtype", "bfloat16", "--eval-samples", "20", "--output", out, *SMALL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    again = json.loads(_run("evaluate", "--model", out, "--max-samples", "20", "--json", "--quiet").stdout)
    assert again["templates"] == {t["name"]: t["pruned"] for t in report["templates"]}
    as_fp32 = json.loads(_run("evaluate", "--model", out, "--max-samples", "20", "--dtype", "float32", "--json",
                              "--quiet").stdout)
    assert as_fp32["right_prob"] != again["right_prob"]  # the dtype reached the model
    with caplog.at_level("INFO", logger="fnprune"):
        _run("evaluate", "--model", out, "--json")
    assert "scoring all 32 examples; the folder's report scored the first 20" in caplog.text


def test_evaluate_names_an_unreadable_recipe_yaml_and_lm_eval_only_refuses_task_flags(model_dir, task_data,
                                                                                        tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_dir("llama"), folder)
    (folder / "recipe.yaml").write_text("model: {name_or_path: x}\nfuture_field: 1\n")
    result = CliRunner().invoke(main, ["evaluate", "--model", str(folder)])
    assert result.exit_code == 1 and f"{folder / 'recipe.yaml'}: future_field: unknown field" in result.output
    named = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--task", "sst2", "--data-dir",
                                      str(task_data), "--max-samples", "4", "--json"])
    assert named.exit_code == 0 and "cannot be read" in named.stderr, named.output
    (folder / "recipe.yaml").unlink()
    lm_eval_only = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--lm-eval-tasks", "fnp_sst2",
                                             "--template", "nope", "--max-samples", "3"])
    assert lm_eval_only.exit_code == 1
    assert "--max-samples, --template: only used with a task" in lm_eval_only.output, lm_eval_only.output


def test_evaluate_scores_an_architecture_fnprune_cannot_prune(tokenizer_dir, task_data, tmp_path):
    """evaluate knows nothing about pruning: a BLOOM model (not in the support table) is scored, not refused."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("bloom", vocab_size=384, hidden_size=32, n_layer=2, n_head=4)
    folder = tmp_path / "bloom"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--task", "sst2", "--data-dir",
                                       str(task_data), "--max-samples", "4", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 4
    refused = CliRunner().invoke(main, ["compress", "--model", str(folder), "--task", "sst2", "--data-dir",
                                        str(task_data), "--output", str(tmp_path / "o"), *SMALL])
    assert refused.exit_code == 1 and "architecture 'bloom' is not supported" in refused.output


def test_a_saved_recipe_never_replaces_or_pushes_on_its_own(model_dir, task_data, tmp_path, caplog):
    """`--overwrite` (and a push) ran once; the saved recipe.yaml kept `overwrite: true`, so `--recipe
    out/recipe.yaml --output out2` replaced an existing out2 and no flag could say otherwise. Settings the run
    never reads are named, and --task naming the recipe's own task keeps its templates."""
    out, other = tmp_path / "o", tmp_path / "o2"
    with caplog.at_level("WARNING", logger="fnprune"):
        first = _run("compress", "--task", "sst2", "--model", model_dir("llama"), "--data-dir", task_data,
                     "--no-eval", "--overwrite", "--output", out, *SMALL)
    assert first.exit_code == 0, first.output
    assert "fn_boost" not in caplog.text  # never given: fn-task's default is not filled in for flap either
    caplog.clear()
    saved = load_recipe(out / "recipe.yaml").output
    assert saved.overwrite is False and saved.push_to_hub is None and saved.private is False
    other.mkdir()
    (other / "report.json").write_text("{}")
    again = _run("compress", "--recipe", out / "recipe.yaml", "--output", other, "--quiet")
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    with caplog.at_level("WARNING", logger="fnprune"):
        unused = _run("compress", "--recipe", out / "recipe.yaml", "--task", "sst2", "--output", tmp_path / "o3",
                      "--components", "4", "--fn-boost", "2", "--no-reconstruct", "--ridge", "0.7", "--no-refit",
                      "--refit-ridge", "3",
                      "--eval-samples", "5", "--no-eval", "--quiet")
    assert unused.exit_code == 0, unused.output
    said = caplog.text
    assert "not used by this run (method flap, no reconstruction): networks.components" in said
    assert "selection.ridge" in said and "selection.refit_ridge" in said and "--eval-samples not used" in said
    assert "selection.fn_boost" in said
    assert "replaces the recipe's task" not in said  # the recipe's own task, named: kept


def test_task_flag_keeps_a_recipes_own_task_and_data_dir_says_what_it_replaces(task_data, tmp_path, caplog):
    from fnprune.cli import _recipe_task_overrides
    from fnprune.cli_flags import flag_overrides
    from fnprune.recipe import TaskSpec

    mine = TaskSpec(name="sst2", templates=[], template="Text: {sentence}\nMood:", label_column="label",
                    label_words={"0": " sad", "1": " glad"}, data_files={"train": "a.tsv"})
    values = {"task": "sst2", "data_dir": str(task_data)}
    overrides = flag_overrides(values)
    with caplog.at_level("WARNING", logger="fnprune"):
        _recipe_task_overrides(mine, values, overrides)
    assert "task" not in overrides and overrides["task.data_dir"] == str(task_data)
    assert "--data-dir replaces the recipe's task.data_files (train=a.tsv)" in caplog.text
    values = {"task": "rte"}
    overrides = flag_overrides(values)
    with caplog.at_level("WARNING", logger="fnprune"):
        _recipe_task_overrides(mine, values, overrides)
    assert overrides["task"] == {"name": "rte"} and "--task rte replaces the recipe's task sst2" in caplog.text
    caplog.clear()  # a recipe task with only a data setting (AG News' split_of) was replaced without a word
    with caplog.at_level("WARNING", logger="fnprune"):
        _recipe_task_overrides(TaskSpec(name="ag_news", split_of="test"), {"task": "sst2"}, {"task": {"name": "x"}})
    assert "--task sst2 replaces the recipe's task ag_news (its split_of)" in caplog.text
