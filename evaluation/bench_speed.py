"""Speed and memory of fnprune on a real model: compress stage timings and peak RSS, then dense vs pruned
inference throughput (prefill and decode) next to the reduction in MLP + attention FLOPs.

    python evaluation/bench_speed.py --model ~/.cache/fnprune-models/smollm2-135m-instruct \
        --data-dir ../shared/data/sst2

Writes evaluation/results/bench_speed.{json,md}. These CPUs are shared and noisy (the same compress took 7.7 s
and 9.4 s to capture within one run): every compress config and the forward-only yardstick run
`--compress-repeats` times in turn, and the ratios compare best runs with best runs.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # as `python evaluation/bench_speed.py` (documented) or `python -m evaluation.bench_speed`
    from llama_cpp_speed import export_ggufs, llama_cpp_throughput, token_bounds
    from tables import with_extension, write_rows
    from validation_speed import validation_throughput
except ImportError:
    from .llama_cpp_speed import export_ggufs, llama_cpp_throughput, token_bounds
    from .tables import with_extension, write_rows
    from .validation_speed import validation_throughput

RESULTS = Path(__file__).parent / "results"

COMPRESS_AND_MEASURE = """
import json, resource, sys, time, torch
torch.set_flush_denormal(True)
import fnprune
from fnprune.recipe import recipe_from_dict
recipe = recipe_from_dict(json.loads(sys.argv[1]))
start = time.perf_counter()
result = fnprune.compress(recipe, progress=False)
total = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# the result's timings include save (report.json's stop before writing it); an older --compare-src has no such
# field, and there the report's dict was the timer's own, save included
timings = getattr(result, "timings", None) or result.report["timings_seconds"]
print(json.dumps({"total": total, "timings": timings, "peak_rss": peak,
                  "parameters": result.report["parameters"], "widths": result.report["widths"]["pruned"],
                  "refit_share": (result.report.get("refit") or {}).get("prompts", recipe.calibration.num_samples)
                  / recipe.calibration.num_samples if "refit" in result.report else 0.0}))
"""


FORWARD_ONLY = """
import json, resource, sys, time, torch
torch.set_flush_denormal(True)
from fnprune.data import resolve_task
from fnprune.inputs import calibration_prompts, evaluation_texts
from fnprune.models import load_model
from fnprune.recipe import recipe_from_dict
from fnprune.tokens import batches, encode_inputs, forward, is_classifier
recipe = recipe_from_dict(json.loads(sys.argv[1]))
cal = recipe.calibration
task = resolve_task(recipe.task)
examples = calibration_prompts(task, cal, evaluation_texts(task, recipe.evaluation.enabled))  # compress's prompts
model, tok = load_model(recipe.model)
seqs = encode_inputs(tok, examples, cal.max_length, model)
start = time.perf_counter()
with torch.inference_mode():
    for batch in batches(seqs, cal.batch_size, "right"):
        forward(model, batch, all_logits=False)
