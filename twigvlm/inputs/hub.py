"""Models by Hugging Face hub id: "owner/name" (or "owner/name@revision") → a model directory in the HF cache.

This module owns the one step between a `--model` argument and a directory on disk: a local directory is used
as it is; a hub id is looked up in the Hugging Face cache first (no network), and downloaded only where the hub
may be reached (not under `HF_HUB_OFFLINE`), with huggingface_hub's own progress bars. Only the files a model
needs are fetched. Anything else is a one-line `TwigVLMError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import TwigVLMError

# What loading a VLM reads: config, weights and their index, tokenizer, processor, chat template, generation config.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `model` has the shape of a hub id, "owner/name[@revision]", else None."""
    match = _HUB_ID.fullmatch(model)
    if match is None:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(match["repo"])  # the hub's own rules: no "--" or "..", at most 96 characters, ...
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def check_model_path(model: str | Path) -> tuple[str, str | None] | None:
    """None for a directory, else the (repo id, revision) of the hub id `model` has the shape of; a one-line error
    when it is neither (nothing is looked up on the hub)."""
    path = Path(model)
    if path.is_dir():
        return None
    parsed = None if path.exists() else parse_hub_id(str(model))
    if parsed is None:
        problem = "is a file" if path.exists() else "does not exist"
        raise TwigVLMError(
            f"model {model} {problem}: it is neither a model directory (save_pretrained output) nor a Hugging Face "
            "hub id (owner/name)"
        )
    return parsed


def resolve_model_dir(model: str | Path) -> Path:
    """The directory of a model: `model` itself when it is a directory, else the cached (or, with network,
    downloaded) snapshot of the hub id it names."""
    parsed = check_model_path(model)
    return Path(model) if parsed is None else _snapshot(str(model), *parsed)


def _snapshot(model: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" --revision {revision}" if revision else ""
    fetch = f"download it with `hf download {repo_id}{at}` on a machine with network, or pass a local model directory"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached (or cached in part): the hub may have it
        pass
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise TwigVLMError(
            f"model {model} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            + fetch
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    except GatedRepoError:
        raise TwigVLMError(
            f"model {model} is gated on the Hugging Face hub: accept its terms on its page, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise TwigVLMError(
            f"model {model} is not on the Hugging Face hub (or is private: `hf auth login`), and no directory "
            "of that name exists"
        ) from None
    except RevisionNotFoundError:
        raise TwigVLMError(f"model {model}: the hub repository {repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # the hub could not be reached
        raise TwigVLMError(
            f"model {model} is neither a local directory nor in the Hugging Face cache, and the hub cannot be "
            f"reached (set HF_HUB_OFFLINE=1 to skip trying): {fetch}"
        ) from None
    except Exception as e:  # noqa: BLE001 — any other failure of the download (HTTP, proxy, TLS, disk)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise TwigVLMError(f"could not download model {model} ({type(e).__name__}: {first}): {fetch}") from None


def local_config(model: str | Path) -> Path | None:
    """The config.json a model argument names without fetching anything: a directory's own, or a hub id's in the
    Hugging Face cache; None where neither is on disk (or the argument is a name such as "demo")."""
    path = Path(model)
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    parsed = None if path.exists() else parse_hub_id(str(model))
    if parsed is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(parsed[0], "config.json", revision=parsed[1])
    return Path(found) if isinstance(found, str) else None
