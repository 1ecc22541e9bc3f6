"""The torch ICA engine against known sources and against scikit-learn, which stays the reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from fnprune.moments import SecondMoments
from fnprune.networks.engines import find_networks_batch, find_networks_torch
from fnprune.networks.engines import find_networks_reference as find_networks
from fnprune.networks.fastica import fast_ica, match_components
from fnprune.networks.whitening import estimated_whitening_bytes as _whitening_bytes
from fnprune.networks.whitening import layer_whitening as _layer_whitening
from fnprune.networks.whitening import token_side as _token_side
from fnprune.networks.whitening import whiten, whiten_gram


@pytest.fixture(autouse=True)
def one_blas_thread():
    """numpy/scipy on one thread: threaded LAPACK on a shared machine made these small tests 10x slower."""
    with threadpool_limits(1):
        yield


def _mixture(n: int = 3000, features: int = 10, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(mixed data (n, features), true sources (4, n)): four non-Gaussian sources, two heavy- and two
    light-tailed (nonzero kurtosis, so "cube" can find them too), mixed linearly with a little noise."""
    rng = np.random.default_rng(seed)
    sources = np.stack([
        rng.laplace(size=n),
        rng.uniform(-1, 1, n),
        np.sign(rng.standard_normal(n)) * rng.exponential(size=n) ** 2,
        np.sin(np.linspace(0, 97, n)),
    ])  # (4, n)
    sources = (sources - sources.mean(1, keepdims=True)) / sources.std(1, keepdims=True)
    mixed = sources.T @ rng.standard_normal((4, features)) + 0.01 * rng.standard_normal((n, features))
    return torch.from_numpy(mixed), sources


