"""Resolving a model name to a local directory, with one clear line when that is impossible."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_TARGET = REPO_ROOT / "models" / "tiny-target"
EMBEDDED_DRAFT = REPO_ROOT / "models" / "tiny-draft"
EMBEDDED_ALIASES = {"embedded": (EMBEDDED_TARGET, EMBEDDED_DRAFT),
                    "embedded-target": (EMBEDDED_TARGET, None),
                    "embedded-draft": (None, EMBEDDED_DRAFT)}


def looks_like_hub_id(name: str) -> bool:
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not os.path.exists(name))


def resolve_model_dir(name: str, what: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory for ``name``: a path, an 'embedded' alias, or a hub id.

    Hub ids are fetched with huggingface_hub (or read from its cache when offline). Failure is
    a UserError that says how to use a local path or the embedded pair instead.
    """
    if name in ("embedded", "embedded-target") and what != "draft":
        return EMBEDDED_TARGET
    if name in ("embedded", "embedded-draft") and what == "draft":
        return EMBEDDED_DRAFT
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{what} directory '{name}' has no config.json",
                            "point to a Hugging Face model folder")
        return path
    if path.exists():
        raise UserError(f"{what} path '{name}' is a file, not a model folder")
    if not looks_like_hub_id(name):
        raise UserError(f"{what} '{name}' does not exist",
                        "give a local model folder, a hub id like Qwen/Qwen3-4B, or 'embedded'")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(name, allow_patterns=allow_patterns)
    except Exception as first_err:  # offline or unreachable: try the local cache only
        try:
            from huggingface_hub import snapshot_download
            local = snapshot_download(name, allow_patterns=allow_patterns, local_files_only=True)
        except Exception:
            raise UserError(
                f"{what} '{name}' cannot be reached on the Hugging Face hub and is not cached "
                f"({type(first_err).__name__})",
                "download it on a machine with access and pass its local folder, "
                "or use the embedded pair (--model-name-or-path embedded "
                "--draft-name-or-path embedded)") from first_err
    return Path(local)
