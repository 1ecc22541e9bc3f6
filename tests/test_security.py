"""Nothing unsafe is loaded: no pickle, no unsafe YAML, no remote code unless the user asks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).parent.parent / "fnprune").rglob("*.py"))
UNSAFE = {
    "torch.load": re.compile(r"torch\.load\("),
    "pickle": re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b"),
    "yaml.load": re.compile(r"yaml\.(load|unsafe_load|full_load)\("),
    "remote code on": re.compile(r"trust_remote_code\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_unsafe_loading(path):
    text = path.read_text()
    for name, pattern in UNSAFE.items():
        assert not pattern.search(text), f"{path.name}: {name}"


def test_remote_code_is_off_by_default():
    from fnprune.recipe import ModelSpec

    assert ModelSpec().trust_remote_code is False

