"""`fnprune export`: GGUF files (llama.cpp) and DeciLM folders (vLLM) read back, per-layer widths included.

Fast tests use tiny models. The GGUF files are read with `gguf.GGUFReader` and, for dense models, loaded by
transformers' own GGUF loader (an independent reader of names and the Q/K re-ordering). vLLM does not run on
these machines: its loaders' expectations (config keys, tensor names, shapes; from vLLM's
model_executor/models/llama.py and nemotron_nas.py) are checked against the files instead.
The opt-in test at the end runs the real SmolLM2 in llama.cpp (llama-cpp-python).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fnprune.arch import layout_for, mlp_widths
from fnprune.checkpoint import write_per_layer_code
from fnprune.cli import main
from fnprune.errors import ModelError
from fnprune.export import export, read_checkpoint
from fnprune.models import load_model
from fnprune.recipe import ModelSpec
from fnprune.surgery import prune_mlp

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16  # tests/tiny.py's Llama-like configs


def _prune(model_dir, dest: Path, arch: str, widths: list[int], layout: str = "uniform", bias: bool = False,
           dense_width: int | None = None) -> Path:
    """A tiny pruned checkpoint: random kept neurons, optionally bias-compensated (Llama: mlp_bias true)."""
    if dense_width is None:
        model, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
    else:  # a wider tiny model (DeciLM widths must be multiples of 256)
        import tiny
        from transformers import AutoModelForCausalLM

        _, tok = load_model(ModelSpec(name_or_path=str(model_dir(arch))))
        config = tiny.make_config(arch, len(tok))
        config.intermediate_size = dense_width
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tiny._reinit(model, 0)
    mlp = layout_for(model)
    gen = torch.Generator().manual_seed(0)
    dense = mlp_widths(model, mlp)
    keep = [torch.randperm(d, generator=gen)[:w].sort().values for d, w in zip(dense, widths)]
    means = [torch.rand(d, generator=gen) for d in dense] if bias else None
    prune_mlp(model, mlp, keep, removed_means=means, width_layout=layout)
    if layout == "per-layer":
        write_per_layer_code(dest, model)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    (dest / "report.json").write_text(json.dumps({"layout": layout, "base_model": "tiny"}))
    return dest


def _field(reader, key):
    return reader.fields[key].contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary row order (pairs 2i, 2i+1 per head) back to HF's (halves per head)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in reader.tensors}


def _hf_names(arch: str, n_layers: int = 2) -> dict[str, str]:
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    return names


def _compare(ckpt_dir: Path, gguf_file: Path, arch: str, check) -> None:
    """Every checkpoint tensor (but a tied lm_head) is in the file, under llama.cpp's name, with its values."""
    hf = load_file(str(ckpt_dir / "model.safetensors"))
    got = _read(gguf_file)
    names = _hf_names(arch)
    expected = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in hf if k != "lm_head.weight"}
    assert set(got) == set(expected)
    for target, name in expected.items():
        want = hf[name].float().numpy()
        have = got[target].reshape(want.shape)
        if arch in ("llama", "deci") and ".q_proj." in name:
            have = _unpermute(have, HEADS)
        elif arch in ("llama", "deci") and ".k_proj." in name:
            have = _unpermute(have, KV_HEADS)
        check(name, want, have)


def _exact(name, want, have):
    np.testing.assert_array_equal(have, want, err_msg=name)


