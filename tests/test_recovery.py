"""Recovery (distillation toward the dense model): the loss, the training loop, and compress with it."""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fnprune
from fnprune import distillation, interrupt, recovery
from fnprune.arch import layout_for
from fnprune.data import load_evaluation, load_sample, resolve_task
from fnprune.distillation import bucket_kl, recover, teacher_targets
from fnprune.errors import NumericalError, RecipeError
from fnprune.inputs import calibration_prompts
from fnprune.recipe import RecoverySpec, apply_overrides, recipe_from_dict
from fnprune.surgery import prune_mlp


def _recipe(model_path, data_dir, out, **recovery_fields):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_path)},
        "task": {"name": "sst2", "data_dir": str(data_dir)},
        "calibration": {"num_samples": 32, "max_tokens": 300, "batch_size": 8},
        "networks": {"components": 8},
        "selection": {"keep": 0.5, "refit": False},  # compared with streamed surgery, which has no refit
        "recovery": {"enabled": True, "epochs": 2, "lr": 1e-3, **recovery_fields},
        "evaluation": {"max_samples": 16},
        "output": {"dir": str(out)},
    })


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bucket_kl_is_the_exact_kl_with_the_whole_vocabulary_and_zero_at_the_teacher():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 11, generator=g).log_softmax(-1)
    student = torch.randn(5, 11, generator=g).log_softmax(-1)
    exact = (teacher.exp() * (teacher - student)).sum(-1)
    top, ids = teacher.topk(11, dim=-1)
    assert torch.allclose(bucket_kl(student, ids, top), exact, atol=1e-5)
    top3, ids3 = teacher.topk(3, dim=-1)
    coarse = bucket_kl(student, ids3, top3)
    assert (coarse >= -1e-6).all() and (coarse <= exact + 1e-5).all()  # coarsening never adds divergence
    assert bucket_kl(teacher, ids3, top3).abs().max() < 1e-5


