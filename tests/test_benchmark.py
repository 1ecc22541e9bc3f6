"""The benchmark runs the product: its numbers are the CLI's for the same recipe."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from evaluation import benchmark
from evaluation.tables import write_rows
from fnprune.cli import main

pytestmark = pytest.mark.slow  # full compress runs


def test_benchmark_rows_equal_the_cli_on_the_same_recipe(model_dir, task_data, tmp_path):
    prefix = tmp_path / "bench"
    args = ["--model", str(model_dir("llama")), "--data-dir", str(task_data), "--keeps", "0.5",
            "--configs", "default", "--num-samples", "24", "--work", str(tmp_path / "runs"),
            "--out-prefix", str(prefix), "--quiet"]
    benchmark.main(args)
    row = json.loads(prefix.with_suffix(".json").read_text())["rows"][0]
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--keep", "0.5", "--num-samples", "24", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "refit" in report  # the default runs the refit on classification, in the benchmark as in the CLI
    assert row["held_out_pruned"] == round(report["metric"]["pruned"], 4)
    assert row["calibration_pruned"] == round(report["template_means"]["calibration"]["pruned"], 4)
    assert row["params"] == report["parameters"]["ratio"]
    soft = report["metric"]["right_prob"]  # the probability of the right answer, as the CLI reports it
    assert row["held_out_soft_pct"] == round(100 * soft["pruned"] / soft["dense"], 1)
    assert benchmark.summary([row])[0]["held_out_soft_pct"] == str(row["held_out_soft_pct"])
    calibration_soft = report["template_means"]["calibration"]["right_prob"]
    assert row["calibration_soft_pct"] == round(100 * calibration_soft["pruned"] / calibration_soft["dense"], 1)
    held = [t for t in report["templates"] if t["held_out"]]  # the worst held-out template, from the CLI's report
    assert row["worst_held_out_pct"] == round(min(100 * t["pruned"] / t["dense"] for t in held), 1)
    from evaluation.compare import compare  # the same recipe: the same answer to every example, a zero difference

    bench_report = json.loads((next((tmp_path / "runs").iterdir()) / "report.json").read_text())
    assert all(len(t["hits"]["pruned"]) == report["metric"]["n"] for t in report["templates"])
    for r in compare(bench_report, report):
        assert (r["difference"], r["difference_ci95"]) == (0.0, "+0.0 to +0.0"), r
        assert (r["soft_difference"], r["soft_difference_ci95"]) == (0.0, "+0.0 to +0.0"), r
    rerun = benchmark.run_one(benchmark.main.__globals__["argparse"].Namespace(
        model=str(model_dir("llama")), data_dir=str(task_data), task="sst2", num_samples=24,
        work=str(tmp_path / "runs"), quiet=True), "default", 0.5, 0)
    assert rerun == row  # a finished run is read back, not run again
    folder = next((tmp_path / "runs").iterdir())
    (folder / benchmark.CODE_MARK).write_text("written by other code\n")
    report_before = (folder / "report.json").stat().st_mtime_ns
    benchmark.run_one(benchmark.main.__globals__["argparse"].Namespace(
        model=str(model_dir("llama")), data_dir=str(task_data), task="sst2", num_samples=24,
        work=str(tmp_path / "runs"), quiet=True), "default", 0.5, 0)
    assert (folder / "report.json").stat().st_mtime_ns != report_before  # other code's run is made again
    assert (folder / benchmark.CODE_MARK).read_text().startswith(benchmark.code_digest() + "\n")
    report_before = (folder / "report.json").stat().st_mtime_ns
    other = benchmark.run_one(benchmark.main.__globals__["argparse"].Namespace(
        model=str(model_dir("llama")), data_dir=str(task_data), task="sst2", num_samples=16,
        work=str(tmp_path / "runs"), quiet=True), "default", 0.5, 0)
    assert (folder / "report.json").stat().st_mtime_ns != report_before  # another input: made again, not reused
    assert json.loads((folder / "report.json").read_text())["calibration"]["samples"] == 16 and other != row


def test_benchmark_recipe_overrides_and_perplexity_equal_the_cli(model_dir, task_data, tmp_path):
    """The default configuration (FLAP + reconstruction) with --set overrides and --wikitext: the
    same numbers as `fnprune compress` given the same settings as flags."""
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text("\n".join(f" = Film {i} = \n The film was {'good' if i % 2 else 'bad'} and the story is long ."
                              for i in range(60)), encoding="utf-8")
    small = {"calibration.max_tokens": 300, "networks.components": 6, "selection.ridge": 1.0,
             "evaluation.perplexity_tokens": 256, "evaluation.perplexity_window": 64}
    prefix = tmp_path / "bench"
    benchmark.main(["--model", str(model_dir("llama")), "--data-dir", str(task_data), "--keeps", "0.5",
                    "--configs", "default", "--seeds", "0", "--num-samples", "24", "--wikitext", str(wiki),
                    *[a for k, v in small.items() for a in ("--set", f"{k}={v}")],
                    "--work", str(tmp_path / "runs"), "--out-prefix", str(prefix), "--quiet"])
    row = json.loads(prefix.with_suffix(".json").read_text())["rows"][0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("sst2-default-k0.5-s0-")  # other settings, another folder
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--keep", "0.5", "--num-samples", "24", "--max-tokens", "300", "--components", "6", "--ridge", "1.0",
        "--validate", f"wikitext={wiki}", "--perplexity-tokens", "256", "--perplexity-window", "64",
        "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "flap" and report["reconstruct"] and report["ridge"] == 1.0
    assert row["held_out_pruned"] == round(report["metric"]["pruned"], 4)
    assert row["calibration_pruned"] == round(report["template_means"]["calibration"]["pruned"], 4)
    assert row["params"] == report["parameters"]["ratio"]
    assert row["ppl_pruned"] == round(report["validation"]["perplexity"]["pruned"], 2)
    assert row["ppl_dense"] == round(report["validation"]["perplexity"]["dense"], 2)
    for name in ("model.safetensors", "networks.safetensors"):
        assert (run_dir / name).read_bytes() == (out / name).read_bytes()


def test_benchmark_set_needs_key_and_value():
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        benchmark.parse_overrides(["selection.ridge"], None)
    base = ["--model", "m", "--data-dir", "d", "--out-prefix", "p"]
    with pytest.raises(SystemExit, match="selection.kep: unknown field"):  # every run's recipe checked up front
        benchmark.main([*base, "--keeps", "0.5", "--set", "selection.kep=1"])
    with pytest.raises(SystemExit, match="selection.keep: must be"):
        benchmark.main([*base, "--keeps", "0.5,1.5"])
    with pytest.raises(SystemExit, match=r"--set selection.keep: '\[' is not a YAML value"):
        benchmark.main([*base, "--keeps", "0.5", "--set", "selection.keep=["])
    assert benchmark.uses_ica("default", "sst2", {"selection.method": "fn-task"})  # --seeds then apply
    assert benchmark.parse_overrides(["networks.engine=sklearn", "selection.fn_boost=4"], None) == {
        "networks.engine": "sklearn", "selection.fn_boost": 4}


def test_bench_ica_captures_through_the_package_and_its_cache(model_dir, task_data, monkeypatch):
    """The ICA benchmark's activations are compress's calibration sample, from fnprune's one cache."""
    from evaluation import bench_ica
    from fnprune import calibration

    monkeypatch.setattr(bench_ica, "MODEL", model_dir("llama"))
    monkeypatch.setattr(bench_ica, "DATA", task_data)
    first = bench_ica.capture_tokens(24, 64, 0)
    assert first and all(t.shape[0] == 64 for t in first)  # the sampled tokens, kept as tokens
    calls = []
    real = calibration.capture_activations
    monkeypatch.setattr(calibration, "capture_activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = bench_ica.capture_tokens(24, 64, 0)
    assert not calls and all(a.equal(b) for a, b in zip(first, again))


def test_tables_keep_a_dot_in_the_prefix(tmp_path):
    from evaluation.tables import write_rows

    write_rows(tmp_path / "rows_k0.25", "cmd", [{"a": 1, "b": None}, {"a": 2, "c": "x"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows_k0.25.csv", "rows_k0.25.json", "rows_k0.25.md"]
    assert (tmp_path / "rows_k0.25.csv").read_text().splitlines() == ["a,b,c", "1,,", "2,,x"]


def test_benchmark_plots_every_configuration_against_keep(tmp_path):
    rows = [{"config": c, "keep": k, "seed": s, "held_out_pct": 80 + 10 * k + s, "calibration_pct": 90.0}
            for c in ("default", "flap+recon") for k in (0.25, 0.5) for s in ((0, 5) if c == "default" else (0,))]
    benchmark.plot_keeps(rows, tmp_path / "curve.png", "sst2")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_measure(model_dir, task_data, tmp_path_factory) -> dict:
    """What bench_speed's compress script prints for a real compress of the tiny model: the fakes below take
    its shape (which stages are timed), so a stage the product stops reporting fails them as it fails the run."""
    from evaluation import bench_speed

    recipe = {"model": {"name_or_path": str(model_dir("llama"))},
              "task": {"name": "sst2", "data_dir": str(task_data)},
              "calibration": {"cache": False, "num_samples": 16, "max_tokens": 128},
              "evaluation": {"enabled": False}, "selection": {"keep": 0.5},
              "output": {"dir": str(tmp_path_factory.mktemp("bench-speed") / "out")}}
    return bench_speed.run_script(bench_speed.COMPRESS_AND_MEASURE, recipe)


def _fake_timings(real: dict, made_up: dict[str, float]) -> dict[str, float]:
    """The real run's stages, with made-up seconds (0 for a stage not named)."""
    return {stage: made_up.get(stage, 0.0) for stage in real["timings"]}


def test_bench_speed_times_the_save_stage(real_measure):
    """report.json's timings stop before writing it: the compress script reads the result's, save included."""
    assert {"load", "capture", "surgery", "save"} <= set(real_measure["timings"])
    assert sum(real_measure["timings"].values()) <= real_measure["total"]


def test_bench_speed_also_max_tokens_compresses_each_keep_with_that_sample_in_the_same_turns(
        model_dir, task_data, tmp_path, monkeypatch, real_measure):
    import sys

    from evaluation import bench_speed

    seen = []

    def run_script(script, recipe, src=None):  # no subprocess: what would run, and made-up timings
        seen.append(recipe)
        if script == bench_speed.FORWARD_ONLY:
            return {"forward_s": 10.0, "peak_rss": 2**30}
        return {"total": 12.0, "timings": _fake_timings(real_measure, {"load": 1.0, "capture": 10.0, "save": 1.0}),
                "peak_rss": 2**30,
                "parameters": {}, "widths": [8]}

    monkeypatch.setattr(bench_speed, "run_script", run_script)
    monkeypatch.setattr(sys, "argv", [
        "bench_speed.py", "--model", str(model_dir("llama")), "--data-dir", str(task_data), "--keeps", "0.5,0.25",
        "--reference-keeps", "", "--compress-repeats", "1", "--no-throughput", "--also-max-tokens", "64",
        "--out-prefix", str(tmp_path / "speed")])
    bench_speed.main()
    compress = [(r["calibration"].get("max_tokens"), r["selection"]["keep"]) for r in seen if "output" in r]
    assert compress == [(None, 0.5), (None, 0.25), (64, 0.5), (64, 0.25)]
    assert "max_tokens" not in seen[0]["calibration"]  # the forward-only yardstick: the recipe's own sample
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["config"], r["keep"]) for r in rows] == [("dense", 1.0), ("default", 0.5), ("default", 0.25),
                                                       ("max_tokens 64", 0.5), ("max_tokens 64", 0.25)]
    assert rows[1]["total_over_forward_only"] == 1.2


def test_bench_speed_pruned_forward_compare_src_and_baselines_without_the_refit(model_dir, task_data, tmp_path,
                                                                               monkeypatch, real_measure):
    """--pruned-forward times the forward passes through each written checkpoint; --compare-src compresses the
    default from another checkout in the same turns; --baselines pin the refit off (flap+reconstruction is the
    default with --no-refit)."""
    import sys

    from evaluation import bench_speed

    seen = []

    def run_script(script, recipe, src=None):
        seen.append((script, recipe, src))
        if script == bench_speed.FORWARD_ONLY:
            return {"forward_s": 10.0 if recipe["model"]["name_or_path"] == str(model_dir("llama")) else 7.0,
                    "peak_rss": 2**30}
        return {"total": 30.0, "timings": _fake_timings(real_measure, {"load": 1.0, "capture": 12.0, "save": 1.0}),
                "peak_rss": 2**30,
                "parameters": {}, "widths": [8], "refit_share": 0.5 if src is None else 1.0}

    monkeypatch.setattr(bench_speed, "run_script", run_script)
    old = tmp_path / "old-checkout"
    monkeypatch.setattr(sys, "argv", [
        "bench_speed.py", "--model", str(model_dir("llama")), "--data-dir", str(task_data), "--keeps", "0.5",
        "--reference-keeps", "", "--compress-repeats", "1", "--no-throughput", "--baselines", "--pruned-forward",
        "--compare-src", str(old), "--out-prefix", str(tmp_path / "speed")])
    bench_speed.main()
    compress = [(r["selection"], src) for script, r, src in seen if script == bench_speed.COMPRESS_AND_MEASURE]
    assert compress == [({"keep": 0.5}, None), ({"keep": 0.5}, str(old)),
                        ({"method": "flap", "refit": False, "keep": 0.5}, None),
                        ({"method": "flap", "reconstruct": False, "refit": False, "keep": 0.5}, None)]
    outputs = [r["output"]["dir"] for script, r, _ in seen if script == bench_speed.COMPRESS_AND_MEASURE]
    timed = [r["model"]["name_or_path"] for script, r, _ in seen if script == bench_speed.FORWARD_ONLY][1:]
    assert timed == outputs  # each written checkpoint, right after its compress
    rows = {r["config"]: r for r in json.loads((tmp_path / "speed.json").read_text())["rows"]}
    assert set(rows) == {"dense", "default", "default@old-checkout", "flap+reconstruction", "flap"}
    assert rows["default"]["pruned_forward_s"] == 7.0
    assert rows["default"]["refit_floor_over_forward_only"] == 1.35  # (10 + 7 x half the prompts) / 10
    assert rows["default@old-checkout"]["refit_floor_over_forward_only"] == 1.7  # all of them: (10 + 7) / 10
    assert rows["default"]["total_over_forward_only"] == 1.4  # the stages' sum, 14 s


def test_validation_speed_times_the_scorer_and_a_plain_pass_over_the_same_examples(model_dir, task_data,
                                                                                    monkeypatch):
    """bench_speed --validation-tasks: fnprune's scorer is what runs (a spy counts its examples), the plain pass
    sees one sequence per example and template, and the ratio is the two rates' quotient."""
    from evaluation import validation_speed
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    scored, real = [], validation_speed.evaluate_templates
    monkeypatch.setattr(validation_speed, "evaluate_templates",
                        lambda m, t, sets, *a, **k: scored.append(sum(map(len, sets.values()))) or real(m, t, sets,
                                                                                                         *a, **k))
    row = validation_speed.validation_throughput(model, tok, "sst2", str(task_data), 8, 10, repeats=2)
    assert row["templates"] == 7 and row["examples"] == 70 and row["sequences"] == 70
    assert scored == [70, 70]
    assert row["scorer_over_plain"] == pytest.approx(row["scorer_ex_s"] / row["plain_forward_ex_s"], rel=0.05)


def test_calibration_tune_bad_inputs_stop_before_any_run(tmp_path, capsys):
    from evaluation import calibration_tune

    base = ["--model", "m", "--data-dir", str(tmp_path), "--work", str(tmp_path / "runs"), "--out-prefix",
            str(tmp_path / "t")]
    for extra, said in ((["--vary", "selection.ridge"], "expected KEY=V1,V2"),
                        (["--vary", "selection.rdge=1"], "selection.rdge: unknown field"),
                        (["--vary", "selection.ridge=1", "--share", "1.5"], "--share: must be in"),
                        (["--vary", "selection.ridge=1", "--task", "copa"], "carves its calibration split")):
        with pytest.raises(SystemExit) as info:
            calibration_tune.main([*base, *extra])
        assert not (tmp_path / "runs").exists()
        shown = str(info.value.code) + capsys.readouterr().err  # argparse's usage errors: on stderr, exit 2
        assert said in shown, (extra, shown)


def test_calibration_tune_reads_the_calibration_split_and_templates_only(model_dir, tmp_path):
    """A setting is chosen on half of the calibration split: the evaluation split's file is unreadable here and
    no held-out template is scored."""
    from evaluation import calibration_tune
    from fnprune.recipe import load_recipe
    from tests.test_tasks import _arc_rows, _write_jsonl

    data = tmp_path / "arc"
    _write_jsonl(data / "ARC-Easy-Dev.jsonl", _arc_rows(24, 1))
    (data / "ARC-Easy-Test.jsonl").write_text("not json\n")
    prefix = tmp_path / "tune"
    calibration_tune.main(["--model", str(model_dir("llama")), "--task", "arc_easy", "--data-dir", str(data),
                           "--config", "flap+recon", "--vary", "calibration.choices=none,all", "--vary",
                           "selection.ridge=1", "--set", "calibration.max_tokens=200", "--max-samples", "6", "--work",
                           str(tmp_path / "runs"), "--out-prefix", str(prefix), "--quiet"])
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["dense", "calibration.choices=none", "calibration.choices=all",
                                        "selection.ridge=1"]
    assert {k for r in rows for k in r} == {"run", "qa", "science", "answer", "mean", "pct", "vs_first", "soft_pct",
                                            "soft_vs_first", "folder", "_exact"}  # _exact: JSON only, unrounded
    for column in ("vs_first", "soft_vs_first"):
        assert rows[1][column] == "+0.0 (+0.0 to +0.0)"  # the first setting against itself
    assert len({r["folder"] for r in rows[1:]}) == 3
    ridge = load_recipe(tmp_path / "runs" / rows[3]["folder"] / "recipe.yaml")
    assert ridge.selection.ridge == 1 and ridge.calibration.choices == "none"  # one key varied at a time


def test_calibration_tune_hold_template_keeps_it_out_of_calibration_and_scores_it(model_dir, tmp_path):
    from evaluation import calibration_tune
    from fnprune.recipe import load_recipe
    from fnprune.tasks import resolve_task
    from tests.test_tasks import _arc_rows, _write_jsonl

    data = tmp_path / "arc"
    _write_jsonl(data / "ARC-Easy-Dev.jsonl", _arc_rows(24, 1))
    prefix = tmp_path / "tune"
    calibration_tune.main(["--model", str(model_dir("llama")), "--task", "arc_easy", "--data-dir", str(data),
                           "--config", "flap+recon", "--vary", "calibration.choices=none", "--set",
                           "calibration.max_tokens=200", "--max-samples", "6", "--work", str(tmp_path / "runs"),
                           "--out-prefix", str(prefix), "--quiet", "--hold-template", "science"])
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert {"qa", "science", "answer", "held_pct", "held_vs_first", "held_soft_pct", "held_soft_vs_first"} <= set(
        rows[1]) and "lm-eval" not in rows[1]
    task = resolve_task(load_recipe(tmp_path / "runs" / rows[1]["folder"] / "recipe.yaml").task)
    assert [t.name for t in task.calibration_templates()] == ["qa", "answer"]
    with pytest.raises(SystemExit):
        calibration_tune.main(["--model", "m", "--data-dir", str(data), "--task", "arc_easy", "--vary", "a=1",
                               "--hold-template", "lm-eval"])


def test_calibration_tune_means_leave_the_held_template_out(model_dir, tmp_path, monkeypatch):
    """`mean`, `pct` and `vs_first` are the calibrated templates'; the held one is scored in its own columns."""
    from evaluation import calibration_tune
    from tests.test_tasks import _arc_rows, _write_jsonl

    data = tmp_path / "arc"
    _write_jsonl(data / "ARC-Easy-Dev.jsonl", _arc_rows(24, 1))
    right = {"qa": [1, 1, 0, 0], "science": [0, 0, 0, 0], "answer": [1, 1, 1, 0]}  # the pruned model's answers

    def scored(model_path, task, names, *args):
        dense = "runs" not in model_path
        hits = {n: torch.tensor([1.0] * 4 if dense else right[n], dtype=torch.float64) for n in names}
        return {n: float(h.mean()) for n, h in hits.items()}, hits, hits
    monkeypatch.setattr(calibration_tune, "_accuracies", scored)
    calibration_tune.main(["--model", str(model_dir("llama")), "--task", "arc_easy", "--data-dir", str(data),
                           "--config", "flap+recon", "--vary", "calibration.choices=none", "--set",
                           "calibration.max_tokens=200", "--work", str(tmp_path / "runs"),
                           "--out-prefix", str(tmp_path / "t"), "--quiet", "--hold-template", "science"])
    row = json.loads((tmp_path / "t.json").read_text())["rows"][1]
    assert (row["mean"], row["pct"], row["held_pct"]) == (0.625, 62.5, 0.0)


def test_calibration_tune_runs_several_cuts_and_their_mean(model_dir, task_data, tmp_path):
    """`--split-seeds 0,1`: each cut scored on its own tuning part, cut 1 in the folders `--set task.split_seed=1`
    names, and a mean row per setting."""
    from evaluation import calibration_tune
    from fnprune.recipe import load_recipe

    args = ["--model", str(model_dir("llama")), "--task", "sst2", "--data-dir", str(task_data), "--config",
            "flap+recon", "--vary", "selection.keep=0.5,0.25", "--set", "calibration.max_tokens=200", "--set",
            "calibration.num_samples=32", "--max-samples", "16", "--work", str(tmp_path / "runs"), "--quiet",
            "--hold-template", "review"]
    calibration_tune.main([*args, "--split-seeds", "0,1", "--out-prefix", str(tmp_path / "cuts")])
    rows = json.loads((tmp_path / "cuts.json").read_text())["rows"]
    assert [(r["cut"], r["run"]) for r in rows] == [
        (0, "dense"), (0, "selection.keep=0.5"), (0, "selection.keep=0.25"),
        (1, "dense"), (1, "selection.keep=0.5"), (1, "selection.keep=0.25"),
        ("mean", "selection.keep=0.5"), ("mean", "selection.keep=0.25")]
    assert load_recipe(tmp_path / "runs" / rows[4]["folder"] / "recipe.yaml").task.split_seed == 1
    assert rows[0] != rows[3]  # another cut scores other rows
    quarter = [r for r in rows if r["run"] == "selection.keep=0.25"]
    for column in ("pct", "held_pct", "soft_pct", "held_soft_pct"):  # means of the unrounded cuts
        exact = [r["_exact"][column] for r in quarter[:2]]
        assert quarter[2][column] == round((exact[0] + exact[1]) / 2, 1)
        assert all(r[column] == round(e, 1) for r, e in zip(quarter, exact))
    for column in ("vs_first", "held_vs_first", "soft_vs_first", "held_soft_vs_first"):
        exact = [r["_exact"][column] for r in quarter[:2]]
        assert quarter[2][column] == f"{(exact[0] + exact[1]) / 2:+.1f}" and rows[6][column] == "+0.0"
        assert all(float(r[column].split()[0]) == pytest.approx(e, abs=0.051) for r, e in zip(quarter, exact))
    calibration_tune.main([*args, "--set", "task.split_seed=1", "--out-prefix", str(tmp_path / "one")])
    one = json.loads((tmp_path / "one.json").read_text())["rows"]
    assert [r["folder"] for r in one[1:]] == [r["folder"] for r in rows[4:6]]  # the same runs, not new ones
    assert [{k: v for k, v in r.items() if k != "cut"} for r in rows[3:6]] == one


def test_calibration_tune_starts_from_a_recipe_with_its_own_templates(model_dir, tmp_path):
    """`--recipe`: the runs calibrate on the recipe's templates (an extra one here), in folders of their own."""
    import dataclasses

    import yaml

    from evaluation import calibration_tune
    from fnprune.recipe import load_recipe
    from fnprune.tasks import BUILTIN_TASKS, resolve_task
    from tests.test_tasks import _arc_rows, _write_jsonl

    data = tmp_path / "arc"
    _write_jsonl(data / "ARC-Easy-Dev.jsonl", _arc_rows(24, 1))
    templates = [dataclasses.asdict(t) for t in BUILTIN_TASKS["arc_easy"].templates]
    templates.insert(1, {"name": "extra", "template": "Q: {question}\nA:"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": {"name": "arc_easy", "templates": templates}}))
    args = ["--model", str(model_dir("llama")), "--data-dir", str(data), "--config", "flap+recon", "--vary",
            "selection.ridge=1", "--set", "calibration.max_tokens=200", "--max-samples", "6", "--work",
            str(tmp_path / "runs"), "--quiet", "--hold-template", "science"]
    calibration_tune.main([*args, "--recipe", str(recipe), "--out-prefix", str(tmp_path / "with")])  # its task
    calibration_tune.main([*args, "--task", "arc_easy", "--out-prefix", str(tmp_path / "without")])
    with_rows, without_rows = (json.loads((tmp_path / f"{n}.json").read_text())["rows"] for n in ("with", "without"))
    assert "extra" in with_rows[1] and "extra" not in without_rows[1]
    assert with_rows[1]["folder"] != without_rows[1]["folder"]
    task = resolve_task(load_recipe(tmp_path / "runs" / with_rows[1]["folder"] / "recipe.yaml").task)
    assert [t.name for t in task.calibration_templates()] == ["qa", "extra", "answer"]
    assert "science" in [t.name for t in task.held_out_templates()]


def test_generic_text_probe_swaps_an_even_share_of_prompts_for_passages_from_the_second_half(tmp_path):
    from evaluation.generic_text_probe import GENERIC, wikitext_passages, with_generic
    from fnprune.data import Example

    words = " ".join(["word"] * 40)
    lines = [" = Heading = "] + [f"first {i} {words}" for i in range(10)] + ["short line"] * 2 + [
        f"second {i} {words}" for i in range(8)] + [" = = Sub = = "]
    (tmp_path / "wiki.test.raw").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    passages = wikitext_passages(tmp_path)  # a folder holding wiki.test.raw, as the perplexity check reads it
    assert passages and all(p.startswith("second") for p in passages)
    prompts = [Example(f"Review: t{i}", str(i % 2), (f"t{i}",), "review") for i in range(12)]
    out = with_generic(prompts, passages, 0.25, seed=0)
    swapped = [i for i, e in enumerate(out) if e.template == GENERIC]
    assert swapped == [3, 7, 11] and [out[i].label for i in swapped] == ["1", "1", "1"]
    assert all(out[i].prompt in passages and out[i].texts == (out[i].prompt,) for i in swapped)
    assert [e for i, e in enumerate(out) if i not in swapped] == [e for i, e in enumerate(prompts) if i not in swapped]
    assert with_generic(prompts, passages, 0.25, seed=0) == out and with_generic(prompts, passages, 0.0, 0) == prompts


def test_label_margin_scores_like_the_product_and_reads_the_ranking(model_dir, task_data, tmp_path):
    """Its accuracies are report.json's, dense and pruned, per template; AUC and the share answered label 1
    agree with the log-odds."""
    from evaluation import label_margin

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--keep", "0.5", "--num-samples", "24", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    prefix = tmp_path / "margin"
    label_margin.main(["--model", str(model_dir("llama")), "--pruned", str(out), "--out-prefix", str(prefix)])
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    report = {t["name"]: t for t in json.loads((out / "report.json").read_text())["templates"]}
    assert len(rows) == 2 * len(report)
    for r in rows:
        which = "dense" if r["model"] == "dense" else "pruned"
        name = r["template"].rstrip("*")
        assert r["accuracy"] == round(report[name][which], 4)
        assert r["template"].endswith("*") == report[name]["held_out"]
        assert 0 <= r["auc"] <= 1 and 0 <= r["label_1_share"] <= 1


def test_label_margin_rows_from_scores():
    import torch

    from evaluation.label_margin import margin_rows
    from fnprune.data import Example
    from fnprune.evaluate import EvalResult

    examples = [Example(f"t{i}", label, (f"t{i}",)) for i, label in enumerate("0011")]
    scores = torch.tensor([[0.0, -1.0], [0.0, -0.5], [0.0, -0.2], [0.0, 0.4]])  # log-odds -1, -0.5, -0.2, 0.4
    result = type("R", (), {"by_template": {"a": EvalResult(0.75, 4, 0.0, [], scores)}})()
    (row,) = margin_rows("m", result, {"a": examples}, held_out={"a"}, positive="1")
    assert row["template"] == "a*" and row["auc"] == 1.0  # ranked perfectly though 3 of 4 answers are label 0
    assert row["label_1_share"] == 0.25 and row["mean_log_odds"] == -0.325


def test_summary_averages_unrounded_percentages_and_a_task_without_held_out_templates_runs(tmp_path):
    """Rounding each run before averaging moved a three-seed mean by 0.1; a task with no held-out template
    crashed `row_of` (min of nothing) and would have shown its calibration mean as held out."""
    def report(pruned: float, held_out: bool = True) -> dict:
        templates = [{"name": "a", "held_out": held_out, "dense": 0.5, "pruned": pruned}]
        return {"metric": {"dense": 0.5, "pruned": pruned}, "parameters": {"ratio": 0.8}, "timings_seconds": {},
                "template_means": {"calibration": {"dense": 0.5, "pruned": pruned}}, "templates": templates}
    rows = [benchmark.row_of("c", 0.5, s, report(p)) for s, p in enumerate([0.2502, 0.2502, 0.2507])]
    assert [r["held_out_pct"] for r in rows] == [50.0, 50.0, 50.1]
    assert benchmark.summary(rows)[0]["held_out_pct"] == "50.1 (50.0..50.1)"  # 100 * 0.25037 / 0.5 = 50.07
    table = write_rows(tmp_path / "t", "cmd", rows)
    assert "_exact" not in table and "_exact" not in (tmp_path / "t.csv").read_text()
    calibration_only = benchmark.row_of("c", 0.5, 0, report(0.3, held_out=False))
    assert calibration_only["held_out_pct"] is None and calibration_only["calibration_pct"] == 60.0


def test_a_template_the_dense_model_scores_zero_on_gives_blank_percentages_not_a_crash(tmp_path):
    """A tiny model can score 0 on a wording: its "% of dense" is blank, and the summary and plot skip it."""
    def report(dense_held: float) -> dict:
        return {
            "metric": {"dense": dense_held, "pruned": 0.25}, "parameters": {"ratio": 0.8}, "timings_seconds": {},
            "template_means": {"calibration": {"dense": 0.5, "pruned": 0.4}},
            "templates": [{"name": "a", "held_out": True, "dense": dense_held, "pruned": 0.25},
                          {"name": "b", "held_out": False, "dense": 0.5, "pruned": 0.4}],
        }
    rows = [benchmark.row_of("default", 0.5, 0, report(0.0)), benchmark.row_of("default", 0.5, 5, report(0.5))]
    assert rows[0]["held_out_pct"] is None and rows[0]["worst_held_out_pct"] is None
    assert rows[0]["calibration_pct"] == 80.0 and rows[1]["held_out_pct"] == 50.0
    (entry,) = benchmark.summary(rows)
    assert entry["held_out_pct"] == "50.0" and entry["calibration_pct"] == "80.0 (80.0..80.0)"
    assert benchmark.summary(rows[:1])[0]["held_out_pct"] is None
    benchmark.plot_keeps(rows, tmp_path / "keeps.png", "sst2")
    assert (tmp_path / "keeps.png").stat().st_size > 0


def test_extra_questions_probe_adds_the_files_rows_after_the_splits_up_to_num_samples(task_data, tmp_path):
    from evaluation.extra_questions_probe import with_extra_rows
    from fnprune.data import resolve_task
    from fnprune.inputs import calibration_prompts
    from fnprune.recipe import CalibrationSpec, TaskSpec

    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    extra = tmp_path / "more.tsv"
    extra.write_text("sentence\tlabel\n" + "".join(f"an extra sentence {i}\t{i % 2}\n" for i in range(5)))
    own = calibration_prompts(task, CalibrationSpec(num_samples=40))
    assert len(own) == 40
    out = with_extra_rows(own, task, CalibrationSpec(num_samples=43), extra, calibration_prompts)
    assert out[:40] == own and len(out) == 43
    assert all(e.texts[0].startswith("an extra sentence") for e in out[40:])
    assert {e.template for e in out[40:]} <= {t.name for t in task.calibration_templates()} | {"(raw)"}
    assert len(with_extra_rows(own, task, CalibrationSpec(num_samples=99), extra, calibration_prompts)) == 45
    assert with_extra_rows(own, task, CalibrationSpec(num_samples=40), extra, calibration_prompts) == own


def test_extra_questions_probe_runs_the_product_with_the_files_rows_and_restores_it(model_dir, tmp_path):
    """`--vary calibration.num_samples=12,64` on a 12-question calibration half: none of the file's 10 rows, then
    all of them (report.json counts 22 calibration prompts); compress's own calibration_prompts is back after."""
    import fnprune.inputs
    from evaluation import extra_questions_probe
    from tests.test_tasks import _arc_rows, _write_jsonl

    data = tmp_path / "arc"
    _write_jsonl(data / "ARC-Easy-Dev.jsonl", _arc_rows(24, 1))
    other = [{**r, "question": {**r["question"], "stem": "other " + r["question"]["stem"]}} for r in _arc_rows(10, 7)]
    extra = _write_jsonl(tmp_path / "other.jsonl", other)
    product = fnprune.inputs.calibration_prompts
    prefix = tmp_path / "extra"
    extra_questions_probe.main(["--extra-file", str(extra), "--model", str(model_dir("llama")), "--task", "arc_easy",
                                "--data-dir", str(data), "--config", "flap+recon", "--vary",
                                "calibration.num_samples=12,64", "--set", "calibration.max_tokens=200",
                                "--max-samples", "6", "--work", str(tmp_path / "runs"), "--out-prefix", str(prefix),
                                "--quiet"])
    assert fnprune.inputs.calibration_prompts is product
    rows = json.loads(prefix.with_suffix(".json").read_text())
    assert rows["command"].startswith("python -m evaluation.extra_questions_probe --extra-file")
    samples = [json.loads((tmp_path / "runs" / r["folder"] / "report.json").read_text())["calibration"]["samples"]
               for r in rows["rows"][1:]]
    assert samples == [12, 22]


def test_a_finished_run_is_not_reused_after_its_model_data_or_probe_changed(tmp_path):
    """The run mark held the code and the recipe's text: labels flipped in the data file, weights replaced in place
    or an edited probe reused the old run's numbers."""
    import os

    from evaluation import benchmark
    from fnprune.recipe import recipe_from_dict

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev.tsv").write_text("sentence\tlabel\na\t0\n")
    recipe = recipe_from_dict({"model": {"name_or_path": str(tmp_path / "model")},
                               "task": {"name": "sst2", "data_dir": str(tmp_path / "data")}})
    first = benchmark.run_mark(recipe)
    assert benchmark.run_mark(recipe) == first
    os.utime(tmp_path / "data" / "dev.tsv", ns=(1, 1))  # the same size, another time: rewritten in place
    assert benchmark.run_mark(recipe) != first
    second = benchmark.run_mark(recipe)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weightz")
    assert benchmark.run_mark(recipe) != second
    third = benchmark.run_mark(recipe)
    benchmark.PROBE["probe"] = "abc"
    try:
        assert benchmark.run_mark(recipe) != third
    finally:
        benchmark.PROBE.clear()


def test_no_two_configurations_run_the_same_recipe():
    """The ablations pinned nothing of the default they were measured against (fn-task): once the default became
    FLAP, `n256` ran what `flap+recon-n256` runs, `no-recon` what `flap` runs, `recover` what `flap+recon+recover`
    runs, and `relevance-pooled` read no networks. With auto's resolution filled in, every configuration is its
    own recipe."""
    from evaluation.benchmark import CONFIGS

    auto = {"selection.method": "flap", "calibration.raw_share": 0.5, "selection.reconstruct": True,
            "recovery.enabled": False}
    resolved = {name: json.dumps({**auto, **c}, sort_keys=True) for name, c in CONFIGS.items() if name != "default"}
    same = [(a, b) for a in resolved for b in resolved if a < b and resolved[a] == resolved[b]]
    assert not same
    assert CONFIGS["relevance-pooled"]["selection.method"] == "fn-task"  # the relevance it changes is fn-task's


def test_recovery_tune_builds_each_rows_teacher_and_leaves_the_evaluation_split_out(model_dir, tmp_path, monkeypatch):
    """`--set label_target=own,consensus` trained both rows toward one teacher (the checkpoint's settings) and gave
    identical rows; its calibration and tuning prompts took train rows that are also evaluation rows, which
    compress leaves out."""
    import tiny

    import fnprune.recovery
    from evaluation import recovery_tune

    data = tiny.make_task_data(tmp_path / "sst2", n_train=96, n_dev=24)
    train = (data / "train.tsv").read_text().splitlines()
    with (data / "dev.tsv").open("a") as dev:  # 8 train rows are evaluation rows too
        dev.write("".join(line + "\n" for line in train[1:9]))
    evaluation_rows = {(line.split("\t")[0],) for line in (data / "dev.tsv").read_text().splitlines()[1:]}
    out = tmp_path / "pruned"
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(data), "--keep", "0.5",
        "--num-samples", "48", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    calls, prompts = [], []
    real_teacher, real_inputs = fnprune.recovery.teacher, fnprune.recovery.recovery_inputs
    monkeypatch.setattr(fnprune.recovery, "teacher", lambda *a, **k: calls.append(a[3].recovery) or real_teacher(
        *a, **k))
    monkeypatch.setattr(fnprune.recovery, "recovery_inputs", lambda tok, m, examples, r: prompts.append(
        examples) or real_inputs(tok, m, examples, r))
    prefix = tmp_path / "tune"
    recovery_tune.main(["--model", str(model_dir("llama")), "--pruned", str(out), "--set", "label_target=own,consensus",
                        "--set", "steps=2", "--tune-prompts", "8", "--out-prefix", str(prefix)])
    assert [(c.label_target, c.enabled) for c in calls] == [("own", True), ("consensus", True)]
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert [r["setting"] for r in rows[1:]] == ["label_target=own, steps=2", "label_target=consensus, steps=2"]
    assert rows[1]["loss_last"] != rows[2]["loss_last"]  # another teacher, another training
    assert prompts and all(not ({e.texts for e in examples} & evaluation_rows) for examples in prompts)
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["samples"] == len(prompts[0]) == 48  # each teacher's, then tuning and training
    assert [len(examples) for examples in prompts[1:]] == [48, 8, 48]


def test_bench_speed_and_bench_ica_draw_compress_prompts_leaving_the_evaluation_split_out(model_dir, tmp_path,
                                                                                         monkeypatch):
    """bench_speed's forward-only yardstick and bench_ica's capture drew their prompts without leaving out the
    train rows that are also evaluation rows, as compress does: other prompts than compress's."""
    import tiny

    from evaluation import bench_ica, bench_speed
    from fnprune import calibration

    data = tiny.make_task_data(tmp_path / "sst2", n_train=40, n_dev=8)
    train = (data / "train.tsv").read_text().splitlines()
    with (data / "dev.tsv").open("a") as dev:  # 8 train rows are evaluation rows too: compress calibrates on 32
        dev.write("".join(line + "\n" for line in train[1:9]))
    recipe = {"model": {"name_or_path": str(model_dir("llama"))}, "task": {"name": "sst2", "data_dir": str(data)},
              "calibration": {"cache": False, "num_samples": 40}, "evaluation": {"enabled": False}}
    assert bench_speed.run_script(bench_speed.FORWARD_ONLY, recipe)["prompts"] == 32
    seen = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda m, t, examples, *a, **k: seen.append(examples) or real(
        m, t, examples, *a, **k))
    monkeypatch.setattr(bench_ica, "MODEL", model_dir("llama"))
    monkeypatch.setattr(bench_ica, "DATA", data)
    bench_ica.capture_tokens(40, 64, 0)
    assert len(seen[0]) == 32