def test_gguf_uniform_llama_with_mlp_bias_f32_is_exact(model_dir, tmp_path):
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [64, 64], bias=True)
    assert json.loads((ckpt / "config.json").read_text())["mlp_bias"] is True
    out = tmp_path / "m.gguf"
    info = export(ckpt, "gguf", out, outtype="f32")
    assert info["arch"] == "llama" and info["tokenizer_pre"] == "gpt-2"  # the tiny tokenizer splits as GPT-2
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "llama"
    meta = {k: _field(reader, f"llama.{k}") for k in (
        "block_count", "feed_forward_length", "embedding_length", "context_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "vocab_size")}
    assert meta == {"block_count": 2, "feed_forward_length": 64, "embedding_length": HIDDEN, "context_length": 128,
                    "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
                    "attention.key_length": HEAD_DIM, "rope.dimension_count": HEAD_DIM, "vocab_size": 384}
    config = json.loads((ckpt / "config.json").read_text())
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 384 and len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # GGUF order: [in, out]
    assert shapes["blk.0.ffn_gate.weight"] == [HIDDEN, 64] and shapes["blk.1.ffn_down.weight"] == [64, HIDDEN]
    assert "blk.0.ffn_down.bias" in shapes and "output.weight" not in shapes  # tied: llama.cpp uses token_embd
    _compare(ckpt, out, "llama", _exact)


def test_gguf_f16_and_q8_0_within_tolerance(model_dir, tmp_path):
    """f16: within half an f16 ulp (2^-11 relative); q8_0: within one step (block max / 127) of each 32-block."""
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [64, 64], bias=True)
    export(ckpt, "gguf", tmp_path / "f16.gguf", outtype="f16")
    export(ckpt, "gguf", tmp_path / "q8.gguf", outtype="q8_0")

    def f16(name, want, have):
        assert np.all(np.abs(have - want) <= 2**-11 * np.abs(want) + 1e-7), name

    def q8(name, want, have):
        if want.ndim == 1:
            return _exact(name, want, have)
        blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
        assert np.all(np.abs(have - want).reshape(-1, 32) <= blocks / 127 * 1.01 + 1e-7), name

    _compare(ckpt, tmp_path / "f16.gguf", "llama", f16)
    _compare(ckpt, tmp_path / "q8.gguf", "llama", q8)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_loads_in_transformers_with_the_same_logits(arch, model_dir, tmp_path):
    """transformers' GGUF loader (its own tensor-name map and Q/K re-ordering) gets the model back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = _prune(model_dir, tmp_path / "ckpt", arch, [64, 64])
    export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    ids = torch.tensor([[5, 17, 33, 80, 2, 41, 7, 99]])
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    # transformers' GGUF config reader ignores qwen3.attention.key_length (head_dim; llama.cpp reads it): give it
    extra = {"config": AutoConfig.from_pretrained(ckpt)} if arch == "qwen3" else {}
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32, **extra).eval()
    assert back.config.intermediate_size == 64
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,bias", [("llama", True), ("qwen3", False)])
def test_fnprune_loads_its_gguf_export_with_the_same_logits(arch, bias, model_dir, tmp_path):
    """fnprune's own loader (compress/evaluate --model file.gguf) keeps what transformers' GGUF config reader
    leaves out: the bias compensation (Llama's mlp_bias) and Qwen3's head size."""
    ckpt = _prune(model_dir, tmp_path / "ckpt", arch, [64, 64], bias=bias)
    export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    ids = torch.tensor([[5, 17, 33, 80, 2, 41, 7, 99]])
    ref, _ = load_model(ModelSpec(name_or_path=str(ckpt)))
    back, _ = load_model(ModelSpec(name_or_path=str(tmp_path / "m.gguf")))
    assert getattr(back.config, "mlp_bias", False) is bias
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_tokenizer_llama_cpp_cannot_be_told_of_is_refused_unless_named(model_dir, tmp_path):
    """A pre-tokenizer outside fnprune's table and not GPT-2's split (here digits split apart first, as Llama 3's
    and Qwen2's do) is refused: llama.cpp's `default` would split text otherwise. --tokenizer-pre names it; a
    damaged tokenizer.json is one line."""
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [64, 64])
    file = ckpt / "tokenizer.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    file.write_text(json.dumps(data), encoding="utf-8")
    msg = _cli_error(str(ckpt), "--format", "gguf", "--output", str(tmp_path / "m.gguf"))
    assert "not in fnprune's table of llama.cpp pre-tokenizers" in msg and "--tokenizer-pre NAME" in msg
    assert not (tmp_path / "m.gguf").exists()
    result = CliRunner().invoke(main, ["export", str(ckpt), "--format", "gguf", "--tokenizer-pre", "qwen2",
                                       "--output", str(tmp_path / "m.gguf"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert _field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.pre") == "qwen2"
    result = CliRunner().invoke(main, ["export", str(ckpt), "--format", "deci", "--tokenizer-pre", "qwen2",
                                       "--output", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--tokenizer-pre: --format gguf only" in result.output
    from fnprune.export.to_gguf import _PRE_BY_SPLIT

    for regex, name in _PRE_BY_SPLIT.items():  # Llama 3's and Qwen2's own split: named by their regex
        data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = regex
        file.write_text(json.dumps(data), encoding="utf-8")
        assert export(ckpt, "gguf", tmp_path / "m.gguf", overwrite=True, progress=False)["tokenizer_pre"] == name
    del data["pre_tokenizer"]["pretokenizers"][1]["use_regex"]  # tokenizers' default: GPT-2's split after it
    file.write_text(json.dumps(data), encoding="utf-8")
    assert "--tokenizer-pre NAME" in _cli_error(str(ckpt), "--format", "gguf", "--output", str(tmp_path / "x.gguf"))
    file.write_text('{"model": ', encoding="utf-8")
    msg = _cli_error(str(ckpt), "--format", "gguf", "--output", str(tmp_path / "n.gguf"))
    assert "tokenizer.json" in msg and "not valid JSON" in msg
    del data["model"]["merges"]  # valid JSON, but no tokenizer: the tokenizers library's own reason, one line
    file.write_text(json.dumps(data), encoding="utf-8")
    msg = _cli_error(str(ckpt), "--format", "gguf", "--output", str(tmp_path / "n.gguf"))
    assert "not a tokenizer the tokenizers library can read" in msg


def test_gguf_per_layer_is_deci_with_a_width_array(model_dir, tmp_path):
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [24, 40], layout="per-layer", bias=True)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(main, ["export", str(ckpt), "--format", "gguf", "--outtype", "f32", "--output",
                                       str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "GGUF arch deci" in result.output and "24..40" in result.output
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "deci"
    assert _field(reader, "deci.feed_forward_length") == [24, 40]
    assert _field(reader, "deci.attention.head_count") == [HEADS, HEADS]
    assert _field(reader, "deci.attention.head_count_kv") == [KV_HEADS, KV_HEADS]
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_up.weight"] == [HIDDEN, 24] and shapes["blk.1.ffn_up.weight"] == [HIDDEN, 40]
    _compare(ckpt, out, "deci", _exact)
    with pytest.raises(ModelError, match="is a per-layer GGUF .llama.cpp arch deci., which transformers cannot read"):
        load_model(ModelSpec(name_or_path=str(out)))
    export(ckpt, "gguf", tmp_path / "q8.gguf", outtype="q8_0")  # 24-wide rows are not 32-blocks: f16 instead
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_gguf_padded_is_llama(model_dir, tmp_path):
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [24, 40], layout="padded")
    info = export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    assert info["arch"] == "llama" and info["widths"] == [40, 40]
    assert _field(gguf.GGUFReader(tmp_path / "m.gguf"), "llama.feed_forward_length") == 40
    _compare(ckpt, tmp_path / "m.gguf", "llama", _exact)


def test_gguf_file_is_readable_like_any_written_file(model_dir, tmp_path):
    """The temporary file a GGUF is written through is private (mkstemp: 0600); the export is not."""
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [24, 24])
    old = os.umask(0o022)
    try:
        export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    finally:
        os.umask(old)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644


def _cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, ["export", *args])
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_bad_inputs_give_one_line_errors(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "x.gguf")
    assert "not an fnprune output folder" in _cli_error(str(tmp_path / "empty"), "--format", "gguf", "--output", out)
    per_layer = _prune(model_dir, tmp_path / "pl", "llama", [24, 40], layout="per-layer")
    msg = _cli_error(str(per_layer), "--format", "gguf", "--gguf-arch", "llama", "--output", out)
    assert "one FFN width" in msg and "deci" in msg
    msg = _cli_error(str(model_dir("gpt2")), "--format", "gguf", "--output", out)
    assert "not supported" in msg and "llama" in msg
    qwen = _prune(model_dir, tmp_path / "qw", "qwen2", [24, 40], layout="per-layer")
    assert "--layout padded" in _cli_error(str(qwen), "--format", "gguf", "--output", out)
    uniform = _prune(model_dir, tmp_path / "u", "llama", [64, 64])
    Path(out).write_text("keep me")
    assert "--overwrite" in _cli_error(str(uniform), "--format", "gguf", "--output", out)
    assert Path(out).read_text() == "keep me"
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(tmp_path / "nowhere")  # refused before the export, not after it
    assert "already exists; pass --overwrite" in _cli_error(str(uniform), "--format", "gguf", "--output",
                                                              str(dangling))
    (tmp_path / "d").mkdir()
    assert "--overwrite" in _cli_error(str(uniform), "--format", "deci", "--output", str(tmp_path / "d"))
    assert "--round-to 256" in _cli_error(str(per_layer), "--format", "deci", "--output", str(tmp_path / "d2"))
    padded = _prune(model_dir, tmp_path / "pad", "llama", [24, 40], layout="padded")
    assert "padded" in _cli_error(str(padded), "--format", "deci", "--output", str(tmp_path / "d3"))
    assert not list(tmp_path.glob(".*partial"))  # nothing half-written left behind


def _damaged(source: Path, dest: Path, damage) -> str:
    """A copy of checkpoint `source` with one thing broken by `damage(folder)`."""
    import shutil

    shutil.copytree(source, dest)
    damage(dest)
    return str(dest)


def _edit_config(**changes):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return damage


def test_damaged_checkpoints_are_refused_in_one_line(model_dir, tmp_path):
    """A broken config.json or report.json, a truncated weights file, or a config whose MLP width is not the
    weights' stops export (both formats) and inspect in one line, before anything is written."""
    uniform = _prune(model_dir, tmp_path / "u", "llama", [24, 24])
    truncate = lambda f: os.truncate(f / "model.safetensors", 5000)  # noqa: E731
    cases = {
        "config": (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        "report": (lambda f: (f / "report.json").write_text("[1]"), "not fnprune's report object"),
        "weights": (truncate, "not a readable safetensors file"),
        "layers": (_edit_config(num_hidden_layers=None), "num_hidden_layers"),
        "width": (_edit_config(intermediate_size=32), "config and weights disagree"),
        "per-layer": (_edit_config(fnprune_layout={"widths": [24]}), "has 1 widths for 2 layers"),
    }
    for name, (damage, message) in cases.items():
        folder = _damaged(uniform, tmp_path / name, damage)
        assert message in _cli_error(folder, "--format", "gguf", "--output", str(tmp_path / f"{name}.gguf"))
        assert message in _cli_error(folder, "--format", "deci", "--output", str(tmp_path / f"{name}-deci"))
        result = CliRunner().invoke(main, ["inspect", folder])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*-deci"))


def test_float16_output_of_values_beyond_its_range_is_refused(model_dir, tmp_path):
    """A bfloat16 (or float32) weight past float16's 65504 became inf in an f16 GGUF with only numpy's warning
    (and in q8_0 past 127 x 65504, its block scale's range)."""
    from safetensors.torch import save_file

    def overflow(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    folder = _damaged(_prune(model_dir, tmp_path / "u", "llama", [24, 24]), tmp_path / "big", overflow)
    msg = _cli_error(folder, "--format", "gguf", "--outtype", "f16", "--output", str(tmp_path / "m.gguf"), "--quiet")
    assert "model.layers.0.mlp.up_proj.weight holds values up to 1e+05, beyond float16's 65504" in msg
    assert not (tmp_path / "m.gguf").exists()
    export(folder, "gguf", tmp_path / "m.gguf", outtype="f32", progress=False)

    def beyond_q8_0(folder: Path) -> None:  # an inf already there hid the overflow; q8_0's scale is float16 too
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.0.mlp.up_proj.weight"][0, :2] = torch.tensor([float("inf"), 1e7])
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    folder = _damaged(_prune(model_dir, tmp_path / "u2", "llama", [32, 32]), tmp_path / "bigger", beyond_q8_0)
    for outtype, message in (("f16", "values up to 1e+07, beyond float16's 65504"),
                             ("q8_0", "q8_0's float16 block scale cannot hold them")):
        msg = _cli_error(folder, "--format", "gguf", "--outtype", outtype, "--output", str(tmp_path / "n.gguf"),
                         "--quiet")
        assert message in msg and "--outtype f32" in msg


def test_inspect_checks_the_weights_against_the_report(model_dir, tmp_path):
    """inspect reads the weights' headers: a report.json alone, or one written for other widths, is refused."""
    uniform = _prune(model_dir, tmp_path / "u", "llama", [24, 24])
    result = CliRunner().invoke(main, ["inspect", str(uniform)])
    assert result.exit_code == 0 and "weights: model.safetensors; their MLP widths are config.json's" in result.output
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "report.json").write_text((uniform / "report.json").read_text())
    result = CliRunner().invoke(main, ["inspect", str(alone)])
    assert result.exit_code != 0 and "no config.json" in result.output
    report = json.loads((uniform / "report.json").read_text())
    (uniform / "report.json").write_text(json.dumps({**report, "widths": {"dense": 128, "pruned": [30, 18]}}))
    result = CliRunner().invoke(main, ["inspect", str(uniform)])
    assert result.exit_code != 0 and "written for another checkpoint" in result.output


def test_export_never_replaces_its_input_and_sweeps_a_killed_export(model_dir, tmp_path):
    uniform = _prune(model_dir, tmp_path / "u", "llama", [24, 24])
    weights = (uniform / "model.safetensors").read_bytes()
    msg = _cli_error(str(uniform), "--format", "gguf", "--output", str(uniform / "model.safetensors"), "--overwrite")
    assert "a file of the input checkpoint" in msg and (uniform / "model.safetensors").read_bytes() == weights
    assert "is the input" in _cli_error(str(uniform), "--format", "deci", "--output", str(uniform), "--overwrite")
    assert (uniform / "model.safetensors").read_bytes() == weights and (uniform / "report.json").is_file()
    stale = tmp_path / f".m.gguf.{2**22 + 7}.x1.partial"  # a pid above the kernel's maximum: not alive
    stale.write_bytes(b"half")
    export(uniform, "gguf", tmp_path / "m.gguf", outtype="f32", progress=False)
    export(uniform, "gguf", uniform / "m.gguf", outtype="f32", progress=False)  # beside its files: allowed
    assert not stale.exists() and (tmp_path / "m.gguf").is_file() and (uniform / "m.gguf").is_file()
    export(uniform, "gguf", tmp_path / "m.gguf", outtype="f32", overwrite=True, progress=False)  # a GGUF: replaced
    victim = shutil.copytree(uniform, tmp_path / "victim")  # another model's weights, a user's notes
    (tmp_path / "notes.txt").write_text("mine")
    for other in (victim / "model.safetensors", tmp_path / "notes.txt"):
        before = other.read_bytes()
        msg = _cli_error(str(uniform), "--format", "gguf", "--output", str(other), "--overwrite")
        assert "is not a GGUF file" in msg and other.read_bytes() == before


def test_gguf_flags_are_refused_with_deci_and_deci_arch_advice(model_dir, tmp_path):
    uniform = _prune(model_dir, tmp_path / "u", "llama", [24, 24])
    result = CliRunner().invoke(main, ["export", str(uniform), "--format", "deci", "--outtype", "q8_0", "--output",
                                       str(tmp_path / "d")])
    assert result.exit_code == 2 and "--outtype: --format gguf only" in result.output
    qwen = _prune(model_dir, tmp_path / "qw", "qwen2", [24, 24])
    msg = _cli_error(str(qwen), "--format", "gguf", "--gguf-arch", "deci", "--output", str(tmp_path / "q.gguf"))
    assert "Llama-only" in msg and "--gguf-arch auto" in msg and "--layout padded" not in msg


def _tiny_llama(model_dir, dest: Path, **settings) -> Path:
    """A tiny Llama (the fixture's tokenizer) with config `settings` changed, saved to `dest`."""
    import tiny
    from transformers import AutoModelForCausalLM

    _, tok = load_model(ModelSpec(name_or_path=str(model_dir("llama"))))
    config = tiny.make_config("llama", len(tok))
    for key, value in settings.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tiny._reinit(model, 0)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _tiny_llama3_rope(model_dir, dest: Path) -> Path:
    """A tiny Llama with Llama 3's RoPE scaling (llama.cpp: the rope_freqs tensor), short original context so
    that 100 positions exercise every band."""
    return _tiny_llama(model_dir, dest, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})


@pytest.mark.parametrize("settings", [
    {"attention_bias": True},
    {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}], ids=["bias", "linear"])
def test_fnprune_loads_a_gguf_with_attention_biases_or_linear_rope_scaling(settings, model_dir, tmp_path):
    """transformers' GGUF config reader drops both (its logits differed by 0.5 and 5.5): fnprune's loader keeps
    them."""
    ckpt = _tiny_llama(model_dir, tmp_path / "ckpt", **settings)
    export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    ids = torch.tensor([[5, 17, 33, 80, 2, 41, 7, 99, 100, 200, 300, 12]])
    ref, _ = load_model(ModelSpec(name_or_path=str(ckpt)))
    back, _ = load_model(ModelSpec(name_or_path=str(tmp_path / "m.gguf")))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_rope_scaling_a_gguf_config_cannot_hold_is_refused():
    """Phi-3's LongRoPE factors and Gemma 3's linear scaling (its RoPE settings are per layer type) were loaded
    without their scaling; transformers 4.x configs (no rope_parameters) take linear scaling as rope_scaling."""
    from types import SimpleNamespace

    from fnprune.models import _gguf_rope

    def field(value):
        return SimpleNamespace(contents=lambda: value)

    linear = SimpleNamespace(fields={"a.rope.scaling.type": field("linear"), "a.rope.scaling.factor": field(8.0)})
    split = SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "default"}, "sliding_attention": {}})
    with pytest.raises(ModelError, match="RoPE scaling, linear, with settings per layer type"):
        _gguf_rope(split, linear, "a", set(), Path("m.gguf"))
    with pytest.raises(ModelError, match="RoPE scaling, LongRoPE"):
        _gguf_rope(SimpleNamespace(), SimpleNamespace(fields={}), "a", {"rope_factors_long.weight"}, Path("m.gguf"))
    old = SimpleNamespace()  # a transformers 4.x config
    _gguf_rope(old, linear, "a", set(), Path("m.gguf"))
    assert old.rope_scaling == {"rope_type": "linear", "type": "linear", "factor": 8.0}


