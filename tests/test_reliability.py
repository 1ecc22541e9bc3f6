"""Bad inputs, round 2 (issue 19): each case prints one clear line, exits non-zero without a traceback, and
leaves the input model, the data, the current directory and any existing output byte for byte as they were.
Plus the inputs that are now accepted (GLUE TSV quotes, long fields, BOM, JSON arrays, GGUF) and the cache,
output and signal behaviour behind them."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import tiny
from click.testing import CliRunner
from test_bad_inputs import _tree_digest

from fnprune import cache
from fnprune.cli import main

SMALL = ["--num-samples", "40", "--max-tokens", "300", "--components", "8", "--quiet"]
DATA = {  # case -> (file, text, the line it must print): task data refused with a clear line
    "tsv-extra-field": ("train.tsv", "sentence\tlabel\nfine\t1\nhi\t1\textra\n",
                        "train.tsv:3: 3 field(s), the header has 2 (sentence, label); TSV fields are separated"),
    "tsv-duplicate-header": ("train.tsv", "sentence\tsentence\tlabel\nhi\tho\t1\n", "the header names a column twice"),
    "jsonl-row-not-object": ("train.jsonl", '{"sentence": "a", "label": 1}\n[1, "x"]\n',
                             "train.jsonl:2: list, not a JSON object"),
    "json-array-of-scalars": ("train.json", '[1, "a"]', "item 0 is int, not a JSON object"),
    "json-broken": ("train.json", '[{"sentence": "a", ', "train.json: not valid JSON"),
    "jsonl-missing-key": ("train.jsonl", '{"sentence": "a", "label": 1}\n{"text": "b", "label": "0"}\n',
                          "data row 2: column 'sentence' is missing"),
    "jsonl-null": ("train.jsonl", '{"sentence": null, "label": 1}\n', "data row 1: column 'sentence' is null"),
    "jsonl-object-value": ("train.jsonl", '{"sentence": {"text": "a"}, "label": 1}\n',
                           "data row 1: column 'sentence' is a dict"),
    "csv-unclosed-quote": ("train.csv", 'sentence,label\n"unclosed,1\nb,0\n',
                           "cannot parse the CSV (unexpected end of data)"),
}
REPORTS = {  # inspect: report.json text -> the line it must print (exit 1)
    "notjson": ("{", "not valid JSON"),
    "empty": ("{}", "an empty object, not an fnprune report"),
    "list": ("[1, 2]", "a JSON list, not fnprune's report object"),
    "string": ('"report"', "a JSON str, not fnprune's report object"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dir, task_data):
    """A model, task data, a working directory, a file and broken recipes and data, built once."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(model_dir("llama"), root / "models/llama")
    shutil.copytree(task_data, root / "data/sst2")
    (root / "work").mkdir()
    (root / "work/notes.txt").write_text("mine\n")
    (root / "afile").write_text("a file\n")
    (root / "dup.yaml").write_text("selection:\n  keep: 0.3\n  method: flap\n  keep: 0.5\n")
    (root / "seed.yaml").write_text("networks:\n  seed: 4294967293\n")
    for case, (name, text, _) in DATA.items():
        (root / case).mkdir()
        (root / case / name).write_text(text)
    shutil.copytree(model_dir("llama"), root / "badindex")
    shutil.copytree(model_dir("llama"), root / "badconfig")
    (root / "badconfig/config.json").write_text("{not json")
    (root / "garbage.gguf").write_bytes(b"GGUF" + bytes(60))
    (root / "badindex/model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "../x"}}')
    (root / "badindex/model.safetensors").rename(root / "badindex/model-00001-of-00001.safetensors")  # index only
    for name, (text, _) in REPORTS.items():
        (root / "reports" / name).mkdir(parents=True)
        (root / "reports" / name / "report.json").write_text(text)
    return root


def _digests(root: Path) -> dict:
    return {p: _tree_digest(root / p) for p in ("models", "data", "work")} | {"afile": (root / "afile").read_text()}


M, D, R = "{root}/models/llama", "{root}/data/sst2", "{root}"
BASE = ["--task", "sst2", "--model", M, "--data-dir", D]
CASES = [
    # output paths that would destroy an input, the current directory or cannot be created
    ("output-is-model", [*BASE, "--output", M, "--overwrite"], "is the input"),
    ("output-inside-model", [*BASE, "--output", f"{M}/pruned", "--overwrite"], "is inside the input"),
    ("output-contains-model", [*BASE, "--output", f"{R}/models", "--overwrite"], "contains the input"),
    ("output-contains-data", [*BASE, "--output", f"{R}/data", "--overwrite"], "contains the input"),
    ("output-is-data-file", ["--task", "sst2", "--model", M, "--data-files",
                             f"train={D}/train.tsv,validation={D}/dev.tsv", "--output", f"{D}/dev.tsv", "--overwrite"],
     "is the input"),
    ("output-is-validation-data", [*BASE, "--validate", f"sst2={R}/reports", "--output", f"{R}/reports",
                                   "--overwrite"], "is the input"),
    ("output-is-lm-eval-include", [*BASE, "--lm-eval-tasks", "fnp_sst2", "--lm-eval-include", f"{R}/reports/list",
                                   "--output", f"{R}/reports/list", "--overwrite"], "is the input"),
    ("output-cwd", [*BASE, "--output", ".", "--overwrite"], "is the current directory or contains it"),
    ("output-cwd-parent", [*BASE, "--output", "..", "--overwrite"], "is the current directory or contains it"),
    ("output-parent-is-file", [*BASE, "--output", f"{R}/afile/out"], "afile is a file, not a folder"),
    # recipe values
    ("recipe-duplicate-key", [*BASE, "--recipe", f"{R}/dup.yaml", "--output", "o"],
     "line 4: key 'keep' given twice (first on line 2)"),
    ("seed-too-big", [*BASE, "--seed", str(2**32), "--output", "o"],
     "calibration.seed: must be between 0 and 2**32 - 1, got 4294967296"),
    ("seed-negative", [*BASE, "--seed", "-1", "--output", "o"], "selection.seed: must be between 0 and 2**32 - 1"),
    ("networks-seed-runs", [*BASE, "--recipe", f"{R}/seed.yaml", "--output", "o"],
     "networks.seed: must be between 0 and 2**32 - 1 - 4 (it seeds 5 runs"),
    ("max-shard-size-decimal", [*BASE, "--max-shard-size", "1.5GB", "--output", "o"],
     "output.max_shard_size: '1.5GB' is not a size saving accepts"),  # transformers takes whole numbers only
    ("max-shard-size-tb", [*BASE, "--max-shard-size", "1TB", "--output", "o"], "output.max_shard_size: '1TB'"),
    # task data
    *[(case, ["--task", "sst2", "--model", M, "--data-dir", f"{R}/{case}", "--output", "o"], message)
      for case, (_, _, message) in DATA.items()],
    # model folder
    ("shard-index-outside", ["--task", "sst2", "--model", f"{R}/badindex", "--data-dir", D, "--streamed",
                             "--output", "o"], "could not load model"),  # transformers refuses it first
    ("config-not-json", ["--task", "sst2", "--model", f"{R}/badconfig", "--data-dir", D, "--output", "o"],
     "could not load a tokenizer from"),
    ("gguf-not-gguf", ["--task", "sst2", "--model", f"{R}/garbage.gguf", "--data-dir", D, "--output", "o"],
     "could not load a tokenizer from"),
    ("analyze-output-is-model", ["analyze", "--task", "sst2", "--model", M, "--data-dir", D, "--output", M,
                                 "--overwrite"], "is the input"),
    ("analyze-seed-negative", ["analyze", "--task", "sst2", "--model", M, "--data-dir", D, "--output", "o",
                               "--seed", "-1"], "seed: must be between 0 and 2**32 - 1 - 11"),
    # evaluate sizes
    ("evaluate-batch-size-zero", ["evaluate", "--model", M, "--task", "sst2", "--data-dir", D, "--batch-size", "0"],
     "Invalid value for '--batch-size': 0 is not in the range x>=1"),
    ("evaluate-batch-size-negative", ["evaluate", "--model", M, "--task", "sst2", "--data-dir", D,
                                      "--batch-size", "-4"], "-4 is not in the range x>=1"),
    ("evaluate-max-samples-zero", ["evaluate", "--model", M, "--task", "sst2", "--data-dir", D, "--max-samples", "0"],
     "Invalid value for '--max-samples': 0 is not in the range x>=1"),
    # inspect: report.json is untrusted
    *[(f"inspect-report-{name}", ["inspect", f"{R}/reports/{name}"], msg) for name, (_, msg) in REPORTS.items()],
    ("inspect-no-report", ["inspect", f"{R}/work"], "has no report.json: not an fnprune output folder"),
]


@pytest.mark.parametrize(("name", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_round_two(name, args, message, world, monkeypatch):
    monkeypatch.chdir(world / "work")
    before = _digests(world)
    args = [a.format(root=world) for a in args]
    command = args if args[0] in ("analyze", "evaluate", "inspect") else ["compress", *args]
    result = CliRunner().invoke(main, command)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1, result.output
    assert _digests(world) == before
    assert sorted(p.name for p in (world / "work").iterdir()) == ["notes.txt"]


def test_inspect_prints_what_is_there(world, tmp_path):
    """Null, empty or wrongly typed fields are shown as n/a, the rest as it is (beside readable weights)."""
    folder = tmp_path / "partial"
    shutil.copytree(world / "models/llama", folder)
    (folder / "report.json").write_text(json.dumps({
        "task": "sst2", "method": None, "keep": "half", "widths": {"dense": 128, "pruned": []},
        "parameters": {"dense": 1000, "pruned": None}, "metric": None, "timings_seconds": {"load": "slow", "ica": 1},
        "file_bytes": [], "calibration": {"samples": 40},
    }))
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "method n/a, kept n/a of the MLP neurons, widths 128 -> n/a per layer" in result.output
    assert "parameters 1,000 -> n/a" in result.output and "timings load n/as, ica 1.0s" in result.output
    assert "sst2 n/a on n/a n/a examples" in result.output and "calibration 40 examples" in result.output


# ------------------------------------------------------------------------------------------ accepted data


def _task(path: Path):
    from fnprune.data import resolve_task
    from fnprune.recipe import TaskSpec

    return resolve_task(TaskSpec(name="sst2", template="Review: {sentence}\nSentiment:", label_column="label",
                                 label_words={"0": " negative", "1": " positive"}, data_files={"train": str(path)}))


@pytest.mark.parametrize(("name", "text", "sentences", "labels"), [
    ("quotes.tsv", 'sentence\tlabel\n"a quoted start\t1\nnext\t0\nends with a quote"\t1\n',
     ['"a quoted start', "next", 'ends with a quote"'], ["1", "0", "1"]),
    ("long.tsv", "sentence\tlabel\n" + "word " * 40_000 + "\t1\n", ["word " * 39_999 + "word"], ["1"]),
    ("bom.tsv", "\ufeff sentence \t label\r\nhi\t1\r\n\n\t\n", ["hi"], ["1"]),
    ("separators.tsv", "sentence\tlabel\nform\x0cfeed\u2028and\x1cmore\t0\n", ["form\x0cfeed\u2028and\x1cmore"], ["0"]),
    ("bom.csv", '\ufeffsentence, label\n"a, b",0\n"two\nlines",1\n', ["a, b", "two\nlines"], ["0", "1"]),
    ("mixed.jsonl", '\ufeff{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": "0"}\n', ["a", "b"], ["1", "0"]),
    ("array.json", '[{"sentence": "a", "label": 1},\n {"sentence": 2, "label": "0"}]', ["a", "2"], ["1", "0"]),
    ("lines.json", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0}\n', ["a", "b"], ["1", "0"]),
])
def test_accepted_data(name, text, sentences, labels, tmp_path):
    """GLUE TSV has no quoting (each line is one row); csv's field limit does not apply; a BOM and spaces around
    header names are dropped; JSON labels 1 and "1" are the same label; a .json file may be one array."""
    from fnprune.data import load_split

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    examples = load_split(_task(path), "train")
    assert [e.texts[0] for e in examples] == sentences
    assert [e.label for e in examples] == labels


# --------------------------------------------------------------------------- outputs, concurrency, modes


def test_output_created_meanwhile_is_not_replaced(tmp_path):
    """A second run into the same output, without --overwrite, refuses at the rename and keeps its work."""
    from fnprune.checkpoint import atomic_output_dir
    from fnprune.errors import OutputError

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while this run was writing it") as info:
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_text("mine")
            out.mkdir()
            (out / "model.safetensors").write_text("theirs")  # the other run finished first
    assert (out / "model.safetensors").read_text() == "theirs"
    kept = tmp_path / f"out.fnprune-{os.getpid()}"
    assert str(kept) in str(info.value) and (kept / "model.safetensors").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", kept.name]
    with atomic_output_dir(out, overwrite=True) as tmp:  # --overwrite still replaces it
        (tmp / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "new"


def test_output_created_during_calibration_keeps_the_finished_run(world, tmp_path, monkeypatch):
    """The output is checked before the heavy work; one that appears afterwards (another run finished first) is
    left as it is and this run's checkpoint is kept beside it, not thrown away."""
    import fnprune.pipeline as pipeline

    out = tmp_path / "out"
    reconstruct = pipeline._reconstruct

    def reconstruct_then_appear(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_reconstruct", reconstruct_then_appear)
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(world / "models/llama"),
                                       "--data-dir", str(world / "data/sst2"), "--no-eval", "--output", str(out),
                                       *SMALL])
    assert result.exit_code == 1 and "appeared while this run was writing it" in result.output, result.output
    kept = tmp_path / f"out.fnprune-{os.getpid()}"
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert (kept / "model.safetensors").is_file() and str(kept) in result.output


def test_overwrite_replaces_a_symbolic_link_and_keeps_the_folder_it_pointed_to(tmp_path):
    from fnprune.checkpoint import atomic_output_dir

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "theirs.txt").write_text("theirs")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    with atomic_output_dir(link, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert not link.is_symlink() and (link / "model.safetensors").read_text() == "new"
    assert (tmp_path / "real" / "theirs.txt").read_text() == "theirs"  # not ours to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]  # nothing left behind


DEAD = 2**22 + 7  # a pid above the kernel's maximum: no live process here


def test_the_sweep_leaves_other_outputs_and_locked_temp_folders_alone(tmp_path):
    """A killed run's temp folder beside `m` is swept; `m.25`'s (its name begins with `m.` and a number) and one
    locked by a live run in another pid namespace (a container, another machine on shared storage) are not."""
    from fnprune.temp_files import locked, sweep_stale

    other, stale, live = (tmp_path / f".m.25.{DEAD}.abc.partial", tmp_path / f".m.{DEAD}.abc.partial",
                          tmp_path / f".m.{DEAD}.xyz.partial")
    for folder in (other, stale, live):
        folder.mkdir()
    with locked(live):
        sweep_stale(tmp_path / "m")
    assert other.exists() and live.exists() and not stale.exists()


def test_overwrite_replaces_only_a_folder_this_command_wrote(world, tmp_path):
    """--overwrite on a folder of the user's own (a cache, a model, a thesis) is refused before any work; an
    fnprune output or an empty folder is replaced."""
    from fnprune.checkpoint import check_output_dir
    from fnprune.errors import OutputError

    theirs = tmp_path / "docs"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match="a folder this command did not write .no report.json."):
        check_output_dir(theirs, True, own_files=["report.json"])
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(world / "models/llama"),
                                       "--data-dir", str(world / "data/sst2"), "--output", str(theirs),
                                       "--overwrite", *SMALL])
    assert result.exit_code == 1 and "did not write" in result.output and (theirs / "thesis.txt").is_file()
    (theirs / "recipe.yaml").write_text(f"model: {{name_or_path: {world / 'models/llama'}}}\n")  # the user's own
    result = CliRunner().invoke(main, ["compress", "--recipe", str(theirs / "recipe.yaml"), "--task", "sst2",
                                       "--data-dir", str(world / "data/sst2"), "--output", str(theirs),
                                       "--overwrite", *SMALL])
    assert result.exit_code == 1 and "did not write" in result.output and (theirs / "thesis.txt").is_file()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", True, own_files=["report.json"])
    (theirs / "report.json").write_text("{}")
    check_output_dir(theirs, True, own_files=["report.json"])


