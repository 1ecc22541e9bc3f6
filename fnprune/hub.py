"""Upload a pruned checkpoint folder to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import FnpruneError, OutputError

__all__ = ["push_folder", "hub_offline", "check_push"]

log = logging.getLogger(__name__)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set, as the Hub client reads it (at its import; read here when asked)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_push(repo_id: str | None) -> None:
    """Before any work: a push that cannot happen (the Hub switched off) fails now, not after the run."""
    if repo_id and hub_offline():
        raise OutputError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, "
                          "or drop --push-to-hub and push the folder later")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) `repo_id` and upload every file of `folder`; returns the repo URL.

    The token is read by huggingface_hub itself and never passed through, printed or written by fnprune.
    """
    from huggingface_hub import HfApi, get_token

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload fnprune pruned checkpoint")
    except Exception as exc:  # network, auth, permissions: the message says which
        status = getattr(getattr(exc, "response", None), "status_code", None)
        unauthorized = status in (401, 403) or get_token() is None  # not a network failure
        login = "log in with `hf auth login` (or set HF_TOKEN), then " if unauthorized else ""
        raise FnpruneError(
            f"could not push {folder} to the Hub repo {repo_id}: {type(exc).__name__}: {exc}. "
            f"The checkpoint is saved locally; {login}upload it with "
            f"`hf upload {repo_id} {folder}{' --private' if private else ''}`."
        ) from exc
    log.info("pushed %s to %s", folder, url)
    return str(url)
