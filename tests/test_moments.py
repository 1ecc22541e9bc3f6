"""Second moments accumulated batch by batch equal the moments of the stored sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fnprune.moments import SecondMoments


def _tokens(n: int = 700, width: int = 37, offset: float = 50.0, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a large common offset (float32 sums without a shift would cancel)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, width, generator=gen,
                                                                                 dtype=torch.float64)
    return base + 0.3 * torch.randn(n, width, generator=gen, dtype=torch.float64) + offset


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_streamed_covariance_equals_the_stored_sample(dtype, tol):
    tokens = _tokens()  # odd width: the packed blocks are uneven
    moments = SecondMoments(tokens.shape[1], dtype=dtype)
    for chunk in tokens.to(dtype).split(97):
        moments.update(chunk)
    assert moments.count == len(tokens) and moments.packed.numel() < tokens.shape[1] ** 2
    scale = tokens.var(0).max().item()
    torch.testing.assert_close(moments.mean(), tokens.mean(0), atol=tol * 50, rtol=tol)
    centred = tokens - tokens.mean(0)
    torch.testing.assert_close(moments.covariance(), centred.T @ centred / len(tokens), atol=tol * scale, rtol=tol)
    centre = tokens.mean(0) + 0.5  # around another point, e.g. the mean over all tokens, not just the sample
    around = tokens - centre
    torch.testing.assert_close(moments.covariance(centre), around.T @ around / len(tokens), atol=tol * scale,
                               rtol=tol)
    zero = torch.zeros(tokens.shape[1], dtype=torch.float64)
    torch.testing.assert_close(moments.covariance(zero), tokens.T @ tokens / len(tokens), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covariance_rows_are_rows_of_the_covariance(dtype):
    moments = SecondMoments.of(_tokens(), dtype)  # odd width 37: uneven panels, rows from each of them
    rows = torch.tensor([0, 3, 17, 18, 19, 36])
    centre = moments.mean() + 0.25
    for around in (None, centre, torch.zeros(37, dtype=torch.float64)):
        full = moments.covariance(around)
        assert torch.equal(moments.covariance_rows(rows, around), full[rows])
    assert moments.covariance_rows(torch.tensor([], dtype=torch.long)).shape == (0, 37)


def test_correlation_gram_is_the_spatial_ica_gram():
    tokens = _tokens(offset=0.0).numpy()
    tokens[:, 7] = 1.5  # a dead neuron
    moments = SecondMoments.of(tokens)
    assert moments.constant.nonzero().flatten().tolist() == [7]
    std = tokens.std(0)
    z = np.where(std > 0, (tokens - tokens.mean(0)) / np.where(std > 0, std, 1), 0.0).T  # (d, T) as the whitening
    z[std > 0] -= z[std > 0].mean(0)  # each token centred across the live neurons: the dead one stays 0
    np.testing.assert_allclose(moments.correlation_gram().numpy(), z @ z.T / len(tokens), atol=1e-10)


def test_state_round_trip_and_checks():
    tokens = _tokens()
    moments = SecondMoments.of(tokens, torch.float32)
    again = SecondMoments.from_state(moments.state())
    torch.testing.assert_close(again.covariance(), moments.covariance())
    assert again.count == moments.count and again.width == moments.width
    with pytest.raises(ValueError, match="no tokens"):
        SecondMoments(4).covariance()
    with pytest.raises(ValueError, match="flat"):
        SecondMoments(4, out=torch.zeros(16))
    buffer = torch.zeros(SecondMoments.packed_size(6), dtype=torch.float64)
    into = SecondMoments(6, out=buffer)
    into.update(torch.randn(10, 6, dtype=torch.float64))
    assert buffer.abs().sum() == 0 and into.n_pending == 10  # fewer rows than a group wait
    into.flush()
    assert buffer.abs().sum() > 0  # accumulated in the caller's buffer
    bad = torch.randn(10, 6, dtype=torch.float64)
    bad[3, 2] = float("inf")
    into.update(bad)
    assert not into.finite()


def _fields(m: SecondMoments) -> list[torch.Tensor]:
    m.flush()
    return [m.packed, m.sum, m.shift, m.low, m.high]


def test_groups_do_not_depend_on_how_rows_arrive():
    tokens = _tokens(n=1000).float()
    first = tokens[:50]  # the shift is the first batch's mean: the same first batch everywhere
    want = SecondMoments(37, dtype=torch.float32)
    want.update(first)
    want.update(tokens[50:])
    for sizes in ([1] * 30 + [920], [7] * 130 + [40], [128, 300, 1, 500, 21], [950]):
        m = SecondMoments(37, dtype=torch.float32)
        m.update(first)
        start = 50
        for size in sizes:
            m.update(tokens[start : start + size])
            start += size
        assert start == 1000 and m.count == 1000
        assert all(torch.equal(a, b) for a, b in zip(_fields(m), _fields(want)))


def test_state_with_pending_rows_continues_bit_for_bit():
    tokens = _tokens(n=600).float()
    whole = SecondMoments(37, dtype=torch.float32)  # uninterrupted, same batches
    whole.update(tokens[:300])
    whole.update(tokens[300:])
    part = SecondMoments(37, dtype=torch.float32)
    part.update(tokens[:300])  # one group multiplied in, the rest pending
    state = {k: v.clone() for k, v in part.state().items()}
    assert state["pending"].shape == (300 % SecondMoments.GROUP_ROWS, 37)
    resumed = SecondMoments(37, dtype=torch.float32)
    resumed.load_state_(state)
    resumed.update(tokens[300:])
    assert all(torch.equal(a, b) for a, b in zip(_fields(resumed), _fields(whole)))
    copy = SecondMoments.from_state(part.state())  # multiplies the pending rows into its own copy
    want = SecondMoments.of(tokens[:300], torch.float32).covariance()  # other groups: rounding differs
    torch.testing.assert_close(copy.covariance(), want, rtol=1e-5, atol=1e-4)
    assert part.n_pending == 300 % SecondMoments.GROUP_ROWS  # the original is untouched


@pytest.mark.parametrize("width", [1, 3, 8, 37, 1536])
def test_panels_cover_the_upper_triangle_once(width):
    """The packed panels hold every entry on or above the diagonal, blocks below it as little as possible:
    at SmolLM2's width about 9/16 of d x d (the multiplications capture spends its extra time on)."""
    bounds = SecondMoments.bounds(width)
    assert bounds[0] == 0 and bounds[-1] == width and bounds == sorted(set(bounds))
    covered = torch.zeros(width, width, dtype=torch.long)
    for lo, hi in zip(bounds, bounds[1:]):
        covered[lo:hi, lo:] += 1
    assert covered.triu().eq(1).sum() == width * (width + 1) // 2 and covered.max() == 1
    assert SecondMoments.packed_size(width) == int(covered.sum())
    if width == 1536:
        assert SecondMoments.packed_size(width) == 9 * width * width // 16
    tokens = _tokens(n=50, width=width)
    centred = tokens - tokens.mean(0)
    torch.testing.assert_close(SecondMoments.of(tokens).covariance(), centred.T @ centred / 50)


def test_a_state_in_another_layout_is_refused():
    state = SecondMoments.of(_tokens()).state()
    state["packed"] = state["packed"][:-1]
    with pytest.raises(ValueError, match="layout"):
        SecondMoments.from_state(state)