def _planted(n_tokens: int = 800, width: int = 400, k: int = 4, size: int = 25, seed: int = 0) -> np.ndarray:
    """Token activations (T, d) with k planted networks of `size` neurons each (as in test_networks)."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((k, width))
    for i in range(k):
        maps[i, rng.choice(width, size, replace=False)] = rng.uniform(2, 4, size)
    return rng.standard_normal((n_tokens, k)) @ maps + 0.05 * rng.standard_normal((n_tokens, width))


def _sklearn_sources(whitened: torch.Tensor, fun: str, seed: int, max_iter: int = 200) -> np.ndarray:
    ica = FastICA(whiten=False, fun=fun, random_state=seed, max_iter=max_iter, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return ica.fit_transform(whitened.numpy()).T  # (k, n)


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("shape", [(3000, 10), (40, 300)])
def test_whiten_gives_white_columns_in_the_pca_subspace(method, shape):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((shape[0], 8)) @ rng.standard_normal((8, shape[1])) * 3 + 1)
    x += 0.1 * torch.from_numpy(rng.standard_normal(shape))
    white = whiten(x, 5, method, seed=0)
    n = shape[0]
    assert white.whitened.shape == (n, 5) and white.components.shape == (5, shape[1])
    torch.testing.assert_close(white.whitened.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(white.whitened.T @ white.whitened / n, torch.eye(5, dtype=torch.float64))
    xc = (x - x.mean(0)).numpy()
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    cosines = np.linalg.svd(u[:, :5].T @ white.whitened.numpy() / n**0.5, compute_uv=False)
    assert cosines.min() > 1 - 1e-8  # the same subspace as a full SVD
    np.testing.assert_allclose(white.explained.numpy(), s[:5] ** 2 / (s**2).sum(), rtol=1e-8)
    np.testing.assert_allclose(np.abs(white.components.numpy() @ vt[:5].T), np.eye(5), atol=1e-7)


def test_randomized_whitening_is_deterministic_for_a_seed():
    x, _ = _mixture()
    a, b = whiten(x, 4, "randomized", seed=3), whiten(x, 4, "randomized", seed=3)
    assert torch.equal(a.whitened, b.whitened)
    with pytest.raises(ValueError, match="method"):
        whiten(x, 4, "svd")
    with pytest.raises(ValueError, match="k"):
        whiten(x, 11)


@pytest.mark.parametrize("fun", ["logcosh", "cube"])
def test_recovers_known_sources(fun):
    x, sources = _mixture()
    result = fast_ica(whiten(x, 4).whitened, fun=fun, max_iter=400, seed=0)
    assert result.converged and result.sources.shape == (3000, 4) and result.unmixing.shape == (4, 4)
    _, perm = match_components(sources, result.sources.T)
    per = [abs(np.corrcoef(sources[i], result.sources[:, j])[0, 1]) for i, j in enumerate(perm)]
    assert min(per) > 0.95


@pytest.mark.parametrize("fun", ["logcosh", "cube"])
def test_matches_scikit_learn_on_the_same_whitened_data(fun):
    x, _ = _mixture(seed=2)
    whitened = whiten(x, 4).whitened
    ours = fast_ica(whitened, fun=fun, max_iter=400, seed=0)
    theirs = _sklearn_sources(whitened, fun, seed=5, max_iter=400)  # its own random start
    assert match_components(ours.sources.T, theirs)[0] >= 0.95
    # From scikit-learn's own start the two implementations take the same steps.
    w_init = np.random.RandomState(5).normal(size=(4, 4))
    same = fast_ica(whitened, fun=fun, max_iter=400, seed=0, w_init=w_init)
    np.testing.assert_allclose(same.sources.T.numpy(), theirs, atol=1e-8)


def test_deterministic_for_a_seed_and_restarts_keep_run_zero():
    x, _ = _mixture()
    whitened = whiten(x, 4).whitened
    a, b = fast_ica(whitened, seed=7), fast_ica(whitened, seed=7)
    assert torch.equal(a.sources, b.sources) and a.n_iter == b.n_iter
    assert not torch.equal(fast_ica(whitened, seed=8).unmixing, a.unmixing)
    several = fast_ica(whitened, seed=7, restarts=3)
    torch.testing.assert_close(several.sources, a.sources)
    assert several.n_iter == a.n_iter and a.stability is None
    assert several.component_stability.shape == (4,)


def test_stability_high_for_clean_mixtures_low_for_gaussian_noise():
    x, _ = _mixture()
    clean = fast_ica(whiten(x, 4).whitened, max_iter=400, seed=0, restarts=4)
    noise = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gauss = fast_ica(whiten(noise, 8).whitened, max_iter=400, seed=0, restarts=4)  # any rotation is as good
    assert clean.stability > 0.99
    assert gauss.stability < 0.9


def test_match_components_ignores_sign_and_order():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 200))
    order = np.array([3, 0, 4, 1, 2])
    b = a[order] * np.array([1, -1, 1, -2, 0.5])[:, None]
    score, perm = match_components(a, b)
    assert score == pytest.approx(1.0)
    np.testing.assert_array_equal(order[perm], np.arange(5))


def test_whitening_from_streamed_moments_equals_the_stored_sample():
    tokens = _planted()
    tokens[:, 7] = 1.5  # a dead neuron
    stream = SecondMoments(400)
    for chunk in np.array_split(tokens, 7):
        stream.update(chunk)
    assert int(stream.constant.sum()) == 1
    std = tokens.std(0)
    z = np.where(std > 0, (tokens - tokens.mean(0)) / np.where(std > 0, std, 1), 0.0).T  # (d, T) as the whitening
    z[std > 0] -= z[std > 0].mean(0)  # each token centred across the live neurons: the dead one stays 0
    np.testing.assert_allclose(stream.correlation_gram().numpy(), z @ z.T / len(tokens), atol=1e-10)
    stored = whiten(torch.from_numpy(z), 4, "gram")
    for method in ("krylov", "randomized"):
        streamed, explained = whiten_gram(stream.correlation_gram(), 4, method)
        torch.testing.assert_close(streamed, stored.whitened)  # same sign convention, too
        torch.testing.assert_close(explained, stored.explained)


def _spectrum_gram(m: int, rank: int, seed: int) -> torch.Tensor:
    """PSD (m, m) with a slowly decaying spectrum of `rank` nonzero eigenvalues: no gap to help the solver."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    return torch.from_numpy(basis @ np.diag(1.0 / np.arange(1, rank + 1) ** 0.3) @ basis.T)


