"""The model card states what the run wrote: how the checkpoint loads, its widths, how it was scored and which
`fnprune export` formats its family and layout allow (those fnprune.export accepts)."""

from __future__ import annotations

import pytest

from fnprune.card import CardInfo, model_card


def _card(model_type: str = "llama", layout: str = "uniform", widths: list[int] | None = None,
          head: str = "AutoModelForCausalLM", kind: str = "classification", allocation: str = "uniform",
          config: dict | None = None) -> str:
    report = {"parameters": {"dense": 100, "pruned": 60}, "file_bytes": {"dense": 400, "pruned": 240},
              "calibration": {"samples": 8}, "widths": {"dense": 128, "pruned": widths or [64, 64]},
              "layout": layout, "allocation": allocation, "metric": {"n": None}, "templates": []}
    return model_card(CardInfo("org/base", "sst2", "flap", 0.5, report, "task: {}\n", model_type, head, kind,
                               config or {}), "0")


def test_card_says_when_the_headline_is_the_calibration_mean():
    """A task with no held-out template: the card may not call its headline held out."""
    calibration_only = [{"name": "t", "held_out": False, "dense": 0.75, "pruned": 0.5}]
    report = {"parameters": {"dense": 100, "pruned": 60}, "file_bytes": {"dense": 400, "pruned": 240},
              "calibration": {"samples": 8}, "widths": {"dense": 128, "pruned": [64, 64]},
              "templates": calibration_only,
              "metric": {"n": 4, "dense": 0.75, "pruned": 0.5, "of": "calibration templates (mean)"}}
    card = model_card(CardInfo("org/base", "t", "flap", 0.5, report, "task: {}\n", "llama"), "0")
    assert "no\nheld-out prompt template" in card and "mean over held-out" not in card
    held = [*calibration_only, {"name": "h", "held_out": True, "dense": 0.7, "pruned": 0.6}]
    card = model_card(CardInfo("org/base", "t", "flap", 0.5, {**report, "templates": held}, "", "llama"), "0")
    assert "the mean over held-out prompt templates" in card


def test_uniform_llama_card():
    card = _card()
    assert "loads with\nplain" not in card and "loads with plain `AutoModelForCausalLM.from_pretrained`" in card
    assert "| MLP width per layer | 128 | 64 |" in card and "of every layer" in card
    assert "written as llama.cpp's `llama` architecture" in card and "--format deci" in card
    assert "label-word log-probabilities" in card


def test_per_layer_card_names_the_loader_and_the_width_range():
    card = _card(layout="per-layer", widths=[48, 80], allocation="global")
    assert "fnprune.load_pruned(DIR)" in card and "trust_remote_code=True" in card and "plain" not in card
    assert "| 48..80 (per layer) |" in card and "`global` allocation" in card and "of every layer" not in card
    assert "`deci` architecture" in card


def test_the_card_offers_the_deci_export_as_is_only_for_widths_it_writes():
    """The card offered `--format deci` for widths the exporter refuses (not multiples of 256)."""
    odd = _card(layout="per-layer", widths=[48, 80])
    assert "not all multiples of 256" in odd and "`--round-to 256`, then `fnprune export DIR --format deci" in odd
    even = _card(layout="per-layer", widths=[256, 512])
    assert "vLLM: `fnprune export DIR --format deci --output DIR-deci`." in even and "multiples of 256" not in even


@pytest.mark.parametrize(("model_type", "layout", "gguf", "deci"), [
    ("qwen2", "uniform", True, False), ("qwen2", "per-layer", False, False), ("qwen2", "padded", True, False),
    ("mistral", "padded", True, False), ("mistral", "per-layer", True, True), ("gpt2", "uniform", False, False),
])
def test_export_lines_follow_what_export_accepts(model_type, layout, gguf, deci):
    widths = [48, 80] if layout != "uniform" else None
    card = _card(model_type, layout, widths)
    assert ("--format gguf" in card) == gguf and ("--format deci" in card) == deci
    if not gguf and not deci:
        assert f"does not write `{model_type}` checkpoints with this layout" in card