def test_sigterm_cleans_up_as_ctrl_c_does(world, tmp_path, monkeypatch):
    """`kill`, systemd or a container stop mid-run: one line, and no temp checkpoint left beside the output."""
    import signal

    import fnprune.pipeline as pipeline

    reconstruct = pipeline._reconstruct

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_reconstruct", terminated)
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(world / "models/llama"),
                                       "--data-dir", str(world / "data/sst2"), "--no-eval", "--output",
                                       str(tmp_path / "out"), *SMALL])
    assert result.exit_code == 130 and "interrupted: no output was written" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only


def test_a_file_output_that_appears_meanwhile_is_kept_and_so_is_this_runs(tmp_path):
    """Two GGUF exports to one name: the second to finish does not replace the first (it did, silently)."""
    from fnprune.checkpoint import atomic_output_file
    from fnprune.errors import OutputError

    out = tmp_path / "m.gguf"
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        with atomic_output_file(out) as tmp:
            tmp.write_text("mine")
            out.write_text("theirs")
    kept = tmp_path / f"m.gguf.fnprune-{os.getpid()}"
    assert out.read_text() == "theirs" and kept.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", kept.name]
    with atomic_output_file(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"


def test_ctrl_c_while_the_replaced_output_is_deleted_says_the_new_one_is_in_place(tmp_path, monkeypatch):
    from fnprune import checkpoint
    from fnprune.interrupt import InterruptedAfterWrite

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    real = checkpoint.remove

    def interrupted(path):
        real(path)
        raise KeyboardInterrupt  # a second Ctrl-C, which stops at once

    monkeypatch.setattr(checkpoint, "remove", interrupted)
    with pytest.raises(InterruptedAfterWrite, match="the new output is in place"):
        with checkpoint.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "new"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_overwrite_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    """--overwrite exchanges the new output with the old in one rename (a kill between two renames left no
    output at the path, and the next run swept both)."""
    from fnprune import checkpoint

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not checkpoint._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot exchange two folders (the two-rename path runs)")
    (tmp_path / "a").rmdir(), (tmp_path / "b").rmdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    monkeypatch.setattr(Path, "rename", lambda *a: pytest.fail("two renames"))
    with checkpoint.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_cache_write_sweeps_the_temp_file_a_killed_write_left(tmp_path):
    import torch

    from fnprune.safetensors_io import read_with_meta, write_atomic

    stale = tmp_path / f".entry.safetensors.{DEAD}.q1w2.tmp"
    stale.write_bytes(b"half of 8 GB")
    write_atomic(tmp_path / "entry.safetensors", {"x": torch.ones(2)}, {"kind": "test"})
    assert not stale.exists() and read_with_meta(tmp_path / "entry.safetensors") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.safetensors"]


def test_ctrl_c_while_the_activations_are_cached_keeps_them(world, tmp_path, isolated_cache, monkeypatch):
    """Capture's progress file is gone once it finishes: a first Ctrl-C while the activations are written to the
    cache waits for the entry (it was lost with the progress, and the rerun captured again)."""
    import signal

    from fnprune import calibration

    save = cache.save_activations

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save(*args, **kwargs)

    monkeypatch.setattr(cache, "save_activations", interrupted_save)
    args = ["compress", "--task", "sst2", "--model", str(world / "models/llama"), "--data-dir",
            str(world / "data/sst2"), "--no-eval", "--output", str(tmp_path / "out"), *SMALL, "--num-samples", "37"]
    first = CliRunner().invoke(main, args)  # (37: activations no other test has cached)
    assert first.exit_code == 130 and "the activations are in the cache" in first.output, first.output
    monkeypatch.setattr(cache, "save_activations", save)
    monkeypatch.setattr(calibration, "capture_activations", lambda *a, **k: pytest.fail("captured again"))
    assert CliRunner().invoke(main, args).exit_code == 0


def test_round_to_at_least_the_width_warns(world, tmp_path, caplog):
    """--round-to 256 on 128-wide MLPs cannot round (e.g. for a DeciLM export): said, not silently ignored."""
    with caplog.at_level(logging.WARNING, logger="fnprune"):
        result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(world / "models/llama"),
                                           "--data-dir", str(world / "data/sst2"), "--round-to", "256", "--no-eval",
                                           "--output", str(tmp_path / "out"), *SMALL])
    assert result.exit_code == 0, result.output
    assert "round_to 256 is not below the MLP width, so it cannot round: 2 layers keep a plain share" in caplog.text
    assert "0: 64 of 128" in caplog.text