@pytest.mark.parametrize("rank", [400, 60])  # full rank, and a space that stops growing after a few blocks
def test_block_krylov_finds_the_top_eigenpairs(rank):
    gram = _spectrum_gram(400, rank, seed=rank)
    exact, _ = whiten_gram(gram, 8, "eigh")
    eigval = torch.linalg.eigvalsh(gram).flip(0)[:8]
    for method, tol in (("krylov", 1e-6), ("randomized", 1e-2)):
        white, explained = whiten_gram(gram, 8, method)
        cos = torch.linalg.svdvals(white.T @ exact / 400).min()
        assert 1 - cos < tol, (method, float(1 - cos))  # Krylov is far closer for the same budget
        if method == "krylov":
            torch.testing.assert_close(explained, eigval / gram.trace())
            torch.testing.assert_close(white, exact, atol=1e-3, rtol=0)  # same signs (entries ~ 1)
    assert torch.equal(whiten_gram(gram, 8, "krylov", seed=5)[0], whiten_gram(gram, 8, "krylov", seed=5)[0])
    small = gram[:100, :100]  # a Krylov basis of 9 blocks of 16 would not fit: exact eigh instead
    assert torch.equal(whiten_gram(small, 8, "krylov")[0], whiten_gram(small, 8, "eigh")[0])
    with pytest.raises(ValueError, match="eigen method"):
        whiten_gram(gram, 8, "lanczos")


def test_find_networks_torch_matches_the_reference():
    tokens = _planted()
    ref = find_networks(tokens, 4, 2.5, seed=0)
    for eig in ("krylov", "randomized", "eigh"):
        ours = find_networks_torch(tokens, 4, 2.5, seed=0, eig_method=eig)
        assert ours.maps.shape == (4, 400) and ours.maps.dtype == np.float64 and ours.converged
        assert match_components(ours.maps, ref.maps)[0] > 0.99
        _, perm = match_components(ref.maps, ours.maps)
        for i, j in enumerate(perm):
            iou = (ref.members[i] & ours.members[j]).sum() / (ref.members[i] | ours.members[j]).sum()
            assert iou > 0.9
        np.testing.assert_allclose(ours.maps.mean(1), 0, atol=1e-9)
        np.testing.assert_allclose(ours.maps.std(1), 1, atol=1e-9)
        assert ((ours.maps**3).mean(1) > 0).all()  # heavy tail positive


def test_find_networks_torch_float32_and_restarts():
    tokens = _planted(seed=1)
    full = find_networks_torch(tokens, 4, 3.0, seed=0)
    single = find_networks_torch(tokens.astype(np.float32), 4, 3.0, seed=0, dtype=torch.float32, restarts=2)
    assert single.maps.dtype == np.float64
    assert match_components(single.maps, full.maps)[0] > 0.99


def test_find_networks_torch_checks_like_the_reference():
    tokens = _planted()
    tokens[:, :10] = 0.0
    found = find_networks_torch(tokens, 4, 3.0, seed=0)
    assert found.dead_neurons == find_networks(tokens, 4, 3.0, seed=0).dead_neurons == 10
    assert not found.members[:, :10].any()
    bad = tokens.copy()
    bad[0, 50] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        find_networks_torch(bad, 4, 3.0, seed=0)
    bad[0, 50] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        find_networks_torch(bad, 4, 3.0, seed=0)
    with pytest.raises(ValueError, match="components"):
        find_networks_torch(tokens[:4], 4, 3.0, seed=0)
    low_rank = np.random.default_rng(0).standard_normal((300, 3)) @ np.random.default_rng(1).standard_normal((3, 50))
    for dtype in (torch.float64, torch.float32):
        with pytest.raises(ValueError, match="rank"):
            find_networks_torch(low_rank, 4, 3.0, seed=0, dtype=dtype)
    with pytest.raises(ValueError, match="nonlinearity"):
        fast_ica(torch.zeros(10, 2, dtype=torch.float64), fun="tanh")