@pytest.fixture(scope="module")
def pruned_llama(model_dir, tokenizer_dir, task_data):
    """(dense, pruned copy, prompts as token ids, teacher targets) on the tiny llama."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir("llama")).eval()
    task = resolve_task(fnprune.recipe.TaskSpec(name="sst2", data_dir=str(task_data)))
    seqs = [tok(e.prompt)["input_ids"] for e in load_sample(task, "train", 24, 0)]
    targets = teacher_targets(dense, seqs, 16, 8, progress=False)
    pruned = copy.deepcopy(dense)
    layout = layout_for(pruned)
    prune_mlp(pruned, layout, [torch.arange(0, 128, 2)] * 2, None, "uniform", None)
    return dense, pruned, seqs, targets


def _mean_kl(model, seqs, targets):
    with torch.no_grad():
        return float(distillation._loss(model, seqs, targets, list(range(len(seqs))), RecoverySpec(answer_weight=0.0)))


@pytest.mark.parametrize("params", ["mlp", "lora", "all"])
def test_recovery_lowers_the_divergence_and_keeps_the_shapes(pruned_llama, params):
    _, pruned, seqs, targets = pruned_llama
    student = copy.deepcopy(pruned)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    before = _mean_kl(student, seqs, targets)
    result = recover(student, layout_for(student), seqs, targets,
                     RecoverySpec(enabled=True, epochs=4, lr=3e-2 if params == "lora" else 3e-3, params=params),
                     progress=False)
    assert _mean_kl(student, seqs, targets) < 0.9 * before
    assert {k: v.shape for k, v in student.state_dict().items()} == shapes  # LoRA merged: same plain weights
    assert result.steps == 4 * 3 and result.trained_parameters > 0
    assert all(p.grad is None for p in student.parameters())
    if params == "mlp":  # attention and embeddings untouched
        for (name, a), b in zip(pruned.state_dict().items(), student.state_dict().values()):
            assert torch.equal(a, b) == ("mlp" not in name), name


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])  # Conv1D with GELU (a revived neuron fires); fused gate/up
@pytest.mark.parametrize("params", ["mlp", "lora"])
def test_recovery_keeps_a_padded_layouts_zero_neurons_zero(model_dir, tokenizer_dir, task_data, arch, params):
    """Padding neurons (all-zero weights) must stay zero: LoRA's B @ A spans the whole weight and revived them
    (GELU(0) has slope 1/2, so they fired), while the report counted them as removed."""
    from fnprune.arch import by_neuron, get_module, input_weights_by_neuron, layer_blocks

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir(arch)).eval()
    task = resolve_task(fnprune.recipe.TaskSpec(name="sst2", data_dir=str(task_data)))
    seqs = [tok(e.prompt)["input_ids"] for e in load_sample(task, "train", 12, 0)]
    targets = teacher_targets(dense, seqs, 16, 8, progress=False)
    student, layout = copy.deepcopy(dense), layout_for(dense)
    width = by_neuron(get_module(layer_blocks(dense, layout)[1], layout.output).weight, layout).shape[0]
    prune_mlp(student, layout, [torch.arange(width), torch.arange(width // 2)], None, "padded")
    recover(student, layout, seqs, targets, RecoverySpec(enabled=True, steps=6, lr=3e-2, params=params),
            progress=False)
    block = layer_blocks(student, layout)[1]
    assert not by_neuron(get_module(block, layout.output).weight.detach(), layout)[width // 2:].any()
    for path in layout.inputs:
        for half in input_weights_by_neuron(get_module(block, path), layout):
            assert not half[width // 2:].any() and half[: width // 2].any()


def test_recovered_model_reloads_with_the_same_logits(pruned_llama, tmp_path):
    _, pruned, seqs, targets = pruned_llama
    student = copy.deepcopy(pruned)
    recover(student, layout_for(student), seqs, targets, RecoverySpec(enabled=True, steps=4, lr=1e-2, params="lora"),
            progress=False)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([seqs[0]])
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reloaded(ids).logits, atol=1e-5)
        assert not torch.allclose(student(ids).logits, pruned(ids).logits, atol=1e-3)  # it did train


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: the float32 masters are resumed too
def test_recovery_is_deterministic_and_resumes_after_an_interrupt(pruned_llama, tmp_path, monkeypatch, dtype):
    _, pruned, seqs, targets = pruned_llama
    pruned = copy.deepcopy(pruned).to(dtype)
    spec = RecoverySpec(enabled=True, epochs=2, lr=1e-3)
    whole = copy.deepcopy(pruned)
    uninterrupted = recover(whole, layout_for(whole), seqs, targets, spec, progress=False)
    again = copy.deepcopy(pruned)
    recover(again, layout_for(again), seqs, targets, spec, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), again.state_dict().values()))

    calls = {"n": 0}

    class StopAfterTwoSteps:  # stands in for deferred_interrupt: "Ctrl-C" arrives during the third step
        def __init__(self, what):
            pass

        def __enter__(self):
            def interrupted():
                calls["n"] += 1
                return calls["n"] >= 3
            return interrupted

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(interrupt, "deferred_interrupt", StopAfterTwoSteps)
    stopped = copy.deepcopy(pruned)
    with pytest.raises(KeyboardInterrupt, match="continues from there"):
        recover(stopped, layout_for(stopped), seqs, targets, spec, progress=False, progress_dir=tmp_path)
    assert len(list(tmp_path.glob("recovery-*.partial.safetensors"))) == 1
    monkeypatch.undo()
    resumed = copy.deepcopy(pruned)
    result = recover(resumed, layout_for(resumed), seqs, targets, spec, progress=False, progress_dir=tmp_path)
    assert result.resumed_at == 3
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert not list(tmp_path.glob("recovery-*"))  # done: the progress file is gone
    # the report's losses cover every step, not only the resumed ones
    assert (result.loss_first, result.loss_last) == (uninterrupted.loss_first, uninterrupted.loss_last)


def test_recovery_stops_when_interrupted_at_its_last_step_and_the_rerun_finishes(pruned_llama, tmp_path,
                                                                                 monkeypatch):
    _, pruned, seqs, targets = pruned_llama
    spec = RecoverySpec(enabled=True, steps=2, lr=1e-3)
    whole = copy.deepcopy(pruned)
    uninterrupted = recover(whole, layout_for(whole), seqs, targets, spec, progress=False)
    calls = {"n": 0}

    @contextmanager
    def ctrl_c_during_the_last_step(what):
        def pressed():
            calls["n"] += 1
            return calls["n"] >= 2
        yield pressed

    monkeypatch.setattr(interrupt, "deferred_interrupt", ctrl_c_during_the_last_step)
    stopped = copy.deepcopy(pruned)
    with pytest.raises(KeyboardInterrupt, match=r"\(2 of 2 steps\); the same command continues"):
        recover(stopped, layout_for(stopped), seqs, targets, spec, progress=False, progress_dir=tmp_path)
    monkeypatch.undo()
    resumed = copy.deepcopy(pruned)
    result = recover(resumed, layout_for(resumed), seqs, targets, spec, progress=False, progress_dir=tmp_path)
    assert result.resumed_at == 2 and result.loss_last == uninterrupted.loss_last
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_recovery_goes_on_when_its_progress_cannot_be_saved_and_still_stops_on_ctrl_c(pruned_llama, tmp_path,
                                                                                    monkeypatch, caplog):
    _, pruned, seqs, targets = pruned_llama
    spec = RecoverySpec(enabled=True, steps=3, lr=1e-3)
    whole = copy.deepcopy(pruned)
    recover(whole, layout_for(whole), seqs, targets, spec, progress=False)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distillation, "_save_progress", full_disk)
    saved = copy.deepcopy(pruned)
    recover(saved, layout_for(saved), seqs, targets, spec, progress=False, progress_dir=tmp_path, save_every=0)
    assert "cannot save recovery progress" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), saved.state_dict().values()))

    @contextmanager
    def ctrl_c(what):
        yield lambda: True

    monkeypatch.setattr(interrupt, "deferred_interrupt", ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="stopped \\(1 of 3 steps\\); its progress could not be saved"):
        recover(copy.deepcopy(pruned), layout_for(pruned), seqs, targets, spec, progress=False, progress_dir=tmp_path)


def test_a_non_finite_recovery_loss_is_a_numerical_error(pruned_llama):
    _, pruned, seqs, targets = pruned_llama
    spec = RecoverySpec(enabled=True, steps=2, lr=1e30)
    model = copy.deepcopy(pruned)
    with pytest.raises(NumericalError, match="lower recovery.lr"):
        recover(model, layout_for(model), seqs, targets, spec, progress=False)


@pytest.fixture(scope="module")
def recovered_run(model_dir, task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("recovery") / "llama"
    return fnprune.compress(_recipe(model_dir("llama"), task_data, out), progress=False)


@pytest.mark.slow
def test_recovered_checkpoint_reloads_with_the_scores_of_the_report(recovered_run):
    out, report = recovered_run.output_dir, recovered_run.report
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    task = resolve_task(recovered_run.recipe.task)
    sets = {k: v[:16] for k, v in load_evaluation(task, "validation").items()}
    result = fnprune.evaluate.evaluate_templates(model, AutoTokenizer.from_pretrained(out), sets, task, progress=False)
    assert [r.accuracy for r in result.by_template.values()] == [t["pruned"] for t in report["templates"]]
    rec = report["recovery"]
    assert rec["steps"] == 2 * 4 and rec["settings"]["lr"] == 1e-3 and rec["seconds"] > 0
    assert rec["before"]["metric"]["pruned"] is not None and set(rec["before"]["templates"]) == set(result.by_template)
    assert {"teacher", "recover", "evaluate_recovered"} <= set(report["timings_seconds"])
    assert recovered_run.recipe.recovery.enabled
    card = (out / "README.md").read_text()
    assert "before recovery" in card.lower()


@pytest.mark.slow
def test_recovered_checkpoint_is_byte_identical_on_rerun(recovered_run, tmp_path):
    again = apply_overrides(recovered_run.recipe, {"output.dir": str(tmp_path / "again")})
    result = fnprune.compress(again, progress=False)
    assert _sha(result.output_dir / "model.safetensors") == _sha(recovered_run.output_dir / "model.safetensors")


@pytest.mark.slow
def test_evaluation_data_and_held_out_templates_never_reach_recovery(model_dir, task_data, tmp_path, monkeypatch,
                                                                     tokenizer_dir):
    """The teacher and the training loop see exactly the calibration prompts: none of the evaluation split's
    prompts under any template, none of the held-out templates' prompts of any split."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    recipe = _recipe(model_dir("llama"), task_data, tmp_path / "out")
    task = resolve_task(recipe.task)
    forbidden = {tuple(tok(e.prompt)["input_ids"]) for ex in load_evaluation(task, "validation").values() for e in ex}
    for t in task.held_out_templates():
        forbidden |= {tuple(tok(e.prompt)["input_ids"]) for e in load_evaluation(task, "train")[t.name]}
    seen: dict[str, set] = {"teacher": set(), "train": set()}
    real_teacher, real_recover = recovery.teacher_targets, recovery.recover

    def spy_teacher(model, seqs, *a, **kw):
        seen["teacher"] |= {tuple(s) for s in seqs}
        return real_teacher(model, seqs, *a, **kw)

    def spy_recover(model, layout, seqs, *a, **kw):
        seen["train"] |= {tuple(s) for s in seqs}
        return real_recover(model, layout, seqs, *a, **kw)

    monkeypatch.setattr(recovery, "teacher_targets", spy_teacher)
    monkeypatch.setattr(recovery, "recover", spy_recover)
    fnprune.compress(apply_overrides(recipe, {"calibration.cache": False}), progress=False)
    calibration = {tuple(tok(e.prompt)["input_ids"]) for e in calibration_prompts(task, recipe.calibration)}
    assert seen["teacher"] == seen["train"] == calibration
    assert not forbidden & seen["train"]


