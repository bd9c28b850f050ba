"""Directories that appear whole or not at all: built beside their target, then renamed."""

from __future__ import annotations

import tempfile
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """A fresh temporary directory beside ``target`` (same file system, so the rename is atomic).

    ``mkdtemp`` makes it private (0700); what we publish (adapters, models, reports, the
    tiny base, the bundled data) is meant to be readable like any directory, so open it up.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    return tmp
