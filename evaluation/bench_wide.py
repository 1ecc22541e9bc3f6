"""Whitening one wide MLP layer from its stored token sample: the neuron Gram (d x d, as fnprune did before)
against the token Gram (T x T, `fnprune.ica._token_gram_whitening`), time and peak RSS side by side.

Wide MLPs keep their token sample instead of its d x d moments (`calibration.sample_store: auto`), so their
whitening starts from tokens. No wide real model fits these machines, so the layer is synthetic: T = 4096
tokens of 64 heavy-tailed sources mixed into d neurons plus Gaussian noise, at Llama widths. Each (width,
path) runs in a fresh process so its peak RSS is its own; the two paths' whitened data are compared on the
planted signal directions (subspace 1 - cos of the top components).

    python -m evaluation.bench_wide                       # d = 11008 (Llama-2-7B) and 14336 (Llama-3-8B)
    python -m evaluation.bench_wide --widths 11008,14336,28672 --token-only 28672

Writes evaluation/results/bench_wide.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from .tables import write_rows

RESULTS = Path(__file__).parent / "results"

ONE_LAYER = """
import json, resource, sys, time, torch
torch.set_flush_denormal(True)
from fnprune.ica import _layer_whitening
from fnprune.moments import SecondMoments
width, tokens, components, path, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
gen = torch.Generator().manual_seed(0)
u = torch.rand(tokens, 64, generator=gen) - 0.5
sources = -torch.sign(u) * torch.log1p(-2 * u.abs())  # (T, 64) Laplace: heavy-tailed, as ICA wants
x = sources @ torch.randn(64, width, generator=gen) + torch.randn(tokens, width, generator=gen)  # (T, d) float32
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
# "neuron": the previous path, float64 moments of the tokens then the d x d correlation Gram
sample = SecondMoments.of(x.to(torch.float64), torch.float64) if path == "neuron" else x
whitened, dead = _layer_whitening(sample, components, 0, "krylov", "cpu", torch.float32)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# the whitened data go to the parent as raw float32 bytes (never pickled)
whitened.contiguous().numpy().tofile(out)
print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_before": before, "sample_bytes": x.numel() * 4}))
"""


def run(width: int, tokens: int, components: int, path: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", ONE_LAYER, str(width), str(tokens), str(components), path,
                           str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def subspace_gap(a, b, top: int) -> float:
    """1 - the smallest cosine between the spans of the first `top` columns of a and b (0 = same span)."""
    import numpy as np

    qa = np.linalg.qr(a[:, :top].astype(np.float64))[0]
    qb = np.linalg.qr(b[:, :top].astype(np.float64))[0]
    return float(1 - np.linalg.svd(qa.T @ qb, compute_uv=False).min())


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="11008,14336")
    parser.add_argument("--token-only", default="", help="widths whose d x d path is too big to run here")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--out-prefix", default=str(RESULTS / "bench_wide"))
    args = parser.parse_args()
    command = "python -m evaluation.bench_wide " + " ".join(sys.argv[1:])
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
