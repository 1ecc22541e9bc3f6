"""`fnprune analyze`: files written, per-layer masking, replayed scoring, IoU matching, CLI and bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fnprune import analysis as an
from fnprune.analysis import scoring
from fnprune.arch import get_module, layer_blocks, layout_for
from fnprune.cli import main
from fnprune.data import Example, load_split, resolve_task
from fnprune.evaluate import evaluate_accuracy
from fnprune.models import load_model
from fnprune.recipe import ModelSpec, TaskSpec

SMALL = dict(num_samples=40, max_tokens=300, components=8, group_tokens=300, recurrence_groups=3, group_size=4,
             top_networks=2, control_networks=1, seeds=2, scales=(0.0, 2.0), group_mask=2, eval_samples=32)
CLI_SMALL = ["--num-samples", "40", "--max-tokens", "300", "--components", "8", "--group-tokens", "300",
             "--recurrence-groups", "2", "--group-size", "4", "--top-networks", "1", "--control-networks", "1",
             "--seeds", "1", "--scales", "0,2", "--group-mask", "1", "--eval-samples", "16", "--quiet"]


def _spec(model_dir, task_data, out: Path, **kw) -> an.AnalysisSpec:
    return an.AnalysisSpec.from_settings(model=ModelSpec(name_or_path=str(model_dir("llama"))),
                                         task=TaskSpec(name="sst2", data_dir=str(task_data)), output=str(out),
                                         **{**SMALL, **kw})


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def analysis(model_dir, task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "report"
    cola = out.parent / "cola"  # a second task for the recurrence experiment: CoLA's layout, tiny sentences
    cola.mkdir()
    rows = (task_data / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    (cola / "in_domain_train.tsv").write_text("".join(f"gj04\t{r.split(chr(9))[1]}\t\t{r.split(chr(9))[0]}\n"
                                                      for r in rows), encoding="utf-8")
    spec = _spec(model_dir, task_data, out, also_tasks=[TaskSpec(name="cola", data_dir=str(cola))])
    return an.analyze(spec, progress=False), out


def test_api_writes_report_figures_and_csvs(analysis):
    result, out = analysis
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "summary.json", *an.FIGURES.values()} <= names
    for table in ("layer_networks", "layer_summary", "group_networks", "group_network_layers", "group_network_map",
                  "layer_relevance_grid", "recurrence", "recurrence_groups", "key_networks", "key_networks_seeds",
                  "group_mask", "amplification", "amplification_summary"):
        assert f"{table}.csv" in names and _rows(out / f"{table}.csv"), table
    for png in an.FIGURES.values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for section in ("## 1. Networks", "## 2. Recurrence", "## 3. Key networks", "## 4. Amplification",
                    "fnprune analyze --task sst2"):
        assert section in report
    for png in an.FIGURES.values():
        assert f"]({png})" in report
    assert not list(out.parent.glob(".*partial"))  # the temp dir was renamed into place

    # one ICA per layer (compress pools several runs, whose networks repeat one another): k networks per layer
    assert [int(r["networks"]) for r in _rows(out / "layer_summary.csv")] == [SMALL["components"]] * 2
    key = _rows(out / "key_networks.csv")
    assert [r["kind"] for r in key] == ["top", "top", "control"]
    assert all(r["masking_verified"] == "True" for r in key)
    assert len(_rows(out / "key_networks_seeds.csv")) == 3 * 2
    # the relevance ranking is the pipeline's: top networks are the two most relevant per-layer networks
    rel = sorted((float(r["relevance"]) for r in _rows(out / "layer_networks.csv") if int(r["size"]) > 0),
                 reverse=True)
    assert [float(r["relevance"]) for r in key[:2]] == pytest.approx(rel[:2], abs=1e-4)
    dense = result.info["dense_accuracy"]
    for r in key:
        assert float(r["fn_drop"]) == pytest.approx(dense - float(r["masked_fn_acc"]), abs=1e-3)
    # amplification at factor 0 is the masked result
    amp = {(r["network"], float(r["scale"])): r for r in _rows(out / "amplification.csv") if r["target"] == "network"}
    for r in key:
        assert float(amp[(r["network"], 0.0)]["accuracy"]) == pytest.approx(float(r["masked_fn_acc"]), abs=1e-4)
    # recurrence ran for both tasks given
    tasks = {r["task"] for r in _rows(out / "recurrence.csv")}
    assert tasks == {"sst2", "cola"} and len(_rows(out / "recurrence_groups.csv")) == 2 * 3 * 8
    # the evaluation examples are from the validation split, disjoint from calibration
    assert result.info["evaluation"]["split"] == "validation" and result.info["calibration"]["split"] == "train"


def _record_down_inputs(model, run) -> list[torch.Tensor]:
    layout = layout_for(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [get_module(b, layout.output).register_forward_hook(
        lambda m, args, out, i=i: seen.__setitem__(i, args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
        for i, b in enumerate(layer_blocks(model, layout))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in sorted(seen)]


def test_write_report_names_its_own_folder_in_the_command(analysis, tmp_path):
    result, _ = analysis
    again = an.write_report(dataclasses.replace(result, spec=dataclasses.replace(result.spec, output="")),
                            tmp_path / "again")
    command = json.loads((again / "summary.json").read_text())["command"]
    assert command.endswith(f"--output {tmp_path / 'again'}"), command


def test_masking_zeroes_exactly_the_network_in_its_layer(model_dir, task_data):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    examples = load_split(task, "validation")[:8]
    scorer = an.Scorer(model, tok, examples, task.label_words, batch_size=4)
    members = np.array([3, 17, 64, 100, 127])
    dense = _record_down_inputs(model, lambda: scorer.scores(None))
    masked = _record_down_inputs(model, lambda: scorer.scores({1: (members, 0.0)}))
    assert torch.equal(masked[0], dense[0])  # layer before: untouched
    assert (masked[1][:, members] == 0).all() and (dense[1][:, members] != 0).any()
    rest = np.setdiff1d(np.arange(128), members)
    assert torch.equal(masked[1][:, rest], dense[1][:, rest])  # only the network's neurons changed
    # in layer 0 (which feeds everything after it): exactly its members are zero, layer 1 has no forced zeros
    m0 = _record_down_inputs(model, lambda: scorer.scores({0: (members, 0.0)}))
    assert (m0[0][:, members] == 0).all() and torch.equal(m0[0][:, rest], dense[0][:, rest])
    assert not (m0[1] == 0).all(0).any()
    # scaling multiplies exactly those neurons
    scaled = _record_down_inputs(model, lambda: scorer.scores({1: (members, 2.0)}))
    assert torch.allclose(scaled[1][:, members], 2 * dense[1][:, members])
    assert torch.equal(scaled[1][:, rest], dense[1][:, rest])
    assert an.verify_masking(model, tok, examples[:3], {1: members, 0: members[:2]})["ok"]


def test_verify_masking_catches_a_late_bound_mask(model_dir, task_data, monkeypatch):
    """The reference code's bug (every layer got the last layer's mask) must not pass the check."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    real = scoring.masked_neurons

    def buggy(model, layout, keep, fill=None, scale=None):
        return real(model, layout, [keep[-1]] * len(keep), fill, scale)

    monkeypatch.setattr(scoring, "masked_neurons", buggy)
    one = Example("Review: a fine film\nSentiment:", "1", ("a fine film",))
    check = an.verify_masking(model, tok, [one], {1: np.array([1, 2, 3])})
    assert not check["ok"] and any("layer 0" in p for p in check["problems"])


