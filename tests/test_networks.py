"""Spatial ICA finds planted networks; relevance finds the network that carries the label."""

from __future__ import annotations

import numpy as np
import pytest

from fnprune.networks import network_relevance
from fnprune.networks.engines import find_networks_reference as find_networks


def _planted(n_tokens=800, width=400, k=4, size=25, seed=0):
    rng = np.random.default_rng(seed)
    supports = [rng.choice(width, size, replace=False) for _ in range(k)]
    maps = np.zeros((k, width))
    for i, s in enumerate(supports):
        maps[i, s] = rng.uniform(2, 4, size)
    courses = rng.standard_normal((n_tokens, k))  # (T, k) activity of each network over tokens
    tokens = courses @ maps + 0.05 * rng.standard_normal((n_tokens, width))
    return tokens, supports, courses


def test_recovers_planted_networks():
    tokens, supports, _ = _planted()
    found = find_networks(tokens, components=4, threshold=2.5, seed=0)
    assert found.maps.shape == (4, 400) and found.members.shape == (4, 400)
    for s in supports:
        truth = np.zeros(400, bool)
        truth[s] = True
        iou = max((m & truth).sum() / (m | truth).sum() for m in found.members)
        assert iou > 0.8
    np.testing.assert_allclose(found.maps.mean(1), 0, atol=1e-9)
    np.testing.assert_allclose(found.maps.std(1), 1, atol=1e-9)


def test_deterministic_for_a_seed():
    tokens, _, _ = _planted()
    a = find_networks(tokens, 4, 3.0, seed=1)
    b = find_networks(tokens, 4, 3.0, seed=1)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_dead_neurons_and_bad_input():
    tokens, _, _ = _planted()
    tokens[:, :10] = 0.0
    found = find_networks(tokens, 4, 3.0, seed=0)
    assert found.dead_neurons == 10
    assert not found.members[:, :10].any()
    tokens[0, 50] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        find_networks(tokens, 4, 3.0, seed=0)
    with pytest.raises(ValueError, match="components"):
        find_networks(_planted()[0][:4], 4, 3.0, seed=0)


@pytest.mark.parametrize("path", ["reference", "torch", "token-gram", "analyze"])
def test_dead_neurons_stay_out_of_every_network_beside_a_common_mode(path):
    """Centred across all neurons, every token moved the dead neurons (z-scored to 0) to one shared point: with a
    token-wide common mode FastICA isolated them as a network (|z| ~ 6.7) and `fn` kept all of them. Centred across
    the live neurons, they stay 0 in every map."""
    from fnprune.analysis.group_ica import spatial_ica
    from fnprune.networks.engines import find_networks_torch

    tokens, _, _ = _planted()
    tokens = tokens + 2.0 * np.random.default_rng(5).standard_normal((tokens.shape[0], 1))  # a common mode
    tokens[:, :8] = 1.5  # dead: constant over every token
    if path == "token-gram":
        tokens = tokens[:200]  # fewer tokens than neurons: the whitening goes through the token Gram
    run = {"reference": lambda t: find_networks(t, 4, 3.0, seed=0),
           "torch": lambda t: find_networks_torch(t, 4, 3.0, seed=0),
           "token-gram": lambda t: find_networks_torch(t, 4, 3.0, seed=0),
           "analyze": lambda t: spatial_ica(t[:200], 4, 3.0, seed=0)}[path]
    found = run(tokens)
    assert found.dead_neurons == 8 and not found.members[:, :8].any()
    assert np.abs(found.maps[:, :8]).max() < 1e-6


def test_relevance_picks_the_label_network():
    rng = np.random.default_rng(3)
    width, n = 200, 300
    maps = np.zeros((3, width))
    maps[0, :20] = 1
    maps[1, 20:40] = 1
    maps[2, 40:60] = 1
    labels = rng.integers(0, 2, n)
    decision = rng.standard_normal((n, width))
    decision[:, 20:40] += 1.5 * labels[:, None]  # network 1 fires for label 1
    rel = network_relevance(maps, decision, labels)
    assert rel.argmax() == 1 and rel[1] > 0.5 and rel[0] < 0.2


def test_pooled_runs_stack_networks_and_sum_membership():
    from fnprune.networks import network_relevance, pool_networks

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    runs = [find_networks(tokens, 4, 2.0, seed) for seed in (0, 1, 2)]
    pooled = pool_networks(runs)
    assert pooled.maps.shape == (12, 40) and pooled.members.shape == (12, 40)
    np.testing.assert_array_equal(pooled.maps[4:8], runs[1].maps)
    assert pool_networks(runs[:1]) is runs[0]
    labels = rng.integers(0, 2, 50)
    decision = rng.standard_normal((50, 40))
    rel = network_relevance(pooled.maps, decision, labels)
    membership = rel @ pooled.members
    per_run = sum(network_relevance(r.maps, decision, labels) @ r.members for r in runs)
    np.testing.assert_allclose(membership, per_run)


