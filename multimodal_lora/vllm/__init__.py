"""vLLM as a second engine: serve and batch-caption our adapters on the engine users run at scale.

vLLM cannot live in this package's environment (it pins its own ``torch`` and
``transformers``), so it runs in an interpreter of its own, which
:mod:`~multimodal_lora.vllm.env` builds and finds. Nothing that runs there
imports this package: the code for that side is in ``runtime/`` (stdlib, vLLM
and PIL only), run by path, and everything that knows our families, prompts,
adapters and output files stays here.

* :mod:`~multimodal_lora.vllm.env`: ``python -m multimodal_lora.vllm install``, and which interpreter to use;
* :mod:`~multimodal_lora.vllm.support`: which families vLLM serves, what becomes of int8/4-bit adapters;
* :mod:`~multimodal_lora.vllm.plan`: adapters → base, model names, prompt layouts, the ``vllm serve`` line;
* :mod:`~multimodal_lora.vllm.serve`: ``python -m multimodal_lora.serve --engine vllm``;
* :mod:`~multimodal_lora.vllm.captioner`: ``python -m multimodal_lora.caption --engine vllm``.
"""
