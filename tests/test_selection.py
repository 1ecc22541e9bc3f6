"""Budgets and criteria: widths, ties, determinism, and that each criterion ranks what it claims to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fnprune.networks import LayerNetworks
from fnprune.selection import CRITERIA, LayerEvidence, allocate_widths, layer_width, score_layer, top_neurons


@pytest.mark.parametrize(
    ("width", "keep", "round_to", "expected"),
    [(1536, 0.5, 8, 768), (1536, 0.7, 64, 1088), (1536, 0.01, 64, 64), (100, 1.0, 8, 100), (10, 0.5, 16, 5),
     (128, 0.33, 1, 42)],
)
def test_layer_width(width, keep, round_to, expected):
    assert layer_width(width, keep, round_to) == expected


def test_top_neurons_sorted_and_ties_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    assert top_neurons(scores, 2).tolist() == [1, 2]
    assert top_neurons(scores, 4).tolist() == [0, 1, 2, 4]


def _evidence(layer=0, d=50, with_networks=True):
    gen = torch.Generator().manual_seed(layer)
    maps = np.zeros((2, d))
    maps[0, :5] = 5.0  # network 0: neurons 0-4, task relevant
    maps[1, 5:10] = 5.0  # network 1: neurons 5-9, irrelevant
    nets = LayerNetworks(maps, np.abs(maps) > 3, 3.0, True, 0) if with_networks else None
    return LayerEvidence(
        layer=layer, mean_abs=torch.rand(d, generator=gen), var=torch.rand(d, generator=gen),
        out_norm=torch.rand(d, generator=gen) + 0.5, in_norm=torch.rand(d, generator=gen) + 0.5,
        networks=nets, relevance=np.array([1.0, 0.0]) if with_networks else None,
        mean=torch.randn(d, generator=gen), out_abs_mean=torch.rand(d, generator=gen) + 0.1,
    )


def test_allocations_rank_across_layers_on_comparable_scores():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(512, generator=g) ** power for power in (1, 2, 4, 8)]  # ever heavier tails
    for allocation in ("global", "median", "standardized"):
        widths = allocate_widths(scores, 0.35, 8, allocation)
        assert all(w % 8 == 0 and 8 <= w <= 512 for w in widths)
        assert abs(sum(widths) - round(0.35 * 2048)) <= 4 * 8  # the budget, up to each layer's rounding
        # heavier tails: fewer neurons above the common line, except over the median, where the line (above every
        # layer's median below keep 0.5) is crossed by more of a long tail
        assert widths == sorted(widths, reverse=allocation != "median")
        assert len(set(widths)) > 1
        # a layer's scale never matters; its offset matters to the mean and median ratios, not to the z-scores
        assert allocate_widths([s * 1e3 if i == 1 else s for i, s in enumerate(scores)], 0.35, 8, allocation) == widths
        shifted = allocate_widths([s + 1 if i == 3 else s for i, s in enumerate(scores)], 0.35, 8, allocation)
        assert (shifted == widths) == (allocation == "standardized")
    assert allocate_widths(scores, 0.5, 8, "standardized") != allocate_widths(scores, 0.5, 8, "global")
    with pytest.raises(ValueError, match="unknown allocation"):
        allocate_widths(scores, 0.5, 8, "uniform")


def test_median_allocation_keeps_half_of_every_layer_at_keep_half_whatever_its_outliers():
    """Each layer's median lands on the common line at keep 0.5, so a few neurons 1,000x their layer's mean (as in
    SmolLM2's layers 1, 2, 9, 11, 27, 28) cannot empty a layer as they do under "global"."""
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(512, generator=g) for _ in range(4)]
    scores[2][:4] = 1e6
    assert allocate_widths(scores, 0.5, 8, "median") == [256] * 4
    assert allocate_widths(scores, 0.5, 8, "global")[2] == 8


def test_median_allocation_scales_a_mostly_silent_layer_by_its_live_neurons():
    """Over half a layer scoring 0 (silent neurons, as in ReLU layers) makes its median 0; its live neurons are then
    ranked by their own median, not as if infinitely above every other layer's (which kept all of them at any keep)."""
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(512, generator=g) for _ in range(4)]
    scores[2][:308] = 0  # 204 live neurons
    widths = allocate_widths(scores, 0.25, 8, "median")
    assert 8 < widths[2] < 96  # about a quarter of its live neurons' share of the line, not all 204 of them
    assert allocate_widths(scores, 0.5, 8, "median")[2] < 204
    scores[3].zero_()  # a layer with nothing live keeps the minimum
    assert allocate_widths(scores, 0.25, 8, "median")[3] == 8


