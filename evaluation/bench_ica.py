"""Speed and agreement of the torch ICA engine (fnprune.networks) against scikit-learn on real SmolLM2 activations.

Captures MLP activations once through `fnprune.pipeline.calibrate` (compress's calibration sample, kept as tokens;
--samples / --max-tokens default to the recipe's, in fnprune's cache), then per layer times, side by side in the
same process:
  (a) `fnprune.networks.engines.find_networks_reference` (numpy Gram + eigh, scikit-learn FastICA on the whitened data);
  (b) plain scikit-learn `FastICA(n_components=k, whiten="unit-variance")` on the full z-scored neuron x token
      matrix, as a user would run the reference (full SVD whitening);
  (c) `fnprune.networks.engines.find_networks_torch`: float64 and float32, randomized (default) and exact eigh
      whitening.
(a) and (b) run twice: with the BLAS thread defaults, as users get them, and pinned to one thread (threadpoolctl),
because threaded LAPACK on a loaded machine is what makes the defaults slow and that is not the algorithm's cost.
Agreement is the mean |corr| of the maps after Hungarian matching; since FastICA started from another random
matrix lands on partly different components, the reference against itself with the next seed is the ceiling.
Machine load is shared and noisy: compare ratios within one run, not absolute seconds across runs.

    python -m evaluation.bench_ica --samples 256 --max-tokens 4096                 # layers 0, 10, 20, 29
    python -m evaluation.bench_ica --samples 256 --max-tokens 4096 --all-layers
    python -m evaluation.bench_ica --samples 256 --max-tokens 4096 --model-wide    # bench_ica_model.md

--model-wide times the whole networks stage instead: every layer, pooled runs, the torch engine batched over
layers from float32 moments (the default) against scikit-learn layer by layer, both from scikit-learn's start
for the same seeds, so their maps should agree up to rounding amplified by FastICA's own instability.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from evaluation.tables import with_extension, write_file
from fnprune.moments import SecondMoments
from fnprune.networks import LayerNetworks
from fnprune.networks.engines import find_networks_batch, find_networks_reference, find_networks_torch
from fnprune.networks.fastica import fast_ica, match_components
from fnprune.networks.whitening import whiten_gram
from fnprune.recipe import CalibrationSpec, ModelSpec, NetworksSpec, Recipe, TaskSpec

HERE = Path(__file__).resolve().parent
MODEL = Path("~/.cache/fnprune-models/smollm2-135m-instruct").expanduser()
DATA = Path("/work/shared/data/sst2")
TORCH_VARIANTS = [  # (name, dtype, eig_method)
    ("t64", torch.float64, "randomized"),
    ("t32", torch.float32, "randomized"),
    ("t64_eigh", torch.float64, "eigh"),
    ("t32_eigh", torch.float32, "eigh"),
]


def capture_tokens(n_samples: int, max_tokens: int, seed: int) -> list[torch.Tensor]:
    """Per-layer sampled token activations (T, d) of the calibration sample compress draws, through the
    package's calibrate (kept as tokens, not moments) and its on-disk cache."""
    from fnprune.calibration import calibrate
    from fnprune.data import label_keys, resolve_task
    from fnprune.inputs import calibration_prompts, evaluation_texts
    from fnprune.models import load_model

    recipe = Recipe(
        model=ModelSpec(name_or_path=str(MODEL)), task=TaskSpec(name="sst2", data_dir=str(DATA)),
        calibration=CalibrationSpec(num_samples=n_samples, max_tokens=max_tokens, seed=seed, sample_store="tokens"),
    )
    task = resolve_task(recipe.task)
    cal = recipe.calibration
    examples = calibration_prompts(task, cal, evaluation_texts(task, recipe.evaluation.enabled))  # compress's
    model, tokenizer = load_model(recipe.model)
    calib = calibrate(model, tokenizer, examples, dict.fromkeys(label_keys(task, examples), ""), recipe,
                      with_networks=False, progress=False, use_cache=True)
    return [a.tokens for a in calib.activations]


