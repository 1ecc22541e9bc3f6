"""Probe: do another file's questions, added to the calibration, help where the calibration split runs out of its
own? Runs `evaluation.calibration_tune` (the product's compress, the calibration split cut in two) with the rows of
`--extra-file` (read as the task reads its own files) drawn after the split's, up to `calibration.num_samples`:
`--vary calibration.num_samples=285,1024` on ARC-Easy's 285 calibrated Dev questions compares none of them with
all of ARC-Challenge's 299 Dev questions, paired. The extra rows take the calibration templates and plain text in
turn like the split's own, and are checked against the scored rows like any calibration data.

Not a recipe option: on ARC-Easy the Challenge questions lost (RESULTS 0.0.22).

    python -m evaluation.extra_questions_probe --extra-file ../shared/data/arc_challenge/ARC-Challenge-Dev.jsonl \
        --model ~/.cache/fnprune-models/smollm2-135m-instruct --task arc_easy --data-dir ../shared/data/arc_easy \
        --keep 0.5 --hold-template qa --max-samples 285 --vary calibration.num_samples=285,1024
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from fnprune.data import Example
from fnprune.provenance import file_sha256
from fnprune.recipe import CalibrationSpec, TaskSpec


def with_extra_rows(own: list[Example], task: TaskSpec, spec: CalibrationSpec, extra_file: Path,
                    draw: Callable[[TaskSpec, CalibrationSpec], list[Example]]) -> list[Example]:
    """`own` (the split's calibration prompts, one per row) followed by up to `spec.num_samples - len(own)` rows of
    `extra_file`, drawn by `draw` (the product's calibration_prompts) as if the file were the calibration split."""
    room = spec.num_samples - len(own)
    if room <= 0:
        return own
    extra_task = dataclasses.replace(task, data_files={task.calibration_split: str(extra_file)}, data_dir=None,
                                     split_of=None, split_files={})
    return own + draw(extra_task, dataclasses.replace(spec, num_samples=room))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--extra-file", required=True, type=Path, help="rows in the task's format (e.g. a .jsonl)")
    if {"-h", "--help"} & set(argv or []):
        from evaluation.calibration_tune import print_probe_help

        print_probe_help(p)
    args, rest = p.parse_known_args(argv)
    if not args.extra_file.is_file():
        p.error(f"--extra-file: {args.extra_file} is not a file")
    from evaluation.calibration_tune import main_with_prompts

    def prompts(task, spec, product):
        if spec.choices != "none":
            raise SystemExit("extra_questions_probe: calibration.choices must be none (one prompt per row)")
        return with_extra_rows(product(task, spec), task, spec, args.extra_file, product)

    main_with_prompts(prompts, rest, f"evaluation/.runs/extra-{args.extra_file.stem}",
                      "python -m evaluation.extra_questions_probe " + " ".join(sys.argv[1:] if argv is None else argv),
                      # its contents name the runs, not only its path: a file edited in place runs anew
                      f"extra-{args.extra_file.resolve()}-{file_sha256(args.extra_file)}")


if __name__ == "__main__":
    main(sys.argv[1:])