def test_replayed_scores_equal_full_passes(model_dir, task_data):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    examples = load_split(task, "validation")
    scorer = an.Scorer(model, tok, examples, task.label_words, batch_size=8)
    dense = scorer.prepare({1})
    assert scorer.replay_ok == {1: True}
    ref = evaluate_accuracy(model, tok, examples, task.label_words, 8, progress=False)
    np.testing.assert_allclose(dense, ref.scores.numpy(), atol=1e-5)
    change = {1: (np.array([5, 6, 7, 50]), 0.0)}
    replayed = scorer.scores(change)
    scorer.replay_ok = {}
    full = scorer.scores(change)
    np.testing.assert_allclose(replayed, full, atol=1e-5)
    assert not np.allclose(full, dense)


def test_iou_matching_on_planted_maps():
    d = 1000
    templates = np.zeros((3, d), dtype=bool)
    templates[0, :50] = True
    templates[1, 100:120] = True
    templates[2, 500:600] = True
    maps = np.zeros((4, d), dtype=bool)
    maps[0, 10:60] = True  # template 0: 40 shared / 60 union
    maps[1, 500:510] = True  # template 2: 10 / 100
    maps[2, 900:950] = True  # matches nothing
    iou = an.iou_matrix(templates, maps)
    assert iou[0, 0] == pytest.approx(40 / 60) and iou[2, 1] == pytest.approx(0.1) and iou[:, 2].max() == 0
    assert iou[:, 3].max() == 0  # an empty map
    best, hit = an.match_templates(templates, maps, 0.2)
    assert best == pytest.approx([40 / 60, 0, 0.1]) and hit.tolist() == [True, False, False]
    best, hit = an.match_templates(templates, maps[:0], 0.2)
    assert not hit.any()
    shuffled = an.shuffle_within_layers(templates, [400, 600], np.random.default_rng(0))
    assert (shuffled[:, :400].sum(1) == templates[:, :400].sum(1)).all()
    assert (shuffled[:, 400:].sum(1) == templates[:, 400:].sum(1)).all()
    assert not (shuffled == templates).all()