def sklearn_plain(tokens: np.ndarray, components: int, seed: int, max_iter: int, tol: float) -> np.ndarray:
    """The reference as users run it: FastICA with its own (full SVD) whitening on the neuron x token matrix."""
    std = tokens.std(axis=0)
    x = np.where(std > 0, (tokens - tokens.mean(axis=0)) / np.where(std > 0, std, 1), 0.0).T  # (d, T)
    ica = FastICA(n_components=components, whiten="unit-variance", max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return ica.fit_transform(x).T  # (k, d) spatial maps


def timed(fn: Callable[[], Any], repeats: int, every: list[float] | None = None) -> tuple[Any, float]:
    """Result of the first call and the best wall time of `repeats` calls (the best is the least disturbed);
    every call's time is appended to `every` when given."""
    best, out = float("inf"), None
    for i in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        best = min(best, seconds)
        if every is not None:
            every.append(round(seconds, 3))
        out = result if i == 0 else out
    return out, best


def same_start_match(
    tokens: torch.Tensor, components: int, seed: int, max_iter: int, tol: float
) -> tuple[float, float]:
    """(match, whitening cosine): the iterations alone, torch vs scikit-learn from the same whitened data and start.

    Also the smallest principal cosine between the randomized and the exact (eigh) whitening subspaces.
    """
    stream = SecondMoments(tokens.shape[1])
    stream.update(tokens)
    gram = stream.correlation_gram()
    exact, _ = whiten_gram(gram, components, "eigh")  # (d, k)
    fast, _ = whiten_gram(gram, components, "randomized", seed)
    cosine = float(torch.linalg.svdvals(exact.T @ fast / exact.shape[0]).min())
    w_init = np.random.RandomState(seed).normal(size=(components, components))  # what FastICA(random_state=seed) draws
    ica = FastICA(whiten=False, max_iter=max_iter, tol=tol, random_state=seed)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = ica.fit_transform(exact.numpy()).T  # (k, d)
    ours = fast_ica(exact, "logcosh", max_iter, tol, seed, w_init=w_init).sources.T
    return match_components(ours, ref)[0], cosine


def per_component(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|corr| of each row of a (k, n) with its matched row of b (k, n)."""
    _, perm = match_components(a, b)
    return np.array([abs(np.corrcoef(a[i], b[j])[0, 1]) for i, j in enumerate(perm)])


def stable_match(
    ours: np.ndarray, ref: np.ndarray, ref_other_seed: np.ndarray, floor: float = 0.9
) -> tuple[float, int]:
    """Match with the reference over the reference components that its next seed reproduces (|corr| >= floor)."""
    per_ours = per_component(ref, ours)
    keep = per_component(ref, ref_other_seed) >= floor
    return (float(per_ours[keep].mean()) if keep.any() else float("nan")), int(keep.sum())


def bench_layer(tokens: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    k, seed, it, tol, reps = args.components, args.seed, args.max_iter, args.tol, args.repeats
    x = tokens.numpy()
    row: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}

    def ref(name: str, fn: Callable[[], Any], pinned: bool, repeats: int) -> None:
        with threadpool_limits(1) if pinned else nullcontext():
            out, row[f"t_{name}"] = timed(fn, repeats)
        maps[name] = out.maps if isinstance(out, LayerNetworks) else out
        if isinstance(out, LayerNetworks):
            row[f"converged_{name}"] = out.converged

    if not args.skip_as_run:
        ref("a", lambda: find_networks_reference(x, k, args.threshold, seed, it, tol), False, 1)
        ref("b", lambda: sklearn_plain(x, k, seed, it, tol), False, 1)
    ref("a1", lambda: find_networks_reference(x, k, args.threshold, seed, it, tol), True, reps)
    ref("b1", lambda: sklearn_plain(x, k, seed, it, tol), True, reps)
    ref("a1_next_seed", lambda: find_networks_reference(x, k, args.threshold, seed + 1, it, tol), True, 1)
    for name, dtype, eig in TORCH_VARIANTS:
        ref(name, lambda d=dtype, e=eig: find_networks_torch(tokens, k, args.threshold, seed, it, tol, dtype=d,
                                                            eig_method=e), False, reps)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref("t64_1thread", lambda: find_networks_torch(tokens, k, args.threshold, seed, it, tol), False, reps)
    finally:
        torch.set_num_threads(torch_threads)
    stream = SecondMoments(tokens.shape[1])
    stream.update(tokens)
    white, _ = whiten_gram(stream.correlation_gram(), k, "randomized", seed)
    multi, row["t_t64_restarts4_ica"] = timed(lambda: fast_ica(white, "logcosh", it, tol, seed, restarts=4), 1)
    row["stability_t64_restarts4"] = multi.stability
    row["same_start_match"], row["whitening_min_cos"] = same_start_match(tokens, k, seed, it, tol)
    ref_key = "a1"
    for name in [n for n, _, _ in TORCH_VARIANTS] + ["b1"]:
        row[f"match_{name}_vs_a"] = match_components(maps[name], maps[ref_key])[0]
    row["match_t64_vs_b"] = match_components(maps["t64"], maps["b1"])[0]
    row["match_a_vs_a_next_seed"] = match_components(maps[ref_key], maps["a1_next_seed"])[0]
    row["match_t64_vs_a_stable"], row["n_stable"] = stable_match(maps["t64"], maps[ref_key], maps["a1_next_seed"])
    return row


def bench_model(layers_tokens: list[torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """All layers as compress runs them (--runs pooled runs per layer): the torch engine batched over layers,
    from the float32 second moments capture keeps, against scikit-learn layer by layer (1 BLAS thread), from the
    same tokens' moments, same seeds. The reference with the next --runs seeds is its own ceiling."""
    k, seed, it, tol, runs = args.components, args.seed, args.max_iter, args.tol, args.runs
    out: dict[str, Any] = {"runs": runs, "layers": len(layers_tokens)}

    # The moments exist before the networks stage (capture accumulates them), so neither engine is timed on
    # forming them: scikit-learn gets float64 moments, torch the float32 ones capture keeps (or float64).
    moments = {dtype: [SecondMoments.of(t.to(dtype), dtype) for t in layers_tokens]
               for dtype in (torch.float32, torch.float64)}

    def sklearn_all(first: int) -> list[LayerNetworks]:
        with threadpool_limits(1):
            return [find_networks_reference(m, k, args.threshold, first, it, tol, runs=runs)
                    for m in moments[torch.float64]]

    def torch_all(dtype: torch.dtype) -> list[LayerNetworks]:
        return find_networks_batch(moments[dtype], k, args.threshold, seed, it, tol, runs=runs, dtype=dtype)

    ref, out["t_sklearn"] = timed(lambda: sklearn_all(seed), 1)
    out["t_torch32_runs"] = []
    ours, out["t_torch32"] = timed(lambda: torch_all(torch.float32), args.repeats, out["t_torch32_runs"])
    ours64, out["t_torch64"] = timed(lambda: torch_all(torch.float64), 1)
    other = sklearn_all(seed + runs)
    per_layer = []
    for i, (r, o, o64, nxt) in enumerate(zip(ref, ours, ours64, other)):
        per_layer.append({
            "layer": i,
            "torch32_vs_sklearn": match_components(o.maps, r.maps)[0],
            "torch64_vs_sklearn": match_components(o64.maps, r.maps)[0],
            "sklearn_vs_sklearn_next_seeds": match_components(nxt.maps, r.maps)[0],
            "member_iou_torch32": float((o.members & r.members).sum() / max((o.members | r.members).sum(), 1)),
        })
    out["per_layer"] = per_layer
    for key in ("torch32_vs_sklearn", "torch64_vs_sklearn", "sklearn_vs_sklearn_next_seeds", "member_iou_torch32"):
        out[f"mean_{key}"] = float(np.mean([r[key] for r in per_layer]))
    out["speedup_torch32"] = out["t_sklearn"] / out["t_torch32"]
    out["speedup_torch64"] = out["t_sklearn"] / out["t_torch64"]
    return out


def model_markdown(res: dict[str, Any], command: str, info: dict[str, Any]) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"All {res['layers']} layers of SmolLM2-135M-Instruct ({info['tokens']} tokens x {info['width']} neurons "
        f"each), k = {info['components']}, {res['runs']} pooled FastICA runs per layer, max_iter = "
        f"{info['max_iter']}, as `compress` runs them. scikit-learn: `find_networks_reference` layer by layer on "
        "one BLAS thread (numpy eigh whitening + FastICA) from float64 moments. torch: `find_networks_batch`, every "
        "layer's runs in one batched fixed-point loop, the layers shared by one single-threaded worker per core, from "
        "float32 moments (float32, the default) or float64 throughout. Both are timed from moments formed "
        "beforehand, as capture leaves them. Both start run r "
        f"from scikit-learn's matrix for seed {info['seed']} + r. {info['cpus']} CPU cores, load average "
        f"{info['load_before']} before, {info['load_after']} after.",
        "",
        "| engine | seconds (all layers) | speed-up vs scikit-learn | mean matched abs(corr) vs scikit-learn |",
        "|---|---|---|---|",
        f"| scikit-learn (1 thread) | {res['t_sklearn']:.1f} | 1.0x | (itself, next {res['runs']} seeds: "
        f"{res['mean_sklearn_vs_sklearn_next_seeds']:.3f}) |",
        f"| torch float32 (default) | {res['t_torch32']:.1f} (best of {len(res['t_torch32_runs'])}; all: "
        f"{', '.join(f'{t:.2f}' for t in res['t_torch32_runs'])}) | {res['speedup_torch32']:.1f}x (slowest run: "
        f"{res['t_sklearn'] / max(res['t_torch32_runs']):.1f}x) | {res['mean_torch32_vs_sklearn']:.3f} |",
        f"| torch float64 | {res['t_torch64']:.1f} | {res['speedup_torch64']:.1f}x | "
        f"{res['mean_torch64_vs_sklearn']:.3f} |",
        "",
        f"Mean member IoU, torch float32 vs scikit-learn: {res['mean_member_iou_torch32']:.3f}.",
        "",
        "| layer | torch32 vs sklearn | torch64 vs sklearn | sklearn vs sklearn (next seeds) |",
        "|---|---|---|---|",
    ]
    for r in res["per_layer"]:
        lines.append(f"| {r['layer']} | {r['torch32_vs_sklearn']:.3f} | {r['torch64_vs_sklearn']:.3f} "
                     f"| {r['sklearn_vs_sklearn_next_seeds']:.3f} |")
    return "\n".join(lines) + "\n"


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def markdown(rows: list[dict[str, Any]], command: str, info: dict[str, Any]) -> str:
    as_run = "t_a" in rows[0]
    refs = (["a", "b"] if as_run else []) + ["a1", "b1"]
    names = {"a": "(a) find_networks", "b": "(b) sklearn FastICA", "a1": "(a) 1 thread", "b1": "(b) 1 thread"}
    lines = [
        f"Command: `{command}`",
        "",
        f"SmolLM2-135M-Instruct MLP activations ({info['tokens']} tokens x {info['width']} neurons per layer, "
        f"256 SST-2 train prompts), k = {info['components']}, max_iter = {info['max_iter']}, tol = {info['tol']}. "
        f"{info['cpus']} CPU cores shared with other jobs (load average {info['load_before']} before, "
        f"{info['load_after']} after): best of {info['repeats']} runs (as-run references: 1 run); "
        f"compare ratios, not seconds. torch {info['torch']}, scikit-learn {info['sklearn']}, numpy {info['numpy']}.",
        "",
        "Seconds per layer. (a) = fnprune.networks.engines.find_networks_reference (numpy Gram + eigh + sklearn "
        "FastICA); (b) = sklearn FastICA(whiten='unit-variance') on the z-scored neuron x token matrix; "
        "\"1 thread\" = BLAS pinned to one thread; t64/t32 = find_networks_torch float64/float32 (randomized "
        "whitening, the default); _eigh = exact eigh whitening; t64 1 thread = torch pinned to one thread.",
        "",
        "| layer | " + " | ".join(names[r] for r in refs) + " | t64 | t32 | t64_eigh | t32_eigh | t64 1 thread |",
        "|---|" + "---|" * (len(refs) + 5),
    ]
    cols = [f"t_{r}" for r in refs] + ["t_t64", "t_t32", "t_t64_eigh", "t_t32_eigh", "t_t64_1thread"]
    for r in rows:
        lines.append(f"| {r['layer']} | " + " | ".join(_f(r[c], ".2f") for c in cols) + " |")
    lines += ["", "Speed-up of torch float64 / float32 (reference seconds / torch seconds; geometric mean last).", ""]
    lines += ["| layer | " + " | ".join(f"vs {names[r]}" for r in refs) + " |", "|---|" + "---|" * len(refs)]
    for r in [*rows, geomean_row(rows, refs)]:
        lines.append(f"| {r['layer']} | " + " | ".join(
            f"{r[f't_{ref}'] / r['t_t64']:.1f}x / {r[f't_{ref}'] / r['t_t32']:.1f}x" for ref in refs) + " |")
    lines += [
        "",
        "Agreement (mean |corr| of matched maps). Against (a) 1 thread, seed s. \"(a) vs (a) seed s+1\" is the "
        "reference against itself: FastICA from another start lands on partly different components, so no engine "
        "can agree with one reference run better than that. \"stable comps\" = only the reference components its "
        "next seed reproduces (|corr| >= 0.9). \"same start\" = torch vs sklearn iterations from the same whitened "
        "data and the same initial W (the implementations alone). Whitening cos = smallest principal cosine between "
        "the randomized and exact whitening subspaces. Stability = torch, 4 restarts.",
        "",
        "| layer | t64 vs (a) | t32 vs (a) | t64_eigh vs (a) | (b) vs (a) | t64 vs (b) | (a) vs (a) seed s+1 "
        "| t64 vs (a), stable comps (n) | same start | whitening cos | stability | converged (a) / t64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['match_t64_vs_a']:.3f} | {r['match_t32_vs_a']:.3f} | {r['match_t64_eigh_vs_a']:.3f} "
            f"| {r['match_b1_vs_a']:.3f} | {r['match_t64_vs_b']:.3f} | {r['match_a_vs_a_next_seed']:.3f} "
            f"| {_f(r['match_t64_vs_a_stable'], '.3f')} ({r['n_stable']}) | {r['same_start_match']:.4f} "
            f"| {r['whitening_min_cos']:.7f} | {r['stability_t64_restarts4']:.3f} "
            f"| {r['converged_a1']} / {r['converged_t64']} |"
        )
    keys = ["match_t64_vs_a", "match_t32_vs_a", "match_b1_vs_a", "match_a_vs_a_next_seed", "same_start_match"]
    lines += ["", "Means over layers: " + ", ".join(f"{k} {np.mean([r[k] for r in rows]):.3f}" for k in keys)]
    return "\n".join(lines) + "\n"


def geomean_row(rows: list[dict[str, Any]], refs: list[str]) -> dict[str, Any]:
    """Geometric means of the times, so the ratio of two entries is the geometric mean of the ratios."""
    out: dict[str, Any] = {"layer": "geomean"}
    for c in [f"t_{r}" for r in refs] + ["t_t64", "t_t32"]:
        out[c] = float(np.exp(np.mean([np.log(r[c]) for r in rows])))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="0,10,20,29", help="comma-separated layer indices")
    p.add_argument("--all-layers", action="store_true", help="every layer (long: add --skip-as-run)")
    p.add_argument("--skip-as-run", action="store_true", help="do not time (a) and (b) with default BLAS threads")
    net, cal = NetworksSpec(), CalibrationSpec()  # defaults: the recipe's
    p.add_argument("--components", type=int, default=net.components)
    p.add_argument("--threshold", type=float, default=net.threshold)
    p.add_argument("--max-iter", type=int, default=net.max_iter)
    p.add_argument("--tol", type=float, default=net.tol)
    p.add_argument("--seed", type=int, default=net.seed, help="ICA seed and calibration sample seed")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept)")
    p.add_argument("--samples", type=int, default=cal.num_samples, help="calibration prompts")
    p.add_argument("--max-tokens", type=int, default=cal.max_tokens, help="sampled tokens per layer")
    p.add_argument("--out-prefix", default=None,
                   help="default evaluation/results/bench_ica (bench_ica_model with --model-wide)")
    p.add_argument("--model-wide", action="store_true",
                   help="all layers as compress runs them (pooled runs, layers batched) instead of per layer")
    p.add_argument("--runs", type=int, default=net.runs, help="with --model-wide: pooled FastICA runs per layer")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    command = ("python -m evaluation.bench_ica " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    layers_tokens = capture_tokens(args.samples, args.max_tokens, args.seed)
    layers = range(len(layers_tokens)) if args.all_layers else [int(i) for i in args.layers.split(",")]
    info: dict[str, Any] = {
        "tokens": layers_tokens[0].shape[0], "width": layers_tokens[0].shape[1], "components": args.components,
        "max_iter": args.max_iter, "tol": args.tol, "repeats": args.repeats, "cpus": len(os.sched_getaffinity(0)),
        "load_before": round(os.getloadavg()[0], 1), "torch": torch.__version__, "sklearn": sklearn.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
    }
    if args.model_wide:
        info["seed"] = args.seed
        res = bench_model(layers_tokens, args)
        info["load_after"] = round(os.getloadavg()[0], 1)
        md = model_markdown(res, command, info)
        prefix = Path(args.out_prefix or HERE / "results" / "bench_ica_model")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        write_file(with_extension(prefix, ".json"), json.dumps({"command": command, "info": info, **res}, indent=1))
        write_file(with_extension(prefix, ".md"), md)
        print(md)
        return
    rows = []
    for i in layers:
        start = time.perf_counter()
        row = {"layer": i, **bench_layer(layers_tokens[i], args)}
        rows.append(row)
        print(f"layer {i}: {time.perf_counter() - start:.0f}s " + json.dumps(
            {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    info["load_after"] = round(os.getloadavg()[0], 1)
    md = markdown(rows, command, info)
    prefix = Path(args.out_prefix or HERE / "results" / "bench_ica")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_file(with_extension(prefix, ".json"),
               json.dumps({"command": command, "args": vars(args), "info": info, "rows": rows}, indent=1))
    write_file(with_extension(prefix, ".md"), md)
    print(md)


if __name__ == "__main__":
    main()