def test_a_gguf_with_llama3_rope_scaling_is_refused_by_fnprunes_loader(model_dir, tmp_path):
    """Llama 3's RoPE settings cannot be read back from llama.cpp's rope_freqs tensor: loading it as transformers
    does would score a model with other positions, so compress/evaluate say so."""
    export(_tiny_llama3_rope(model_dir, tmp_path / "ckpt"), "gguf", tmp_path / "m.gguf", outtype="f32")
    with pytest.raises(ModelError, match=r"m.gguf: its RoPE scaling, llama3 \(rope_freqs\), is not rebuilt"):
        load_model(ModelSpec(name_or_path=str(tmp_path / "m.gguf")))


def test_gguf_llama3_rope_factors(model_dir, tmp_path):
    ckpt = _tiny_llama3_rope(model_dir, tmp_path / "ckpt")
    export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    factors = _read(tmp_path / "m.gguf")["rope_freqs.weight"]
    # head_dim 16: wavelengths 2 pi 10000^(2i/16); below 32/4 kept (1), above 32 slowed 8x, one blended between
    wavelen = 2 * np.pi * 10000 ** (np.arange(0, 16, 2) / 16)
    smooth = np.clip((32 / wavelen - 1) / 3, 0, 1)
    np.testing.assert_allclose(factors, 1 / ((1 - smooth) / 8 + smooth), rtol=1e-6)
    assert factors[0] == 1 and factors[-1] == 8 and 1 < factors[1] < 8


