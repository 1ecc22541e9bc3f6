"""Probe: does generic text in the calibration carry a pruned model to wordings it never saw? Runs
`evaluation.calibration_tune` (the product's compress, the calibration split cut in two) with a `--generic-share`
of the calibration prompts swapped for WikiText passages, spread evenly like `calibration.raw_share`.

Not a recipe option: on SST-2 with `review` held out it lost to the task's own plain text (RESULTS 0.0.7). The
passages come from the second half of the WikiText-2 test file's lines, so they never meet the perplexity
check, which reads the file's first tokens (16,384 by default).

    python -m evaluation.generic_text_probe --generic-share 0.25 --wikitext ../shared/data/wikitext-2-raw \
        --model ~/.cache/fnprune-models/smollm2-135m-instruct --task sst2 --data-dir ../shared/data/sst2 \
        --vary selection.keep=0.35,0.25 --hold-template review --max-samples 400
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

from fnprune.data import Example

GENERIC = "(generic)"  # the template name the swapped prompts carry


def wikitext_passages(path: Path, min_words: int = 40) -> list[str]:
    """Paragraphs of the file's second half with at least `min_words` words, headings (`= ... =`) left out."""
    from fnprune.perplexity import wikitext_file

    lines = [line.strip() for line in wikitext_file(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines[len(lines) // 2:] if not line.startswith("=") and len(line.split()) >= min_words]


def with_generic(prompts: list[Example], passages: list[str], share: float, seed: int) -> list[Example]:
    """`prompts` with a `share` of them, spread evenly, replaced by seeded passages (each used once while they
    last). The replaced prompts' labels stay: nothing in the default pipeline reads a plain prompt's label."""
    picks = random.Random(seed).sample(passages, min(len(passages), len(prompts)))
    out, used = [], 0
    for j, e in enumerate(prompts):
        if int((j + 1) * share) > int(j * share):
            text = picks[used % len(picks)]
            used += 1
            out.append(dataclasses.replace(e, prompt=text, texts=(text,), template=GENERIC))
        else:
            out.append(e)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--generic-share", type=float, required=True)
    p.add_argument("--wikitext", required=True, help="the WikiText-2 raw test file or its folder")
    if {"-h", "--help"} & set(argv or []):
        from evaluation.calibration_tune import print_probe_help

        print_probe_help(p)
    args, rest = p.parse_known_args(argv)
    if not 0 <= args.generic_share < 1:
        p.error("--generic-share must be in [0, 1)")
    from evaluation.calibration_tune import main_with_prompts
    from fnprune.perplexity import wikitext_file
    from fnprune.provenance import file_sha256

    passages = wikitext_passages(Path(args.wikitext))
    wikitext = wikitext_file(args.wikitext)
    main_with_prompts(
        lambda task, spec, product: with_generic(product(task, spec), passages, args.generic_share, spec.seed),
        rest, f"evaluation/.runs/generic-{args.generic_share}",
        "python -m evaluation.generic_text_probe " + " ".join(sys.argv[1:] if argv is None else argv),
        # the file's contents name the runs, not only its path: a file replaced in place runs anew
        f"generic-{args.generic_share}-{wikitext}-{file_sha256(wikitext)}")


if __name__ == "__main__":
    main(sys.argv[1:])