def test_a_run_stopped_while_scoring_the_recovered_model_keeps_the_training(model_dir, task_data, tmp_path,
                                                                            monkeypatch, isolated_cache, caplog):
    """Recovery's progress file outlives the training until the checkpoint is written: Ctrl-C while the recovered
    model is scored, and the rerun resumes at the last periodic save instead of training again; then it is
    gone."""
    import functools

    from fnprune import pipeline, recovery

    monkeypatch.setattr(recovery, "recover", functools.partial(recovery.recover, save_every=0.0))  # save each step
    recipe = _recipe(model_dir("llama"), task_data, tmp_path / "out", epochs=1, evaluate_before=False)
    trained = {"done": False}
    real_recover, real_score = pipeline.recover_model, pipeline._score
    monkeypatch.setattr(pipeline, "recover_model", lambda *a, **k: trained.update(done=True) or real_recover(*a, **k))

    def score(model, *args, **kwargs):
        if trained["done"]:
            raise KeyboardInterrupt
        return real_score(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_score", score)
    with pytest.raises(KeyboardInterrupt):
        fnprune.compress(recipe, progress=False)
    assert not (tmp_path / "out").exists() and len(list(isolated_cache.glob("recovery-*.partial.safetensors"))) == 1
    monkeypatch.setattr(pipeline, "_score", real_score)
    with caplog.at_level("INFO", logger="fnprune"):
        result = fnprune.compress(recipe, progress=False)
    # the last save: after step 1 at least (the saver then spaces its saves by ten times a save's duration)
    assert 1 <= result.report["recovery"]["resumed_at"] <= result.report["recovery"]["steps"] - 1
    assert "progress_file" not in result.report["recovery"]
    assert not list(isolated_cache.glob("recovery-*.partial.safetensors"))  # served: deleted with the output written


def test_recovery_settings_are_checked(tmp_path):
    base = {"model": {"name_or_path": "m"}, "task": {"name": "sst2"}, "output": {"dir": str(tmp_path)}}
    bad = recipe_from_dict({**base, "recovery": {"enabled": True, "lr": 0, "params": "head", "answer_weight": 2}})
    with pytest.raises(RecipeError) as err:
        bad.validate()
    assert "recovery.lr" in str(err.value) and "recovery.params" in str(err.value)
    infinite = recipe_from_dict({**base, "recovery": {"lr": float("inf"), "label_weight": float("inf")}})
    with pytest.raises(RecipeError, match="recovery.lr: must be a finite number > 0, got inf") as infinite_err:
        infinite.validate()
    assert "recovery.label_weight: must be a finite number >= 0" in str(infinite_err.value)
    assert "recovery.answer_weight" in str(err.value)
    streamed = recipe_from_dict({**base, "recovery": {"enabled": True}, "output": {"dir": "x", "streamed": True}})
    assert streamed.validate().streamed()  # trains the checkpoint streamed surgery wrote
    disk = recipe_from_dict({**base, "recovery": {"enabled": True},
                             "model": {"name_or_path": "m", "device_map": {"model.layers.1": "disk", "x": 0}}})
    with pytest.raises(RecipeError, match="disk offload"):
        disk.validate()
    assert json.loads(json.dumps(recipe_from_dict(base).to_dict()))["recovery"]["enabled"] == "auto"
    auto_disk = recipe_from_dict({**base, "model": disk.to_dict()["model"]})
    assert auto_disk.validate().recovery.enabled == "auto"  # auto is off with disk offload, not an error


@pytest.mark.slow
def test_cli_recover_flags_reach_the_run_and_the_summary(model_dir, task_data, tmp_path):
    from click.testing import CliRunner

    from fnprune.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "compress", "--task", "sst2", "--model", str(model_dir("llama")), "--data-dir", str(task_data),
        "--output", str(out), "--num-samples", "16", "--max-tokens", "200", "--components", "4",
        "--eval-samples", "8", "--recover", "--recover-steps", "3", "--recover-lr", "0.001",
        "--recover-params", "lora",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] == 3 and report["recovery"]["settings"]["params"] == "lora"
    assert "recovered: 3 steps" in result.output and "before recovery: held-out templates" in result.output
    shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_pretrained(out).state_dict().items()}
    assert not any("lora" in k or "parametrizations" in k for k in shapes)


