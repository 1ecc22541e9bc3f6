"""Write .safetensors files one tensor at a time (the format: 8-byte header length, JSON header, raw data).

safetensors' own `save_file` builds every tensor's bytes in memory first, which doubles the peak memory of a
large activation cache or checkpoint shard. Here the header is written from the planned dtypes and shapes
(meta tensors will do), then each tensor is made, written and freed in turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .temp_files import replaced

__all__ = ["DTYPES", "DTYPE_NAMES", "read_with_meta", "tensors_sha256", "write_atomic", "write_safetensors"]

log = logging.getLogger("fnprune")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{k: getattr(torch, v) for k, v in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, v)},
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(
    path: str | Path,
    planned: dict[str, torch.Tensor],
    metadata: dict[str, str],
    make: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Write `planned` (name -> tensor, or a meta tensor of the right dtype and shape when `make(name)` builds
    the real one) to `path`; a made tensor that does not match its plan is an error, never a corrupt file."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in planned.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, plan in planned.items():
            t = make(name) if make is not None else plan
            if t.dtype != plan.dtype or t.shape != plan.shape:
                raise RuntimeError(
                    f"{name}: made {t.dtype} {tuple(t.shape)}, planned {plan.dtype} {tuple(plan.shape)}"
                )
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t


def tensors_sha256(tensors: dict[str, torch.Tensor], meta_json: str = "") -> str:
    """Checksum of the metadata and the tensors' names, dtypes, shapes and bytes (in name order), so a garbled,
    zeroed or truncated file is noticed."""
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}\0{DTYPE_NAMES[t.dtype]}\0{list(t.shape)}\0".encode())
        digest.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def write_atomic(target: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """`tensors` and a JSON `meta` to `target` through a temporary file renamed into place: a crash never
    leaves a half-written file under the target's name (and the next write sweeps the temporary file a killed one
    left). The header carries a checksum of the metadata and tensors."""
    with replaced(target) as tmp:
        meta_json = json.dumps(meta)
        write_safetensors(tmp, tensors, {"meta": meta_json, "sha256": tensors_sha256(tensors, meta_json)})


def read_with_meta(target: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """What `write_atomic` wrote, or None when the file is missing, unreadable or fails its checksum (callers
    treat it as absent and write it anew; a damaged file is logged)."""
    if not target.is_file():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(target), framework="pt") as f:
            header = f.metadata() or {}
        meta, tensors = json.loads(header["meta"]), load_file(str(target))
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        if header.get("sha256") != tensors_sha256(tensors, header["meta"]):
            raise ValueError("checksum mismatch (garbled, truncated or written by an older fnprune)")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is "absent"
        log.warning("ignoring %s: %s", target, f"{type(exc).__name__}: {exc}")
        return None
    return tensors, meta