def test_runs_share_one_whitening_and_equal_pooled_separate_calls():
    from fnprune.networks import pool_networks

    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    together = find_networks(tokens, 4, 2.0, 3, runs=3)
    separate = pool_networks([find_networks(tokens, 4, 2.0, s) for s in (3, 4, 5)])
    np.testing.assert_array_equal(together.maps, separate.maps)
    np.testing.assert_array_equal(together.members, separate.members)


def _layer(tokens: np.ndarray):
    """A layer as capture leaves it with `sample_store: moments` (the token sample's float32 moments only)."""
    import torch

    from fnprune.capture import LayerActivations
    from fnprune.moments import SecondMoments

    t = torch.from_numpy(tokens).float()
    moments = SecondMoments.of(t, torch.float32)
    empty = torch.zeros(t.shape[1])
    return LayerActivations(None, torch.zeros(2, t.shape[1]), t.mean(0), empty, empty, len(t), moments), moments


def test_one_layer_and_all_layers_agree_for_both_engines():
    """find_networks(sample, spec) is the stage's per-layer answer: the reference engine's networks from the
    sample's moments, and the torch engine's batched loop for a layer alone in its batch."""
    from threadpoolctl import threadpool_limits

    from fnprune import networks
    from fnprune.networks.engines import find_networks_batch, find_networks_reference
    from fnprune.recipe import NetworksSpec

    tokens = _planted()[0]
    layer, moments = _layer(tokens)
    for runs in (1, 3):
        reference = NetworksSpec(components=4, threshold=2.5, seed=2, engine="sklearn", runs=runs)
        ours = networks.find_networks(moments, reference)
        with threadpool_limits(1):  # as the stage runs it: BLAS threads change the last bits
            expected = find_networks_reference(moments, 4, 2.5, 2, runs=runs)
        np.testing.assert_array_equal(ours.maps, expected.maps)
        np.testing.assert_array_equal(networks.find_all_networks([layer], reference)[0].maps, ours.maps)
        spec = NetworksSpec(components=4, threshold=2.5, seed=2, engine="torch", runs=runs)
        single = networks.find_networks(moments, spec)
        assert single.maps.shape == (4 * runs, 400)
        np.testing.assert_array_equal(single.maps, find_networks_batch([moments], 4, 2.5, 2, runs=runs)[0].maps)
        np.testing.assert_array_equal(networks.find_all_networks([layer], spec)[0].maps, single.maps)
    with pytest.raises(ValueError, match="engine"):
        networks.find_networks(moments, NetworksSpec(engine="jax"))


def test_all_layers_refuse_what_cannot_be_unmixed():

    from fnprune.errors import NumericalError, RecipeError
    from fnprune.networks import find_all_networks
    from fnprune.recipe import NetworksSpec

    tokens = _planted()[0]
    good, _ = _layer(tokens)
    bad_tokens = tokens.copy()
    bad_tokens[0, 5] = np.nan
    bad, _ = _layer(bad_tokens)
    for engine in ("torch", "sklearn"):
        spec = NetworksSpec(components=4, threshold=2.5, engine=engine, runs=1)
        with pytest.raises(NumericalError, match="layer 1: activations contain NaN"):
            find_all_networks([good, bad], spec)
        with pytest.raises(RecipeError, match="networks.components"):
            find_all_networks([good], NetworksSpec(components=400, engine=engine))


def test_cache_identity_carries_the_torch_engines_revision():
    import dataclasses

    from fnprune.networks import REVISION, cache_identity
    from fnprune.recipe import NetworksSpec

    torch_spec, reference = NetworksSpec(engine="torch"), NetworksSpec(engine="sklearn")
    after = ("relevance", "relevance_within_template")  # how the networks are weighted, not what ICA finds
    fields = {k: v for k, v in dataclasses.asdict(torch_spec).items() if k not in after}
    assert cache_identity(torch_spec) == {**fields, "revision": REVISION}
    assert cache_identity(reference) == {**fields, "engine": "sklearn"}  # its networks never changed
    assert cache_identity(NetworksSpec(relevance="uniform")) == cache_identity(torch_spec)
    assert cache_identity(NetworksSpec(relevance_within_template=False)) == cache_identity(torch_spec)


def test_wide_token_whitening_spans_the_neuron_grams_subspace():
    """The reference whitening of a token sample with more neurons than tokens (the analysis' group ICA) goes
    through the T x T token Gram and spans what the neuron Gram's whitening spans."""
    from fnprune.moments import SecondMoments
    from fnprune.networks.whitening import reference_gram_whitening, reference_token_whitening

    tokens = _planted(n_tokens=150, width=400)[0]
    tokens[:, 9] = 2.0
    wide, dead = reference_token_whitening(tokens, 4)
    narrow = reference_gram_whitening(SecondMoments.of(tokens).correlation_gram().numpy(), 4)
    assert wide.shape == narrow.shape == (400, 4) and dead == 1
    np.testing.assert_allclose(wide.T @ wide / 400, np.eye(4), atol=1e-5)
    assert np.linalg.svd(wide.T @ narrow / 400, compute_uv=False).min() > 1 - 1e-5
