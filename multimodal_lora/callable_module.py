"""Modules that share their name with a public function: ``caption`` and ``train``.

``multimodal_lora.caption`` is both the caption CLI module and the public
``caption()`` function (``multimodal_lora.train`` likewise). Python's import
system rebinds ``multimodal_lora.caption`` to the module the first time the
module is imported, so ``from multimodal_lora import caption`` would give the
function or the module depending on what was imported before. Making the
module itself callable, forwarding to the function, gives the same answer in
every import order.
"""

from __future__ import annotations

import importlib
import sys
import types


def forward_calls(module_name: str, function_module: str, function_name: str) -> None:
    """Make ``sys.modules[module_name]`` callable as ``function_module.function_name``."""
    if module_name == "__main__":  # run as `python -m`: nothing imports it by its package name
        return

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(function_module), function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
