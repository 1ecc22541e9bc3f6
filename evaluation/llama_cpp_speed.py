"""Dense vs pruned tokens/s in llama.cpp (llama-cpp-python): prompt processing and generation of GGUF files
written by `fnprune export`, the models taking turns so drifting machine load hits them alike.

Used by `bench_speed.py --llama-cpp`; llama-cpp-python is built from source (about 15 minutes on 2 cores) and is
not a dependency of fnprune.
"""

from __future__ import annotations

import time
from pathlib import Path

from fnprune.export import export

__all__ = ["export_ggufs", "llama_cpp_throughput", "token_bounds"]


def token_bounds(vocab: int) -> tuple[int, int]:
    """[low, high) of the random token ids the speed runs feed: 100..20000 (past the special tokens), below
    `vocab` for a model with fewer tokens (an id past the vocabulary fails, or reads out of bounds)."""
    high = min(20000, vocab)
    return min(100, high // 2), high


def export_ggufs(checkpoints: dict[float, str], outtypes: list[str], folder: Path) -> dict[tuple, Path]:
    """(keep, outtype) -> GGUF file of each checkpoint folder, through the product's own exporter."""
    files = {}
    for keep, path in checkpoints.items():
        for outtype in outtypes:
            out = folder / f"keep{keep}-{outtype}.gguf"
            export(Path(path), "gguf", out, outtype=outtype)
            files[(keep, outtype)] = out
    return files


def _load(path: Path, threads: int, flash_attn: bool, n_ctx: int):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                 flash_attn=flash_attn, use_mmap=False, verbose=False)


def _timed_prompt(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)  # one batch; only the last position's logits are computed (logits_all=False)
    return time.perf_counter() - start


def _timed_generation(llm, ids: list[int], new_tokens: int) -> float:
    """Seconds for `new_tokens` one-token decode steps after a 32-token prompt (greedy choice is irrelevant to
    the cost, so the next tokens are fixed ids)."""
    llm.reset()
    llm.eval(ids[:32])
    start = time.perf_counter()
    for tok in ids[32 : 32 + new_tokens]:
        llm.eval([tok])
    return time.perf_counter() - start


def llama_cpp_throughput(files: dict[tuple, Path], prompt_len: int, new_tokens: int, repeats: int,
                         threads: int, flash_attn: bool) -> dict[tuple, dict[str, float]]:
    """Best-of-`repeats` prompt-processing and generation tokens/s of each GGUF file."""
    import numpy as np

    llms = {key: _load(path, threads, flash_attn, n_ctx=max(prompt_len, 32 + new_tokens) + 8)
            for key, path in files.items()}
    low, high = token_bounds(min(llm.n_vocab() for llm in llms.values()))
    ids = [int(x) for x in np.random.default_rng(0).integers(low, high, max(prompt_len, 32 + new_tokens))]
    for llm in llms.values():
        _timed_prompt(llm, ids[:32])  # warm up
    best = {key: [float("inf"), float("inf")] for key in llms}
    for _ in range(repeats):
        for key, llm in llms.items():
            best[key][0] = min(best[key][0], _timed_prompt(llm, ids[:prompt_len]))
            best[key][1] = min(best[key][1], _timed_generation(llm, ids, new_tokens))
    for llm in llms.values():
        llm.close()
    return {key: {"prompt_tok_s": prompt_len / p, "generation_tok_s": new_tokens / g} for key, (p, g) in best.items()}