@pytest.mark.parametrize("config", [{"sliding_window": 64, "max_position_embeddings": 128},
                                    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}])
def test_the_card_offers_no_gguf_export_the_exporter_refuses(config):
    card = _card("mistral", config=config)
    assert "--format gguf" not in card and "--format deci" in card
    assert "--format gguf" in _card("mistral", config={"sliding_window": 4096, "max_position_embeddings": 4096})


def test_encoder_and_multiple_choice_wording():
    card = _card("bert", head="AutoModelForSequenceClassification")
    assert "plain `AutoModelForSequenceClassification.from_pretrained`" in card
    assert "each choice's log-likelihood" in _card(kind="multiple_choice")


def test_card_states_the_share_of_neurons_kept_as_counted_not_as_asked():
    report = {"parameters": {"dense": 100, "pruned": 60}, "file_bytes": {"dense": 400, "pruned": 240},
              "calibration": {"samples": 8}, "widths": {"dense": 128, "pruned": [64, 64]}, "layout": "uniform",
              "allocation": "uniform", "metric": {"n": None}, "templates": [],
              "mlp_neurons": {"dense": 256, "pruned": 128}}
    rounded = model_card(CardInfo("org/base", "sst2", "flap", 0.3, report, "task: {}\n", "llama",
                                  "AutoModelForCausalLM", "classification"), "0")
    assert "kept 50% (asked 30%) of the MLP neurons" in rounded
    assert "kept 50% of the MLP neurons" in _card() and "asked" not in _card()


@pytest.mark.parametrize("task", ["reviews: sentiment #1", "[draft] sst2", "sst2"])
def test_front_matter_is_yaml_for_any_task_name_and_names_any_hub_base(task, tmp_path):
    """A custom task's name may hold YAML syntax (it broke the Hub metadata); `gpt2` is a Hub id too, a local
    folder is not."""
    import yaml

    report = {"parameters": {"dense": 100, "pruned": 60}, "file_bytes": {"dense": 400, "pruned": 240},
              "calibration": {"samples": 8}, "widths": {"dense": 128, "pruned": [64, 64]}, "metric": {"n": None},
              "templates": []}
    for base, expected in [("gpt2", "gpt2"), ("org/base", "org/base"), (str(tmp_path), None)]:
        card = model_card(CardInfo(base, task, "flap", 0.5, report, "", "llama"), "0")
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["tags"] == ["fnprune", "pruned", task] and meta.get("base_model") == expected


def test_figures_are_rounded_once_and_sizes_name_their_formats():
    """14 of 17 is 82.35%: shown 82.4% (report.json's ratio was rounded to 4 decimals first, 82.3%); a float32
    source beside a bfloat16 checkpoint says so, as the summary's weights line does; the summary states the share
    kept as counted beside the one asked."""
    import torch

    from fnprune.card import retained_text
    from fnprune.report_text import report_lines
    from fnprune.validation import retained

    dense, pruned = torch.ones(1, 17), torch.tensor([[1.0] * 14 + [0.0] * 3])
    assert retained_text(retained(dense, pruned)).startswith("82.4% of dense")
    report = {"keep": 0.4, "mlp_neurons": {"dense": 128, "pruned": 48}, "file_bytes": {
        "dense": 4 * 2**20, "pruned": 2**20, "dense_format": "float32", "pruned_format": "bfloat16"}}
    lines = "\n".join(report_lines(report))
    assert "weights file 4.0 MiB (float32) -> 1.0 MiB (bfloat16)" in lines
    assert "kept 37.5% (asked 40%) of the MLP neurons" in lines
    same = {**report, "file_bytes": {**report["file_bytes"], "pruned_format": "float32"}}
    assert "weights file 4.0 MiB -> 1.0 MiB" in "\n".join(report_lines(same))


