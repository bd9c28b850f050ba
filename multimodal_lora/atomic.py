"""Directories that appear whole or not at all: built beside their target, then renamed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from multimodal_lora.errors import UserError


def staging_dir(target: Path) -> Path:
    """A fresh temporary directory beside ``target`` (same file system, so the rename is atomic).

    ``mkdtemp`` makes it private (0700); what we publish (adapters, models, reports, the
    tiny base, the bundled data) is meant to be readable like any directory, so open it up.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    return tmp


class DiskFullError(UserError):
    """The file system lacks the room for what is about to be written; nothing was written."""


def require_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse, before writing anything, when ``directory``'s file system has less than ``needed`` bytes free.

    Args:
        directory: where the bytes will go (its nearest existing ancestor is measured).
        needed: bytes about to be written.
        what: what they are, for the message (e.g. "the feature cache of 2,000 images × 16 KB").

    Raises:
        DiskFullError: naming both numbers and the place.
    """
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DiskFullError(
            f"{what} needs {format_bytes(needed)} in {directory}, but only {format_bytes(free)} is free there; "
            "free some space, or point the cache elsewhere (MULTIMODAL_LORA_CACHE)"
        )


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KB'``: sizes for people (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"
