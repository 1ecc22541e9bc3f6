"""The evaluation scripts' own bookkeeping (no compress runs): what they reuse, where they write, what they record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _parity_run(out: Path, model: Path, task: str = "fnp_copa", batch_size: int = 16) -> None:
    """An lm-eval results file and its logged samples under `out`, as lm-eval 0.4.13 writes them for `model`."""
    folder = out / str(model).replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"2026-01-01T00-00-00.0000{batch_size:02d}"
    (folder / f"results_{stamp}.json").write_text(json.dumps({
        "config": {"model": "hf", "model_args": {"pretrained": str(model), "dtype": "float32"},
                   "batch_size": str(batch_size)},
        "results": {task: {"acc,none": 0.5, "acc_norm,none": 1.0}}}))
    logged = [{"doc_id": i, "filtered_resps": [[str(a), "False"] for a in lls]}
              for i, lls in enumerate([[-1, -2], [-3, -1]])]
    (folder / f"samples_{task}_{stamp}.jsonl").write_text("\n".join(map(json.dumps, logged)))


def _fnprune_saved(out: Path, model: Path, tasks: tuple[str, ...] = ("fnp_copa",), batch_size: int = 16) -> None:
    scores = {"acc": 0.5, "acc_norm": 1.0, "n": 2, "seconds": 0.1, "scores": [[-1.0, -2.0], [-3.0, -1.5]]}
    (out / "fnprune_scores.json").write_text(json.dumps({"model": str(model), "batch_size": batch_size,
                                                        "scores": {t: scores for t in tasks}}))


def test_lm_eval_parity_reuses_only_the_same_models_results_and_records_its_command(tmp_path):
    """--skip-fnprune / --skip-lm-eval read whatever --lm-eval-out held and labelled it with the current --model;
    the tables always went to evaluation/results and recorded only the lm-eval command."""
    from evaluation import lm_eval_parity

    a, b, out = tmp_path / "model-a", tmp_path / "model-b", tmp_path / "lm-eval"
    a.mkdir(), b.mkdir()
    _parity_run(out, a)
    _fnprune_saved(out, a)
    prefix = tmp_path / "parity"
    args = ["--tasks", "fnp_copa", "--lm-eval-out", str(out), "--skip-lm-eval", "--skip-fnprune",
            "--out-prefix", str(prefix)]
    lm_eval_parity.main(["--model", str(a), *args])
    saved = json.loads(prefix.with_suffix(".json").read_text())
    assert saved["command"] == "python -m evaluation.lm_eval_parity --model " + str(a) + " " + " ".join(args)
    assert saved["model"] == str(a) and "lm_eval" in saved["lm_eval_command"]
    (row,) = saved["rows"]
    assert (row["task"], row["lm_eval_acc_norm"], row["max_abs_loglik_diff"], row["argmax_differs"]) == (
        "fnp_copa", 1.0, 0.5, 0)
    assert saved["command"] in prefix.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match=f"scores of {a}, not {b}: run without --skip-fnprune"):
        lm_eval_parity.main(["--model", str(b), *args])
    _fnprune_saved(out, b)
    with pytest.raises(SystemExit, match=f"no lm-eval results of {b} for fnp_copa under .*runs of {a}"):
        lm_eval_parity.main(["--model", str(b), *args])
    _fnprune_saved(out, a)
    with pytest.raises(SystemExit, match="no fnprune scores for fnp_boolq"):
        lm_eval_parity.main(["--model", str(a), *args[:1], "fnp_copa,fnp_boolq", *args[2:]])
    _fnprune_saved(out, a, ("fnp_copa", "fnp_boolq"))
    with pytest.raises(SystemExit, match=f"no lm-eval results of {a} for fnp_boolq"):
        lm_eval_parity.main(["--model", str(a), *args[:1], "fnp_copa,fnp_boolq", *args[2:]])


def test_lm_eval_parity_reuses_only_results_at_its_batch_size(tmp_path):
    """Padding moves a log-likelihood's last digits: saved scores or lm-eval runs at another batch size are not
    this run's."""
    from evaluation import lm_eval_parity

    model, out = tmp_path / "model", tmp_path / "lm-eval"
    model.mkdir()
    _parity_run(out, model, batch_size=8)
    _fnprune_saved(out, model, batch_size=8)
    args = ["--model", str(model), "--tasks", "fnp_copa", "--lm-eval-out", str(out), "--skip-lm-eval",
            "--skip-fnprune", "--out-prefix", str(tmp_path / "parity")]
    with pytest.raises(SystemExit, match="fnprune's scores at batch size 8, not 16: run without --skip-fnprune"):
        lm_eval_parity.main(args)
    _fnprune_saved(out, model)
    with pytest.raises(SystemExit, match=f"no lm-eval results of {model} for fnp_copa .*{model} at batch size 8"):
        lm_eval_parity.main(args)
    _parity_run(out, model)
    lm_eval_parity.main(args)
    _fnprune_saved(out, model, batch_size=8)
    lm_eval_parity.main([*args, "--batch-size", "8"])  # the batch-8 run, though a batch-16 one is newer


