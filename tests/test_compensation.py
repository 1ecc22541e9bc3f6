"""Least-squares reconstruction of removed neurons: the math alone, on synthetic activations."""

from __future__ import annotations

import pytest
import torch

from fnprune.compensation import fold_into_output, reconstruction_map, removed_indices
from fnprune.moments import SecondMoments


def _linear_tokens(n_tokens: int = 500, width: int = 12, seed: int = 0):
    """Activations whose neurons 8..11 are exact affine functions of neurons 0..7."""
    gen = torch.Generator().manual_seed(seed)
    kept_part = torch.randn(n_tokens, 8, generator=gen) * torch.linspace(0.5, 2, 8) + 1.5
    mix = torch.randn(8, width - 8, generator=gen)
    offset = torch.randn(width - 8, generator=gen)
    return torch.cat([kept_part, kept_part @ mix + offset], dim=1), mix


def test_recovers_an_exact_linear_dependence():
    tokens, mix = _linear_tokens()
    keep = torch.arange(8)
    m = reconstruction_map(tokens, keep, tokens.mean(0), ridge=0)
    torch.testing.assert_close(m, mix, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("centred", [True, False])
def test_folded_weights_reproduce_the_dense_output(centred):
    tokens, _ = _linear_tokens(seed=1)
    keep = torch.tensor([5, 0, 3, 1, 2, 7, 6, 4])  # unsorted on purpose
    centre = tokens.mean(0) if centred else None
    m = reconstruction_map(tokens.double(), keep, centre, ridge=0)
    w = torch.randn(12, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w_kept, bias = fold_into_output(w, keep, m, centre)
    assert (bias is None) == (not centred)
    approx = tokens.double()[:, keep.sort().values] @ w_kept + (bias if bias is not None else 0)
    dense = tokens.double() @ w
    # Through zero, the affine offset cannot be represented exactly: only the centred fit is exact.
    if centred:
        torch.testing.assert_close(approx, dense, atol=1e-3, rtol=1e-3)
    else:
        assert (approx - dense).pow(2).mean() < 0.1 * dense.var()


def test_beats_the_mean_fill_on_correlated_neurons():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2000, 6, generator=gen)
    tokens = torch.cat([base, base[:, :3] * 0.8 + 0.3 * torch.randn(2000, 3, generator=gen)], dim=1)
    fit, test = tokens[:1000], tokens[1000:]
    keep = torch.arange(6)
    m = reconstruction_map(fit, keep, fit.mean(0), ridge=0.1)
    removed = removed_indices(keep, 9)
    recon = fit.mean(0)[removed] + (test[:, keep] - fit.mean(0)[keep]) @ m
    mean_fill = fit.mean(0)[removed].expand_as(recon)
    truth = test[:, removed]
    assert (recon - truth).pow(2).mean() < 0.2 * (mean_fill - truth).pow(2).mean()


def test_ridge_shrinks_the_map_and_negative_ridge_is_refused():
    tokens, _ = _linear_tokens(seed=4)
    keep = torch.arange(8)
    small = reconstruction_map(tokens, keep, tokens.mean(0), ridge=0.01)
    large = reconstruction_map(tokens, keep, tokens.mean(0), ridge=10)
    assert large.norm() < 0.5 * small.norm()
    with pytest.raises(ValueError, match="ridge"):
        reconstruction_map(tokens, keep, None, ridge=-1)


@pytest.mark.parametrize("centred", [True, False])
def test_the_sample_moments_give_the_same_map_as_the_tokens(centred):
    tokens, _ = _linear_tokens(seed=4)
    tokens = tokens + 0.1 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5))
    keep = torch.tensor([0, 2, 4, 6, 8, 10])
    centre = tokens.mean(0) + 0.2 if centred else None  # e.g. the mean over all tokens, not just the sample
    x = (tokens - (centre if centred else 0)).double()  # the ridge regression written out on the tokens
    removed = removed_indices(keep, tokens.shape[1])
    kk, kr = x[:, keep].T @ x[:, keep] / len(x), x[:, keep].T @ x[:, removed] / len(x)
    want = torch.linalg.solve(kk + 0.1 * kk.diagonal().mean() * torch.eye(len(keep), dtype=torch.float64), kr)
    moments = SecondMoments(tokens.shape[1], dtype=torch.float32)
    for chunk in tokens.split(64):
        moments.update(chunk)
    for sample in (tokens, moments):
        torch.testing.assert_close(reconstruction_map(sample, keep, centre, ridge=0.1), want.float(), atol=1e-4,
                                   rtol=1e-4)


