"""Where multimodal_lora keeps what it builds: the tiny base, the bundled data.

The location is ``$MULTIMODAL_LORA_CACHE`` when set, else
``~/.cache/multimodal_lora``. Everything under it can be deleted at any time;
it is rebuilt, bit-identically, on next use.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MULTIMODAL_LORA_CACHE"


def cache_dir() -> Path:
    """Return the cache root (not created)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "multimodal_lora"
