"""Shared fixtures: a tiny tokenizer, tiny models of every supported architecture, tiny SST-2-like data."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch

torch.set_flush_denormal(True)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/fnprune."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("fnprune-cache")
    mp.setenv("FNPRUNE_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny.make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    return tiny.make_task_data(tmp_path_factory.mktemp("sst2"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    """model_dir(model_type) -> folder with a saved tiny model + tokenizer (built once per session)."""
    from transformers import AutoTokenizer

    built: dict[str, Path] = {}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tiny.make_model(model_type, tmp_path_factory.mktemp(model_type), tok)
        return built[model_type]

    return make