@pytest.mark.slow
@pytest.mark.parametrize("placement", [{"output.streamed": True}, {"model.device_map": "cpu"}])
def test_streamed_surgery_then_recovery_equals_in_memory(recovered_run, tmp_path, placement):
    """With a device map (how a GPU user runs it) or streamed surgery, recovery trains the checkpoint written from
    the source files where the map puts it, and saves it over the streamed weights: the same model as in memory."""
    again = apply_overrides(recovered_run.recipe, {"output.dir": str(tmp_path / "streamed"), **placement})
    result = fnprune.compress(again, progress=False)
    ours = AutoModelForCausalLM.from_pretrained(result.output_dir).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(recovered_run.output_dir).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    rec, want = result.report["recovery"], recovered_run.report["recovery"]
    assert rec["steps"] == want["steps"] and rec["before"]["metric"] == want["before"]["metric"]
    assert [t["pruned"] for t in result.report["templates"]] == [t["pruned"] for t in recovered_run.report["templates"]]
    assert sorted(p.name for p in result.output_dir.glob("model*")) == ["model.safetensors"]


def test_recovery_refuses_an_offloaded_model():
    from fnprune.errors import ModelError
    from fnprune.offload import check_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ModelError, match=r"offloads 1 modules \(1, \.\.\.\)"):
        check_trainable(model, "this model")
    check_trainable(torch.nn.Linear(2, 2), "this model")