def test_lm_eval_parity_knows_every_shipped_task_and_keeps_its_default_tables():
    from evaluation import lm_eval_parity

    shipped = {p.stem for p in lm_eval_parity.TASK_DIR.glob("*.yaml")}
    assert set(lm_eval_parity.TASKS) == shipped
    assert "fnp_sst2_raw" not in lm_eval_parity.DEFAULT_TASKS  # a prompt difference, not parity: by name only
    with pytest.raises(SystemExit):
        lm_eval_parity.main(["--model", "m", "--tasks", "fnp_nope", "--skip-fnprune", "--skip-lm-eval"])


def test_tables_replace_each_file_whole_or_not_at_all(tmp_path):
    """write_rows truncated and wrote each file in turn: a failure part way (here a value JSON writes but whose
    text cannot be made) left a new JSON beside the last run's table, or a truncated file."""
    import os
    import stat

    from evaluation.tables import write_rows

    class Unprintable(int):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    prefix = tmp_path / "rows"
    write_rows(prefix, "first", [{"a": 1}])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="no text"):
        write_rows(prefix, "second", [{"a": 2}, {"a": Unprintable(5)}])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing half-written, nothing left
    write_rows(prefix, "third", [{"a": 3}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "rows.json", "rows.md"]
    assert (tmp_path / "rows.csv").read_bytes() == b"a\r\n3\r\n"  # csv's line ends, as before
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "rows.md").stat().st_mode) == 0o666 & ~mask  # an ordinary file, not mkstemp's


@pytest.mark.parametrize("probe", ["extra_questions_probe", "generic_text_probe"])
def test_probe_runs_are_keyed_on_their_files_contents_not_only_the_path(probe, tmp_path, monkeypatch):
    """--extra-file and --wikitext named the runs by their path alone: a file edited in place reused the runs made
    from its old rows."""
    import importlib

    from evaluation import calibration_tune

    module = importlib.import_module(f"evaluation.{probe}")
    variants = []
    monkeypatch.setattr(calibration_tune, "main_with_prompts", lambda *a: variants.append(a[-1]))
    path = tmp_path / "wiki.test.raw"
    flags = ["--extra-file", str(path)] if probe == "extra_questions_probe" else [
        "--generic-share", "0.25", "--wikitext", str(tmp_path)]
    for text in ("first rows\n", "first rows\n", "other rows\n"):
        path.write_text(text)
        module.main([*flags, "--model", "m"])
    assert variants[0] == variants[1] != variants[2]