def _llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (build it from source)")


@pytest.mark.parametrize("case", ["llama-bias", "per-layer-deci", "padded", "llama3-rope", "mistral", "qwen2",
                                  "qwen3"])
def test_tiny_gguf_runs_in_llama_cpp_like_transformers(case, model_dir, tmp_path):
    """When llama-cpp-python is installed: llama.cpp's logits of every tiny export equal transformers'."""
    llama_cpp = _llama_cpp_or_skip()
    from transformers import AutoModelForCausalLM

    dest = tmp_path / "ckpt"
    if case == "llama3-rope":
        ckpt = _tiny_llama3_rope(model_dir, dest)
    elif case in ("llama-bias", "per-layer-deci", "padded"):
        layout = {"llama-bias": "uniform", "per-layer-deci": "per-layer", "padded": "padded"}[case]
        ckpt = _prune(model_dir, dest, "llama", [64, 64] if layout == "uniform" else [24, 40], layout, bias=True)
    else:
        ckpt = _prune(model_dir, dest, case, [64, 64])
    export(ckpt, "gguf", tmp_path / "m.gguf", outtype="f32")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 384, (100,), generator=gen).tolist()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # f32 KV cache (default f16)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    print(f"\n{case}: max |llama.cpp - transformers| = {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


# --- vLLM: what its loaders read (vLLM is not run here) --------------------------------------------------------


