"""Spatial ICA finds planted networks; relevance finds the network that carries the label."""

from __future__ import annotations

import numpy as np
import pytest

from fnprune.networks import find_networks, network_relevance


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
