"""Tiny offline twins of the real models, built on demand and cached.

``base: tiny`` (BLIP-2 OPT), ``base: tiny-t5`` (BLIP-2 Flan-T5) and
``base: tiny-instructblip`` (InstructBLIP with a LLaMA language model) each
name a small model with the real model's classes and module names, random
weights and a tokenizer trained locally. How each is built is its family's
business (:mod:`multimodal_lora.families`); this module builds it once,
atomically, under :func:`multimodal_lora.cache.cache_dir`, and hands out the
directory, which loads through the same ``from_pretrained`` path as a real
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from multimodal_lora.core.atomic import staging_dir

TINY_NAME = "tiny"

logger = logging.getLogger(__name__)


def _family(name: str):
    from multimodal_lora.families import tiny_family, tiny_names

    family = tiny_family(name)
    if family is None:
        raise ValueError(f"no tiny base is called {name!r}; the tiny bases are {', '.join(tiny_names())}")
    return family


def tiny_dir(cache_root: Path | None = None, name: str = TINY_NAME) -> Path:
    """Where the tiny base ``name`` lives (built on demand by :func:`ensure_tiny_base`)."""
    from multimodal_lora.cache import cache_dir

    root = cache_root if cache_root is not None else cache_dir()
    return root / _family(name).tiny_dirname


def ensure_tiny_base(cache_root: Path | None = None, name: str = TINY_NAME) -> Path:
    """Build the tiny base once and return its directory.

    The directory appears atomically (built in a temporary directory beside it,
    then renamed), so a crash mid-build never leaves a half-written model, and
    two processes building at once both end up with the same files.
    """
    family = _family(name)
    target = tiny_dir(cache_root, name)
    if _is_complete(target):
        return target
    if _is_secondary_rank():
        # transformers' save_pretrained writes no weights on a rank other than 0 of a
        # torch.distributed job (accelerate launch): rank 0 builds, the others wait.
        return _wait_for(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    try:
        import torch

        # Building seeds torch's global generator; keep the caller's (a training run that
        # builds the base on first use must draw the same numbers as one that finds it cached).
        with torch.random.fork_rng(devices=[]):
            family.build_tiny(tmp)
            (tmp / "TINY_BASE.json").write_text(json.dumps({"name": name, "family": family.name, "dir": target.name}, indent=2) + "\n")
        if not _is_complete(tmp):
            raise RuntimeError(f"building the tiny base in {tmp} wrote no weights")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (its files are identical to ours), or an
            # older, broken build left an incomplete directory: replace that one.
            if not _is_complete(target):
                shutil.rmtree(target)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the tiny %s base in %s", family.name, target)
    return target


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _is_secondary_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _wait_for(target: Path, timeout: float = 600.0) -> Path:
    import time

    deadline = time.monotonic() + timeout
    while not _is_complete(target):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not build the tiny base in {target} within {timeout:.0f} s")
        time.sleep(0.2)
    return target