@pytest.mark.parametrize("allocation", ["global", "median", "standardized"])
def test_ties_at_the_cut_cannot_keep_more_than_the_budget(allocation):
    """Dead neurons all score 0: when the cut falls among them, the share asked for is kept, not every tied neuron
    (which kept the whole model at keep 0.8 with 60 of 256 neurons dead)."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(128, generator=g) + 0.5 for _ in range(2)]
    scores[1][:60] = 0
    widths = allocate_widths(scores, 0.8, 8, allocation)
    assert abs(sum(widths) - 0.8 * 256) <= 8, widths


def test_wanda_sp_is_flaps_reference_score():
    """FLAP's prune_wanda_sp: |W_down| * sqrt(mean of the input's squares), averaged over the output rows; from the
    statistics capture keeps (mean, population variance) and the column's mean |weight|."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 24, generator=gen, dtype=torch.float64)
    x = x * torch.linspace(0.1, 3, 24) + torch.linspace(-2, 2, 24)  # neurons of other scales and means
    w = torch.randn(16, 24, generator=gen, dtype=torch.float64)  # down_proj: hidden x neurons
    reference = (w.abs() * x.pow(2).mean(0).sqrt()).mean(0)
    ev = LayerEvidence(layer=0, mean_abs=x.abs().mean(0), var=x.var(0, unbiased=False), out_norm=w.norm(dim=0),
                       in_norm=torch.ones(24), mean=x.mean(0), out_abs_mean=w.abs().mean(0))
    torch.testing.assert_close(score_layer("wanda-sp", ev, 0), reference)


def test_baseline_formulas():
    ev = _evidence()
    rms = (ev.var.double() + ev.mean.double() ** 2).sqrt()
    torch.testing.assert_close(score_layer("wanda-sp", ev, 0), rms * ev.out_abs_mean.double())
    torch.testing.assert_close(score_layer("flap", ev, 0), (ev.var * ev.out_norm**2).double())
    torch.testing.assert_close(score_layer("magnitude", ev, 0), (ev.in_norm * ev.out_norm).double())
    assert set(top_neurons(score_layer("fn", ev, 0), 10).tolist()) == set(range(10))


def test_random_is_seeded_and_differs_per_layer():
    a0, a1 = score_layer("random", _evidence(0), 7), score_layer("random", _evidence(1), 7)
    assert torch.equal(a0, score_layer("random", _evidence(0), 7))
    assert not torch.equal(a0, a1)
    assert not torch.equal(a0, score_layer("random", _evidence(0), 8))


def test_fn_task_boosts_relevant_networks_only():
    ev = _evidence()
    flap = score_layer("flap", ev, 0)
    boosted = score_layer("fn-task", ev, 0, boost=100.0)
    ratio = boosted / (flap / flap.mean())
    assert torch.allclose(ratio[:5], torch.tensor(101.0, dtype=torch.float64))
    assert torch.allclose(ratio[5:], torch.tensor(1.0, dtype=torch.float64))
    assert set(top_neurons(boosted, 5).tolist()) == set(range(5))


def test_network_criteria_need_networks():
    for method in ("fn", "fn-task"):
        with pytest.raises(ValueError, match="networks"):
            score_layer(method, _evidence(with_networks=False), 0)
    with pytest.raises(ValueError, match="unknown method"):
        score_layer("nope", _evidence(), 0)
    assert set(CRITERIA) == {"fn-task", "fn", "random", "magnitude", "wanda-sp", "flap"}


def test_default_fn_boost_follows_the_budget():
    from fnprune.recipe import default_fn_boost

    assert default_fn_boost(0.9) == default_fn_boost(0.5) == default_fn_boost(0.25) == 16.0  # reconstruct on
    assert default_fn_boost(0.9, False) == default_fn_boost(0.75, False) == 1.0
    assert default_fn_boost(0.5, False) == default_fn_boost(0.25, False) == 16.0


def test_a_layer_ranked_below_the_budget_keeps_the_least_allowed():
    """A layer with none of the top `keep` neurons keeps one multiple of round_to, or one neuron when round_to
    is not below its width: it was given its whole width then, so the least important layer went unpruned."""
    scores = [torch.arange(128, dtype=torch.float64), torch.full((128,), 5.0)]  # z-scores: layer 1 all 0
    assert allocate_widths(scores, 0.2, 8, "standardized") == [48, 8]
    for round_to in (128, 256):
        assert allocate_widths(scores, 0.2, round_to, "standardized") == [51, 1]


def test_sparsity_is_the_keep_it_names():
    """--sparsity 0.7 is --keep 0.3 exactly: 1 - 0.7 in floats is 0.30000000000000004, which rounds a width that
    lands on a half (8960 x 0.3 / 256 = 10.5) up where keep 0.3 rounds it to the even multiple."""
    from fnprune.cli_flags import flag_overrides

    for sparsity, keep in ((0.7, 0.3), (0.55, 0.45), (0.85, 0.15), (0.9, 0.1), (0.5, 0.5)):
        got = flag_overrides({}, sparsity)["selection.keep"]
        assert got == keep and layer_width(8960, got, 256) == layer_width(8960, keep, 256)
