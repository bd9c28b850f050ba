"""Architectures, one module each: the only code that knows module names and token layouts.

The rest of the package asks this package, through a :class:`Family`, for

* the LoRA target names, the anchored pattern that places them (the
  language model's attention), and the default targets; and, for the parts
  ``lora.parts`` may add, the language model's MLP names and pattern and its
  :class:`~multimodal_lora.families.base.Connector`;
* the token layout for training and generation
  (:mod:`~multimodal_lora.families.layouts`), one object used by training,
  evaluation and inference alike;
* the memory plan's dimensions;
* the published configs of its hub checkpoints (``families/configs/``);
* how to build its tiny offline twin.

**Adding a family** is adding one module here that builds a :class:`Family`,
its config files under ``configs/`` (with their source in ``configs/SOURCES.md``),
a recipe, and an entry in :data:`FAMILIES`. The module must provide:

1. ``matches(config)``: recognise its configs (``model_type``,
   ``text_config.model_type``, ``is_encoder_decoder``), without overlapping
   another family;
2. its ``lora_targets``, ``default_targets`` and an ``attention_pattern`` that
   matches full module names from the root, inside the language model only;
   optionally (``lora.parts``; without them the family offers ``attention`` only,
   and a recipe asking for more is refused before weights load):
   ``mlp_targets`` and an ``mlp_pattern`` anchored on the language model's MLP
   blocks (never the vision encoder's ``fc1``/``fc2``), and a ``connector``
   (:class:`~multimodal_lora.families.base.Connector`: a pattern matching only
   the ``Linear`` layers that join the image path to the language model, their
   top-level modules for messages, and the activation values it keeps per image
   while it trains, for the memory plan). The connector trains by LoRA on its
   linears, so every adapter stays a plain PEFT LoRA adapter;
3. ``make_layout``: a :class:`~multimodal_lora.families.layouts.TokenLayout`
   with the ids read from the base's config, generation config and processor
   (never hard-coded), stopping on the token the base's ``generate`` stops on;
4. ``plan_dims``: hidden width, MLP width, layers and vocabulary of its language model;
5. a tiny twin builder (deterministic, offline, same classes and module names
   as the real model, a tokenizer trained locally) and its cache directory name;
6. tests: the tiny twin learns the shapes recipe, and trainable-parameter
   counts of the real configs on the ``meta`` device, with the arithmetic
   (per part, when it offers more than attention: ``tests/test_parts.py``).
7. for ``--engine vllm``: ``vllm``, a :class:`~multimodal_lora.families.base.VllmRoute`
   (vLLM's architecture name and the text framing a prompt as our layout does),
   or ``vllm_refusal``, why vLLM cannot serve it (``tests/test_vllm.py`` checks
   the route's tokens against ``generation_inputs``).
8. for the server's continuous batching: ``decoding``, a
   :class:`~multimodal_lora.families.decoding.Decoding` (a joining group's prefill and one
   step for the running rows, as the family's ``generate`` runs them), or
   ``no_continuous_batching``, why not.


A family that is not a Q-Former (Qwen2.5-VL) also says, through its layout's
:class:`~multimodal_lora.families.image_inputs.ImageInputs`, what its image
processor returns and how many tokens each image takes (the text carries one
placeholder, expanded per image), and, when its image features vary in length,
what the feature cache keeps per image and how the features are computed
(``cache_keeps``, ``image_features``), and through its :class:`Family` where its
language model and frozen image path are, its plan's image-token figure, how
its processor loads, and why (if so) it cannot use the feature cache or the
server's continuous batching (see ``docs/families.md``).
"""

from __future__ import annotations

from multimodal_lora.core.errors import ConfigError
from multimodal_lora.families import blip2_opt, blip2_t5, instructblip, paligemma, qwen2_5_vl, qwen3_vl, smolvlm
from multimodal_lora.families.base import Family, PlanDims, VllmRoute
from multimodal_lora.families.image_inputs import PIXELS, ImageInputs
from multimodal_lora.families.layouts import (
    IGNORE_INDEX,
    ChatLayout,
    DecoderOnlyLayout,
    EncoderDecoderLayout,
    Padding,
    TokenLayout,
)

__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "PIXELS",
    "ChatLayout",
    "DecoderOnlyLayout",
    "EncoderDecoderLayout",
    "Family",
    "Padding",
    "PlanDims",
    "TokenLayout",
    "VllmRoute",
    "ImageInputs",
    "family_for_config",
    "family_named",
    "published_family",
    "tiny_family",
]

FAMILIES: tuple[Family, ...] = (
    blip2_opt.FAMILY,
    blip2_t5.FAMILY,
    instructblip.VICUNA,
    instructblip.FLAN_T5,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    paligemma.FAMILY,
    smolvlm.SMOLVLM,
    smolvlm.IDEFICS3,
)


def family_for_config(config) -> Family:
    """The family of a model config (``Blip2Config``, ``InstructBlipConfig``).

    Raises:
        ConfigError: no family knows this architecture (the message lists the known ones).
    """
    for family in FAMILIES:
        if family.matches(config):
            return family
    text = getattr(config, "text_config", None)
    what = f"model_type {getattr(config, 'model_type', None)!r} with a {getattr(text, 'model_type', None)!r} language model"
    known = "; ".join(f"{f.name} ({f.description})" for f in FAMILIES)
    raise ConfigError(f"model.base: {what} is not a supported architecture; supported: {known}")


def family_named(name: str) -> Family:
    """The family recorded in an adapter under ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def tiny_family(base: str) -> Family | None:
    """The family whose tiny twin is called ``base`` (``tiny``, ``tiny-t5`` ...), else ``None``."""
    return next((f for f in FAMILIES if f.tiny_name == base), None)


def published_family(hub_id: str) -> Family | None:
    """The family that ships the published config of ``hub_id``, else ``None``."""
    return next((f for f in FAMILIES if hub_id in f.published), None)


def tiny_names() -> list[str]:
    """Every ``model.base`` that means a tiny offline twin."""
    return [f.tiny_name for f in FAMILIES if f.tiny_name]