def test_compress_without_a_usable_cache_warns_and_writes_readable_files(world, tmp_path, monkeypatch, caplog):
    """FNPRUNE_CACHE_DIR is a file: a warning, the run goes on. --keep below the --round-to minimum: a warning
    saying what was kept. Every output file has the mode a plain write gives (safetensors' are 0600)."""
    monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(world / "afile"))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="fnprune"):
        result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(world / "models/llama"),
                                           "--data-dir", str(world / "data/sst2"), "--keep", "0.01", "--no-eval",
                                           "--output", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert "cannot be written" in caplog.text and "running without the cache" in caplog.text
    assert "keep 0.01: 2 of 2 layers keep only the round_to minimum of 8 neurons" in caplog.text
    assert "0: 8 of 128" in caplog.text
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert (world / "afile").read_text() == "a file\n"
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "128 -> 8 per layer" in shown.output, shown.output


# --------------------------------------------------------------------------------------------------- cache


def _entry(name: str) -> Path:
    return cache.cache_dir() / name


def _acts():
    import numpy as np
    import torch

    from fnprune.capture import LayerActivations

    return [LayerActivations(torch.randn(5, 4), torch.randn(3, 4), torch.randn(4), torch.rand(4), torch.rand(4), 9)], \
        np.array([0, 1, 1])


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the tensors, after the header
    if how == "garbled":
        raw[start + 3] ^= 0xFF
    elif how == "zeroed":
        raw[start:] = bytes(len(raw) - start)
    else:
        raw = raw[: len(raw) - 4]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["garbled", "zeroed", "truncated", "wrong-kind", "no-checksum"])
