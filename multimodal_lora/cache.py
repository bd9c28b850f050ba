"""Where multimodal_lora keeps what it builds: the tiny base, the bundled data, image feature caches.

The location is ``$MULTIMODAL_LORA_CACHE`` when set, else
``~/.cache/multimodal_lora``. Everything under it can be deleted at any time;
it is rebuilt, bit-identically, on next use. Feature caches grow with every
new data set, base or image-processor setting; list and remove them with::

    python -m multimodal_lora.cache list                      # every entry, its size and last use
    python -m multimodal_lora.cache clear                     # all image feature caches
    python -m multimodal_lora.cache clear --older-than 7      # those unused for a week
    python -m multimodal_lora.cache clear KEY ...             # the named feature caches
    python -m multimodal_lora.cache clear --all               # everything (rebuilt on next use)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from multimodal_lora.core.atomic import remove_tree

ENV_VAR = "MULTIMODAL_LORA_CACHE"
FEATURES = "features"
"""The subdirectory holding one directory per image feature cache."""


def cache_dir() -> Path:
    """Return the cache root (not created)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "multimodal_lora"


@dataclass(frozen=True)
class Entry:
    """One thing in the cache: a feature cache, the tiny base, the bundled data."""

    path: Path
    kind: str
    bytes: int
    last_used: float
    """Modification time of its newest file (a feature cache is touched each time a run opens it)."""
    detail: str = ""


def entries(root: Path | None = None) -> list[Entry]:
    """What is in the cache, feature caches first, each with its size on disk."""
    import json

    root = Path(root) if root is not None else cache_dir()
    out: list[Entry] = []
    features = root / FEATURES
    if features.is_dir():
        for path in sorted(p for p in features.iterdir() if p.is_dir() and not p.name.startswith(".")):
            detail = "incomplete"
            try:
                index = json.loads((path / "index.json").read_text())
                detail = f"{len(index['rows']):,} images, {index['dtype']}"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            out.append(Entry(path, "features", *_size_and_time(path), detail))
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.name != FEATURES and not p.name.startswith(".")):
            out.append(Entry(path, "base" if path.name.startswith("tiny") else "data", *_size_and_time(path)))
    return out


def clear(
    keys: list[str] | None = None,
    *,
    everything: bool = False,
    older_than_days: float | None = None,
    root: Path | None = None,
) -> list[Entry]:
    """Remove feature caches (all, the named ones, or the unused ones); ``everything`` removes all entries.

    Returns:
        The entries removed.

    Raises:
        UserError: a named key is not a feature cache here.
    """
    from multimodal_lora.core.errors import UserError

    found = entries(root)
    chosen = found if everything else [e for e in found if e.kind == "features"]
    if keys:
        known = {e.path.name: e for e in chosen}
        missing = [k for k in keys if k not in known]
        if missing:
            raise UserError(
                f"no feature cache named {', '.join(missing)} in {(Path(root) if root else cache_dir()) / FEATURES}; "
                "see python -m multimodal_lora.cache list"
            )
        chosen = [known[k] for k in keys]
    if older_than_days is not None:
        cutoff = time.time() - older_than_days * 86400
        chosen = [e for e in chosen if e.last_used < cutoff]
    for entry in chosen:
        remove_tree(entry.path)
    return chosen


def _size_and_time(path: Path) -> tuple[int, float]:
    if path.is_file():
        stat = path.stat()
        return stat.st_size, stat.st_mtime
    size, newest = 0, path.stat().st_mtime
    for dirpath, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(dirpath, name))
            size += stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size
            newest = max(newest, stat.st_mtime)
    return size, newest


if __name__ == "__main__":  # python -m multimodal_lora.cache
    from multimodal_lora.commands.cache import cli

    cli()