def test_bench_wide_flushes_denormals_alternates_the_fits_and_deletes_its_compress_folder(tmp_path, monkeypatch):
    """main never set flush-denormal (the fits it times run in this process), --fit timed one fit twice then the
    other twice, and --compress left its /tmp/bench-wide-* folder (a model and checkpoints) behind."""
    import tempfile

    import torch

    import fnprune.compensation
    from evaluation import bench_wide

    flushes, order = [], []
    real_flush = torch.set_flush_denormal
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: flushes.append(on) or real_flush(on))
    for name in ("fit_token_gram", "fit_kept_gram"):
        real = getattr(fnprune.compensation, name)
        monkeypatch.setattr(fnprune.compensation, name, lambda *a, _real=real, _name=name: order.append(_name) or _real(
            *a))
    bench_wide.main(["--fit", "--widths", "32", "--tokens", "96", "--out-prefix", str(tmp_path / "wide")])
    assert flushes == [True]
    assert order == ["fit_token_gram", "fit_kept_gram"] * 2
    (row,) = json.loads((tmp_path / "wide_fit.json").read_text())["rows"]
    assert row["width"] == 32 and row["token_gram_rel_err_vs_float64"] < 1e-3

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    made = []
    monkeypatch.setattr(bench_wide, "build_wide_llama", lambda out, *a: made.append(out) or out.mkdir())

    def run_script(script, recipe, src=None):
        Path(recipe["output"]["dir"]).mkdir()
        return {"total": 2.0, "timings": {"load": 1.0, "save": 1.0}, "peak_rss": 2**30}

    monkeypatch.setattr(bench_wide, "run_script", run_script)
    args = ["--compress", "--compress-repeats", "1", "--data-dir", str(tmp_path), "--out-prefix", str(tmp_path / "w")]
    bench_wide.main(args)
    assert made and not list((tmp_path / "tmp").iterdir())
    monkeypatch.setattr(bench_wide, "run_script", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bench_wide.main(args)
    assert len(made) == 2 and not list((tmp_path / "tmp").iterdir())  # a failed run's too


def test_bench_speed_takes_a_relative_model_and_a_vocabulary_under_20000(model_dir, task_data, tmp_path,
                                                                          monkeypatch):
    """A relative --model reached the compress runs as given, which start in an empty folder; the throughput
    runs fed token ids up to 20000 to a model with fewer (the tiny one has a few hundred)."""
    import shutil
    import sys

    from evaluation import bench_speed

    seen = []

    def run_script(script, recipe, src=None):  # the compress run's checkpoint: the dense model, copied
        seen.append(recipe["model"]["name_or_path"])
        if script == bench_speed.FORWARD_ONLY:
            return {"forward_s": 1.0, "peak_rss": 2**30}
        shutil.copytree(recipe["model"]["name_or_path"], recipe["output"]["dir"])
        return {"total": 2.0, "timings": {"load": 1.0, "capture": 1.0, "save": 0.1}, "peak_rss": 2**30,
                "parameters": {}, "widths": [8]}

    monkeypatch.setattr(bench_speed, "run_script", run_script)
    model = model_dir("llama")
    monkeypatch.chdir(model.parent)
    monkeypatch.setattr(sys, "argv", [
        "bench_speed.py", "--model", model.name, "--data-dir", str(task_data), "--keeps", "0.5", "--reference-keeps",
        "", "--compress-repeats", "1", "--prefill-batch", "1", "--prefill-len", "24", "--decode-tokens", "2",
        "--repeats", "1", "--out-prefix", str(tmp_path / "speed")])
    bench_speed.main()
    assert seen[:2] == [str(model.resolve())] * 2
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert rows[1]["prefill_tok_s"] > 0 and rows[1]["decode_tok_s"] > 0


def test_llama_cpp_speed_draws_token_ids_below_the_models_vocabulary(monkeypatch):
    from evaluation import llama_cpp_speed

    class FakeLlama:
        def n_vocab(self) -> int:
            return 384

        def reset(self) -> None:
            pass

        def eval(self, ids: list[int]) -> None:
            assert all(0 <= i < 384 for i in ids), max(ids)

        def close(self) -> None:
            pass

    monkeypatch.setattr(llama_cpp_speed, "_load", lambda *a, **k: FakeLlama())
    speed = llama_cpp_speed.llama_cpp_throughput({(1.0, "f32"): Path("x.gguf")}, 40, 4, 1, 1, False)
    assert speed[(1.0, "f32")]["prompt_tok_s"] > 0
    assert llama_cpp_speed.token_bounds(49152) == (100, 20000)  # a real vocabulary: the ids as before


def test_every_evaluation_script_is_in_the_evaluation_readme():
    """extra_questions_probe.py had no line in evaluation/README.md."""
    folder = Path(__file__).resolve().parent.parent / "evaluation"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    scripts = [p.name for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"]
    assert [name for name in scripts if f"`{name}`" not in readme] == []


def test_recovery_tune_refuses_an_unknown_setting_in_one_line():
    from evaluation.recovery_tune import parse_settings
    from fnprune.recipe import RecoverySpec

    assert parse_settings(["lr=1e-4,3e-4"], RecoverySpec()) == [{"lr": 1e-4}, {"lr": 3e-4}]
    for bad in ("badfield=1", "lr"):
        with pytest.raises(SystemExit, match="expected FIELD=V1,V2, FIELD one of enabled"):
            parse_settings([bad], RecoverySpec())


def test_gguf_tokenizer_check_counts_llama_cpps_matches(tmp_path):
    """Opt-in (llama-cpp-python): the script exports through fnprune and counts llama.cpp's ids equal to the saved
    tokenizer's; on a Llama-2-shaped tokenizer every text without a leading space matches."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (build it from source)")
    import tiny

    from evaluation import gguf_tokenizer_check

    tiny.make_spm_tokenizer(tmp_path / "tok")
    texts = tmp_path / "texts.txt"
    texts.write_text("the cast was warm\r\n\r\n a dull film , with 3 stars\r\nvery  good\r\n", encoding="utf-8")
    gguf_tokenizer_check.main(["--tokenizer", str(tmp_path / "tok"), "--texts", str(texts),
                               "--out-prefix", str(tmp_path / "check")])
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert rows["leading spaces stripped"] == {"texts": 3, "same_as_tokenizer": 3, "same_as_sentencepiece": None}
    assert rows["as is"]["texts"] == 3


def test_calibrated_means_leave_the_held_template_out_of_committed_tuning_files(tmp_path):
    from evaluation import calibrated_means

    rows = [{"run": "dense", "a": 0.8, "b": 0.6, "held": 0.9, "mean": 0.7667, "pct": 100.0},
            {"run": "x=1", "a": 0.4, "b": 0.3, "held": 0.9, "mean": 0.5333, "pct": 69.6, "held_pct": 100.0}]
    tuned = tmp_path / "calibration_tune_t.json"
    tuned.write_text(json.dumps({"command": "python -m evaluation.calibration_tune --hold-template held",
                                 "rows": rows}))
    (tmp_path / "calibration_tune_u.json").write_text(json.dumps({"command": "no template held", "rows": rows}))
    calibrated_means.main([str(tuned), str(tmp_path / "calibration_tune_u.json"), "--out-prefix", str(tmp_path / "o")])
    out = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [(r["run"], r["pct_as_committed"], r["calibrated_pct"], r["held_pct"]) for r in out] == [
        ("x=1", 69.6, 50.0, 100.0)]
