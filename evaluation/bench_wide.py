"""Whitening one wide MLP layer from its stored token sample: the neuron Gram (d x d, as fnprune did before)
against the token Gram (T x T, `fnprune.networks.whitening._token_gram_whitening`), time and peak RSS side by side.

Wide MLPs keep their token sample instead of its d x d moments (`calibration.sample_store: auto`), so their
whitening starts from tokens. No wide real model fits these machines, so the layer is synthetic: T = 4096
tokens of 64 heavy-tailed sources mixed into d neurons plus Gaussian noise, at Llama widths. Each (width,
path) runs in a fresh process so its peak RSS is its own; the two paths' whitened data are compared on the
planted signal directions (subspace 1 - cos of the top components).

    python -m evaluation.bench_wide                       # d = 11008 (Llama-2-7B) and 14336 (Llama-3-8B)
    python -m evaluation.bench_wide --widths 11008,14336,28672 --token-only 28672

Writes evaluation/results/bench_wide.{json,md}. `--compress` instead runs the whole pipeline on a synthetic
Llama with Llama-2-7B's MLP (random weights, seeded; 4 layers of hidden 2048 x MLP 11008, SmolLM2's
tokenizer): `fnprune compress` on SST-2 at keep 0.5, no evaluation, in fresh processes taking turns, with this
checkout and with `--baseline-src` (an older fnprune checkout, e.g. a `git worktree`) side by side; writes
evaluation/results/bench_wide_compress.{json,md}. `--fit` times the reconstruction's ridge fit on the same
synthetic layers through the k x k kept-neuron Gram and the T x T token Gram (fnprune.compensation), each
against a float64 solve; writes evaluation/results/bench_wide_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fnprune.recipe import NetworksSpec

from .bench_speed import COMPRESS_AND_MEASURE, run_script
from .tables import write_rows

RESULTS = Path(__file__).parent / "results"

ONE_LAYER = """
import json, resource, sys, time, torch
torch.set_flush_denormal(True)
from fnprune.networks.whitening import layer_whitening
from fnprune.moments import SecondMoments
width, tokens, components, path, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
from evaluation.bench_wide import synthetic_layer
x = synthetic_layer(width, tokens)  # (T, d) float32
start = time.perf_counter()
# "neuron": the previous path, float64 moments of the tokens then the d x d correlation Gram
sample = SecondMoments.of(x.to(torch.float64), torch.float64) if path == "neuron" else x
whitened, _ = layer_whitening(sample, components, 0, "krylov", "cpu", torch.float32)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# the whitened data go to the parent as raw float32 bytes (never pickled)
whitened.contiguous().numpy().tofile(out)
print(json.dumps({"seconds": seconds, "peak_rss": peak, "sample_bytes": x.numel() * 4}))
"""


def synthetic_layer(width: int, tokens: int):
    """(T, d) float32 activations, seeded: 64 Laplace (heavy-tailed, as ICA wants) sources mixed into `width`
    neurons, plus unit Gaussian noise."""
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(tokens, 64, generator=gen) - 0.5
    sources = -torch.sign(u) * torch.log1p(-2 * u.abs())  # (T, 64) Laplace by the inverse CDF
    return sources @ torch.randn(64, width, generator=gen) + torch.randn(tokens, width, generator=gen)


def run(width: int, tokens: int, components: int, path: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", ONE_LAYER, str(width), str(tokens), str(components), path,
                           str(out)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def subspace_gap(a, b, top: int) -> float:
    """1 - the smallest cosine between the spans of the first `top` columns of a and b (0 = same span)."""
    qa = np.linalg.qr(a[:, :top].astype(np.float64))[0]
    qb = np.linalg.qr(b[:, :top].astype(np.float64))[0]
    return float(1 - np.linalg.svd(qa.T @ qb, compute_uv=False).min())


def best_taking_turns(fits: list, args: tuple, repeats: int) -> list[tuple]:
    """(result, best seconds) of each fit on `args`, the fits taking turns within every repeat, so drifting
    machine load hits them alike instead of whichever ran last."""
    best = [(None, float("inf"))] * len(fits)
    for _ in range(repeats):
        for i, fit in enumerate(fits):
            start = time.perf_counter()
            result = fit(*args)
            best[i] = (result, min(best[i][1], time.perf_counter() - start))
    return best


def compare_fits(args: argparse.Namespace, command: str) -> None:
    """The reconstruction's ridge fit on one wide layer (keep 0.5 at random, ridge 0.1), through the k x k
    kept-neuron Gram and the T x T token Gram, timed (best of 2, taking turns) and each compared with a float64
    solve of the k x k system."""
    from fnprune.compensation import fit_kept_gram, fit_token_gram, removed_indices

    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        x = synthetic_layer(width, args.tokens)
        keep = torch.randperm(width, generator=torch.Generator().manual_seed(1))[: width // 2].sort().values
        x = x - x.mean(0)
        (token, token_s), (kept, kept_s) = best_taking_turns([fit_token_gram, fit_kept_gram], (x, keep, 0.1), 2)
        x64 = x.double()
        cross = x64[:, keep].T @ x64 / x.shape[0]  # (k, d) float64
        kk, kr = cross[:, keep], cross[:, removed_indices(keep, width)]
        kk.diagonal().add_(0.1 * kk.diagonal().mean())
        exact = torch.linalg.solve(kk, kr)
        err = {name: float(f"{((m.double() - exact).norm() / exact.norm()).item():.1e}")
               for name, m in (("token", token), ("kept", kept))}
        rows.append({"width": width, "tokens": args.tokens, "kept": len(keep), "kept_gram_s": round(kept_s, 2),
                     "token_gram_s": round(token_s, 2), "speedup": round(kept_s / token_s, 2),
                     "kept_gram_rel_err_vs_float64": err["kept"], "token_gram_rel_err_vs_float64": err["token"]})
        print(rows[-1], flush=True)
    print(write_rows(Path(args.out_prefix + "_fit"), command, rows))


def build_wide_llama(out: Path, tokenizer: Path, width: int, hidden: int, layers: int) -> Path:
    """A seeded random-weight Llama with `layers` layers of an MLP `width` wide, saved with `tokenizer`'s files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=width,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def compare_compress(args: argparse.Namespace, command: str) -> None:
    """compress on a synthetic wide Llama with this checkout and `--baseline-src`, taking turns (module doc). The
    model and checkpoints (several GiB at Llama widths) live in a temporary folder, deleted however this ends."""
    work = Path(tempfile.mkdtemp(prefix="bench-wide-"))
    try:
        rows = compress_rows(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_rows(Path(args.out_prefix + "_compress"), command, rows))


