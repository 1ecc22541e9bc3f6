"""Upload a pruned checkpoint folder to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from .errors import FnpruneError, OutputError, first_line

__all__ = ["push_folder", "hub_offline", "check_push", "base_license", "license_file"]

LICENSE_KEYS = ("license", "license_name", "license_link")  # the Hub card metadata a derivative carries over

log = logging.getLogger(__name__)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the TRANSFORMERS_OFFLINE it also honours) set, as the Hub client reads them (at its
    import; read here when asked)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_push(repo_id: str | None) -> None:
    """Before any work: a push that cannot happen (the Hub switched off) fails now, not after the run."""
    if repo_id and hub_offline():
        raise OutputError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing "
                          "can be uploaded; unset it, or drop --push-to-hub and push the folder later")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) `repo_id` and make it hold exactly `folder`'s files (an earlier push's files it does not
    have, e.g. other weight shards, are deleted in the same commit: loading them would give the old model);
    returns the repo URL. A repo that exists and is public is not pushed to with `private`.

    The token is read by huggingface_hub itself and never passed through, printed or written by fnprune.
    """
    from huggingface_hub import HfApi, get_token

    api = HfApi()
    retry = f"`hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))}{' --private' if private else ''}`"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not getattr(api.repo_info(repo_id, repo_type="model"), "private", True):
            raise FnpruneError(f"--private: the Hub repo {repo_id} exists and is public, and pushing would publish "
                               f"the checkpoint; make it private on the Hub or choose a new repo (the checkpoint is "
                               f"saved in {folder})")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload fnprune pruned checkpoint", delete_patterns="*")
    except FnpruneError:
        raise
    except Exception as exc:  # network, auth, permissions: the message says which
        status = getattr(getattr(exc, "response", None), "status_code", None)
        unauthorized = status in (401, 403) or get_token() is None  # not a network failure
        login = "log in with `hf auth login` (or set HF_TOKEN), then " if unauthorized else ""
        raise FnpruneError(
            f"could not push {folder} to the Hub repo {repo_id}: {type(exc).__name__}: {first_line(exc)}. "
            f"The checkpoint is saved locally; {login}upload it with {retry}."
        ) from exc
    log.info("pushed %s to %s", folder, url)
    return str(url)


def base_license(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The base model card's license metadata (`license`, and `license_name` / `license_link` for "other"), for
    the pruned model's card: from README.md in a local folder, or from the Hub (its cache when offline); empty
    when there is no readable card or it names no license. A relative `license_link` names a file of the base
    repo: it is made absolute for a Hub id; for a local folder it stays when it names a file inside the folder
    (`license_file` finds it, to be copied beside the pruned model) and is dropped otherwise."""
    from huggingface_hub.repocard import metadata_load

    local = Path(name_or_path).expanduser()
    card = local / "README.md" if local.is_dir() else None
    if card is None and not local.exists():
        from huggingface_hub import hf_hub_download

        try:
            card = Path(hf_hub_download(name_or_path, "README.md", revision=revision, local_files_only=hub_offline()))
        except Exception:  # no card, offline without a cached one, not a repo id: the card says nothing
            log.debug("no model card for %s", name_or_path)
    try:
        meta = metadata_load(card) if card is not None and card.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, or front matter that is not a mapping
        meta = None
    found = {k: meta[k] for k in LICENSE_KEYS if isinstance(meta, dict) and isinstance(meta.get(k), (str, list))}
    link = found.get("license_link")
    if isinstance(link, str) and "://" not in link:
        if not local.exists():
            found["license_link"] = f"https://huggingface.co/{name_or_path}/blob/{revision or 'main'}/{link}"
        elif license_file(name_or_path, found) is None:
            del found["license_link"]
    return found


def license_file(name_or_path: str, license_meta: dict[str, Any]) -> str | None:
    """The path, relative to a local base folder, of the file its relative `license_link` names, when that is a
    file inside the folder (judged by the path as written: a Hub cache snapshot's files are links out of it);
    None otherwise."""
    link = license_meta.get("license_link")
    base = Path(name_or_path).expanduser()
    if not isinstance(link, str) or "://" in link or not base.is_dir():
        return None
    rel = os.path.normpath(link.replace("\\", "/"))
    if os.path.isabs(rel) or rel == ".." or rel.startswith("../") or not (base / rel).is_file():
        return None
    return Path(rel).as_posix()