def _vllm_deci_width(ffn_mult: float, hidden: int) -> int:
    """vLLM nemotron_nas.py `_ffn_mult_to_intermediate_size` (llama.cpp's deci converter uses the same rule)."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def _vllm_llama_params(config: dict, widths: list[int]) -> dict[str, list[int]]:
    """Checkpoint tensors vLLM's Llama/DeciLM loaders fill (before fusing q/k/v and gate/up), with HF shapes.
    LlamaMLP gives gate_up_proj AND down_proj a bias when `mlp_bias`: gate/up biases must be in the file."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    out = {"model.embed_tokens.weight": [config["vocab_size"], h], "model.norm.weight": [h]}
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = [config["vocab_size"], h]
    for i, w in enumerate(widths):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                    p + "self_attn.q_proj.weight": [heads * hd, h], p + "self_attn.k_proj.weight": [kv * hd, h],
                    p + "self_attn.v_proj.weight": [kv * hd, h], p + "self_attn.o_proj.weight": [h, heads * hd],
                    p + "mlp.gate_proj.weight": [w, h], p + "mlp.up_proj.weight": [w, h],
                    p + "mlp.down_proj.weight": [h, w]})
        if config.get("mlp_bias"):
            out.update({p + "mlp.gate_proj.bias": [w], p + "mlp.up_proj.bias": [w], p + "mlp.down_proj.bias": [h]})
    return out