def _label_kl(model, seqs, targets):
    idx = list(range(len(seqs)))
    with torch.no_grad():
        rows, ends = distillation._student_rows(model, seqs, idx)
        return distillation.label_kl(rows[ends], targets, idx)


def test_label_kl_is_zero_at_the_teacher_and_recovery_with_label_weight_lowers_it(pruned_llama):
    dense, pruned, seqs, _ = pruned_llama
    words = [[11, 23]] * (len(seqs) - 1) + [[]]  # the last prompt has no label words (raw text)
    targets = teacher_targets(dense, seqs, 16, 8, progress=False, label_ids=words)
    assert targets.label_ids.shape == (len(seqs), 2) and (targets.label_ids[-1] == -1).all()
    at_teacher = _label_kl(dense, seqs, targets)
    assert at_teacher.shape == (len(seqs) - 1,) and at_teacher.abs().max() < 1e-5
    before = _label_kl(pruned, seqs, targets).mean()
    spec = RecoverySpec(enabled=True, epochs=4, lr=3e-3, answer_weight=0.0, label_weight=4.0)
    student = copy.deepcopy(pruned)
    recover(student, layout_for(student), seqs, targets, spec, progress=False)
    assert _label_kl(student, seqs, targets).mean() < 0.5 * before


def test_label_word_ids_are_each_templates_words_and_none_for_untemplated_text(tokenizer_dir, task_data):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    task = resolve_task(fnprune.recipe.TaskSpec(name="sst2", data_dir=str(task_data)))
    examples = [fnprune.data.Example("p", "0", template="review"), fnprune.data.Example("p", "1", template="good-bad"),
                fnprune.data.Example("raw text", "", template="")]
    ids = recovery.label_word_ids(tok, examples, task)
    one = [tok(w, add_special_tokens=False)["input_ids"] for w in (" negative", " positive")]
    assert all(len(x) == 1 for x in one) and len(tok(" good", add_special_tokens=False)["input_ids"]) > 1
    # review: its one-token words in label order; good-bad: " good" is several tokens here, so none; raw text: none
    assert ids == [[one[0][0], one[1][0]], [], []]
    mc = resolve_task(fnprune.recipe.TaskSpec(name="arc_easy", data_dir=str(task_data)))
    assert recovery.label_word_ids(tok, examples[:1], mc) == [[]]


