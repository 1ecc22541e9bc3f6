"""The Hub's code paths without the Hub: what fnprune asks huggingface_hub for and says when it fails (the Hub is
unreachable on the test machines; users have it)."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file

from fnprune import cache, hub, models
from fnprune.errors import FnpruneError, OutputError


def test_transformers_offline_refuses_a_push_before_any_work(monkeypatch):
    """huggingface_hub treats TRANSFORMERS_OFFLINE as offline too: the push failed only after the compression."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(OutputError, match="TRANSFORMERS_OFFLINE"):
        hub.check_push("me/x")


def test_a_private_push_to_a_public_repo_is_refused_and_a_push_replaces_the_repos_files(monkeypatch, tmp_path):
    calls = []
    api = types.SimpleNamespace(
        create_repo=lambda repo_id, **kw: calls.append(("create", kw)) or f"https://huggingface.co/{repo_id}",
        repo_info=lambda repo_id, **kw: types.SimpleNamespace(private=False),
        upload_folder=lambda **kw: calls.append(("upload", kw)),
    )
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    with pytest.raises(FnpruneError, match="exists and is public"):
        hub.push_folder(tmp_path, "me/pub", private=True)
    assert [c for c, _ in calls] == ["create"]  # nothing uploaded
    hub.push_folder(tmp_path, "me/pub")
    assert calls[-1][0] == "upload" and calls[-1][1]["delete_patterns"] == "*"  # no earlier push's files stay


@pytest.mark.parametrize(("kind", "says"), [
    ("GatedRepoError", "gated model: request access on its Hub page"),
    ("RevisionNotFoundError", "has no revision 'v9'"),
    ("RepositoryNotFoundError", "no model org/m on the Hugging Face Hub"),
])
def test_a_hub_id_that_cannot_load_says_why(kind, says):
    """huggingface_hub's first line is often only "403 Client Error. (Request ID ...)"."""
    error = type(kind, (Exception,), {})("403 Client Error. (Request ID: abc)\nCannot access gated repo")
    message = str(models._not_on_hub("org/m", error, "v9"))
    assert says in message and "Request ID" not in message


def test_the_cache_keys_a_hub_model_by_its_commit_alone(monkeypatch):
    """A saved recipe pins the commit the first run loaded as `revision`: its rerun must find that run's
    activations (they were keyed by the revision as given, None, and captured again)."""
    monkeypatch.setattr(cache, "hub_commit", lambda repo, revision: "c0ffee" if revision in (None, "c0ffee") else None)
    assert cache.model_fingerprint("org/m", None) == cache.model_fingerprint("org/m", "c0ffee")
    assert cache.model_fingerprint("org/m", "v2") != cache.model_fingerprint("org/m", None)


def test_streamed_surgery_downloads_the_weights_not_the_whole_repo(monkeypatch, tmp_path):
    """The weights from_pretrained reads and nothing else: a Mistral repo's consolidated.safetensors (a second
    full copy, for mistral-inference) was downloaded too, and counted in the dense checkpoint's size; shards are
    fetched by the names the index gives them (BLOOM's are model_00001-of-00072.safetensors)."""
    import json

    from huggingface_hub.utils import filter_repo_objects

    from fnprune.recipe import ModelSpec

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shards = ["model_00001-of-00002.safetensors", "model_00002-of-00002.safetensors"]
    repo = {"config.json": "{}", "consolidated.safetensors": "", "pytorch_model.bin": "", "model.gguf": "",
            "model.safetensors.index.json": json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}),
            **dict.fromkeys(shards, "")}
    asked = []

    def download(repo_id, revision=None, allow_patterns=None):
        asked.append(allow_patterns)
        for name in filter_repo_objects(list(repo), allow_patterns=allow_patterns):
            (snapshot / name).write_text(repo[name])
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    assert models.weights_dir("org/big") == snapshot
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(["config.json", "model.safetensors.index.json",
                                                                *shards])
    assert asked[0] == models.WEIGHT_FILES
    (snapshot / shards[1]).unlink()
    from fnprune.stream_surgery import source_weight_map

    with pytest.raises(FnpruneError, match="names 1 shard file.*model_00002-of-00002.safetensors"):
        source_weight_map(snapshot)
    local = tmp_path / "local"
    local.mkdir()
    save_file({"w": torch.zeros(4)}, str(local / "model.safetensors"))
    save_file({"w": torch.zeros(400, dtype=torch.bfloat16)}, str(local / "consolidated.safetensors"))
    size = models.checkpoint_bytes(ModelSpec(name_or_path=str(local)))
    assert size == (local / "model.safetensors").stat().st_size
    assert models.checkpoint_format(ModelSpec(name_or_path=str(local))) == "float32"  # not the other copy's


def test_evaluating_a_checkpoint_from_elsewhere_falls_back_to_the_hub_dataset(tmp_path):
    """A Hub checkpoint's recipe.yaml names its author's data folder: a built-in task with a Hub dataset is scored
    on it, any other says what to pass."""
    from fnprune.evaluate_checkpoint import _task_spec
    from fnprune.recipe import recipe_from_dict

    gone = str(tmp_path / "alice_data")
    recorded = recipe_from_dict({"task": {"name": "sst2", "data_dir": gone, "dataset": "glue",
                                          "dataset_config": "sst2"}})
    spec = _task_spec(recorded, None, None, None)
    assert spec.data_dir is None and spec.dataset == "glue"
    assert _task_spec(recorded, None, str(tmp_path), None).data_dir == str(tmp_path)  # given data wins
    custom = recipe_from_dict({"task": {"name": "mine", "template": "{t}", "label_column": "l",
                                        "label_words": {"0": " no"}, "data_dir": gone}})
    with pytest.raises(FnpruneError, match="alice_data, which is not here: pass --data-dir or --data-files"):
        _task_spec(custom, None, None, None)