def _shapes(folder: Path) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in load_file(str(folder / "model.safetensors")).items()}


def test_vllm_llama_with_mlp_bias_format(model_dir, tmp_path):
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [64, 64], bias=True)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["mlp_bias"] is True
    assert config["intermediate_size"] == 64 and "auto_map" not in config  # plain Llama: no remote code
    assert _shapes(ckpt) == _vllm_llama_params(config, [64, 64])


def test_deci_folder_matches_vllm_and_llama_cpp_readers(model_dir, tmp_path):
    ckpt = _prune(model_dir, tmp_path / "ckpt", "llama", [256, 512], layout="per-layer", bias=True, dense_width=512)
    (ckpt / "report.json").write_text(json.dumps({"widths": {"dense": [512, 512], "pruned": [256, 512]}}))
    out = tmp_path / "deci"
    result = CliRunner().invoke(main, ["export", str(ckpt), "--format", "deci", "--output", str(out)])
    assert result.exit_code == 0, result.output
    inspected = CliRunner().invoke(main, ["inspect", str(out)])  # the copied report.json against block_configs
    assert inspected.exit_code == 0 and "their MLP widths are config.json's and report.json's" in inspected.output, \
        inspected.output
    assert read_checkpoint(out).widths == [256, 512] and read_checkpoint(out).layout == "per-layer"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert "fnprune_layout" not in config and config["mlp_bias"] is True
    blocks = config["block_configs"]
    assert len(blocks) == config["num_hidden_layers"] == 2
    widths = [_vllm_deci_width(b["ffn"]["ffn_mult"], config["hidden_size"]) for b in blocks]
    assert widths == [256, 512]
    for b in blocks:  # keys read by vLLM (no_op, n_heads_in_group, ffn_mult) and llama.cpp (replace_with_linear)
        assert b["attention"] == {"n_heads_in_group": HEADS // KV_HEADS, "no_op": False, "replace_with_linear": False}
        assert b["ffn"]["no_op"] is False and b["ffn"]["replace_with_linear"] is False
    assert _shapes(out) == _vllm_llama_params(config, widths)
    assert not (out / "modeling_fnprune.py").exists() and (out / "tokenizer.json").is_file()
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)  # the config class vLLM would build
    assert loaded.model_type == "nemotron-nas"
    assert [b.ffn.ffn_mult for b in loaded.block_configs] == [b["ffn"]["ffn_mult"] for b in blocks]
    assert loaded.block_configs[0].attention.n_heads_in_group == 2 and not loaded.block_configs[0].ffn.no_op
    assert json.loads(loaded.to_json_string())["block_configs"] == blocks
    assert read_checkpoint(ckpt).widths == [256, 512]
    with pytest.raises(ModelError, match="is a DeciLM folder without model code"):  # not transformers' errors
        load_model(ModelSpec(name_or_path=str(out), trust_remote_code=True))