@pytest.mark.slow
def test_compress_passes_the_templates_label_words_to_the_teacher(recovered_run, model_dir, task_data, tmp_path,
                                                                  monkeypatch):
    """compress hands the teacher each calibration prompt's label words (the resolved task's templates), and a
    label_weight changes what recovery writes."""
    passed: list = []
    real = recovery.teacher_targets

    def spy(model, seqs, *a, **kw):
        passed.append(a[3] if len(a) > 3 else kw.get("label_ids"))
        return real(model, seqs, *a, **kw)

    monkeypatch.setattr(recovery, "teacher_targets", spy)
    recipe = apply_overrides(_recipe(model_dir("llama"), task_data, tmp_path / "out", label_weight=4.0),
                             {"calibration.cache": False, "evaluation.enabled": False})
    result = fnprune.compress(recipe, progress=False)
    assert passed and sum(bool(x) for x in passed[0]) > 0  # the review prompts' one-token " negative" / " positive"
    assert _sha(result.output_dir / "model.safetensors") != _sha(recovered_run.output_dir / "model.safetensors")


def test_consensus_is_the_mean_of_centred_templates_and_ignores_one_that_always_answers_the_same():
    g = torch.Generator().manual_seed(0)
    informative = torch.randn(6, 2, generator=g).log_softmax(-1)
    constant = torch.tensor([[-3.0, -0.05]]).expand(6, 2)  # says "label 1" whatever the text
    both = distillation.consensus_label_logprobs(torch.stack([informative, constant]))
    assert torch.allclose(both.exp().sum(-1), torch.ones(6), atol=1e-6)
    # after centring the constant template is zeros: the informative one's centred log-odds, averaged with them
    assert torch.allclose(both, (0.5 * (informative - informative.mean(0))).log_softmax(-1), atol=1e-6)
    assert (both.argmax(-1) == (informative - informative.mean(0)).argmax(-1)).all()


def test_consensus_teacher_asks_the_dense_model_under_calibration_templates_only(model_dir, task_data, tmp_path,
                                                                                 monkeypatch):
    tok = AutoTokenizer.from_pretrained(model_dir("llama"))
    dense = AutoModelForCausalLM.from_pretrained(model_dir("llama")).eval()
    own_recipe = apply_overrides(_recipe(model_dir("llama"), task_data, tmp_path / "out", label_target="own"),
                                 {"calibration.cache": False})
    recipe = apply_overrides(own_recipe, {"recovery.label_target": "consensus"})
    task = resolve_task(recipe.task)
    calibration = load_sample(task, "train", 16, 0, raw_share=0.25)
    asked: list[str] = []
    real = recovery.under_template
    monkeypatch.setattr(recovery, "under_template", lambda t, e, tpl: asked.append(tpl.name) or real(t, e, tpl))
    consensus = recovery.teacher(dense, tok, calibration, recipe, task, progress=False)
    assert asked and not {t.name for t in task.held_out_templates()} & set(asked)
    assert set(asked) == {"review", "opinion", "instruction"}  # good-bad's " good" is several tokens here
    own = recovery.teacher(dense, tok, calibration, own_recipe, task, progress=False)
    worded = own.label_ids[:, 0] >= 0
    assert 0 < int(worded.sum()) < len(calibration)  # raw and good-bad prompts have no label words
    assert torch.equal(consensus.indices, own.indices) and torch.equal(consensus.logprobs, own.logprobs)
    assert not torch.allclose(consensus.label_logprobs[worded], own.label_logprobs[worded])
    assert torch.allclose(consensus.label_logprobs[worded].exp().sum(-1), torch.ones(int(worded.sum())), atol=1e-5)
    assert torch.equal(consensus.label_logprobs[~worded], own.label_logprobs[~worded])



