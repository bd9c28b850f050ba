"""multimodal_lora: teach BLIP-2 new captions with LoRA.

    >>> from multimodal_lora import caption
    >>> caption("photo.jpg", adapter="runs/tiny/adapter")

Importing the package loads neither torch-heavy modules nor bitsandbytes or
gradio; the public names below are imported on first use. It does keep
bitsandbytes, whenever it is imported, from fetching a kernel from the hub
(see :mod:`multimodal_lora.core.offline`).
"""

from __future__ import annotations

import importlib

from multimodal_lora.core import offline

offline.install()  # before PEFT or transformers can import bitsandbytes

__version__ = "0.1.0"

__all__ = ["Captioner", "Recipe", "ask", "caption", "clear_cache", "load_recipe", "train"]

_LAZY = {
    "Captioner": "multimodal_lora.inference.captioner",
    "ask": "multimodal_lora.inference.captioner",
    "caption": "multimodal_lora.inference.captioner",
    "clear_cache": "multimodal_lora.inference.captioner",
    "Recipe": "multimodal_lora.config",
    "load_recipe": "multimodal_lora.config",
    "train": "multimodal_lora.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multimodal_lora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
