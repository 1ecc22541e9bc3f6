"""Sweep pruning criteria x keep levels on one model + task: zero-shot accuracy and WikiText-2 perplexity.

Pruning is simulated by masking (removed MLP neurons zeroed, or set to their calibration mean for bias
compensation), which the package's tests prove equal to physical pruning. Calibration (activations and ICA
networks) and every finished result row are cached on disk, so reruns and interrupted sweeps are cheap.

    python -m evaluation.sweep                      # full sweep, all 872 SST-2 dev sentences
    python -m evaluation.sweep --eval-samples 100 --ppl-tokens 4096 --keeps 0.5   # quick check
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fnprune.arch import layout_for
from fnprune.data import Example, check_disjoint, file_sha256, load_split, resolve_task, sample
from fnprune.evaluate import evaluate_accuracy
from fnprune.hooks import masked_neurons
from fnprune.models import load_model
from fnprune.moments import SecondMoments
from fnprune.networks import LayerNetworks, network_relevance, pool_networks
from fnprune.networks import engines as ica
from fnprune.networks import find_networks as layer_networks
from fnprune.networks.engines import find_networks_batch
from fnprune.perplexity import perplexity, wikitext_ids
from fnprune.pipeline import Calibration, calibrate, reconstruction_fills, select_neurons
from fnprune.recipe import CalibrationSpec, ModelSpec, NetworksSpec, Recipe, TaskSpec
from fnprune.selection import CRITERIA, NEEDS_NETWORKS

from . import fn_criteria
from .cache import RowCache, key_of, load_activations, load_networks, save_activations, save_networks

log = logging.getLogger("sweep")
HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = "fn,random,magnitude,wanda-sp,flap,flap+bias,fn-task,fn-task+bias"
DEFAULT_KEEPS = "0.9,0.75,0.5,0.35,0.25"
CALIB_FIELDS = ("num_samples", "max_tokens", "batch_size", "max_length", "store_dtype", "seed")
# Networks and rows carry the code of the ICA that made them, per engine. 2: the whitening's eigenvector signs
# fixed and FastICA started from scikit-learn's matrix in both engines; 3 (torch engines): block Krylov whitening,
# every kernel on one thread (fnprune.ica.REVISION). Rows cached by earlier code stay readable with --ica-code.
ICA_CODE = {"sklearn": 2, "torch": ica.REVISION, "torch64": ica.REVISION}


@dataclass
class Bench:
    """Everything a sweep needs, loaded once: model, data, calibration, perplexity tokens."""

    args: argparse.Namespace
    model: torch.nn.Module
    tokenizer: Any
    label_words: dict[str, str]
    evaluation: list[Example]
    calibration: list[Example]
    calib: Calibration
    calib_key: str
    ppl_ids: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class MethodSpec:
    """A sweep method: criterion, bias compensation, and optional per-method FN settings."""

    criterion: str
    bias: bool
    reconstruct: bool = False  # "+ls": least-squares reconstruction of removed neurons (fnprune.compensation)
    ridge: float = 0.1
    boost: float | None = None  # None: --fn-boost
    components: int | None = None  # None: --components
    cut: float | None = None  # relevance cut of the *-first criteria
    ica_seed: int | None = None  # None: --seed
    ensemble: int = 1  # ICA runs (seeds ica_seed, ica_seed + 1, ...) whose networks are pooled


def parse_method(spec: str) -> MethodSpec:
    """'fn-task+bias+ls@b=2@k=16@r=0.3' -> fn-task with bias compensation and least-squares reconstruction
    (ridge 0.3), boost 2, 16 ICA components."""
    name, *opts = spec.split("@")
    criterion, *suffixes = name.split("+")
    if criterion not in CRITERIA or any(x not in ("bias", "ls") for x in suffixes):
        raise SystemExit(
            f"unknown method {spec!r}; criteria: {', '.join(CRITERIA)} (append +bias for bias compensation, "
            "+ls for least-squares reconstruction)"
        )
    out = MethodSpec(criterion, "bias" in suffixes, "ls" in suffixes)
    names = {"b": "boost", "k": "components", "cut": "cut", "r": "ridge", "s": "ica_seed", "e": "ensemble"}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in names:
            raise SystemExit(
                f"{spec!r}: unknown option {key!r} (b=boost, k=components, cut=relevance cut, r=ridge, "
                "s=ICA seed, e=ICA runs pooled)"
            )
        setattr(out, names[key], int(value) if key in ("k", "s", "e") else float(value))
    return out


def _networks(
    calib: Calibration, a_key: str, args: argparse.Namespace, components: int, seed: int | None = None,
    runs: int = 1,
) -> list[LayerNetworks]:
    """ICA networks of every layer for `components` (and an ICA seed), from cache or computed (and cached).
    `runs` > 1 (torch engines): seeds seed.. pooled in one call, exactly as compress runs them (the torch
    whitening's random start follows the first seed)."""
    seed = args.seed if seed is None else seed
    info = {"activations": a_key, "components": components, "seed": seed, "max_iter": 400, "tol": 1e-4}
    if runs > 1:
        info["runs"] = runs
    if args.ica_engine != "sklearn":  # sklearn rows keep their original cache keys
        info["engine"] = args.ica_engine
    code = ica_code(args)
    if code > 1:
        info["ica_code"] = code
    path = Path(args.cache_dir) / "calibration" / a_key / f"ica_{key_of(info)}.safetensors"
    nets = load_networks(path, args.threshold)
    if nets is None:
        if code != ICA_CODE[args.ica_engine]:
            raise SystemExit(f"--ica-code {code} only re-reads networks cached by earlier code; this one is not cached")
        start = time.perf_counter()
        if args.ica_engine == "sklearn":
            if runs > 1:
                raise ValueError("the scikit-learn engine's runs are pooled by with_networks")
            spec = NetworksSpec(components=components, threshold=args.threshold, seed=seed, engine="sklearn")
            layers = tqdm(calib.activations, desc=f"ICA k={components}", unit="layer")
            nets = [layer_networks(a.tokens, spec) for a in layers]
        else:  # as compress runs it: float32 moments (torch) or float64 throughout (torch64), layers batched
            dtype = torch.float64 if args.ica_engine == "torch64" else torch.float32
            layers = [SecondMoments.of(a.tokens.to(dtype), dtype) for a in calib.activations]  # all threads
            nets = find_networks_batch(layers, components, args.threshold, seed, runs=runs, dtype=dtype)
        save_networks(path, nets, {**info, "seconds": round(time.perf_counter() - start, 1)})
        log.info("ICA k=%d: %.1f s", components, time.perf_counter() - start)
    return nets


def with_networks(
    calib: Calibration, a_key: str, args: argparse.Namespace, components: int, seeds: list[int] | None = None
) -> Calibration:
    """A copy of `calib` carrying ICA networks with `components` components and their label relevance; with
    several `seeds`, every run's networks pooled (k x runs per layer), for the torch engines in one call, as
    compress does."""
    seeds = seeds or [args.seed]
    if args.ica_engine != "sklearn" and ica_code(args) >= 3 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        nets = _networks(calib, a_key, args, components, seeds[0], runs=len(seeds))  # compress's own call
    else:  # scikit-learn's whitening has no random start, so its runs pool alike one seed at a time
        runs = [_networks(calib, a_key, args, components, s) for s in seeds]
        nets = [pool_networks(list(layer)) for layer in zip(*runs)]
    rel = [network_relevance(n.maps, a.decision.numpy(), calib.labels) for n, a in zip(nets, calib.activations)]
    return Calibration(calib.activations, calib.labels, nets, rel, dict(calib.timings))


def load_bench(args: argparse.Namespace) -> Bench:
    """Load model and data, then calibration from cache (or capture + ICA, then cache it)."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    task = resolve_task(TaskSpec(name=args.task, data_dir=args.data_dir))
    train, dev = load_split(task, task.calibration_split), load_split(task, task.evaluation_split)
    calibration = sample(train, args.calib_samples, args.seed)
    check_disjoint(calibration, dev)
    evaluation = dev if args.eval_on == "dev" else tuning_split(train, calibration, dev, args)
    evaluation = evaluation[: args.eval_samples] if args.eval_samples else evaluation
    model, tok = load_model(ModelSpec(name_or_path=args.model))
    model.eval()
    timings["load"] = round(time.perf_counter() - start, 2)

    cal_spec = CalibrationSpec(num_samples=args.calib_samples, max_tokens=args.max_tokens, seed=args.seed,
                               sample_store="tokens")  # the sweep's criteria and caches use the tokens
    recipe = Recipe(calibration=cal_spec, networks=NetworksSpec(components=args.components, seed=args.seed))
    a_info = {
        "model": str(Path(args.model).expanduser().resolve()),
        "weights_sha": _weights_sha(Path(args.model).expanduser()),
        "task": {k: getattr(task, k) for k in ("name", "template", "label_column", "label_words")},
        "train_sha": file_sha256(Path(args.data_dir) / "train.tsv"),
        "calibration": {k: getattr(cal_spec, k) for k in CALIB_FIELDS},
    }
    a_key = key_of(a_info)
    a_dir = Path(args.cache_dir) / "calibration" / a_key
    cached = load_activations(a_dir)
    start = time.perf_counter()
    if cached is None:
        calib = calibrate(model, tok, calibration, task.label_words, recipe, with_networks=False)
        save_activations(a_dir, calib.activations, calib.labels, a_info)
        timings["capture"] = round(time.perf_counter() - start, 2)
    else:
        calib = Calibration(cached[0], cached[1])
        timings["capture_cached_load"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    calib = with_networks(calib, a_key, args, args.components)
    timings["networks"] = round(time.perf_counter() - start, 2)
    ppl_ids = None
    if args.ppl_tokens:
        ppl_ids = wikitext_ids(tok, Path(args.wikitext), args.ppl_tokens)
    log.info("bench ready: %s", timings)
    return Bench(args, model, tok, task.label_words, evaluation, calibration, calib, a_key, ppl_ids, timings)


def tuning_split(
    train: list[Example], calibration: list[Example], dev: list[Example], args: argparse.Namespace
) -> list[Example]:
    """Held-out train examples for choosing settings, so that dev is only ever used to report.

    Disjoint from the calibration sample and from dev; SST-2 train is mostly short phrases while dev holds
    whole sentences, so only examples of at least `--tune-min-words` words are drawn (seeded).
    """
    used = {e.prompt for e in calibration} | {e.prompt for e in dev}
    pool = [e for e in train if e.prompt not in used and len(" ".join(e.texts).split()) >= args.tune_min_words]
    if len(pool) < args.tune_samples:
        raise SystemExit(f"only {len(pool)} held-out train examples for --tune-samples {args.tune_samples}")
    rng = random.Random(args.tune_seed)
    held_out = [pool[i] for i in sorted(rng.sample(range(len(pool)), args.tune_samples))]
    check_disjoint(calibration, held_out)
    return held_out


def _weights_sha(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else [model_dir]
    return key_of({f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files})


def measure(
    bench: Bench,
    keep_idx: list[torch.Tensor] | None,
    bias: bool,
    ppl: bool = True,
    calib: Calibration | None = None,
    fill_maps: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Accuracy (and perplexity) of the model with only `keep_idx` neurons (None = dense); removed neurons
    are zero, their mean (`bias`), or rebuilt from the kept ones (`fill_maps`)."""
    calib = calib or bench.calib
    layout = layout_for(bench.model)
    out: dict[str, Any] = {}
    if keep_idx is None:
        keep_idx = [torch.arange(a.mean.numel()) for a in calib.activations]
    fill = [a.mean for a in calib.activations] if bias else None
    with masked_neurons(bench.model, layout, keep_idx, fill=fill, fill_map=fill_maps):
        res = evaluate_accuracy(
            bench.model, bench.tokenizer, bench.evaluation, bench.label_words, bench.args.batch_size, progress=False
        )
        correct = "".join("1" if p == e.label else "0" for p, e in zip(res.predictions, bench.evaluation))
        out.update(accuracy=round(res.accuracy, 6), n=res.n, eval_seconds=round(res.seconds, 1), correct=correct)
        if ppl and bench.ppl_ids is not None:
            p = perplexity(bench.model, bench.ppl_ids, bench.args.ppl_window)
            out.update(ppl=round(p.ppl, 4), ppl_tokens_scored=p.tokens_scored, ppl_seconds=round(p.seconds, 1))
    return out


def dense_gap(bench: Bench) -> np.ndarray:
    """Dense log p(positive word) - log p(negative word) on every calibration prompt (cached)."""
    path = Path(bench.args.cache_dir) / "calibration" / bench.calib_key / "dense_gap.json"
    if path.is_file():
        return np.array(json.loads(path.read_text(encoding="utf-8")))
    res = evaluate_accuracy(
        bench.model, bench.tokenizer, bench.calibration, bench.label_words, bench.args.batch_size, progress=False
    )
    gap = (res.scores[:, -1] - res.scores[:, 0]).numpy()
    path.write_text(json.dumps(gap.tolist()), encoding="utf-8")
    return gap


def select(
    bench: Bench, method: str, keep: float
) -> tuple[list[torch.Tensor], bool, list[torch.Tensor] | None]:
    """Kept neurons per layer for one method spec and budget, whether it compensates the bias, and the
    least-squares reconstruction maps of its removed neurons (None without "+ls")."""
    a = bench.args
    spec = parse_method(method)
    calib = bench.calib
    if spec.components not in (None, a.components) or spec.ica_seed is not None or spec.ensemble > 1:
        first = a.seed if spec.ica_seed is None else spec.ica_seed
        seeds = list(range(first, first + spec.ensemble))
        calib = with_networks(calib, bench.calib_key, a, spec.components or a.components, seeds)
    if spec.criterion in fn_criteria.GAP_CRITERIA:
        maps = [n.maps for n in calib.networks]
        decision = [x.decision.numpy() for x in calib.activations]
        fn_criteria.CONTEXT["gap_relevance"] = fn_criteria.gap_relevance(maps, decision, dense_gap(bench))
    if spec.criterion in fn_criteria.OBS_CRITERIA:
        fn_criteria.CONTEXT["residual_var"] = fn_criteria.residual_variances(
            [x.tokens for x in calib.activations], spec.ridge
        )
    fn_criteria.CONTEXT["decision_var"] = [x.decision.var(dim=0, unbiased=False) for x in calib.activations]
    fn_criteria.CONTEXT["first_cut"] = 0.3 if spec.cut is None else spec.cut
    boost = a.fn_boost if spec.boost is None else spec.boost
    kept = select_neurons(bench.model, calib, spec.criterion, keep, a.round_to, a.seed, boost)
    fills = None
    if spec.reconstruct:
        centres = [x.mean for x in calib.activations] if spec.bias else None
        fills = reconstruction_fills(calib, kept, centres, spec.ridge)
    return kept, spec.bias, fills


def _uses_networks(method: str) -> bool:
    return method != "dense" and parse_method(method).criterion in NEEDS_NETWORKS


def ica_code(args: argparse.Namespace) -> int:
    """The ICA code whose networks and rows this run reads: --ica-code, else this version's for the engine."""
    return args.ica_code if args.ica_code is not None else ICA_CODE[args.ica_engine]


def row_key(bench: Bench, method: str, keep: float, extra: dict | None = None) -> dict[str, Any]:
    a = bench.args
    return {
        "calibration": bench.calib_key, "components": a.components, "threshold": a.threshold,
        "method": method, "keep": keep, "round_to": a.round_to, "seed": a.seed, "fn_boost": a.fn_boost,
        "eval_n": len(bench.evaluation), "dev_sha": file_sha256(Path(a.data_dir) / "dev.tsv"),
        **({"eval_on": "tune", "tune": [a.tune_samples, a.tune_seed, a.tune_min_words]} if a.eval_on == "tune" else {}),
        "batch_size": a.batch_size, "ppl_tokens": a.ppl_tokens, "ppl_window": a.ppl_window,
        "threads": a.threads, **(extra or {}),
        **({"ica_engine": a.ica_engine} if a.ica_engine != "sklearn" and _uses_networks(method) else {}),
        **({"ica_code": ica_code(a)} if ica_code(a) > 1 and _uses_networks(method) else {}),
    }


def run_sweep(
    bench: Bench, methods: list[str], keeps: list[float], ppl: bool = True, cached_only: bool = False
) -> list[dict[str, Any]]:
    """Dense row, then every (method, keep) row, each from the row cache when already measured."""
    a = bench.args
    cache = RowCache(Path(a.cache_dir) / "rows")
    rows = []
    jobs = [("dense", 1.0)] + [(m, k) for m in methods for k in keeps]
    for method, keep in jobs:
        info = row_key(bench, method, keep)
        row = cache.get(info)
        if row is None and cached_only:
            log.warning("not measured yet, left out: %s keep %s", method, keep)
            continue
        if row is None:
            start = time.perf_counter()
            if method == "dense":
                row = {"method": "dense", "keep": 1.0, "width": bench.calib.activations[0].mean.numel()}
                row.update(measure(bench, None, False, ppl=ppl))
            else:
                kept, bias, fills = select(bench, method, keep)
                row = {"method": method, "keep": keep, "width": len(kept[0])}
                row.update(measure(bench, kept, bias, ppl=ppl, fill_maps=fills))
            row["seconds"] = round(time.perf_counter() - start, 1)
            cache.put(info, row)
            log.info("measured %s", row)
        else:
            log.info("cached   %s", row)
        rows.append(row)
    return rows


def split_label(args: argparse.Namespace) -> str:
    return "SST-2 dev" if args.eval_on == "dev" else f"SST-2 held-out train (tuning split, seed {args.tune_seed})"


def markdown(
    rows: list[dict[str, Any]], keeps: list[float], command: str, n: int, ppl_tokens: int, split: str = "SST-2 dev"
) -> str:
    dense = rows[0]
    lines = [
        f"Command: `{command}`",
        "",
        (f"{split} accuracy (n = {n}) / WikiText-2 token-level perplexity (first {ppl_tokens} tokens, "
         f"non-overlapping windows). Dense: accuracy {dense['accuracy']:.4f}, "
         f"ppl {dense.get('ppl', float('nan')):.2f}.")
        if ppl_tokens else f"{split} accuracy (n = {n}). Dense: accuracy {dense['accuracy']:.4f}.",
        "",
        "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
    ]
    by = {(r["method"], r["keep"]): r for r in rows}
    for m in dict.fromkeys(r["method"] for r in rows[1:]):
        cells = []
        for k in keeps:
            r = by.get((m, k))
            if r is None:
                cells.append("-")
            else:
                cells.append(f"{r['accuracy']:.4f}" + (f" / {r['ppl']:.1f}" if ppl_tokens and "ppl" in r else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, command: str, split: str = "SST-2 dev") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    dense = rows[0]
    ax.axhline(dense["accuracy"], color="black", ls="--", label=f"dense ({dense['accuracy']:.3f})")
    for m in dict.fromkeys(r["method"] for r in rows[1:]):
        pts = sorted((r["keep"], r["accuracy"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("fraction of MLP neurons kept per layer")
    ax.set_ylabel(f"{split} accuracy (n = {dense['n']})")
    ax.set_title("SmolLM2-135M-Instruct, SST-2 zero-shot, MLP neuron pruning (masked)")
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, command, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], bench: Bench, keeps: list[float], command: str) -> str:
    prefix = Path(bench.args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fields = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "correct"]  # per-example: JSON only
    with open(prefix.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        f.write(f"# {command}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    meta = {"command": command, "args": vars(bench.args), "timings": bench.timings, "rows": rows}
    prefix.with_suffix(".json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    split = split_label(bench.args)
    md = markdown(rows, keeps, command, len(bench.evaluation), bench.args.ppl_tokens, split)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    plot(rows, prefix.with_suffix(".png"), command, split)
    return md


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(Path("~/.cache/fnprune-models/smollm2-135m-instruct").expanduser()))
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default="/work/shared/data/sst2")
    p.add_argument("--wikitext", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--eval-samples", type=int, default=0, help="first N evaluation examples (0 = all)")
    p.add_argument("--eval-on", choices=["dev", "tune"], default="dev",
                   help="dev (report) or tune: held-out train examples for choosing settings")
    p.add_argument("--tune-samples", type=int, default=600)
    p.add_argument("--tune-seed", type=int, default=1234)
    p.add_argument("--tune-min-words", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens sampled for ICA")
    p.add_argument("--components", type=int, default=32)
    p.add_argument("--threshold", type=float, default=3.0)
    p.add_argument("--ica-engine", choices=["sklearn", "torch", "torch64"], default="sklearn",
                   help="torch: compress's engine (float32); torch64: the same in float64")
    p.add_argument("--ica-code", type=int, default=None,
                   help="re-read rows and networks cached by earlier ICA code (1: before sign-fixed whitening and "
                        "scikit-learn's start in both engines; 2: torch kernels on all threads); measures nothing "
                        "new. Default: this version's code for the engine")
    p.add_argument("--fn-boost", type=float, default=1.0)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=32768, help="WikiText-2 test prefix length (0 = skip)")
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="1 is ~4x faster than 2 on a busy 2-core CPU")
    p.add_argument("--cache-dir", default=str(HERE / ".cache"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list; 'X+bias' = X with bias compensation")
    p.add_argument("--keeps", default=DEFAULT_KEEPS)
    p.add_argument("--out-prefix", default=str(HERE / "results" / "sweep_sst2"))
    p.add_argument("--cached-only", action="store_true", help="report cached rows only, measure nothing new")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m evaluation.sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    keeps = [float(k) for k in args.keeps.split(",")]
    for m in methods:
        parse_method(m)
    start = time.perf_counter()
    bench = load_bench(args)
    rows = run_sweep(bench, methods, keeps, cached_only=args.cached_only)
    bench.timings["sweep_total"] = round(time.perf_counter() - start, 1)
    md = write_outputs(rows, bench, keeps, command)
    print(md)
    print(f"timings: {bench.timings}; per-row seconds in {Path(args.out_prefix).with_suffix('.csv')}")


if __name__ == "__main__":
    main()
