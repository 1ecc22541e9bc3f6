"""Nothing unsafe is loaded: no pickle, no unsafe YAML, no remote code unless the user asks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).parent.parent / "fnprune").rglob("*.py"))
UNSAFE = {
    "torch.load": re.compile(r"torch\.load\("),
    "pickle": re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b"),
    "yaml.load": re.compile(r"yaml\.(load|unsafe_load|full_load)\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_unsafe_loading(path):
    text = path.read_text()
    for name, pattern in UNSAFE.items():
        assert not pattern.search(text), f"{path.name}: {name}"
    for node in ast.walk(ast.parse(text)):  # remote code is only ever what the user passed
        for kw in getattr(node, "keywords", []):
            if kw.arg == "trust_remote_code":
                assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), path.name


def test_remote_code_is_off_by_default():
    from fnprune.recipe import ModelSpec

    assert ModelSpec().trust_remote_code is False
