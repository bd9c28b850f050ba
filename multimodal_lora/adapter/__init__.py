"""Adapters: the directory and its checks (:mod:`.files`), discovery and the base they need (:mod:`.search`).

An adapter directory is opened once into an :class:`Adapter` (directory, metadata,
LoRA config, checked tensors); everything that loads one takes that value, and
opening the same unchanged directory again in the process reads no file.
"""

from multimodal_lora.adapter.files import (
    CARD_FILE,
    CONFIG_FILE,
    META_FILE,
    OPENED,
    WEIGHTS_FILE,
    Adapter,
    AdapterMeta,
    adapter_bytes,
    adapter_parts,
    adapter_size_bytes,
    attach,
    base_of,
    check_base_matches,
    check_fits,
    find_adapter_dir,
    open_adapter,
    read_adapter,
    save_adapter,
)
from multimodal_lora.adapter.search import BaseChoice, Found, base_for, base_name_for, collect_adapters, find_adapters

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "META_FILE",
    "OPENED",
    "WEIGHTS_FILE",
    "Adapter",
    "AdapterMeta",
    "BaseChoice",
    "Found",
    "adapter_bytes",
    "adapter_parts",
    "adapter_size_bytes",
    "attach",
    "base_for",
    "base_name_for",
    "base_of",
    "check_base_matches",
    "check_fits",
    "collect_adapters",
    "find_adapter_dir",
    "find_adapters",
    "open_adapter",
    "read_adapter",
    "save_adapter",
]