@pytest.mark.parametrize("n_tokens", [200, 700])  # neurons > tokens (token Gram path), neurons <= tokens
def test_spatial_ica_recovers_planted_networks(n_tokens):
    rng = np.random.default_rng(0)
    d, k = 600, 5
    planted = np.zeros((k, d), dtype=bool)
    for j in range(k):
        planted[j, rng.choice(d, 20, replace=False)] = True
    courses = rng.laplace(size=(k, n_tokens))
    x = (planted.T * rng.uniform(2, 4, size=(d, 1))) @ courses + 0.3 * rng.normal(size=(d, n_tokens))
    nets = an.spatial_ica(x.T, k, 3.0, seed=0)
    best, hit = an.match_templates(planted, nets.members, 0.2)
    assert hit.all() and best.min() > 0.6, best


def test_cli_end_to_end_and_existing_output(model_dir, task_data, tmp_path):
    out = tmp_path / "a"
    args = ["analyze", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
            "--output", str(out), *CLI_SMALL]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "dense accuracy" in result.output and (out / "report.md").is_file()
    assert "--top-networks 1" in (out / "report.md").read_text()
    assert "(one seed)" in result.output and "+- 0.0000" not in result.output  # --seeds 1: no spread to show
    assert {r["random_acc_std"] for r in _rows(out / "key_networks.csv")} == {""}
    before = (out / "report.md").stat().st_mtime_ns
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "already exists" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output and (out / "report.md").stat().st_mtime_ns == before
    cheap = ["--recurrence-groups", "0", "--group-mask", "0", "--seeds", "1", "--scales", "0", "--eval-samples", "8"]
    result = CliRunner().invoke(main, [*args, *cheap, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "--recurrence-groups 0" in (out / "report.md").read_text()


@pytest.mark.parametrize("bad, message", [
    (["--scales", "0,x"], "--scales"),
    (["--also-task", ":foo"], "--also-task"),
    (["--also-task", "sst2:{data}"], "also_tasks: each must be a task other than --task"),
    (["--eval-samples", "0"], "eval_samples"),
    (["--eval-samples", "1"], "eval_samples: must be >= 2"),
    (["--iou", "1.5"], "iou_threshold"),
    (["--scales", "0,nan"], "scales"),
    (["--scales", "inf"], "scales"),
    (["--scales", "1"], "scales: 1 leaves a network as it is"),
    (["--scales", "0,0,2"], "scales: each factor once"),
    (["--scales", ""], "--scales '': expected numbers"),
    (["--group-tokens", "8", "--components", "8"], "group_tokens: must be above components (8)"),
])
def test_cli_bad_input(model_dir, task_data, tmp_path, bad, message):
    args = ["analyze", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
            "--output", str(tmp_path / "x"), "--quiet", *(b.format(data=task_data) for b in bad)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_report_states_per_layer_widths_and_the_groups_that_ran():
    """A per-layer checkpoint's widths are stated as a range (not layer 0's width times the layers), and the
    recurrence text gives the groups each task ran, fewer than asked when its held-out examples ran out."""
    from fnprune.analysis.report import _groups_run, _widths_text

    assert _widths_text({"layers": 2, "mlp_widths": [66, 62], "mlp_width": None}) == "2 layers of 62..66 MLP neurons"
    assert _widths_text({"layers": 2, "mlp_widths": [64, 64], "mlp_width": 64}) == "2 layers x 64 MLP neurons"
    assert _groups_run([{"task": "sst2", "groups": 6}, {"task": "sst2", "groups": 6}]) == "6"
    assert _groups_run([{"task": "sst2", "groups": 6}, {"task": "cola", "groups": 12}]) == "6 (sst2), 12 (cola)"


def test_task_arg_parsing():
    assert an.task_from_arg("ag_news").data_dir is None
    assert an.task_from_arg("sst2:/d").data_dir == "/d"
    t = an.task_from_arg("ag_news:train=/a.csv,test=/b.csv")
    assert t.data_files == {"train": "/a.csv", "test": "/b.csv"}
    spec = an.AnalysisSpec(model=ModelSpec(name_or_path="m"), task=TaskSpec(name="sst2", data_dir="/d"),
                           also_tasks=[t], top_networks=3, scales=(0.0, 2.0), output="o")
    cmd = an.spec_command(spec)
    assert "--also-task ag_news:train=/a.csv,test=/b.csv" in cmd and "--top-networks 3" in cmd
    assert "--scales 0,2" in cmd and "--data-dir /d" in cmd


def test_empty_networks_sort_after_the_ranked_ones():
    from fnprune.analysis.experiments import by_rank

    rows = [{"relevance_rank": ""}, {"relevance_rank": 2}, {"relevance_rank": 1}]
    assert [r["relevance_rank"] for r in sorted(rows, key=by_rank)] == [1, 2, ""]


def test_verify_masking_accepts_relu_zeros_in_later_layers(model_dir, task_data, monkeypatch):
    """OPT's ReLU neurons of layer 1 can be zero on every prompt once layer 0 is masked: the earlier masking's
    doing, not the hooks'. The check passes such masks, and still catches hooks that zero one neuron too many in
    a later masked layer."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("opt"))))
    task = resolve_task(TaskSpec(name="sst2", data_dir=str(task_data)))
    prompts = load_split(task, "validation")[:4]
    rng = np.random.default_rng(0)
    for size in (4, 16, 32, 64, 64, 64):
        check = an.verify_masking(model, tok, prompts, {0: np.sort(rng.choice(128, size, replace=False))})
        assert check["ok"], check["problems"]
    real = scoring.masked_neurons

    def one_too_many(model, layout, keep, fill=None, scale=None):
        return real(model, layout, [keep[0], keep[1][1:]], fill, scale)  # layer 1 loses a kept neuron too

    monkeypatch.setattr(scoring, "masked_neurons", one_too_many)
    check = an.verify_masking(model, tok, prompts, {0: np.array([1, 2]), 1: np.array([5, 6])})
    assert not check["ok"] and any("layer 1" in p and "outside the network" in p for p in check["problems"])


def _with_dead_neurons(model_dir, dest: Path) -> Path:
    """The tiny llama with every even MLP neuron dead (its up_proj row zero: SiLU(gate) * 0), as ReLU models
    and padded checkpoints have them."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[::2] = 0
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def test_random_controls_are_live_neurons(model_dir, task_data, tmp_path, monkeypatch):
    """Networks hold live neurons only, so the random controls must too (a dead one masks nothing), and the
    neurons counted are the live ones."""
    dead_model = _with_dead_neurons(model_dir, tmp_path / "dead")
    masked: list[np.ndarray] = []
    real = an.Scorer.scores

    def recording(self, changes=None):
        masked.extend(idx for idx, _ in (changes or {}).values())
        return real(self, changes)

    monkeypatch.setattr(an.Scorer, "scores", recording)
    spec = dataclasses.replace(_spec(model_dir, task_data, tmp_path / "out", recurrence_groups=0, seeds=3,
                                     top_networks=3, control_networks=2, group_mask=3),
                               model=ModelSpec(name_or_path=str(dead_model)))
    result = an.run_analysis(spec, progress=False)
    assert len(masked) > 10 and all((idx % 2 == 1).all() for idx in masked), masked
    assert [int(x.sum()) for x in an.experiments.live_neurons(result.calibration)] == [64, 64]
    assert result.info["live_neurons"] == 128 and result.info["mlp_neurons"] == 256
    for row in result.tables["layer_summary"]:
        assert row["union_size"] > 0 and row["union_fraction"] == round(row["union_size"] / 64, 4), row
    g = result.tables["group_mask"][0]
    assert g["fraction_of_live_neurons"] == pytest.approx(g["neurons"] / 128, abs=1e-5)


def test_encoder_models_are_scored_by_their_head(model_dir, task_data, tmp_path):
    """BERT (which compress prunes) is analyzed end to end, scored by its classifier head as evaluate scores it;
    recurrence and the masking check feed it what calibration does (the raw text, cut to its positions)."""
    spec = dataclasses.replace(_spec(model_dir, task_data, tmp_path / "out", recurrence_groups=2, seeds=1),
                               model=ModelSpec(name_or_path=str(model_dir("bert"))))
    result = an.run_analysis(spec, progress=False)
    assert result.info["scoring"] == "classifier head" and result.tables["recurrence"]
    assert all(r["masking_verified"] for r in result.tables["key_networks"])
    model, tok = load_model(spec.model)
    task = resolve_task(spec.task)
    scorer = an.Scorer(model, tok, load_split(task, "validation")[:16], task.label_words)
    ref = evaluate_accuracy(model, tok, scorer.examples, task.label_words, progress=False)
    np.testing.assert_allclose(scorer.prepare(set()), ref.scores.numpy(), atol=1e-6)
    text = "a great film " * 100  # past the tiny BERT's 130 positions
    long = [Example(f"Review: {text}\nSentiment:", "1", (text,))] * 8
    assert an.verify_masking(model, tok, long[:2], {0: np.array([1, 2])})["ok"]
    assert an.experiments.recurrence(model, tok, spec, result.group, [("long", long)], False)["recurrence"]


def test_a_smaller_random_control_is_recorded_and_warned(model_dir, task_data, tmp_path, caplog):
    """A network holding most of its layer leaves too few other neurons for a random control of its size: the
    control's actual size is in the tables and the report, with a warning, not passed off as the same size."""
    spec = _spec(model_dir, task_data, tmp_path / "out", threshold=0.3, group_mask=8, recurrence_groups=0, seeds=1,
                 scales=(0.0,))
    with caplog.at_level("WARNING", logger="fnprune"):
        result = an.analyze(spec, progress=False)
    key, group = result.tables["key_networks"], result.tables["group_mask"][0]
    for r in key:
        assert r["random_size"] == min(r["size"], 128 - r["size"]), r
    assert any(r["random_size"] < r["size"] for r in key) and group["random_neurons"] < group["neurons"]
    assert "random control masks" in caplog.text
    report = (tmp_path / "out" / "report.md").read_text()
    assert "random_size" in report and "Smaller controls" in report
    amp = result.tables["amplification_summary"]
    short_amp = any(r["random_size"] != "" and r["random_size"] < r["size"] for r in amp)
    assert ("Smaller controls" in report.split("## 4. Amplification")[1]) == short_amp


def test_output_appearing_mid_run_keeps_the_finished_analysis(model_dir, task_data, tmp_path, monkeypatch):
    """As compress: the output is checked before the work; one that appears afterwards is left alone and the
    finished report is kept beside it, named in the error, not thrown away."""
    import os

    from fnprune.analysis import run
    from fnprune.errors import OutputError

    out = tmp_path / "out"
    amplification = run.amplification

    def appear_then_amplify(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return amplification(*args, **kwargs)

    monkeypatch.setattr(run, "amplification", appear_then_amplify)
    spec = _spec(model_dir, task_data, out, recurrence_groups=0, seeds=1, scales=(0.0,), group_mask=0)
    with pytest.raises(OutputError, match="appeared while this run was writing it") as info:
        an.analyze(spec, progress=False)
    kept = tmp_path / f"out.fnprune-{os.getpid()}"
    assert str(kept) in str(info.value) and (kept / "report.md").is_file() and (kept / "summary.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


def test_command_keeps_both_data_dir_and_data_files():
    """--data-files may name some splits and --data-dir hold the rest: the rerun command gives both."""
    spec = an.AnalysisSpec(model=ModelSpec(name_or_path="m"), output="o",
                           task=TaskSpec(name="sst2", data_dir="/d", data_files={"validation": "/v.tsv"}))
    cmd = an.spec_command(spec)
    assert "--data-dir /d" in cmd and "--data-files validation=/v.tsv" in cmd


def test_calibration_settings_analyze_does_not_read_are_refused():
    from fnprune.errors import RecipeError

    spec = an.AnalysisSpec(model=ModelSpec(name_or_path="m"), task=TaskSpec(name="sst2"))
    spec.calibration.raw_share = 0.0
    with pytest.raises(RecipeError, match="calibration.raw_share: analyze does not read it"):
        spec.validate()


def test_command_reruns_remote_code_and_names_what_no_flag_sets():
    spec = an.AnalysisSpec(model=ModelSpec(name_or_path="m", trust_remote_code=True), output="o",
                           task=TaskSpec(name="sst2", data_dir="/d"))
    cmd = an.spec_command(spec)
    assert "--trust-remote-code" in cmd and "#" not in cmd
    spec = an.AnalysisSpec.from_settings(seed=3, model=ModelSpec(name_or_path="m", dtype="bfloat16"),
                                         task=TaskSpec(name="sst2"), eval_batch_size=8, output="o")
    spec.networks.seed = 5
    cmd = an.spec_command(spec)
    assert "--seed 3" in cmd and "--trust-remote-code" not in cmd
    assert cmd.endswith("# set from Python, no flag: networks.seed=5, eval_batch_size=8, model.dtype=bfloat16")


def test_command_names_task_settings_no_flag_sets():
    """Templates, label words or a split seed set on a TaskSpec from Python change what analyze measures; the
    report's command cannot rerun them, so its comment names them (scalars with their value)."""
    from fnprune.recipe import PromptTemplate

    task = TaskSpec(name="sst2", data_dir="/d", split_seed=2, label_words={"0": " bad", "1": " good"},
                    templates=[PromptTemplate(name="t", template="{sentence} ->")])
    spec = an.AnalysisSpec(model=ModelSpec(name_or_path="m"), task=task, output="o",
                           also_tasks=[TaskSpec(name="ag_news", template="{text}:")])
    cmd = an.spec_command(spec)
    assert cmd.endswith("# set from Python, no flag: task.templates, task.label_words, task.split_seed=2, "
                        "also_tasks[0].template")
    plain = an.AnalysisSpec(model=ModelSpec(name_or_path="m"), task=TaskSpec(name="sst2", data_dir="/d"),
                            also_tasks=[TaskSpec(name="ag_news", data_files={"train": "/a.csv"})], output="o")
    assert "#" not in an.spec_command(plain)


def test_an_evaluation_split_of_one_example_is_refused(model_dir, task_data, tmp_path):
    """Two halves need two examples: one gives NaN accuracies; refused in one line before the work."""
    from fnprune.errors import DataError

    one = tmp_path / "dev.tsv"
    one.write_text("sentence\tlabel\n" + (task_data / "dev.tsv").read_text().splitlines()[1] + "\n")
    spec = _spec(model_dir, task_data, tmp_path / "out", eval_samples=5)
    spec.task = TaskSpec(name="sst2", data_dir=str(task_data), data_files={"validation": str(one)})
    with pytest.raises(DataError, match="needs at least 2"):
        an.analyze(spec, progress=False)
    assert not (tmp_path / "out").exists()


def test_summary_holds_the_wall_time_the_api_returns(analysis):
    result, out = analysis
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] == result.info["wall_seconds"] > 0


@pytest.mark.parametrize("extra, said, unsaid", [
    (["--task", "ag_news", "--data-dir", "{ag}"], "give the train file with --data-files train=FILE",
     ["compress", "split_of"]),
    (["--task", "sst2", "--data-dir", "{sst2}", "--also-task", "ag_news:{ag}"],
     "give the train file with --also-task ag_news:train=FILE", ["--data-files", "compress"]),
    (["--task", "sst2", "--data-dir", "{sst2}", "--seed", "-1"],
     "2**32 - 1 - 11 (it seeds 12 ICAs, one per recurrence group", ["runs"]),
])
def test_bad_input_messages_name_analyze_flags(model_dir, task_data, tmp_path, extra, said, unsaid):
    """A missing split file is given with analyze's flags (no recipe, NAME:SPLIT=PATH for --also-task), and the
    seed's range says the recurrence groups take the seeds, not runs."""
    ag = tmp_path / "ag"
    ag.mkdir()
    (ag / "test.csv").write_text("label,title,description\n1,Rain,It rains.\n2,Goal,A late goal.\n")
    args = ["analyze", "--model", str(model_dir("llama")), "--output", str(tmp_path / "x"), "--quiet",
            *(a.format(ag=ag, sst2=task_data) for a in extra)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and said in result.output and "Traceback" not in result.output, result.output
    assert not any(word in result.output for word in unsaid), result.output


def test_excess_interval_resamples_the_examples_and_the_random_draws():
    """With every draw alike it is the paired bootstrap over examples; with draws that disagree it carries their
    spread: one low draw out of three cannot make a network "better than random neurons"."""
    from fnprune.analysis.experiments import _excess_interval

    rng = np.random.default_rng(0)
    c_fn = rng.random(300) < 0.6
    alike = [rng.random(300) < 0.7] * 3
    diff = alike[0] - c_fn.astype(float)
    lo, hi = _excess_interval(c_fn, alike, 5)
    means = diff[rng.integers(0, 300, size=(100_000, 300))].mean(1)  # the direct bootstrap, many resamples
    assert lo < diff.mean() < hi
    assert [lo, hi] == pytest.approx(np.percentile(means, [2.5, 97.5]), abs=0.006)
    same = c_fn.copy()
    low = same.copy()
    low[np.flatnonzero(same)[:40]] = False  # 40 of the ~180 right answers lost: one unlucky draw
    draws = [same, same, low]
    fixed = (np.mean(draws, axis=0) - c_fn)[rng.integers(0, 300, size=(20_000, 300))].mean(1)
    assert np.percentile(fixed, 97.5) < 0  # the draws held fixed: "measurably better than random neurons"
    lo, hi = _excess_interval(c_fn, draws, 5)
    assert lo < 0 <= hi  # the draws resampled too: within their spread


def test_stages_are_timed_by_the_pipelines_timer(model_dir, task_data, tmp_path, monkeypatch):
    """One stage timer for compress and analyze (pipeline.StageTimer): analyze's timings are its stages'."""
    from fnprune.analysis import run
    from fnprune.pipeline import StageTimer

    timers: list[StageTimer] = []

    class Recording(StageTimer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            timers.append(self)

    monkeypatch.setattr(run, "StageTimer", Recording)
    spec = _spec(model_dir, task_data, tmp_path / "out", recurrence_groups=0, seeds=1, scales=(0.0,), group_mask=0)
    result = an.run_analysis(spec, progress=False)
    assert len(timers) == 1 and result.info["timings_seconds"] is timers[0].seconds
    assert list(timers[0].seconds) == ["load", "calibration + per-layer ICA", "group ICA", "recurrence",
                                       "dense evaluation", "key networks", "group masking", "amplification"]


def test_rows_in_both_files_stay_evaluation_rows_as_compress_keeps_them(model_dir, task_data, tmp_path, caplog):
    """CoLA's train and dev share six sentences: analyze refused most seeds' samples; now, as compress, those rows
    are left out of the calibration (said), never refused."""
    from fnprune.analysis.run import _load_data

    data = tmp_path / "data"
    data.mkdir()
    train = (task_data / "train.tsv").read_text(encoding="utf-8").splitlines()
    dev = (task_data / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (data / "train.tsv").write_text("\n".join(train + dev[1:4]) + "\n", encoding="utf-8")  # 3 dev rows in train
    (data / "dev.tsv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="fnprune"):
        loaded = _load_data(_spec(model_dir, data, tmp_path / "out", num_samples=1000))
    assert "3 row(s) of the 'train' split also appear in the evaluation split" in caplog.text
    assert len(loaded.calibration) == len(train) - 1  # every train row but the shared ones (header aside)
    shared = {line.split("\t")[0] for line in dev[1:4]}
    assert not shared & {t for e in loaded.calibration for t in e.texts}


def test_an_interrupted_analysis_resumes_from_its_last_finished_run(model_dir, task_data, tmp_path, monkeypatch):
    """Each intervention's scores are saved as it finishes: the same analysis run again after a Ctrl-C reads
    those back (only the rest are computed) and gives an uninterrupted run's tables; another evaluation sample
    reuses none of them, and --no-cache saves none."""
    real, computed = an.Scorer._intervention, []

    def counting(stop_after: int | None):
        def intervention(self, changes):
            if changes and len(computed) == stop_after:
                raise KeyboardInterrupt
            computed.append(changes is not None)
            return real(self, changes)

        return intervention

    def run(spec, cache: str, stop_after: int | None = None):
        monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(tmp_path / cache))
        monkeypatch.setattr(an.Scorer, "_intervention", counting(stop_after))
        computed.clear()
        return an.run_analysis(spec, progress=False)

    spec = _spec(model_dir, task_data, tmp_path / "out", recurrence_groups=0)
    uncached = run(dataclasses.replace(spec, calibration=dataclasses.replace(spec.calibration, cache=False)), "a")
    runs = uncached.info["evaluation_runs"]
    assert len(computed) == runs - 1 and uncached.info["evaluation_runs_from_cache"] == 0  # the dense run: no changes
    assert not list((tmp_path / "a").glob("analysis-scores-*"))
    reference = run(spec, "b")
    distinct = len(computed)  # tiny networks: two random controls can be the same neuron, scored once
    assert reference.info["evaluation_runs_from_cache"] == runs - 1 - distinct

    with pytest.raises(KeyboardInterrupt, match="scores of 5 evaluation runs are in the cache: the same command"):
        run(spec, "c", stop_after=5)
    resumed = run(spec, "c")
    assert len(computed) == distinct - 5 and resumed.info["evaluation_runs"] == runs
    assert resumed.info["evaluation_runs_from_cache"] == runs - 1 - distinct + 5
    for result in (reference, resumed):
        assert json.dumps(result.tables, sort_keys=True) == json.dumps(uncached.tables, sort_keys=True)

    other = dataclasses.replace(spec, eval_samples=24)
    assert run(other, "c").info["evaluation_runs_from_cache"] == run(other, "d").info["evaluation_runs_from_cache"]
    monkeypatch.setattr(scoring, "SCORES_REVISION", scoring.SCORES_REVISION + 1)  # scoring changed since
    monkeypatch.setattr(an.run, "SCORES_REVISION", scoring.SCORES_REVISION)
    # none of the old revision's scores read back: only what a fresh cache reuses within the run (two random
    # controls that are the same neurons, which depends on the networks this machine's ICA found)
    assert run(spec, "c").info["evaluation_runs_from_cache"] == reference.info["evaluation_runs_from_cache"]


def test_an_interrupt_counts_only_the_scores_the_cache_holds(tmp_path, monkeypatch):
    """A full disk keeps the last entry written: the interrupt says how many runs that holds, not how many ran."""
    from fnprune import cache
    from fnprune.analysis import run

    monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(tmp_path))
    saved = scoring.SavedScores("k")
    saved.put({0: (np.array([1]), 0.0)}, np.zeros((2, 2)))
    monkeypatch.setattr(cache, "save_analysis_scores", lambda key, scores: False)  # the disk is full from here
    saved.put({0: (np.array([2]), 0.0)}, np.zeros((2, 2)))
    scorer = type("S", (), {"saved_scores": saved})()
    said = run._interrupted(scorer, KeyboardInterrupt())
    assert len(saved.scores) == 2 and "the scores of 1 evaluation runs are in the cache" in str(said)
    assert len(scoring.SavedScores("k").scores) == 1


def test_two_runs_of_one_scores_key_keep_each_others_scores(tmp_path, monkeypatch):
    """Parallel runs sharing a key (a sweep over --top-networks) each rewrote the entry from their own memory."""
    monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(tmp_path))
    a, b = scoring.SavedScores("k"), scoring.SavedScores("k")
    for n in (1, 2, 3):
        a.put({0: (np.array([n]), 0.0)}, np.zeros((2, 2)))
    b.put({0: (np.array([9]), 0.0)}, np.ones((2, 2)))
    assert len(scoring.SavedScores("k").scores) == 4 and b.written == 4