def test_bad_cache_entry_is_a_miss(how, isolated_cache, caplog):
    """A damaged entry (or one of another kind, or from before checksums) is a miss: warned, then recomputed."""
    import numpy as np

    from fnprune.networks import LayerNetworks
    from fnprune.safetensors_io import write_safetensors

    acts, labels = _acts()
    key = f"bad-{how}"
    if how == "wrong-kind":
        maps = np.ones((2, 4))
        cache.save_networks(key, [LayerNetworks(maps, maps > 0, 1.0, True, 0)])
        _entry(f"networks-{key}.safetensors").rename(_entry(f"activations-{key}.safetensors"))
    elif how == "no-checksum":
        write_safetensors(_entry(f"activations-{key}.safetensors"), {"labels": __import__("torch").zeros(3)},
                          {"meta": json.dumps({"counts": [9]})})
    else:
        cache.save_activations(key, acts, labels)
        _damage(_entry(f"activations-{key}.safetensors"), how)
    with caplog.at_level(logging.WARNING, logger="fnprune"):
        assert cache.load_activations(key) is None
    assert "ignoring" in caplog.text
    cache.save_activations(key, acts, labels)  # the recomputed entry overwrites it
    assert cache.load_activations(key)[1].tolist() == [0, 1, 1]


def test_full_disk_or_unusable_cache_folder_costs_only_the_cache(isolated_cache, tmp_path, monkeypatch, caplog):
    import fnprune.safetensors_io as io

    acts, labels = _acts()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_safetensors", full)
    with caplog.at_level(logging.WARNING, logger="fnprune"):
        cache.save_activations("full", acts, labels)
    assert "could not write cache entry" in caplog.text and "No space left" in caplog.text
    assert cache.load_activations("full") is None and not list(cache.cache_dir().glob("*.tmp"))
    monkeypatch.undo()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="fnprune"):
        caplog.clear()
        assert not cache.usable() and not cache.usable()
    assert caplog.text.count("cannot be written") == 1  # once per run, however many stages ask
    cache.save_activations("k", acts, labels)
    assert cache.load_activations("k") is None and blocker.read_text() == "x"


