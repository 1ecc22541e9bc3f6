"""Where each model family keeps its MLP neurons: ONE declarative table keyed by `config.model_type`.

An MLP "neuron" is one intermediate channel: an output channel of every input projection (gate/up, fc1, ...)
and an input channel of the output projection (down_proj, c_proj, fc2, ...). Nothing else in fnprune
branches on the model family to score, prune or save it; it all reads an `MLPLayout` from `MLP_LAYOUTS`. The
format converters (fnprune/export, the GGUF and DeciLM readers in fnprune/models.py) know their formats' own
names, and surgery updates an MLP module's `intermediate_size` attribute wherever a family has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError
from .offload import materialized

__all__ = [
    "MLPLayout",
    "MLP_LAYOUTS",
    "CAUSAL_LM",
    "CLASSIFIER",
    "layout_for",
    "is_classifier",
    "layer_blocks",
    "get_module",
    "mlp_widths",
    "by_neuron",
    "neuron_weight_norms",
]


CAUSAL_LM = "AutoModelForCausalLM"
CLASSIFIER = "AutoModelForSequenceClassification"


@dataclass(frozen=True)
class MLPLayout:
    """How to find and slice one family's MLP, and the facts about its checkpoints that surgery needs.

    layers:   attribute path from the model to the list of transformer blocks; its first part is the base
              model's attribute (`prefix`).
    inputs:   module paths inside a block whose output channels are the neurons.
    output:   module path inside a block whose input channels are the neurons (its input is what we capture).
    conv1d:   weights stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in].
    fused:    number of neuron-sized halves stacked in each input projection (Phi-3 gate_up_proj: 2).
    width_key: config field that holds the intermediate size.
    bias:     how a constant can be added after the output projection (bias compensation):
              "native" = the output projection has a bias (checked on the model); "config:<flag>" = set that
              config flag, which gives every MLP projection a bias (the input ones are zeroed); None = never.
    head:     the transformers auto class the family's checkpoints load with: a causal LM (predicts label
              words at the last token) or a sequence classifier (predicts with its head from the first token).
    residual: whether the output projection's output is added to the residual stream unchanged, which the
              sequential refit (fnprune.refit) needs: "always"; "never" (a norm follows it: Gemma 2/3's
              post-feedforward norm, the encoders' post-LN); "config:<flag>" = when that config flag is true.
    """

    layers: str
    inputs: tuple[str, ...]
    output: str
    width_key: str
    conv1d: bool = False
    fused: int = 1
    bias: str | None = None
    head: str = CAUSAL_LM
    residual: str = "always"

    @property
    def bias_flag(self) -> str | None:
        """The config flag that gives the MLP projections a bias ("config:<flag>" rows), else None."""
        return self.bias.split(":", 1)[1] if self.bias and self.bias.startswith("config:") else None

    @property
    def classifier(self) -> bool:
        return self.head == CLASSIFIER

    @property
    def decision(self) -> str:
        """Which token carries the prediction: "last" (causal LMs) or "first" (encoder [CLS] heads)."""
        return "first" if self.classifier else "last"

    @property
    def prefix(self) -> str:
        """The base model's attribute (transformers' `base_model_prefix`): some checkpoints store their keys
        without it (GPT-2's on the Hub: `h.0.mlp.c_fc.weight` for `transformer.h.0.mlp.c_fc.weight`)."""
        return self.layers.split(".", 1)[0]


_ENCODER = dict(inputs=("intermediate.dense",), output="output.dense", width_key="intermediate_size", bias="native",
                head=CLASSIFIER, residual="never")
_GATED = dict(inputs=("mlp.gate_proj", "mlp.up_proj"), output="mlp.down_proj", width_key="intermediate_size")

MLP_LAYOUTS: dict[str, MLPLayout] = {
    "llama": MLPLayout("model.layers", **_GATED, bias="config:mlp_bias"),
    "mistral": MLPLayout("model.layers", **_GATED),
    "qwen2": MLPLayout("model.layers", **_GATED),
    "qwen3": MLPLayout("model.layers", **_GATED),
    "gemma": MLPLayout("model.layers", **_GATED),
    "gemma2": MLPLayout("model.layers", **_GATED, residual="never"),
    "gemma3_text": MLPLayout("model.layers", **_GATED, residual="never"),
    "phi3": MLPLayout(
        "model.layers", ("mlp.gate_up_proj",), "mlp.down_proj", "intermediate_size", fused=2
    ),
    "gpt2": MLPLayout("transformer.h", ("mlp.c_fc",), "mlp.c_proj", "n_inner", conv1d=True, bias="native"),
    "opt": MLPLayout("model.decoder.layers", ("fc1",), "fc2", "ffn_dim", bias="native",
                     residual="config:do_layer_norm_before"),
    "gpt_neox": MLPLayout(
        "gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "intermediate_size", bias="native"
    ),
    "falcon": MLPLayout("transformer.h", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "ffn_hidden_size", bias="native"),
    # Encoders: *ForSequenceClassification checkpoints (the task head is kept).
    "bert": MLPLayout("bert.encoder.layer", **_ENCODER),
    "roberta": MLPLayout("roberta.encoder.layer", **_ENCODER),
    "distilbert": MLPLayout(
        "distilbert.transformer.layer", ("ffn.lin1",), "ffn.lin2", "hidden_dim", bias="native", head=CLASSIFIER,
        residual="never",
    ),
}


def layout_for(model_or_type: nn.Module | str) -> MLPLayout:
    """The layout of a model (or model_type); an unknown family gets an error naming the supported ones."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in MLP_LAYOUTS:
        raise ModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(MLP_LAYOUTS))}. "
            "A new family needs one MLPLayout row in fnprune/arch.py."
        )
    return MLP_LAYOUTS[model_type]


def is_classifier(model: nn.Module) -> bool:
    """A sequence classifier: predicts with its head, not with label words (the layout's `head`; a model of an
    architecture fnprune cannot prune, which evaluate still scores: its class name)."""
    try:
        return layout_for(model).classifier
    except ModelError:
        return type(model).__name__.endswith("ForSequenceClassification")


def adds_to_residual(layout: MLPLayout, model: nn.Module) -> bool:
    """Whether this model's MLP output enters the residual stream unchanged (`MLPLayout.residual`)."""
    if layout.residual.startswith("config:"):
        return bool(getattr(model.config, layout.residual.split(":", 1)[1], False))
    return layout.residual == "always"


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_blocks(model: nn.Module, layout: MLPLayout) -> list[nn.Module]:
    return list(get_module(model, layout.layers))


def mlp_widths(model: nn.Module, layout: MLPLayout) -> list[int]:
    """Number of MLP neurons in each layer."""
    return [output_weight_by_neuron(get_module(b, layout.output), layout).shape[0] for b in layer_blocks(model, layout)]


def by_neuron(output_weight: torch.Tensor, layout: MLPLayout) -> torch.Tensor:
    """An output projection's stored weight tensor as [neurons, hidden], and back: the change of orientation
    (a transpose for nn.Linear, none for Conv1D) is its own inverse."""
    return output_weight if layout.conv1d else output_weight.t()


def output_weight_by_neuron(module: nn.Module, layout: MLPLayout) -> torch.Tensor:
    """The output projection's weight as [neurons, hidden]."""
    return by_neuron(module.weight.detach(), layout)


def input_weights_by_neuron(module: nn.Module, layout: MLPLayout) -> list[torch.Tensor]:
    """Each input projection's weight as [neurons, hidden], one tensor per fused half."""
    w = module.weight.detach()
    w = w.t() if layout.conv1d else w  # (fused * d_ff, hidden)
    return list(w.chunk(layout.fused, dim=0))


def neuron_weight_norms(model: nn.Module, layout: MLPLayout) -> list[dict[str, torch.Tensor]]:
    """Per layer: L2 norm of each neuron's output-projection column (`out`) and of all its input rows (`in`), and
    the column's mean |weight| (`out_abs_mean`, Wanda-SP's).

    Offloaded modules (device_map) are loaded one at a time; the norms are returned on the CPU.
    """
    norms = []
    for block in layer_blocks(model, layout):
        with materialized(get_module(block, layout.output)) as module:
            column = output_weight_by_neuron(module, layout).float()
            out, out_abs_mean = column.norm(dim=1).cpu(), column.abs().mean(dim=1).cpu()
        sq = torch.zeros_like(out)
        for path in layout.inputs:
            with materialized(get_module(block, path)) as module:
                for w in input_weights_by_neuron(module, layout):
                    sq += w.float().pow(2).sum(dim=1).cpu()
        norms.append({"out": out, "in": sq.sqrt(), "out_abs_mean": out_abs_mean})
    return norms


# model_type -> llama.cpp architecture of its GGUF files (`fnprune export --format gguf`); families not listed
# are not exported yet. Per-layer widths of a "llama" row are written as llama.cpp's "deci" architecture.
LLAMA_CPP_ARCH: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