def test_the_card_carries_the_base_models_license(model_dir, task_data, tmp_path):
    """A derivative pushed without its base model's license metadata would ship unlicensed on the Hub."""
    import shutil

    import yaml

    import fnprune
    from fnprune.hub import base_license
    from fnprune.recipe import recipe_from_dict

    base = tmp_path / "base"
    shutil.copytree(model_dir("llama"), base)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n"
                                    "language: en\n---\n# A tiny model\n", encoding="utf-8")
    assert base_license(str(base)) == {"license": "other", "license_name": "tiny-license"}  # no LICENSE file here
    assert base_license(str(model_dir("llama"))) == {} and base_license(str(base / "README.md")) == {}
    result = fnprune.compress(recipe_from_dict({
        "model": {"name_or_path": str(base)}, "task": {"name": "sst2", "data_dir": str(task_data)},
        "calibration": {"num_samples": 16, "max_tokens": 100}, "selection": {"keep": 0.5, "refit": False},
        "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}}), progress=False)
    meta = yaml.safe_load((result.output_dir / "README.md").read_text().split("---\n")[1])
    assert meta["license"] == "other" and meta["license_name"] == "tiny-license" and "language" not in meta
    (base / "README.md").write_text("---\n- not: a mapping\n---\n", encoding="utf-8")
    assert base_license(str(base)) == {}


def test_a_local_base_models_license_file_is_copied_beside_the_pruned_model(model_dir, task_data, tmp_path):
    """A relative license_link names a file of the base folder: copied, so the card's link resolves in the pruned
    folder and on the Hub once pushed; a link out of the folder, or to a file the folder writes itself, is not."""
    import shutil

    import yaml

    import fnprune
    from fnprune.hub import base_license, license_file
    from fnprune.recipe import recipe_from_dict

    base = tmp_path / "base"
    shutil.copytree(model_dir("llama"), base)
    (base / "legal").mkdir()
    (base / "legal" / "LICENSE.txt").write_text("tiny license terms\n", encoding="utf-8")
    (tmp_path / "OUTSIDE").write_text("not the base's\n", encoding="utf-8")
    (base / "linked").symlink_to(tmp_path / "OUTSIDE")  # as a Hub cache snapshot's files are

    def card(link: str) -> None:
        (base / "README.md").write_text(f"---\nlicense: other\nlicense_name: tiny\nlicense_link: {link}\n---\n",
                                        encoding="utf-8")

    card("../OUTSIDE")
    assert "license_link" not in base_license(str(base))
    card("linked")
    assert license_file(str(base), base_license(str(base))) == "linked"
    card("./legal/LICENSE.txt")
    assert license_file(str(base), base_license(str(base))) == "legal/LICENSE.txt"

    def run(name: str):
        return fnprune.compress(recipe_from_dict({
            "model": {"name_or_path": str(base)}, "task": {"name": "sst2", "data_dir": str(task_data)},
            "calibration": {"num_samples": 16, "max_tokens": 100}, "selection": {"keep": 0.5, "refit": False},
            "evaluation": {"enabled": False}, "output": {"dir": str(tmp_path / name)}}), progress=False).output_dir

    out = run("a")
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["license_link"] == "legal/LICENSE.txt"
    assert (out / "legal" / "LICENSE.txt").read_text() == "tiny license terms\n"
    card("config.json")  # a file the pruned folder writes itself: not replaced, and the link no longer fits
    out = run("b")
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "license_link" not in meta and meta["license"] == "other"
    assert (out / "config.json").read_text() != (base / "config.json").read_text()  # the pruned model's own


def test_a_hub_base_models_license_is_read_from_its_card_and_offline_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    from fnprune.hub import base_license

    card = tmp_path / "README.md"
    card.write_text("\ufeff---\nlicense: other\nlicense_link: LICENSE.md\n---\n", encoding="utf-8")
    asked = []

    def download(repo_id, filename, revision=None, local_files_only=False):
        asked.append((repo_id, filename, revision, local_files_only))
        if repo_id == "org/none":
            raise OSError("no card")
        return str(card)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert base_license("org/model", "v1") == {"license": "other",
                                               "license_link": "https://huggingface.co/org/model/blob/v1/LICENSE.md"}
    assert base_license("org/none") == {}
    assert asked[0] == ("org/model", "README.md", "v1", True)
