"""Activation capture: padding never counts, either side gives the same numbers, memory is capped."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch

from fnprune.arch import layout_for
from fnprune.capture import capture_activations, capture_memory_bytes, resolve_sample_store
from fnprune.models import load_model
from fnprune.moments import SecondMoments
from fnprune.recipe import ModelSpec
from fnprune.tokens import encode

PROMPTS = [
    "Review: a wonderful film\nSentiment:",
    "Review: the acting was dull , boring and a tedious mess of a story\nSentiment:",
    "Review: fresh\nSentiment:",
]


@pytest.fixture(scope="module")
def llama(model_dir):
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    return model, tok, encode(tok, PROMPTS, 64)


def _capture(model, seqs, **kw):
    args = dict(max_tokens=10_000, batch_size=3, seed=0, progress=False)
    args.update(kw)
    return capture_activations(model, layout_for(model), seqs, **args)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_matches_unpadded(llama, side):
    model, _, seqs = llama
    unpadded = _capture(model, seqs, batch_size=1)
    padded = _capture(model, seqs, batch_size=3, padding_side=side)
    for a, b in zip(unpadded, padded):
        assert a.count == b.count == sum(len(s) for s in seqs)
        torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.var, b.var, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.decision, b.decision, atol=1e-5, rtol=1e-4)


def test_statistics_match_direct_computation(llama):
    model, _, seqs = llama
    acts = _capture(model, seqs, batch_size=1)
    for layer in acts:
        assert layer.tokens.shape[0] == layer.count  # under the cap: every token is kept
        torch.testing.assert_close(layer.mean, layer.tokens.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.mean_abs, layer.tokens.abs().mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.var, layer.tokens.var(0, unbiased=False), atol=1e-5, rtol=1e-4)


def test_token_cap_and_determinism(llama):
    model, _, seqs = llama
    a = _capture(model, seqs, max_tokens=7, batch_size=1, seed=5)
    b = _capture(model, seqs, max_tokens=7, batch_size=1, seed=5)
    c = _capture(model, seqs, max_tokens=7, batch_size=1, seed=6)
    assert a[0].tokens.shape == (7, a[0].mean.numel())
    assert torch.equal(a[0].tokens, b[0].tokens)
    assert not torch.equal(a[0].tokens, c[0].tokens)
    # the same tokens are sampled in every layer: each sampled row of layer 0 is a real token of layer 0
    full = _capture(model, seqs, batch_size=1)
    for row in a[0].tokens:
        assert (full[0].tokens - row).abs().sum(1).min() < 1e-5


def test_half_precision_storage(llama):
    model, _, seqs = llama
    acts = _capture(model, seqs, store_dtype="float16")
    assert acts[0].tokens.dtype == torch.float16  # kept in the storage dtype; the math converts per layer
    assert capture_memory_bytes(30, 1536, 4096, 256, "float16") < capture_memory_bytes(30, 1536, 4096, 256, "float32")


def test_activations_beyond_float16_are_one_clear_error(llama):
    """A float16 store makes activations past 65504 inf; the float32 statistics stay finite, so capture says so
    (the ICA or the reconstruction failed later with advice to raise the ridge)."""
    import copy

    from fnprune.errors import NumericalError

    model, _, seqs = llama
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.model.layers[0].mlp.up_proj.weight.mul_(3e4)
    with pytest.raises(NumericalError, match="layer 0: activations beyond float16's range"):
        _capture(loud, seqs, store_dtype="float16")
    assert torch.isfinite(_capture(loud, seqs, store_dtype="bfloat16")[0].tokens.float()).all()


def test_left_padding_is_refused_for_an_encoder(model_dir):
    """An encoder reads positions as they are and decides at position 0: left padding would give other numbers."""
    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("bert"))))
    with pytest.raises(ValueError, match="right padding"):
        _capture(model, encode(tok, PROMPTS, 64), padding_side="left")


def test_an_encoder_reads_text_longer_than_its_positions(model_dir):
    """Scoring and capture cut an encoder's input to its positions (its position embeddings failed past them; the
    default limits, 1,024 and 256 tokens, are above BERT's 512)."""
    from fnprune.data import Example
    from fnprune.evaluate import evaluate_accuracy
    from fnprune.tokens import encode_inputs

    model, tok = load_model(ModelSpec(name_or_path=str(model_dir("bert"))))
    text = " ".join(["word"] * 400)
    examples = [Example(text, "0", (text,), "t"), Example("short text", "1", ("short text",), "t")]
    seqs = encode_inputs(tok, examples, 1024, model)
    assert max(len(s) for s in seqs) <= model.config.max_position_embeddings
    assert evaluate_accuracy(model, tok, examples, {"0": " no", "1": " yes"}, batch_size=2, progress=False).n == 2
    _capture(model, seqs)