def test_capture_goes_on_when_its_progress_cannot_be_saved(model_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from fnprune.arch import layout_for
    from fnprune.capture import capture_activations

    (tmp_path / "file").write_text("x")
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama")).eval()
    seqs = [[5, 6, 7, 8, 9]] * 6
    with caplog.at_level(logging.WARNING, logger="fnprune"):
        acts = capture_activations(model, layout_for(model), seqs, max_tokens=20, batch_size=2, seed=0,
                                   progress=False, progress_file=tmp_path / "file" / "p.safetensors", save_every=0)
    assert len(acts) == 2 and acts[0].count == 30
    assert "cannot save capture progress" in caplog.text


# ---------------------------------------------------------------------------------------------------- GGUF

GGUFS = [("llama", "F32"), ("llama", "Q8_0"), ("qwen2", "F16"), ("qwen2", "Q8_0")]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, model_dir):
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    return {(arch, q): tiny.make_gguf(model_dir(arch), root / f"{arch}-{q}.gguf", q) for arch, q in GGUFS}


@pytest.mark.parametrize(("arch", "qtype"), GGUFS, ids=[f"{a}-{q}" for a, q in GGUFS])
def test_gguf_loads_as_a_plain_model_that_saves(arch, qtype, gguf_files, model_dir, tmp_path):
    """transformers dequantizes a GGUF but used to keep it marked as quantized, so save_pretrained refused it at
    the end of the run; the model fnprune loads is plain, saves as safetensors and reloads."""
    import torch
    from transformers import AutoModelForCausalLM

    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    model, tokenizer = load_model(ModelSpec(name_or_path=str(gguf_files[arch, qtype])))
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved/config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    source = AutoModelForCausalLM.from_pretrained(model_dir(arch))
    ids = torch.tensor([tokenizer.encode("Review: a great film\nSentiment:")])
    with torch.no_grad():
        got, want = reloaded(ids).logits, source(ids).logits
    assert torch.equal(got, model(ids).logits)
    tolerance = {"F32": 1e-5, "F16": 0.05, "Q8_0": 0.5}[qtype]  # the file's own rounding
    assert (got - want).abs().max() < tolerance