def compress_rows(args: argparse.Namespace, work: Path) -> list[dict]:
    """compare_compress's runs in `work`, one row per fnprune version: the best run's times, the highest RSS."""
    model = build_wide_llama(work / "model", Path(args.tokenizer).expanduser(), args.compress_width, args.hidden,
                             args.layers)
    versions = {"this checkout": None, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    for repeat in range(args.compress_repeats):
        for name, src in versions.items():
            recipe = {"model": {"name_or_path": str(model)},
                      "task": {"name": "sst2", "data_dir": str(Path(args.data_dir).resolve())},
                      "calibration": {"cache": False}, "selection": {"keep": 0.5}, "evaluation": {"enabled": False},
                      "output": {"dir": str(work / f"{name}-{repeat}".replace(" ", "-"))}}
            r = run_script(COMPRESS_AND_MEASURE, recipe, src)
            runs[name].append(r)
            print(f"[{repeat + 1}/{args.compress_repeats}] {name}: total {r['total']:.1f} s, "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items() if not k.startswith('evaluate'))}, "
                  f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    rows = []
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r["total"])
        rows.append({"fnprune": name if name != "baseline" else f"baseline ({args.baseline_src})",
                     "mlp_width": args.compress_width, "layers": args.layers,
                     "total_s": round(best["total"], 1), "runs_s": "/".join(f"{r['total']:.1f}" for r in rs),
                     **{f"{k}_s": round(v, 2) for k, v in best["timings"].items() if not k.startswith("evaluate")},
                     "peak_rss_gib": round(max(r["peak_rss"] for r in rs) / 2**30, 2)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="11008,14336")
    parser.add_argument("--token-only", default="", help="widths whose d x d path is too big to run here")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--components", type=int, default=NetworksSpec().components)
    parser.add_argument("--out-prefix", default=str(RESULTS / "bench_wide"))
    parser.add_argument("--compress", action="store_true", help="the whole pipeline instead (module doc)")
    parser.add_argument("--fit", action="store_true", help="the reconstruction's two ridge fits instead")
    parser.add_argument("--compress-width", type=int, default=11008)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compress-repeats", type=int, default=2)
    parser.add_argument("--baseline-src", default=None, help="an older fnprune checkout to run side by side")
    parser.add_argument("--tokenizer", default="~/.cache/fnprune-models/smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2"))
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # as the CLI and the measuring subprocesses run: --fit times in this process
    command = "python -m evaluation.bench_wide " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.compress:
        compare_compress(args, command)
        return
    if args.fit:
        compare_fits(args, command)
        return
    token_only = {int(w) for w in args.token_only.split(",") if w}
    scratch = Path(args.out_prefix).with_suffix(".tmp")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        res, maps = {}, {}
        for path in ("neuron", "token"):
            if path == "neuron" and width in token_only:
                continue
            out = scratch.with_name(f"{scratch.name}.{width}.{path}")
            res[path] = run(width, args.tokens, args.components, path, out)
            maps[path] = np.fromfile(out, dtype=np.float32).reshape(width, args.components)
            out.unlink()
            print(f"d={width} {path} Gram: {res[path]['seconds']:.1f} s, peak RSS "
                  f"{res[path]['peak_rss'] / 2**30:.2f} GiB", flush=True)
        row = {"width": width, "tokens": args.tokens,
               "sample_gib": round(res["token"]["sample_bytes"] / 2**30, 3),
               "token_s": round(res["token"]["seconds"], 2),
               "token_peak_rss_gib": round(res["token"]["peak_rss"] / 2**30, 2)}
        if "neuron" in res:
            row.update({
                "neuron_s": round(res["neuron"]["seconds"], 2),
                "neuron_peak_rss_gib": round(res["neuron"]["peak_rss"] / 2**30, 2),
                "speedup": round(res["neuron"]["seconds"] / res["token"]["seconds"], 1),
                "rss_saved_gib": round((res["neuron"]["peak_rss"] - res["token"]["peak_rss"]) / 2**30, 2),
                # the 64 planted sources span the signal; later components lie in the noise bulk
                "signal_subspace_1_minus_cos": float(f"{subspace_gap(maps['neuron'], maps['token'], 16):.1e}"),
            })
        rows.append(row)
    print(write_rows(Path(args.out_prefix), command, rows))
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