seconds = time.perf_counter() - start
print(json.dumps({"forward_s": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "prompts": len(examples)}))
"""


def run_script(script: str, recipe: dict, src: str | None = None) -> dict:
    """Run one measurement script in a fresh process, so its peak RSS is its own; with `src`, fnprune is
    imported from that checkout instead (e.g. an older version, for a side-by-side run)."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as empty:
        env = dict(os.environ, FNPRUNE_CACHE_DIR=cache)
        if src:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        # from an empty folder: the working directory comes first on sys.path and may hold another fnprune
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(recipe)], capture_output=True, text=True,
                              env=env, cwd=empty)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mlp_attention_flops(config, widths: list[int], seq: int) -> float:
    """Multiply-adds per token of the attention projections, attention scores and MLPs (no embeddings/head)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads)
    attn_proj = h * head_dim * (heads + 2 * kv) + heads * head_dim * h
    attn_scores = 2 * heads * head_dim * seq / 2  # causal: half the positions on average
    return sum(attn_proj + attn_scores + 3 * h * w for w in widths)


@torch.inference_mode()
def throughput(models: dict, prefill_batch: int, prefill_len: int, decode_tokens: int, repeats: int) -> dict:
    """Prefill tokens/s (batch of prompts, last-position logits) and greedy decode tokens/s (batch 1) of each
    model, best of `repeats`. The models take turns within every repeat, so drifting machine load hits them
    alike instead of whichever happened to run last."""
    gen = torch.Generator().manual_seed(0)
    low, high = token_bounds(min(m.config.vocab_size for m in models.values()))
    ids = torch.randint(low, high, (prefill_batch, prefill_len), generator=gen)
    prompt = ids[:1, :32]
    for model in models.values():
        model(ids[:1, :16], logits_to_keep=1)  # warm up
    best = {key: {"prefill": float("inf"), "decode": float("inf")} for key in models}
    for _ in range(repeats):
        for key, model in models.items():
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            best[key]["prefill"] = min(best[key]["prefill"], time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                           pad_token_id=0)
            best[key]["decode"] = min(best[key]["decode"], time.perf_counter() - start)
    return {key: {"prefill_tok_s": prefill_batch * prefill_len / b["prefill"],
                  "decode_tok_s": decode_tokens / b["decode"]} for key, b in best.items()}


def measure_throughput(args: argparse.Namespace, keeps: list[float], runs: dict) -> tuple:
    """Dense vs pruned prefill and decode tokens/s (2 threads and 1), and each model's FLOPs per token."""
    from transformers import AutoModelForCausalLM

    models = {1.0: AutoModelForCausalLM.from_pretrained(Path(args.model).expanduser()).eval()}
    dense = models[1.0]
    widths_dense = [dense.config.intermediate_size] * dense.config.num_hidden_layers
    flops = {1.0: mlp_attention_flops(dense.config, widths_dense, args.prefill_len)}
    for keep in keeps:
        models[keep] = AutoModelForCausalLM.from_pretrained(runs[("default", keep)]["output"]).eval()
        flops[keep] = mlp_attention_flops(models[keep].config, runs[("default", keep)]["widths"], args.prefill_len)
    speed = throughput(models, args.prefill_batch, args.prefill_len, args.decode_tokens, args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices thread poorly: the 1-thread ratio shows the arithmetic alone
    speed_1t = throughput(models, args.prefill_batch, args.prefill_len, args.decode_tokens, args.repeats)
    torch.set_num_threads(threads)
    del models, dense
    return speed, speed_1t, flops


def measure_llama_cpp(args: argparse.Namespace, keeps: list[float], runs: dict, folder: Path) -> list[dict]:
    """Dense vs pruned prompt-processing and generation tokens/s in llama.cpp, per GGUF outtype, thread count
    and flash-attention setting, beside the MLP + attention FLOP reduction at the same prompt length."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(args.model).expanduser())
    widths = {1.0: [config.intermediate_size] * config.num_hidden_layers}
    widths.update({keep: runs[("default", keep)]["widths"] for keep in keeps})
    flops = {keep: mlp_attention_flops(config, w, args.llama_cpp_prompt_len) for keep, w in widths.items()}
    checkpoints = {1.0: str(Path(args.model).expanduser()), **{k: runs[("default", k)]["output"] for k in keeps}}
    files = export_ggufs(checkpoints, args.gguf_outtypes.split(","), folder)
    rows = []
    for threads in (2, 1):
        for flash_attn in (True, False):
            speed = llama_cpp_throughput(files, args.llama_cpp_prompt_len, args.decode_tokens, args.repeats,
                                         threads, flash_attn)
            for (keep, outtype), s in speed.items():
                dense = speed[(1.0, outtype)]
                gain = s["prompt_tok_s"] / dense["prompt_tok_s"]
                rows.append({"outtype": outtype, "threads": threads, "flash_attn": flash_attn, "keep": keep,
                             "prompt_len": args.llama_cpp_prompt_len,
                             "prompt_tok_s": round(s["prompt_tok_s"], 1),
                             "generation_tok_s": round(s["generation_tok_s"], 1),
                             "flop_reduction": round(flops[1.0] / flops[keep], 3),
                             "prompt_gain": round(gain, 3),
                             "prompt_gain_over_flop_reduction": round(gain * flops[keep] / flops[1.0], 3),
                             "generation_gain": round(s["generation_tok_s"] / dense["generation_tok_s"], 3)})
    return rows


def measure_validation(args: argparse.Namespace) -> list[dict]:
    """fnprune's validation examples/s on the dense model beside a plain batched forward pass."""
    from fnprune.models import load_model
    from fnprune.recipe import ModelSpec

    model, tokenizer = load_model(ModelSpec(name_or_path=str(Path(args.model).expanduser())))
    rows = []
    for pair in args.validation_tasks.split(","):
        name, _, data_dir = pair.partition("=")
        rows.append(validation_throughput(model, tokenizer, name, str(Path(data_dir).resolve()),
                                          args.validation_batch_size, args.validation_samples,
                                          args.validation_repeats))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--keeps", default="0.75,0.5,0.25")
    parser.add_argument("--num-samples", type=int, help="calibration prompts (default: the recipe's)")
    parser.add_argument("--max-tokens", type=int, help="tokens sampled per layer (default: the recipe's)")
    parser.add_argument("--also-max-tokens", default="",
                        help="N,...: also compress each keep with N tokens sampled per layer, in the same turns")
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-keeps", default="0.5",
                        help="also compress these as fnprune did before the moments store: fn-task with the "
                             "token sample kept (float32) and the scikit-learn ICA engine, side by side")
    parser.add_argument("--compress-repeats", type=int, default=3,
                        help="compress runs per config (and forward-only runs), taking turns so drifting machine "
                             "load hits them alike; times are the best run's, peak RSS the highest (the "
                             "tokens+sklearn reference runs once)")
    parser.add_argument("--baselines", action="store_true",
                        help="also compress at keep 0.5 with FLAP (no ICA) with and without the reconstruction, both "
                             "without the refit (flap+reconstruction is the default with --no-refit)")
    parser.add_argument("--compare-src", default="",
                        help="a checkout of another fnprune version (e.g. a git worktree): its default is "
                             "compressed in the same turns, as config 'default@FOLDER NAME', for a side-by-side ratio")
    parser.add_argument("--pruned-forward", action="store_true",
                        help="also time the same forward passes through each written checkpoint, in the same turn: "
                             "the sequential refit has to run the pruned model over its calibration prompts once, "
                             "after the dense calibration pass, so their sum is its floor")
    parser.add_argument("--no-throughput", action="store_true",
                        help="only the compress runs (e.g. to see how the time ratio moves with --num-samples)")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time dense vs pruned (the default config's checkpoints) in llama.cpp, exported "
                             "with `fnprune export`; needs llama-cpp-python; results in PREFIX_llama_cpp.*")
    parser.add_argument("--gguf-outtypes", default="f16,f32", help="GGUF outtypes timed with --llama-cpp")
    parser.add_argument("--llama-cpp-prompt-len", type=int, default=256, help="prompt tokens per llama.cpp batch")
    parser.add_argument("--validation-tasks", default="",
                        help="TASK=DIR,...: fnprune's validation examples/s on the dense model beside a plain "
                             "forward pass over the same examples; results in PREFIX_validation.*")
    parser.add_argument("--validation-batch-size", type=int, default=32)
    parser.add_argument("--validation-samples", type=int, help="first N evaluation rows per task (default all)")
    parser.add_argument("--validation-repeats", type=int, default=3, help="scorer and plain passes, taking turns")
    parser.add_argument("--out-prefix", default=str(RESULTS / "bench_speed"),
                        help="results go to PREFIX.json and PREFIX.md")
    args = parser.parse_args()
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        parser.error("--llama-cpp needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp)")
    torch.set_flush_denormal(True)
    if Path(args.model).expanduser().exists():  # the compress runs start in an empty folder: no relative path
        args.model = str(Path(args.model).expanduser().resolve())

    command = "python " + " ".join(sys.argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    out_root = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    atexit.register(shutil.rmtree, out_root, True)  # also when a measurement fails
    base = {
        "model": {"name_or_path": str(Path(args.model).expanduser())},
        "task": {"name": "sst2", "data_dir": str(Path(args.data_dir).resolve())},
        "calibration": {"cache": False, **({"num_samples": args.num_samples} if args.num_samples else {}),
                        **({"max_tokens": args.max_tokens} if args.max_tokens else {})},
        "evaluation": {"enabled": False},
    }
    weights_bytes = sum(p.stat().st_size for p in Path(args.model).expanduser().glob("*.safetensors"))
    # The yardstick: the same calibration forward passes with no hooks, no statistics, nothing kept.
    reference = {"calibration": {**base["calibration"], "sample_store": "tokens"}, "networks": {"engine": "sklearn"},
                 "selection": {"method": "fn-task", "refit": False}}  # the networks' engine: only fn-task runs ICA
    jobs = [("default", k, {}) for k in keeps]
    compare = Path(args.compare_src).resolve() if args.compare_src else None
    if compare:
        jobs += [(f"default@{compare.name}", k, {}) for k in keeps]
    jobs += [(f"max_tokens {n}", k, {"calibration": {**base["calibration"], "max_tokens": int(n)}})
             for n in args.also_max_tokens.split(",") if n for k in keeps]
    jobs += [("tokens+sklearn", float(k), reference) for k in args.reference_keeps.split(",") if k]
    if args.baselines:
        jobs += [("flap+reconstruction", 0.5, {"selection": {"method": "flap", "refit": False}}),
                 ("flap", 0.5, {"selection": {"method": "flap", "reconstruct": False, "refit": False}})]
    forward_runs: list[dict] = []
    all_runs: dict[tuple, list[dict]] = {(config, keep): [] for config, keep, _ in jobs}
    for repeat in range(args.compress_repeats):
        forward_runs.append(run_script(FORWARD_ONLY, base))
        print(f"[{repeat + 1}/{args.compress_repeats}] forward passes alone: {forward_runs[-1]['forward_s']:.1f}s, "
              f"peak RSS {forward_runs[-1]['peak_rss'] / 2**30:.2f} GiB", flush=True)
        for config, keep, extra in jobs:
            if config == "tokens+sklearn" and repeat:
                continue
            recipe = {**base, **extra, "selection": {**extra.get("selection", {}), "keep": keep},
                      "output": {"dir": str(out_root / f"{config}-keep{keep}-run{repeat}")}}
            r = run_script(COMPRESS_AND_MEASURE, recipe, str(compare) if config.startswith("default@") else None)
            if all_runs[(config, keep)]:  # the same recipe writes the same checkpoint: keep the first one only
                shutil.rmtree(recipe["output"]["dir"])
            r["output"] = all_runs[(config, keep)][0]["output"] if all_runs[(config, keep)] else recipe["output"]["dir"]
            all_runs[(config, keep)].append(r)
            if args.pruned_forward:
                r["pruned_forward_s"] = run_script(FORWARD_ONLY, {**base, "model": {"name_or_path": r["output"]}}
                                                   )["forward_s"]
            t = r["timings"]
            print(f"[{repeat + 1}/{args.compress_repeats}] {config} keep {keep}: total {r['total']:.1f}s, "
                  f"capture {t['capture']:.1f}s, ICA {t.get('networks', 0):.1f}s, "
                  f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    forward_only = {"forward_s": min(f["forward_s"] for f in forward_runs),
                    "peak_rss": max(f["peak_rss"] for f in forward_runs)}
    runs = {}
    for key, rs in all_runs.items():  # the fastest run's times, the highest peak RSS of all
        runs[key] = {**min(rs, key=lambda r: r["total"]), "peak_rss": max(r["peak_rss"] for r in rs),
                     "totals": [round(r["total"], 1) for r in rs]}
        if args.pruned_forward:
            runs[key]["pruned_forward"] = [r["pruned_forward_s"] for r in rs]

    speed = speed_1t = flops = {}
    if not args.no_throughput:
        speed, speed_1t, flops = measure_throughput(args, keeps, runs)

    rows = []
    for config, keep in [("dense", 1.0), *((c, k) for c, k, _ in jobs)]:
        r = runs.get((config, keep))
        t = r["timings"] if r else {}
        work = sum(v for k, v in t.items() if not k.startswith("evaluate"))
        row = {
            "config": config,
            "keep": keep,
            "compress_total_s": r and round(r["total"], 1),
            "compress_runs_s": r and "/".join(map(str, r["totals"])),
            "forward_only_s": round(forward_only["forward_s"], 1),
            "forward_only_runs_s": "/".join(str(round(f["forward_s"], 1)) for f in forward_runs),
            **{f"{stage}_s": t.get(stage) for stage in ("load", "capture", "networks", "selection", "reconstruct",
                                                         "refit_inputs", "surgery", "save")},
            "total_over_capture": r and round(work / t["capture"], 2),
            "total_over_forward_only": r and round(work / forward_only["forward_s"], 2),
            # What compress spends even if networks, selection, reconstruction and surgery took no time: reading
            # the model and data, the calibration pass with its statistics, and writing the checkpoint.
            "floor_over_forward_only": r and round(
                (t["load"] + t["capture"] + t["save"]) / forward_only["forward_s"], 2),
            **({} if not (r and "pruned_forward" in r) else {
                "pruned_forward_s": round(min(r["pruned_forward"]), 1),
                "pruned_forward_runs_s": "/".join(str(round(s, 1)) for s in r["pruned_forward"]),
                # the dense calibration pass, then the pruned model over the refit's share of the prompts: what
                # compress with the refit cannot go below, even with the dense block outputs kept and free solves
                "refit_floor_over_forward_only": round((forward_only["forward_s"] + min(r["pruned_forward"])
                                                        * r.get("refit_share", 1.0)) / forward_only["forward_s"], 2),
            }),
            "peak_rss_gib": r and round(r["peak_rss"] / 2**30, 2),
            "rss_over_weights_gib": r and round((r["peak_rss"] - weights_bytes) / 2**30, 2),
            "forward_only_rss_gib": round(forward_only["peak_rss"] / 2**30, 2),
        }
        rows.append(row)
        if keep not in speed or config != "default":
            continue
        flop_ratio = flops[1.0] / flops[keep]
        prefill_gain = speed[keep]["prefill_tok_s"] / speed[1.0]["prefill_tok_s"]
        decode_gain = speed[keep]["decode_tok_s"] / speed[1.0]["decode_tok_s"]
        prefill_gain_1t = speed_1t[keep]["prefill_tok_s"] / speed_1t[1.0]["prefill_tok_s"]
        row.update({
            "prefill_tok_s": round(speed[keep]["prefill_tok_s"], 1),
            "decode_tok_s": round(speed[keep]["decode_tok_s"], 1),
            "flop_reduction": round(flop_ratio, 3),
            "prefill_gain": round(prefill_gain, 3),
            "decode_gain": round(decode_gain, 3),
            "prefill_gain_over_flop_reduction": round(prefill_gain / flop_ratio, 3),
            "prefill_gain_1thread": round(prefill_gain_1t, 3),
            "prefill_gain_1thread_over_flop_reduction": round(prefill_gain_1t / flop_ratio, 3),
            "decode_gain_over_flop_reduction": round(decode_gain / flop_ratio, 3),
        })
    print(write_rows(Path(args.out_prefix), command, rows))
    if args.llama_cpp:
        llama_rows = measure_llama_cpp(args, keeps, runs, out_root)
        print(write_rows(with_extension(Path(args.out_prefix), "_llama_cpp"), command, llama_rows))
    if args.validation_tasks:
        print(write_rows(with_extension(Path(args.out_prefix), "_validation"), command, measure_validation(args)))
    shutil.rmtree(out_root, ignore_errors=True)
    print(f"(peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
