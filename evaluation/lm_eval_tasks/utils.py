"""Document transforms for the local lm-eval task YAMLs: the local files' layout to the Hub datasets' layout.

Only the shape changes (nested ARC choices flattened, BoolQ's string labels to 0/1, fixed subsets); the prompts
are lm-eval 0.4.13's own (COPA's prompt functions are imported from the installed lm_eval).
"""

from __future__ import annotations

from lm_eval.tasks.super_glue.copa.utils import doc_to_choice as copa_doc_to_choice  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import doc_to_target as copa_doc_to_target  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import doc_to_text as copa_doc_to_text  # noqa: F401

BOOLQ_ROWS = 500  # the parity subset: the first 500 rows of val.jsonl


def _arc(doc: dict) -> dict:
    choices = doc["question"]["choices"]
    return {"id": doc["id"], "question": doc["question"]["stem"], "answerKey": doc["answerKey"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


def arc_docs(dataset):
    return dataset.map(_arc, remove_columns=dataset.column_names)


def sst2_docs(dataset):
    return dataset.map(lambda d: {"sentence": d["sentence"].strip()})


def boolq_docs(dataset):
    subset = dataset.select(range(min(BOOLQ_ROWS, len(dataset))))
    return subset.map(lambda d: {"label": {"false": 0, "true": 1}[str(d["label"]).lower()]})
