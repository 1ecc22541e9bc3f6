"""Models placed by accelerate (`device_map`): offloaded modules keep their weights on the meta device and
accelerate's hooks load them for each forward pass. These helpers let fnprune read such a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ModelError

__all__ = ["materialized", "input_device", "offloaded_modules", "check_trainable"]


@contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, an offloaded module's own weights are real tensors (on its execution device); no-op otherwise."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embedding's execution device under a device map (its weight may be
    on meta or disk), else the device of the first parameter."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embed, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def offloaded_modules(model: nn.Module) -> list[str]:
    """Modules whose weights accelerate keeps off their execution device (CPU or disk offload, meta weights)."""
    return [name for name, m in model.named_modules()
            if getattr(getattr(m, "_hf_hook", None), "offload", False)
            or any(p.device.type == "meta" for p in m.parameters(recurse=False))]


def check_trainable(model: nn.Module, what: str) -> None:
    """Recovery trains weights in place: refuse a model whose device map offloads some of them."""
    off = offloaded_modules(model)
    if off:
        raise ModelError(
            f"recovery cannot train {what}: its device map offloads {len(off)} modules ({off[0]}, ...) to CPU or "
            "disk; give the GPUs room (model.max_memory) or use a device map without offload (e.g. cuda or cpu)"
        )
