"""The checks of a recipe's device map, memory limits and offload folder (what from_pretrained and accelerate
accept), refused up front with one line each. No torch here."""

from __future__ import annotations

import re
from typing import Any

from .choices import DEVICE_MAP_STRATEGIES

__all__ = ["device_map_problems"]

_DEVICE = re.compile(r"(cpu|mps|(cuda|xpu|npu|hpu|mlu)(:\d+)?)")
_MEMORY_KEY = re.compile(r"\d+|cpu|disk|mps")  # what accelerate's max_memory takes (a GPU by its index)
# accelerate's units: KiB/MiB/GiB in any case, KB/MB/GB with a capital B (a lower-case b is read as bits)
_SIZE = re.compile(r"(\d+(\.\d+)?)\s*([KMGkmg][iI][bB]|[KMGkmg]B)?")  # no unit: bytes (made an int on loading)


def _is_device(value: Any, disk: bool) -> bool:
    """A device accelerate can place a module on: GPU index, "cpu", "cuda:0", ... ("disk" in maps only)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= 0
    return isinstance(value, str) and (bool(_DEVICE.fullmatch(value)) or (disk and value == "disk"))


def device_map_problems(dm: Any, max_memory: dict[str, Any], offload_folder: str | None) -> list[str]:
    """What is wrong with `model.device_map`, `model.max_memory` and `model.offload_folder`, one line each."""
    problems = []
    if isinstance(dm, str) and dm not in DEVICE_MAP_STRATEGIES and not _is_device(dm, disk=False):
        problems.append(
            f"model.device_map: {dm!r} is not one of {', '.join(DEVICE_MAP_STRATEGIES)} or a device "
            "(cpu, cuda, cuda:0, mps), or a mapping of module names to devices"
        )
    if isinstance(dm, dict):
        if not dm:
            problems.append("model.device_map: an empty mapping places nothing; use auto or list modules")
        for name, device in dm.items():
            if not _is_device(device, disk=True):
                problems.append(
                    f"model.device_map.{name}: {device!r} is not a device (a GPU index, cpu, disk, cuda:0, mps)"
                )
    for key, size in max_memory.items():
        if not _MEMORY_KEY.fullmatch(key):
            problems.append(f"model.max_memory.{key}: not a device accelerate limits (a GPU index like 0, cpu, "
                            "disk, mps)")
        ok_int = isinstance(size, int) and not isinstance(size, bool) and size > 0
        found = _SIZE.fullmatch(size) if isinstance(size, str) else None  # as accelerate reads it: no spaces
        if not ok_int and not (found and float(found.group(1)) > 0 and (found.group(3) or "." not in size)):
            bits = isinstance(size, str) and size.strip().endswith("b") and not size.strip().lower().endswith("ib")
            problems.append(f"model.max_memory.{key}: {size!r} is not a size above 0 (a number of bytes, or like "
                            "2GiB, 500MB" + ("; a lower-case b means bits to accelerate" if bits else "") + ")")
    if dm is None:
        for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value:
                problems.append(f"model.{name}: only used with model.device_map (e.g. auto); set both or neither")
    return problems
