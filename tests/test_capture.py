"""Activation capture: padding never counts, either side gives the same numbers, memory is capped."""

from __future__ import annotations

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
