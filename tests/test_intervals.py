"""The paired bootstrap interval of pruned / dense accuracy (fnprune.intervals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fnprune.card import _accuracy_rows, chance_text, retained_text
from fnprune.intervals import difference_interval, retained_interval


def _hits(p: float, n: int, seed: int, templates: int = 3) -> torch.Tensor:
    return torch.rand(templates, n, generator=torch.Generator().manual_seed(seed)) < p


def test_a_model_that_answers_as_dense_has_no_spread():
    dense = _hits(0.6, 400, 0)
    assert retained_interval(dense, dense.clone()) == (1.0, 1.0)


def test_the_interval_covers_the_ratio_with_the_binomial_width():
    n = 2000
    dense = torch.ones(1, n, dtype=torch.bool)  # always right: the ratio is the pruned accuracy
    pruned = _hits(0.5, n, 1, templates=1)
    low, high = retained_interval(dense, pruned)
    ratio = pruned.double().mean().item()
    assert low < ratio < high
    half = 1.96 * math.sqrt(0.25 / n)  # the normal approximation's half width
    assert abs((high - low) / 2 - half) < 0.25 * half


def test_pairing_narrows_it():
    """Pruned answers the same examples right as dense but for a few: far narrower than two independent
    samples would give."""
    dense = _hits(0.6, 872, 2)
    pruned = dense.clone()
    pruned[:, :20] = ~pruned[:, :20]
    low, high = retained_interval(dense, pruned)
    assert high - low < 0.05


def test_same_inputs_same_interval_and_none_without_a_ratio():
    dense, pruned = _hits(0.55, 300, 3), _hits(0.5, 300, 4)
    assert retained_interval(dense, pruned) == retained_interval(dense, pruned)
    assert retained_interval(torch.zeros(2, 50, dtype=torch.bool), pruned[:2, :50]) is None
    assert retained_interval(dense, pruned[:, :10]) is None  # not the same examples


def test_text_of_a_report_with_and_without_the_interval():
    assert retained_text({"retained": 0.9171, "retained_ci95": [0.8812, 0.9561]}) == (
        "91.7% of dense (95% interval 88.1-95.6%)")
    assert retained_text({"retained": 0.9171}) == "91.7% of dense"
    assert retained_text({"retained": None}) == retained_text({}) == retained_text({"retained": True}) == ""


def test_a_dense_model_at_chance_is_said_so_in_the_summary_and_the_card(capsys):
    """BoolQ on SmolLM2: dense 0.455 where always answering the most frequent label scores 0.59, so the pruned
    model's "103% of dense" says nothing; the summary and the card say so beside the chance row."""
    from fnprune.cli import _print_summary

    at_chance = {"dense": 0.455, "pruned": 0.47, "majority_class": 0.59}
    assert "not above it" in chance_text(at_chance) and chance_text({**at_chance, "dense": 0.6}) == ""
    assert chance_text({"dense": None, "majority_class": 0.5}) == chance_text({}) == ""
    report = {"task": "boolq", "metric": {"name": "accuracy", "n": 100, "split": "validation", **at_chance},
              "templates": []}
    _print_summary(report, "out")
    assert "(chance level; the dense model is not above it" in capsys.readouterr().out
    _print_summary({**report, "metric": {**report["metric"], "dense": 0.7}}, "out")
    assert "(chance level)" in capsys.readouterr().out
    assert "(chance level): the dense model is not above it" in _accuracy_rows("boolq", report)  # the card's rows


def test_inspect_says_when_the_dense_model_is_at_chance(model_dir, tmp_path):
    import shutil

    from click.testing import CliRunner

    from fnprune.cli import main

    tmp_path = Path(shutil.copytree(model_dir("llama"), tmp_path / "ckpt"))  # inspect reads the weights too
    metric = {"name": "accuracy", "n": 100, "split": "validation", "dense": 0.455, "pruned": 0.47,
              "majority_class": 0.59}
    (tmp_path / "report.json").write_text(json.dumps({"task": "boolq", "metric": metric}))
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)]).output
    assert "always the most frequent label scores 0.5900: the dense model is not above it" in out
    (tmp_path / "report.json").write_text(json.dumps({"task": "boolq", "metric": {**metric, "dense": 0.7}}))
    assert "most frequent" not in CliRunner().invoke(main, ["inspect", str(tmp_path)]).output


def test_the_difference_of_two_pruned_models_is_paired():
    """Two pruned models that differ on 30 of 872 examples: the difference's interval holds the true one and is
    far narrower than either model's own interval; two equal models differ by exactly nothing."""
    dense = _hits(0.6, 872, 5)
    first = _hits(0.5, 872, 6)
    second = first.clone()
    second[:, :30] = True  # right on 30 more examples at most
    low, high = difference_interval(dense, first, second)
    truth = ((second.double().mean() - first.double().mean()) / dense.double().mean()).item()
    assert 0 <= low <= truth <= high
    own_low, own_high = retained_interval(dense, second)
    assert high - low < (own_high - own_low) / 3
    assert difference_interval(dense, first, first.clone()) == (0.0, 0.0)
    assert difference_interval(dense, first, second[:, :10]) is None


def test_the_draws_difference_resamples_draws_as_well_as_examples():
    from fnprune.intervals import draws_difference_interval

    first = torch.tensor([1.0, 0.0] * 50)
    assert draws_difference_interval(first, torch.stack([first] * 3)) == (0.0, 0.0)  # every draw answers alike
    assert draws_difference_interval(first, first[None, :10]) is None  # shapes disagree
    spread = torch.stack([first, first, torch.zeros(100)])  # one draw wrong everywhere
    low, high = draws_difference_interval(first, spread, seed=1)
    assert low < -0.4 and high == 0.0  # from "the low draw three times" (-0.5) to "never the low draw" (0)
    assert draws_difference_interval(first, spread, seed=1) == (low, high)
