"""No hub request the user did not ask for: bitsandbytes' optional CPU kernel stays unfetched.

bitsandbytes (0.50 and later), when first imported on a CPU with AVX-512 BF16, asks the
``kernels`` package (which transformers 5.x installs) for an optional 4-bit matmul kernel
from the Hugging Face Hub. That import happens whenever PEFT or transformers is imported
with bitsandbytes installed, so even an fp32 base made a hub request, and every load
printed "Failed to load CPU gemm_4bit_forward from kernels-community: ..." when the
request failed (offline, or the hub's trust check). This toolkit promises no downloads
it was not told to make, so:

* while ``bitsandbytes`` itself is imported, ``kernels`` is hidden from it: the import
  fails at once, without a request, and bitsandbytes keeps its built-in CPU path (the
  one it uses on every CPU without AVX-512 BF16, and the one our int8/4-bit tests check);
* its one warning about that is dropped, since that path is the expected case here;
  our own logger says so at debug level.

Set ``MULTIMODAL_LORA_HUB_KERNELS=1`` to let bitsandbytes fetch its hub kernel (trusting
that repository is then yours to decide). :func:`install` runs when ``multimodal_lora``
is imported; it imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys

logger = logging.getLogger(__name__)

OPT_IN = "MULTIMODAL_LORA_HUB_KERNELS"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _HubKernelWarningFilter(logging.Filter):
    """Drops bitsandbytes' warning that its optional hub kernel was not loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_BNB_KERNEL_WARNING):
            logger.debug("bitsandbytes uses its built-in CPU kernels (hub kernels are not fetched; %s=1 allows it)", OPT_IN)
            return False
        return True


class _WithoutKernels(importlib.abc.Loader):
    """Runs bitsandbytes' own loader with ``kernels`` unimportable for the length of the import."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        hidden = sys.modules.get("kernels", _ABSENT)
        sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError, no request
        try:
            self._loader.exec_module(module)
        finally:
            if hidden is _ABSENT:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = hidden

    def __getattr__(self, name: str):
        # resource readers, get_source, is_package...: the real loader answers.
        return getattr(self._loader, name)


_ABSENT = object()


class _BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds ``bitsandbytes`` as Python would, and wraps its loader in :class:`_WithoutKernels`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _WithoutKernels(spec.loader)
        return spec


def install() -> None:
    """Keep bitsandbytes off the hub from here on (once per process; a no-op when opted in)."""
    if os.environ.get(OPT_IN, "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    bnb_logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _HubKernelWarningFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_HubKernelWarningFilter())
    if "bitsandbytes" in sys.modules:
        return  # imported before us: whatever it fetched, it has fetched
    if not any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesFinder())