def test_wide_layers_whiten_from_the_token_gram():
    """Fewer tokens than neurons (wide MLPs keep their tokens): the T x T token Gram gives the neuron Gram's
    whitening, signs and dead neurons included, and so the reference engine's networks."""
    tokens = _planted(n_tokens=300, width=700, seed=4)
    tokens[:, 7] = 1.5  # a dead neuron
    assert _token_side(tokens) and not _token_side(tokens[:, :200]) and not _token_side(SecondMoments.of(tokens))
    neuron_side, dead = _layer_whitening(SecondMoments.of(tokens), 6, 0, "eigh", "cpu", torch.float64)
    token_side, token_dead = _layer_whitening(torch.from_numpy(tokens), 6, 0, "eigh", "cpu", torch.float64)
    torch.testing.assert_close(token_side, neuron_side, atol=1e-9, rtol=0)
    assert token_dead == dead == 1
    krylov, _ = _layer_whitening(torch.from_numpy(tokens), 6, 0, "krylov", "cpu", torch.float64)
    torch.testing.assert_close(krylov[:, :4], neuron_side[:, :4], atol=1e-9, rtol=0)  # the planted networks
    ref = find_networks(tokens, 4, 2.5, seed=0, runs=2)
    ours = find_networks_torch(tokens, 4, 2.5, seed=0, eig_method="eigh", runs=2)
    np.testing.assert_allclose(ours.maps, ref.maps, atol=1e-6)
    np.testing.assert_array_equal(ours.members, ref.members)
    assert ours.dead_neurons == ref.dead_neurons == 1
    # A float16 sample is widened before it is centred: the same as widening it first
    half = torch.from_numpy(tokens).half()
    widened, _ = _layer_whitening(half.double(), 6, 0, "eigh", "cpu", torch.float64)
    torch.testing.assert_close(_layer_whitening(half, 6, 0, "eigh", "cpu", torch.float64)[0], widened,
                               atol=1e-9, rtol=0)


def test_wide_layers_batched_checked_and_budgeted():
    layers = [_planted(n_tokens=200, width=500, seed=s) for s in (5, 6)]
    one_by_one = [find_networks_torch(t, 4, 2.5, seed=1, runs=2) for t in layers]
    batched = find_networks_batch(layers, 4, 2.5, seed=1, runs=2, dtype=torch.float64)
    for a, b in zip(one_by_one, batched, strict=True):
        np.testing.assert_allclose(b.maps, a.maps, atol=1e-8)
    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 200))
    for dtype in (torch.float64, torch.float32):
        with pytest.raises(ValueError, match="rank"):
            find_networks_torch(low_rank, 4, 3.0, seed=0, dtype=dtype)
    # Llama-7B's MLP with a 4,096-token sample: the token side needs well under the d x d path's 2.4 GB
    llama7b = torch.empty(4096, 11008, device="meta")
    assert _whitening_bytes(llama7b) < 2**30 < 20 * 11008**2


def test_torch_engine_takes_scikit_learns_steps_for_the_same_seed():
    """Same whitening (signs fixed alike) and scikit-learn's start for the seed: the two engines agree."""
    tokens = _planted(seed=3)
    for seed in (0, 4):
        ref = find_networks(tokens, 4, 2.5, seed=seed, runs=2)
        ours = find_networks_torch(tokens, 4, 2.5, seed=seed, eig_method="eigh", runs=2)
        np.testing.assert_allclose(ours.maps, ref.maps, atol=1e-6)
        np.testing.assert_array_equal(ours.members, ref.members)


