"""fnprune's streaming safetensors writer (activation cache, streamed surgery) reads back with safetensors."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fnprune.safetensors_io import write_safetensors


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 2, generator=gen).bfloat16(),
        "i64": torch.arange(5),
        "transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
        "empty": torch.zeros(0, 3),
        "f64": torch.randn(1, generator=gen).double(),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"meta": "{}"})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"meta": "{}"}
