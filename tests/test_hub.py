"""Hub: push uploads the output folder with a proper card; Hub ids load from the Hugging Face cache.

The Hub is unreachable here, so the tests populate a real Hugging Face cache folder (the snapshot layout the
hub client reads) and run with HF_HUB_OFFLINE=1; for pushing, the upload client (huggingface_hub.HfApi) is
replaced by one that copies the folder into a local "remote". fnprune's own code is not mocked.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # full compress runs

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_fnprunetestsecret0123456789"

PUSH_WITH_LOCAL_REMOTE = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    import huggingface_hub
    remote = Path(sys.argv[1])
    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        (remote / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        (remote / repo_id / ".private").write_text(str(private))
        return "https://huggingface.co/" + repo_id
    def repo_info(self, repo_id, repo_type=None):
        from types import SimpleNamespace
        return SimpleNamespace(private=(remote / repo_id / ".private").read_text() == "True")
    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, delete_patterns=None):
        if delete_patterns == "*":  # the Hub keeps .gitattributes (and this mock its .private)
            for old in (remote / repo_id).iterdir():
                if old.name not in (".gitattributes", ".private") and not (Path(folder_path) / old.name).exists():
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)
    huggingface_hub.HfApi.create_repo = create_repo
    huggingface_hub.HfApi.repo_info = repo_info
    huggingface_hub.HfApi.upload_folder = upload_folder
    import os
    os.environ.pop("HF_HUB_OFFLINE", None)  # read by the hub client at import (loads stay offline): pushes may go
    from fnprune.cli import main
    sys.exit(main(sys.argv[2:]))
""")
PUSH_FAILS = textwrap.dedent("""
    import sys
    import huggingface_hub
    def create_repo(self, *args, **kwargs):
        raise ConnectionError("connection reset by peer")
    huggingface_hub.HfApi.create_repo = create_repo
    from fnprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def cache_repo(cache: Path, repo_id: str, files_from: Path) -> None:
    """Put `files_from` into a Hugging Face hub cache as repo `repo_id` at revision main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(files_from, snapshot, ignore=shutil.ignore_patterns(".private"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _run(args, env, cwd):
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_compress_from_hub_id_push_and_load_back(model_dir, task_data, tmp_path):
    cache, remote = tmp_path / "hub-cache", tmp_path / "remote"
    cache_repo(cache, "tiny-org/tiny-llama", model_dir("llama"))
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_TOKEN=TOKEN,
               FNPRUNE_CACHE_DIR=str(tmp_path / "fnprune-cache"))
    _run(["-c", PUSH_WITH_LOCAL_REMOTE, str(remote), "compress", "--task", "sst2", "--model", "tiny-org/tiny-llama",
          "--data-dir", str(task_data), "--num-samples", "40", "--max-tokens", "300", "--components", "8",
          "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny-llama-sst2", "--private", "--quiet"],
         env, tmp_path)
    pushed = remote / "me/tiny-llama-sst2"
    assert (pushed / ".private").read_text() == "True"
    assert {"model.safetensors", "config.json", "README.md", "recipe.yaml", "report.json"} <= {
        p.name for p in pushed.iterdir()}
    card = (pushed / "README.md").read_text()
    assert "base_model: tiny-org/tiny-llama" in card and "- fnprune\n- pruned" in card and "```yaml" in card
    for path in pushed.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token leaked into {path.name}"

    # Load it back by Hub id from the cache, in processes that only see the cache.
    cache_repo(cache, "me/tiny-llama-sst2", pushed)
    out = _run(["-m", "fnprune.cli", "evaluate", "--model", "me/tiny-llama-sst2", "--json", "--quiet"], env, tmp_path)
    evaluated = json.loads(out.strip().splitlines()[-1])
    report = json.loads((pushed / "report.json").read_text())
    assert evaluated["accuracy"] == report["metric"]["pruned"] and evaluated["n"] == report["metric"]["n"]
    code = ("import fnprune, json; p = fnprune.load_pruned('me/tiny-llama-sst2'); "
            "print(json.dumps([p.model.config.intermediate_size, p.report['method']]))")
    assert json.loads(_run(["-c", code], env, tmp_path).strip().splitlines()[-1]) == [64, "flap"]

    # A second push to the repo leaves exactly its folder there: the first push's single weights file is gone, not
    # loaded beside (or instead of) the new shards.
    _run(["-c", PUSH_WITH_LOCAL_REMOTE, str(remote), "compress", "--task", "sst2", "--model", "tiny-org/tiny-llama",
          "--data-dir", str(task_data), "--num-samples", "40", "--max-tokens", "300", "--components", "8",
          "--no-eval", "--max-shard-size", "100KB", "--output", str(tmp_path / "out2"), "--push-to-hub",
          "me/tiny-llama-sst2", "--private", "--quiet"], env, tmp_path)
    assert {p.name for p in pushed.iterdir()} == {p.name for p in (tmp_path / "out2").iterdir()} | {".private"}


def test_push_failure_keeps_the_local_checkpoint(model_dir, task_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_TOKEN=TOKEN, FNPRUNE_CACHE_DIR=str(tmp_path / "c"))
    args = ["compress", "--task", "sst2", "--model", str(model_dir("gpt2")), "--data-dir", str(task_data),
            "--num-samples", "40", "--max-tokens", "300", "--components", "8", "--no-eval", "--output",
            str(tmp_path / "o"), "--push-to-hub", "me/x", "--quiet"]
    offline = subprocess.run([sys.executable, "-m", "fnprune.cli", *args], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=300)
    assert offline.returncode == 1 and not (tmp_path / "o").exists()  # refused before any work
    assert offline.stderr.strip().splitlines()[-1] == (
        "Error: --push-to-hub me/x: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can be uploaded; "
        "unset it, or drop --push-to-hub and push the folder later")
    proc = subprocess.run([sys.executable, "-c", PUSH_FAILS, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "could not push" in proc.stderr and "saved locally" in proc.stderr and TOKEN not in proc.stderr
    assert f"hf upload me/x {shlex.quote(str(tmp_path / 'o'))}" in proc.stderr  # pushes the folder as it is
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_a_hub_id_that_cannot_be_fetched_is_one_line_that_says_what_works_offline(task_data, tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "fnprune.cli", "compress", "--task", "sst2", "--model",
                           "someone/not-cached", "--data-dir", str(task_data), "--output", str(tmp_path / "o"),
                           "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("Error: could not find someone/not-cached locally or on the Hugging Face Hub")
    assert errors[0].endswith("offline, give a local folder or .gguf file")  # HF_HUB_OFFLINE=1 already set
    assert not (tmp_path / "o").exists()
    # evaluate (and load_pruned) resolve a Hub id first: the same advice
    proc = subprocess.run([sys.executable, "-m", "fnprune.cli", "evaluate", "--task", "sst2", "--model",
                           "someone/not-cached", "--data-dir", str(task_data), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("offline, give a local folder or .gguf file")