@pytest.mark.slow  # a fresh process
def test_quiet_hides_the_gguf_readers_progress_bar(gguf_files, world, tmp_path):
    """tqdm reads TQDM_DISABLE once, when it is imported: --quiet set it after compress had imported it, so
    transformers' "Converting and de-quantizing GGUF tensors" bar was drawn anyway. A fresh process, as a user's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FNPRUNE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TQDM_DISABLE", None)
    run = subprocess.run([sys.executable, "-m", "fnprune", "compress", "--quiet", "--task", "sst2", "--model",
                          str(gguf_files["llama", "F32"]), "--data-dir", str(world / "data/sst2"), "--no-eval",
                          "--output", str(tmp_path / "out"), *SMALL], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Converting" not in run.stderr and "it/s]" not in run.stderr, run.stderr


def test_a_gguf_file_with_an_upper_case_suffix_loads(gguf_files, tmp_path):
    """`model.GGUF` was taken for a Hugging Face folder ("no config.json")."""
    import shutil

    import torch

    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    upper = shutil.copy(gguf_files["llama", "F32"], tmp_path / "model.GGUF")
    model, tokenizer = load_model(ModelSpec(name_or_path=str(upper)))
    plain, _ = load_model(ModelSpec(name_or_path=str(gguf_files["llama", "F32"])))
    ids = torch.tensor([tokenizer.encode("Review: a great film")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_a_folder_given_as_a_data_file_is_named_so(world, tmp_path):
    """--data-files train=FOLDER said "cannot tell the file format from its suffix", and a folder named
    train.tsv "data file not found"."""
    from fnprune.data_files import read_rows
    from fnprune.errors import DataError

    (tmp_path / "train.tsv").mkdir()
    for folder in (world / "data/sst2", tmp_path / "train.tsv"):
        with pytest.raises(DataError, match="a folder, not a data file"):
            read_rows(folder)


def test_compress_from_a_quantized_gguf(gguf_files, world, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--task", "sst2", "--model", str(gguf_files["llama", "Q8_0"]),
                                       "--data-dir", str(world / "data/sst2"), "--keep", "0.5", "--no-eval",
                                       "--output", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["intermediate_size"] == 64


def test_still_quantized_model_is_refused_before_calibration():
    import torch

    from fnprune.errors import ModelError
    from fnprune.models import _check_plain
    from fnprune.recipe import ModelSpec

    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"quantization_config": object()})()
    with pytest.raises(ModelError, match="loads as a quantized model"):
        _check_plain(model, ModelSpec(name_or_path="m.gguf"))