def test_recovery_settings_while_recovery_is_off_are_named_in_a_warning(caplog):
    from fnprune.inputs import _warn_unused_recovery

    with caplog.at_level("WARNING", logger="fnprune"):
        _warn_unused_recovery(RecoverySpec(enabled=False, steps=50, lr=1e-3))
        _warn_unused_recovery(RecoverySpec(enabled=False))  # defaults: nothing to say
        _warn_unused_recovery(RecoverySpec(enabled=True, steps=50))
    assert caplog.messages == ["recovery is off (--recover turns it on): recovery.steps, recovery.lr not used"]


def test_the_teacher_is_keyed_by_the_batches_it_runs_in():
    """Padded batches of another size give other floats: a teacher cached at batch size 8 made a batch-16 recipe's
    recovery depend on what the cache held (and a rerun elsewhere wrote other weights)."""
    from fnprune.recipe import apply_overrides, recipe_from_dict
    from fnprune.recovery import teacher_cache_key

    recipe = recipe_from_dict({"model": {"name_or_path": "org/m"}})
    key = teacher_cache_key(recipe, [[1, 2]], [[3]])
    assert key != teacher_cache_key(apply_overrides(recipe, {"calibration.batch_size": 4}), [[1, 2]], [[3]])


@pytest.mark.parametrize(("dtype", "params", "lr"), [
    (torch.float16, "mlp", 3e-3), (torch.float16, "lora", 3e-2),
    (torch.bfloat16, "mlp", 1e-4),  # each step's update below half of bfloat16's spacing at most of these weights
])
def test_recovery_of_a_half_precision_model_trains_as_in_float32(pruned_llama, dtype, params, lr):
    """AdamW stepping float16 weights divides by zero at its first step (its eps and small squared gradients round
    to 0) and stepping bfloat16 weights loses the small updates: it steps float32 copies the weights follow, so a
    half-precision run moves about as many weights as the float32 run."""
    _, pruned, seqs, targets = pruned_llama
    spec = RecoverySpec(enabled=True, epochs=4, lr=lr, params=params)
    ends = {}
    for kind in (torch.float32, dtype):
        student = copy.deepcopy(pruned).to(kind)
        recover(student, layout_for(student), seqs, targets, spec, progress=False)
        assert all(torch.isfinite(p).all() for p in student.parameters())
        ends[kind] = torch.cat([p.detach().to(dtype).flatten() for n, p in student.named_parameters() if "mlp" in n])
    start = torch.cat([p.detach().to(dtype).flatten() for n, p in pruned.named_parameters() if "mlp" in n])
    assert _mean_kl(student.float(), seqs, targets) < _mean_kl(pruned, seqs, targets)
    moved = (ends[torch.float32] != start).float().mean()  # by a rounding step or more
    assert (ends[dtype] != start).float().mean() > 0.8 * moved  # stepping bfloat16 itself: 0.26 of it


def test_recovery_refuses_non_finite_weights_after_its_last_step(pruned_llama, monkeypatch):
    """The loss before each step is checked; nothing checked what the last step wrote."""
    _, pruned, seqs, targets = pruned_llama

    class Overflowing(torch.optim.AdamW):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    monkeypatch.setattr(torch.optim, "AdamW", Overflowing)
    student = copy.deepcopy(pruned)
    with pytest.raises(NumericalError, match="recovery left non-finite weights after step 1"):
        recover(student, layout_for(student), seqs, targets, RecoverySpec(enabled=True, steps=1), progress=False)


def test_recovery_progress_of_another_fnprune_version_is_not_resumed(pruned_llama, monkeypatch):
    _, pruned, seqs, targets = pruned_llama
    params = distillation.trainable_parameters(pruned, layout_for(pruned), "mlp")
    before = distillation.run_fingerprint(params, targets, seqs, RecoverySpec())
    monkeypatch.setattr(distillation, "key_versions", lambda: {"fnprune": "9.9.9"})
    assert distillation.run_fingerprint(params, targets, seqs, RecoverySpec()) != before
