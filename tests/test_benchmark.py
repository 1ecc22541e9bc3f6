"""The benchmark runs the product: its numbers are the CLI's for the same recipe."""

from __future__ import annotations

import json

from click.testing import CliRunner

from evaluation import benchmark
from fnprune.cli import main


def test_benchmark_rows_equal_the_cli_on_the_same_recipe(model_dir, task_data, tmp_path):
    prefix = tmp_path / "bench"
    args = ["--model", str(model_dir("llama")), "--data-dir", str(task_data), "--keeps", "0.5",
            "--configs", "flap+recon", "--num-samples", "24", "--work", str(tmp_path / "runs"),
            "--out-prefix", str(prefix), "--quiet"]
    benchmark.main(args)
    row = json.loads(prefix.with_suffix(".json").read_text())["rows"][0]
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--keep", "0.5", "--method", "flap", "--num-samples", "24", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert row["held_out_pruned"] == round(report["metric"]["pruned"], 4)
    assert row["calibration_pruned"] == round(report["template_means"]["calibration"]["pruned"], 4)
    assert row["params"] == report["parameters"]["ratio"]
    rerun = benchmark.run_one(benchmark.main.__globals__["argparse"].Namespace(
        model=str(model_dir("llama")), data_dir=str(task_data), task="sst2", num_samples=24,
        work=str(tmp_path / "runs"), quiet=True), "flap+recon", 0.5, 0)
    assert rerun == row  # a finished run is read back, not run again