@pytest.mark.parametrize("cap", [1, 7, 20])
def test_reservoir_is_the_bottom_k_sample_in_stream_order(llama, cap):
    """The in-place reservoir holds exactly the tokens with the `cap` smallest seeded keys, in stream order."""
    model, _, seqs = llama
    full = _capture(model, seqs, batch_size=2)  # under the cap: every token, in stream order
    sample = _capture(model, seqs, batch_size=2, max_tokens=cap, seed=9)
    total = full[0].count
    keys = torch.rand(total, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected_rows = keys.argsort(stable=True)[:cap].sort().values
    for f, s in zip(full, sample):
        assert s.tokens.shape[0] == min(cap, total)
        torch.testing.assert_close(s.tokens, f.tokens[expected_rows])


def test_moments_store_holds_the_token_samples_moments(llama):
    """"moments" keeps the second moments of exactly the tokens "tokens" would keep, in far less memory
    when the sample is longer than the MLP is wide."""
    model, _, seqs = llama
    tokens = _capture(model, seqs, max_tokens=20, seed=3, sample_store="tokens")
    moments = _capture(model, seqs, max_tokens=20, seed=3, sample_store="moments")
    for t, m in zip(tokens, moments):
        assert m.tokens is None and m.moments is not None and m.sampled == t.sampled == 20
        want = SecondMoments.of(t.tokens.double())
        torch.testing.assert_close(m.moments.covariance(), want.covariance(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.sample_moments().mean(), t.sample_moments().mean().double(), atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(m.mean, t.mean)


def test_auto_store_counts_the_tokens_there_are(llama):
    """Fewer tokens in all than max_tokens (and than the width): the tokens themselves are the smaller store."""
    model, _, seqs = llama
    acts = _capture(model, seqs, max_tokens=10_000, sample_store="auto")
    assert sum(len(s) for s in seqs) < acts[0].mean.numel()
    assert acts[0].tokens is not None and acts[0].moments is None


def test_auto_store_picks_the_smaller():
    assert resolve_sample_store("auto", 1536, 4096, "float32") == "moments"
    assert resolve_sample_store("auto", 11008, 4096, "float16") == "tokens"
    assert resolve_sample_store("tokens", 8, 4096, "float32") == "tokens"
    small = capture_memory_bytes(30, 1536, 4096, 256, "float32", "moments")
    assert small < capture_memory_bytes(30, 1536, 4096, 256, "float16", "tokens")
    assert capture_memory_bytes(30, 1536, 4096, 256, "float32", "auto") == small


MORE_PROMPTS = [f"Review: {'a fine and ' * (i % 4)}film number {i}\nSentiment:" for i in range(10)]


def _same_capture(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.count == y.count
        for name in ("decision", "mean", "mean_abs", "var"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        if x.tokens is not None:
            assert torch.equal(x.tokens, y.tokens)
        else:
            for k, v in x.moments.state().items():
                assert torch.equal(v, y.moments.state()[k]), k


class _Stop:
    """A forward hook that, on the n-th forward pass, presses Ctrl-C (SIGINT to this process) or fails."""

    def __init__(self, n: int, how: str):
        self.n, self.how, self.calls = n, how, 0

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        if self.calls == self.n:
            if self.how == "ctrl-c":
                os.kill(os.getpid(), signal.SIGINT)  # lands while the batch is still running
            else:
                raise RuntimeError("simulated crash")


@pytest.mark.parametrize("store", ["tokens", "moments"])
def test_interrupted_capture_resumes_to_the_same_numbers(llama, tmp_path, store):
    """Ctrl-C finishes the batch, saves, and stops; the rerun continues and matches an uninterrupted
    capture bit for bit. A crash keeps the last periodic save."""
    model, tok, _ = llama
    seqs = encode(tok, MORE_PROMPTS, 64)
    kw = dict(max_tokens=25, batch_size=2, seed=1, sample_store=store)
    want = _capture(model, seqs, **kw)
    progress = tmp_path / "capture.partial.safetensors"
    for stop, error, save_every in ((_Stop(3, "ctrl-c"), KeyboardInterrupt, 300.0),
                                    (_Stop(4, "crash"), RuntimeError, 0.0)):
        handle = model.register_forward_hook(stop)
        try:
            with pytest.raises(error) as caught:
                _capture(model, seqs, progress_file=progress, save_every=save_every, **kw)
        finally:
            handle.remove()
        assert progress.is_file()
        if error is KeyboardInterrupt:
            assert "the same command continues" in str(caught.value)
        counter = _Stop(0, "count")
        handle = model.register_forward_hook(counter)
        try:
            got = _capture(model, seqs, progress_file=progress, **kw)
        finally:
            handle.remove()
        _same_capture(want, got)
        # 5 batches: after Ctrl-C in the third, two are left; the crash kept one of the first three
        assert counter.calls == 2 if error is KeyboardInterrupt else 2 <= counter.calls <= 4
        assert not progress.exists()  # a finished capture leaves no progress behind


OTHER_SETTINGS = {"seed": dict(seed=2), "batch_size": dict(batch_size=3), "max_tokens": dict(max_tokens=20),
                  "store_dtype": dict(store_dtype="float16"), "padding_side": dict(padding_side="left"),
                  "sample_store": dict(sample_store="moments"), "prompts": dict(prompts=True)}


@pytest.mark.parametrize("changed", OTHER_SETTINGS)
def test_capture_progress_for_other_settings_is_ignored(llama, tmp_path, caplog, changed):
    """Progress saved under one setting is never resumed under another: the rerun says so and equals a fresh
    capture (resuming another batch size or prompt list would count the wrong batches as done)."""
    model, tok, _ = llama
    seqs = encode(tok, MORE_PROMPTS, 64)
    first = dict(max_tokens=25, batch_size=2, seed=1)
    second = {**first, **OTHER_SETTINGS[changed]}
    other_seqs = [s[::-1] for s in seqs] if second.pop("prompts", False) else seqs
    progress = tmp_path / "capture.partial.safetensors"
    handle = model.register_forward_hook(_Stop(2, "crash"))
    try:
        with pytest.raises(RuntimeError):
            _capture(model, seqs, progress_file=progress, save_every=0.0, **first)
    finally:
        handle.remove()
    assert progress.is_file()
    with caplog.at_level(logging.INFO, logger="fnprune"):
        resumed = _capture(model, other_seqs, progress_file=progress, **second)
    assert "it was saved for other prompts or settings" in caplog.text
    _same_capture(_capture(model, other_seqs, **second), resumed)


def test_damaged_capture_progress_is_ignored(llama, tmp_path):
    model, tok, _ = llama
    seqs = encode(tok, MORE_PROMPTS, 64)
    progress = tmp_path / "capture.partial.safetensors"
    progress.write_bytes(b"not a safetensors file")  # damaged: ignored, never an error
    _same_capture(_capture(model, seqs, max_tokens=25, batch_size=2, seed=2),
                  _capture(model, seqs, max_tokens=25, batch_size=2, seed=2, progress_file=progress))


def test_running_statistics_do_not_cancel_in_float32():
    """Per-batch float32 sums around the first batch's mean keep float64 accuracy even when the mean is 1e5
    times the spread (a naive float32 E[a^2] - E[a]^2 would return noise)."""
    from fnprune.capture import LayerStats

    gen = torch.Generator().manual_seed(0)
    batches_ = [(1000 + 0.01 * torch.randn(n, 6, generator=gen)).float() for n in (7, 300, 41)]
    stats = LayerStats(6, n_prompts=1, capacity=1, store_dtype=torch.float32, moments_buffer=None)
    for b in batches_:
        stats.add_statistics(b, torch.empty_like(b))
    done = stats.finish()
    every = torch.cat(batches_).double()
    assert done.count == every.shape[0]
    torch.testing.assert_close(done.mean.double(), every.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(done.var.double(), every.var(0, unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(done.mean_abs.double(), every.abs().mean(0), rtol=1e-7, atol=0)