def test_fewer_tokens_than_kept_neurons_fit_through_the_token_gram(monkeypatch):
    """Wide MLPs keep fewer tokens than neurons: the fit goes through the T x T token Gram (push-through
    identity) and gives the k x k fit's map, checked against a float64 solve of the k x k system."""
    from fnprune import compensation

    calls = []
    through_tokens = compensation.fit_token_gram
    monkeypatch.setattr(compensation, "fit_token_gram", lambda *a: calls.append(1) or through_tokens(*a))
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(60, 20, generator=gen) @ torch.randn(20, 200, generator=gen) + 0.3 * torch.randn(
        60, 200, generator=gen) + 2.0  # (T, d): 60 tokens < 100 kept neurons
    keep = torch.randperm(200, generator=gen)[:100]
    centre = tokens.mean(0) + 0.1
    got = reconstruction_map(tokens, keep, centre, ridge=0.1)
    x = tokens.double() - centre.double()
    kept, removed = keep.sort().values, removed_indices(keep, 200)
    kk = x[:, kept].T @ x[:, kept] / 60
    kk.diagonal().add_(0.1 * kk.diagonal().mean())
    want = torch.linalg.solve(kk, x[:, kept].T @ x[:, removed] / 60)
    assert calls and got.shape == (100, 100) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    moments = reconstruction_map(SecondMoments.of(tokens.double()), keep, centre, ridge=0.1)  # the k x k path
    torch.testing.assert_close(got, moments, atol=1e-4, rtol=1e-3)


def test_answer_emphasis_blends_the_fit_between_the_sample_and_the_emphasised_tokens():
    from fnprune.compensation import reconstruction_map
    from fnprune.moments import SecondMoments

    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(400, 12, generator=g), torch.randn(50, 12, generator=g) @ torch.randn(12, 12, generator=g)
    keep, centre = torch.tensor([0, 2, 3, 7, 9, 11]), x.double().mean(0)
    plain = reconstruction_map(x, keep, centre, 0.1)
    assert torch.allclose(reconstruction_map(x, keep, centre, 0.1, emphasis=e, emphasis_weight=0.0), plain)
    blended = reconstruction_map(x, keep, centre, 0.1, emphasis=e, emphasis_weight=0.5)
    assert not torch.allclose(blended, plain, atol=1e-3)
    from_moments = reconstruction_map(SecondMoments.of(x), keep, centre, 0.1, emphasis=e, emphasis_weight=0.5)
    torch.testing.assert_close(from_moments, blended, atol=1e-5, rtol=1e-4)
    nearly_all = reconstruction_map(x, keep, centre, 0.1, emphasis=e, emphasis_weight=1 - 1e-9)
    only_e = reconstruction_map(e - centre.float(), keep, None, 0.1)
    torch.testing.assert_close(nearly_all, only_e, atol=1e-4, rtol=1e-3)


def test_kept_inputs_that_never_vary_do_not_dilute_the_reconstructions_ridge():
    """Both fits (kept-neuron Gram, and token Gram for fewer tokens than kept neurons) scale the ridge by the mean
    variance of the kept inputs that vary: a dead kept neuron leaves the other neurons' map as it was."""
    from fnprune.compensation import fit_kept_gram, fit_token_gram

    gen = torch.Generator().manual_seed(0)
    live = torch.randn(6, 10, generator=gen)  # 6 tokens: fewer than kept neurons for the token Gram
    x = torch.cat([live[:, :4], torch.zeros(6, 1), live[:, 4:]], dim=1)  # neuron 4 never varies (dead); removed 8-10
    keep_live, keep_dead = torch.tensor([0, 1, 2, 3, 5, 6, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    for fit in (fit_kept_gram, fit_token_gram):
        without = fit(x, keep_live, 0.5)  # (7, removed 4)
        with_dead = fit(x, keep_dead, 0.5)  # (8, removed 3): neuron 4 kept, not removed
        torch.testing.assert_close(with_dead[[0, 1, 2, 3, 5, 6, 7]], without[:, 1:], atol=1e-5, rtol=1e-4)
        assert not with_dead[4].any()  # the dead neuron maps to nothing
