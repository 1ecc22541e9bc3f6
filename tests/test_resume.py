"""Interruption and the calibration cache: a killed or interrupted run leaves no output, and the rerun reuses
its work (cached activations and networks, or the progress an interrupted capture saved)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fnprune import cache
from fnprune.cli import main
from fnprune.networks import LayerNetworks

KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from transformers import PreTrainedModel
    real_save = PreTrainedModel.save_pretrained
    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)          # weights half of the folder written...
        os.kill(os.getpid(), signal.SIGKILL)      # ...then the process dies without any cleanup
    PreTrainedModel.save_pretrained = save_then_die
    from fnprune.cli import main
    sys.exit(main())
""")


def _args(model, data, out):
    return ["compress", "--task", "sst2", "--model", str(model), "--data-dir", str(data), "--output", str(out),
            "--num-samples", "40", "--max-tokens", "300", "--components", "8", "--method", "fn-task", "--no-eval"]


def test_killed_during_save_then_rerun_finishes_from_cache(model_dir, task_data, tmp_path, isolated_cache):
    out = tmp_path / "out"
    env = dict(os.environ, FNPRUNE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *_args(model_dir("gpt2"), task_data, out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # the output path is as it was
    assert len(list(tmp_path.glob(".out.*.partial"))) == 1  # the killed run's temp dir
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["activations", "networks"] and not list((tmp_path / "cache").glob("*.tmp"))

    proc = subprocess.run([sys.executable, "-m", "fnprune.cli", *_args(model_dir("gpt2"), task_data, out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "activations from cache" in proc.stderr
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.*.partial"))  # the stale temp dir was cleaned up


def test_cache_roundtrip_and_damaged_entry_is_a_miss(isolated_cache):
    import numpy as np
    import torch

    from fnprune.capture import LayerActivations

    acts = [LayerActivations(torch.randn(5, 4), torch.randn(3, 4), torch.randn(4), torch.rand(4), torch.rand(4), 9)]
    cache.save_activations("k1", acts, np.array([0, 1, 1]))
    loaded, labels = cache.load_activations("k1")
    assert torch.equal(loaded[0].tokens, acts[0].tokens) and loaded[0].count == 9 and labels.tolist() == [0, 1, 1]
    assert loaded[0].moments is None
    from fnprune.moments import SecondMoments

    with_moments = [LayerActivations(None, torch.randn(3, 4), torch.randn(4), torch.rand(4), torch.rand(4), 9,
                                     SecondMoments.of(torch.randn(6, 4), torch.float32))]
    cache.save_activations("k3", with_moments, np.array([0, 1, 1]))
    (back,), _ = cache.load_activations("k3")
    assert back.tokens is None and back.sampled == 6
    assert torch.equal(back.moments.covariance(), with_moments[0].moments.covariance())
    maps = np.random.default_rng(0).standard_normal((2, 4))
    cache.save_networks("k2", [LayerNetworks(maps, np.abs(maps) > 1, 1.0, False, 1)])
    (net,) = cache.load_networks("k2")
    assert np.array_equal(net.maps, maps) and not net.converged and net.members.sum() == (np.abs(maps) > 1).sum()
    (cache.cache_dir() / "activations-k1.safetensors").write_bytes(b"garbage")
    assert cache.load_activations("k1") is None
    assert cache.load_activations("never-written") is None


def test_no_cache_flag(model_dir, task_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, [*_args(model_dir("llama"), task_data, tmp_path / "o"), "--no-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_capture_saves_progress_and_the_rerun_continues(sig, model_dir, task_data, tmp_path,
                                                                     monkeypatch):
    """Ctrl-C (or SIGTERM, as `kill` or a container stop sends) in compress's capture: the batch finishes,
    progress goes to the cache, exit 130 says so, and the same command continues from there (fewer forward
    passes) to the output. The handlers are restored afterwards."""
    import signal

    import torch
    from click.testing import CliRunner

    monkeypatch.setenv("FNPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    args = [*_args(model_dir("llama"), task_data, tmp_path / "o"), "--batch-size", "8", "--quiet"]
    passes, pressed = [], []

    def press_ctrl_c_once(module, inputs, output):
        if type(module).__name__.endswith("ForCausalLM"):
            passes.append(1)
            if len(passes) == 2 and not pressed:
                pressed.append(True)
                os.kill(os.getpid(), getattr(signal, sig))

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    handle = torch.nn.modules.module.register_module_forward_hook(press_ctrl_c_once)
    try:
        first = CliRunner().invoke(main, args)
        assert first.exit_code == 130, first.output
        assert "capture progress saved" in first.output and "the same command continues" in first.output
        assert not (tmp_path / "o").exists()
        assert len(list((tmp_path / "cache").glob("capture-*.partial.safetensors"))) == 1
        passes.clear()
        second = CliRunner().invoke(main, args)
    finally:
        handle.remove()
    assert second.exit_code == 0, second.output
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert len(passes) == 3  # 40 prompts in batches of 8: two were done before Ctrl-C
    assert not list((tmp_path / "cache").glob("capture-*.partial.safetensors"))
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_a_hub_model_is_keyed_by_the_commit_its_branch_points_to(tmp_path, monkeypatch):
    """The Hub's main moves: the same id and revision are then other weights, so cache entries (activations,
    dense scores, teacher) must not be reused, and the saved recipe pins the commit that was loaded."""
    import huggingface_hub.constants

    from fnprune.output import _absolute_model
    from fnprune.recipe import ModelSpec

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = cache.model_fingerprint("someone/tiny", None)
    assert first["commit"] == "a" * 40
    assert _absolute_model(ModelSpec(name_or_path="someone/tiny")).revision == "a" * 40
    (repo / "refs" / "main").write_text("b" * 40)
    assert cache.model_fingerprint("someone/tiny", None)["commit"] == "b" * 40
    assert cache.model_fingerprint("someone/tiny", "a" * 40)["commit"] == "a" * 40
    assert cache.model_fingerprint("nobody/uncached", None) == {"hub": "nobody/uncached", "revision": None}


def test_local_weights_replaced_in_place_with_their_size_and_mtime_are_new_to_the_cache(tmp_path, caplog):
    """`cp -p` of other weights of the same size keeps the file's name, size and mtime: the fingerprint reads the
    ctime too, which every write changes and no copy tool sets. A damaged JSON entry is named when ignored."""
    import time

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    before, stat = cache.model_fingerprint(str(tmp_path), None), weights.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p leaves it
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns and cache.model_fingerprint(str(tmp_path), None) != before
    (cache.cache_dir() / "perplexity-damaged.json").write_text('{"ppl": 5')
    assert cache.load_perplexity("damaged") is None and "ignoring" in caplog.text
    assert cache.load_perplexity("absent") is None


def test_the_calibration_key_leaves_out_settings_that_do_not_change_the_capture(tmp_path):
    """`choices` shapes the prompts (hashed in the key) and `cache` only says whether to look: a classification
    run with either changed reuses the activations; a setting of the capture itself does not."""
    from fnprune.calibration import calibration_cache_key
    from fnprune.data import Example
    from fnprune.recipe import apply_overrides, recipe_from_dict

    base = recipe_from_dict({"model": {"name_or_path": str(tmp_path)}})
    prompts = [Example("Review: fine\nSentiment:", "1")]
    key = calibration_cache_key(base, prompts)
    for same in ({"calibration.choices": "answer"}, {"calibration.cache": False}):
        assert calibration_cache_key(apply_overrides(base, same), prompts) == key
    assert calibration_cache_key(apply_overrides(base, {"calibration.max_tokens": 100}), prompts) != key