# --- opt-in: the real SmolLM2 in llama.cpp -------------------------------------------------------------------

MODEL = Path(os.environ.get("FNPRUNE_SMOLLM2", "~/.cache/fnprune-models/smollm2-135m-instruct")).expanduser()
DATA = Path(os.environ.get("FNPRUNE_SST2", Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))


def _llama_cpp_missing() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return True
    return False


real = [
    pytest.mark.real,
    pytest.mark.skipif(os.environ.get("FNPRUNE_REAL_TESTS") != "1", reason="opt-in: set FNPRUNE_REAL_TESTS=1"),
    pytest.mark.skipif(_llama_cpp_missing(), reason="llama-cpp-python is not installed (build it from source)"),
    pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason=f"no SmolLM2 at {MODEL}"),
    pytest.mark.skipif(not (DATA / "dev.tsv").is_file(), reason=f"no SST-2 data at {DATA}"),
]


def _examples(n: int) -> dict[str, list[tuple[str, int, list[str]]]]:
    """The first n SST-2 dev sentences under each held-out template (never calibrated on): (prompt, label index,
    the template's label words in label order)."""
    from fnprune.data import load_evaluation
    from fnprune.recipe import TaskSpec
    from fnprune.tasks import resolve_task

    task = resolve_task(TaskSpec(name="sst2", data_dir=str(DATA)))
    sets = load_evaluation(task, task.evaluation_split, n)
    out = {}
    for t in task.held_out_templates():
        words = t.words(task.label_words)
        out[t.name] = [(e.prompt, list(words).index(e.label), list(words.values())) for e in sets[t.name]]
    return out