def test_batched_layers_equal_layer_by_layer():
    layers = [_planted(seed=s) for s in (0, 1)] + [_planted(width=300, seed=2)]  # two widths
    one_by_one = [find_networks_torch(t, 4, 2.5, seed=1, runs=3) for t in layers]
    for limit in (2**23, 1):  # one batch per width, or one layer per batch
        batched = find_networks_batch((t for t in layers), 4, 2.5, seed=1, runs=3, dtype=torch.float64,
                                      max_batch_elements=limit)
        for a, b in zip(one_by_one, batched):
            np.testing.assert_allclose(b.maps, a.maps, atol=1e-8)
            assert b.maps.shape == (12, a.maps.shape[1]) and b.converged == a.converged
    moments = [SecondMoments.of(t.astype(np.float32), torch.float32) for t in layers]
    single = find_networks_batch(moments, 4, 2.5, seed=1, runs=3)  # the pipeline's float32 moments
    for a, b in zip(one_by_one, single):
        assert match_components(b.maps, a.maps)[0] > 0.999


def test_batched_layers_do_not_depend_on_the_worker_count():
    """Workers share the layers out; each layer runs on one torch thread, so its maps are bit for bit the same
    whatever the worker count (and so whatever the machine's core count)."""
    layers = [_planted(seed=s) for s in range(4)] + [_planted(width=300, seed=9)]
    moments = [SecondMoments.of(t.astype(np.float32), torch.float32) for t in layers]
    threads = torch.get_num_threads()
    ref = find_networks_batch(moments, 4, 2.5, seed=2, runs=2, workers=1)
    for workers in (2, 3, 8):
        got = find_networks_batch(iter(moments), 4, 2.5, seed=2, runs=2, workers=workers)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(b.maps, a.maps)
            np.testing.assert_array_equal(b.members, a.members)
            assert b.converged == a.converged
    assert torch.get_num_threads() == threads  # restored
    one_at_a_time = find_networks_batch(moments, 4, 2.5, seed=2, runs=2, workers=3, whitening_bytes=1)
    for a, b in zip(ref, one_at_a_time, strict=True):
        np.testing.assert_array_equal(b.maps, a.maps)
    with pytest.raises(ValueError, match="workers"):
        find_networks_batch(moments, 4, 2.5, seed=2, workers=0)


def test_whitening_memory_budget_bounds_what_runs_at_once():
    """Requests run side by side only while their bytes fit the limit; one bigger than the limit runs alone."""
    import threading
    import time

    from fnprune.networks.threads import ByteBudget as _ByteBudget

    budget, lock = _ByteBudget(100), threading.Lock()
    held, peaks = [0, 0], []

    def job(nbytes: int) -> None:
        with budget.hold(nbytes):
            with lock:
                held[0] += nbytes
                held[1] += 1
                peaks.append((held[0], held[1]))
            time.sleep(0.05)
            with lock:
                held[0] -= nbytes
                held[1] -= 1

    threads = [threading.Thread(target=job, args=(n,)) for n in (40, 40, 40, 150, 30, 60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 0 and len(peaks) == 6
    for total, count in peaks:
        assert total <= 100 or count == 1, (total, count)  # over the limit only when alone
    assert max(count for _, count in peaks) >= 2  # and small requests did share


def test_batched_layers_report_the_first_bad_layer_with_workers():
    layers = [_planted(seed=s) for s in range(5)]
    for bad in (1, 3):
        layers[bad][0, 3] = np.nan
    with pytest.raises(ValueError, match="layer 1: activations contain NaN"):
        find_networks_batch(layers, 4, 2.5, seed=0, workers=2)


def test_batched_layers_name_the_bad_layer():
    layers = [_planted(seed=0), _planted(seed=1)]
    layers[1][0, 3] = np.nan
    with pytest.raises(ValueError, match="layer 1: activations contain NaN"):
        find_networks_batch(layers, 4, 2.5, seed=0)