def _one(tok, model, llm, text: str, label: int, words: list[int]) -> dict[str, float]:
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    pred_hf, pred_cpp = int(ref[words].argmax()), int(got[words].argmax())
    return {"agree": got.argmax() == ref.argmax(), "diff": float(np.abs(got - ref).max()),
            "same_tokens": llm.tokenize(text.encode(), add_bos=False, special=True) == ids,
            "same_pred": pred_hf == pred_cpp, "right_hf": pred_hf == label, "right_cpp": pred_cpp == label}


def compare_with_llama_cpp(hf_dir: Path, gguf_file: Path, examples: dict[str, list]) -> dict[str, float]:
    """Next-token logits after each prompt, transformers (float32) against llama.cpp on the same token ids, and
    the SST-2 prediction each makes from them (the template's label words), per template and overall."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=True).eval()
    llm = Llama(str(gguf_file), n_ctx=512, n_threads=1, logits_all=True, use_mmap=False, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core each, side by side with llama.cpp's one thread
    rows = {}
    try:
        for name, items in examples.items():
            words = None
            for text, label, label_words in items:
                words = words or [tok(w, add_special_tokens=False)["input_ids"][0] for w in label_words]
                rows.setdefault(name, []).append(_one(tok, model, llm, text, label, words))
    finally:
        torch.set_num_threads(threads)
        llm.close()
    every = [r for rs in rows.values() for r in rs]
    mean = {k: sum(float(r[k]) for r in every) / len(every) for k in every[0] if k != "diff"}
    return {"prompts": len(every), "argmax_agreement": mean["agree"],
            "max_abs_diff": round(max(r["diff"] for r in every), 4), "same_tokenization": mean["same_tokens"],
            "same_sst2_prediction": mean["same_pred"], "sst2_acc_transformers": mean["right_hf"],
            "sst2_acc_llama_cpp": mean["right_cpp"],
            "per_template": {name: (sum(r["right_hf"] for r in rs) / len(rs), sum(r["right_cpp"] for r in rs) / len(rs))
                             for name, rs in rows.items()}}


def _real(fn):
    for mark in reversed(real):
        fn = mark(fn)
    return fn


def _real_source(which: str, cache: Path) -> Path:
    """The dense model, or a keep-0.5 checkpoint: from $FNPRUNE_REAL_PRUNED/<which> if given, else compressed."""
    import fnprune
    from fnprune.recipe import recipe_from_dict

    if which == "dense":
        return MODEL
    given = os.environ.get("FNPRUNE_REAL_PRUNED")
    if given and (Path(given) / which / "config.json").is_file():
        return Path(given) / which
    src = cache / which
    if not src.exists():
        extra = {"allocation": "global"} if which == "per-layer" else {}
        fnprune.compress(recipe_from_dict({
            "model": {"name_or_path": str(MODEL)}, "task": {"name": "sst2", "data_dir": str(DATA)},
            "selection": {"keep": 0.5, **extra}, "evaluation": {"enabled": False},
            "output": {"dir": str(src), "layout": which},
        }), progress=False)
    return src


@_real
@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("which", ["dense", "uniform", "per-layer"])
def test_real_smollm2_in_llama_cpp(which, outtype, tmp_path_factory):
    """llama.cpp runs the exported SmolLM2 (dense, keep 0.5 uniform, keep 0.5 per-layer as deci) like
    transformers on 200 SST-2 dev sentences under each held-out template: the same next token after >= 99.5% of
    the prompts, and the held-out accuracy within 0.5 points."""
    src = _real_source(which, tmp_path_factory.getbasetemp() / "real-export")
    out = tmp_path_factory.mktemp("gguf") / f"{which}-{outtype}.gguf"
    info = export(src, "gguf", out, outtype=outtype)
    assert info["arch"] == ("deci" if which == "per-layer" else "llama") and info["tokenizer_pre"] == "smollm"
    result = compare_with_llama_cpp(src, out, _examples(200))
    print(f"\n{which} {outtype} widths {min(info['widths'])}..{max(info['widths'])}: {result}")
    assert result["same_tokenization"] == 1.0, result
    assert result["argmax_agreement"] >= 0.995, result
    assert abs(result["sst2_acc_llama_cpp"] - result["sst2_acc_transformers"]) <= 0.005, result
