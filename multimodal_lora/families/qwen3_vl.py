"""Qwen3-VL (``Qwen3VLForConditionalGeneration``; ``Qwen/Qwen3-VL-4B-Instruct``, ``-8B-Instruct``).

Qwen2.5-VL's successor, and what it shares with it is taken from
:mod:`~multimodal_lora.families.qwen2_5_vl` rather than written again: the
language model is ``model.language_model`` with the same attention and MLP names
(so the same anchored patterns), the image enters the same way
(``pixel_values`` of all images concatenated, an ``image_grid_thw`` row per
image, one ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``
expanded to (t·h·w)/merge² tokens, ``mm_token_type_ids`` for the 3-D positions:
:class:`~multimodal_lora.families.qwen2_5_vl.PatchGrid`), and the processor is
loaded as two parts for the same reason (``Qwen3VLProcessor`` also holds a video
processor, which needs torchvision).

What differs, read from transformers 5.25's ``models/qwen3_vl/modeling_qwen3_vl.py``:

* **Patches of 16 pixels** (Qwen2.5-VL: 14), merged 2×2: an image takes
  (H/32)·(W/32) tokens; the published processor's pixel budget is
  65,536 to 16,777,216 (``size.shortest_edge``/``longest_edge``, not
  ``min_pixels``/``max_pixels``). The plan's 640×480 photo is 15 × 20 = 300 tokens.
* **DeepStack**: the vision tower also taps the hidden states of a few of its
  blocks (``deepstack_visual_indexes``, 5/11/17 on the 4B), merges each through
  its own ``model.visual.deepstack_merger_list.N`` and *adds* the result to the
  image tokens' hidden states after the first language-model layers. So the
  language model gets more than one stream per image token; all are frozen
  functions of the image (unless the connector trains), and the frozen-feature
  cache stores each tap's as one more named stream beside the merger's
  (:class:`DeepStackGrid`: ``deepstack_0`` …, fed back through the model's own
  ``mm_encoder_outputs``).
* **The connector** (``lora.parts: [connector]``) is the merger
  (``model.visual.merger.linear_fc{1,2}``) *and* the DeepStack mergers: both join
  the image path to the language model (one through its input embeddings, the
  others through its first layers' hidden states), and training the one without
  the others would leave half of what the language model sees frozen. The vision
  blocks' MLPs are named ``linear_fc1``/``linear_fc2`` too; the pattern is
  anchored on the mergers, so they never match.
* **The text model** is Qwen3's: q/k RMSNorm after the projections (``q_norm``,
  ``k_norm``: norms, not linears, so LoRA's targets are unchanged), ``head_dim``
  set explicitly (128), and interleaved mrope sections (24/20/20 of 64).
* **The server's decode loop** uses Qwen2.5-VL's
  :class:`~multimodal_lora.families.qwen2_5_vl.MropeDecoding`: the model's own ``get_rope_index``
  gives a joining row its 3-D positions and ``rope_delta``, as ``generate`` does.
* **Chat template**: Qwen3-VL's adds no system turn unless the messages have one
  (Qwen2.5-VL's adds "You are a helpful assistant."), so a prompt is about ten
  tokens shorter. The stop token is still ``<|im_end|>``, the first
  ``eos_token_id`` of the published generation config.
* **vLLM**: 0.32 registers ``Qwen3VLForConditionalGeneration`` with ``SupportsLoRA``;
  its module imports transformers' torchvision image processor, as Qwen2.5-VL's does.

``Qwen3VLMoeForConditionalGeneration`` (the 30B-A3B and 235B-A22B checkpoints,
model type ``qwen3_vl_moe``) is not this family: its experts are fused
parameters, not the ``gate_proj``/``up_proj``/``down_proj`` linears ``lora.parts: [mlp]`` adapts.

**The tiny twin** (``base: tiny-qwen3vl``): the real class from a tiny config
(two text layers of width 128 with 4 query and 2 key/value heads of 32, mrope
sections 6/5/5, a two-block vision tower of width 64 with 4-pixel patches, an
8×8 learned position grid, one DeepStack tap after block 0), Qwen2.5-VL's twin
tokenizer with Qwen3-VL's chat template, its image processor (32×32 pixels: 16
image tokens), and :func:`~multimodal_lora.families.twins.init_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

from multimodal_lora.families import qwen2_5_vl, twins
from multimodal_lora.families.base import Connector, Family, ProcessorParts, VllmRoute, decoder_plan_dims
from multimodal_lora.families.qwen2_5_vl import (
    ATTENTION_PATTERN,
    LORA_TARGETS,
    MLP_PATTERN,
    MLP_TARGETS,
    PLAN_IMAGE,
    SPECIALS,
    TEXT_INIT_STD,
)

CONNECTOR_PATTERN = r"model\.visual\.(?:merger|deepstack_merger_list\.\d+)\.linear_fc(?:1|2)"
COMPONENTS = (
    # before "vision": the mergers sit inside model.visual
    ("projection", ("model.visual.merger.", "model.visual.deepstack_merger_list.")),
    ("vision", "model.visual."),
    ("language model", ("model.language_model.", "lm_head.")),
)
# The tower's parts and the mergers separately, so that training mergers (lora.parts: [connector])
# alone run in train mode. pos_embed is the learned position grid Qwen2.5-VL does not have.
IMAGE_PATH = (
    "model.visual.patch_embed",
    "model.visual.pos_embed",
    "model.visual.blocks",
    "model.visual.merger",
    "model.visual.deepstack_merger_list",
)
CHAT_TEMPLATE_FILE = "qwen3-vl-chat_template.jinja"
PREPROCESSOR_FILE = "qwen3-vl-preprocessor_config.json"

DEEPSTACK_STREAM = "deepstack_{}"
"""The cache's name for DeepStack tap N's features of an image (``deepstack_0`` ...), beside ``pooler_output``."""

TINY_NAME = "tiny-qwen3vl"
TINY_SEED = 0
TINY_VERSION = 1


@dataclass(frozen=True)
class DeepStackGrid(qwen2_5_vl.PatchGrid):
    """Qwen2.5-VL's patch grid, with each DeepStack tap's features cached beside the merger's.

    The language model takes, per image token, the merger's output (into its input embeddings)
    and one merged feature per tap (added after its first layers): all frozen functions of the
    image, each ``(tokens, hidden)`` and split per image by ``get_image_features`` itself, so the
    cache stores them as more streams and hands all of them back through ``mm_encoder_outputs``."""

    def image_features(self, model, items: list[dict]) -> list[dict]:
        out = model.get_image_features(**self.collate(items), return_dict=True)
        taps = out.deepstack_features  # per tap, a tuple of per-image tensors
        return [
            {"pooler_output": pooled, **{DEEPSTACK_STREAM.format(i): tap[n] for i, tap in enumerate(taps)}}
            for n, pooled in enumerate(out.pooler_output)
        ]

    def feature_inputs(self, features: list[Mapping]) -> dict:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        taps = sum(name.startswith(DEEPSTACK_STREAM.format("")) for name in features[0]) if features else 0
        encoded = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(f["pooler_output"] for f in features),
            deepstack_features=[tuple(f[DEEPSTACK_STREAM.format(i)] for f in features) for i in range(taps)],
        )
        return {"mm_encoder_outputs": {"image": encoded}}


def _matches(config) -> bool:
    return getattr(config, "model_type", None) == "qwen3_vl"


def _plan_image_tokens(config, image_processor=None) -> int:
    """Tokens of the plan's 640×480 photo, resized as ``image_processor`` (the base's, when the caller
    has it) else the published processor resizes it (300)."""
    if image_processor is not None:
        factor = image_processor.patch_size * image_processor.merge_size
        size = image_processor.size
    else:
        vision = config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        published = resources.files("multimodal_lora.families").joinpath("configs", PREPROCESSOR_FILE).read_text()
        size = json.loads(published)["size"]  # the pixel budget: shortest_edge/longest_edge are pixel counts
    return qwen2_5_vl._grid_tokens(*PLAN_IMAGE, factor, size["shortest_edge"], size["longest_edge"])


def merger_values(vision, r: int, rows: int) -> int:
    """Values autograd keeps for ``rows`` merged image tokens when the mergers' LoRA (rank ``r``) trains.

    The merger and each DeepStack merger (``1 + len(deepstack_visual_indexes)`` in all)
    normalize a frozen vision output (no gradient: nothing saved), then run
    ``Linear(H, H)``, GELU, ``Linear(H, out)`` on rows of width ``H = v m²``. Per row
    and merger, as :func:`~multimodal_lora.families.qwen2_5_vl.merger_values` counts
    them: the first linear's LoRA A and B inputs (``H + r``), GELU's input (``H``), and
    at the second linear LoRA's dropout mask, A's and B's inputs (``2 H + r``):
    ``4 H + 2 r``. Qwen2.5-VL's extra 1 per row (the index that undoes its window
    order) has no counterpart: Qwen3-VL's tower attends without windows.
    """
    width = vision.hidden_size * vision.spatial_merge_size**2
    mergers = 1 + len(vision.deepstack_visual_indexes)
    return rows * mergers * (4 * width + 2 * r)


def merger_activation_values(config, r: int) -> int:
    """:func:`merger_values` for the plan image's tokens."""
    return merger_values(config.vision_config, r, _plan_image_tokens(config))


CONNECTOR = Connector(
    pattern=CONNECTOR_PATTERN,
    modules=("visual.merger", "visual.deepstack_merger_list"),
    activation_values=merger_activation_values,
)


def chat_template() -> str:
    """The published chat template of the Qwen3-VL instruct checkpoints (see ``configs/SOURCES.md``)."""
    return resources.files("multimodal_lora.families").joinpath("configs", CHAT_TEMPLATE_FILE).read_text()


# --- the tiny twin ------------------------------------------------------------------------------


def build_tokenizer():
    """Qwen2.5-VL's twin tokenizer (the same special tokens and ids) with Qwen3-VL's chat template."""
    tokenizer = qwen2_5_vl.build_tokenizer()
    tokenizer.chat_template = chat_template()
    return tokenizer


def build_tiny_model(tokenizer, seed: int = TINY_SEED):
    """The tiny ``Qwen3VLForConditionalGeneration`` with deterministic weights."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
        # head_dim 32: 16 frequency pairs, interleaved over (time, height, width) as Qwen3's 24/20/20 of 64.
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64, deepstack_visual_indexes=[0],
    )  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,  # as Qwen3-VL-4B: the head is the embedding table, at std 0.2
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    twins.init_weights(model.model.language_model, (model.model.visual,), seed, TEXT_INIT_STD)
    twins.set_generation_defaults(model, tokenizer)
    # As the published generation config: stop on <|im_end|> or <|endoftext|>, BOS <|endoftext|>.
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    return model


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny Qwen3-VL (weights, config, generation config, tokenizer, image processor)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    ProcessorParts(tokenizer, qwen2_5_vl.image_processor()).save_pretrained(directory)
    model.save_pretrained(directory)


FAMILY = Family(
    name="qwen3-vl",
    description="Qwen3-VL: a ViT with a patch merger and DeepStack mergers feeding a decoder-only Qwen3, "
    "prompted through its chat template",
    model_class="Qwen3VLForConditionalGeneration",
    config_class="Qwen3VLConfig",
    lora_targets=LORA_TARGETS,
    default_targets=LORA_TARGETS,
    attention_pattern=ATTENTION_PATTERN,  # model.language_model.layers.N.self_attn, as Qwen2.5-VL
    matches=_matches,
    make_layout=partial(qwen2_5_vl._layout, plan_tokens=_plan_image_tokens, grid=DeepStackGrid),
    plan_dims=decoder_plan_dims,
    published={
        "Qwen/Qwen3-VL-4B-Instruct": "qwen3-vl-4b-instruct.json",
        "Qwen/Qwen3-VL-8B-Instruct": "qwen3-vl-8b-instruct.json",
    },
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-qwen3vl-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    components=COMPONENTS,
    image_path=IMAGE_PATH,
    language_model="model.language_model",
    image_tokens=_plan_image_tokens,
    mlp_targets=MLP_TARGETS,
    mlp_pattern=MLP_PATTERN,
    connector=CONNECTOR,
    decoding=qwen2_5_vl.MropeDecoding(),  # the same 3-D (mrope) positions, from the model's own get_rope_index
    load_processor=ProcessorParts.from_pretrained,
    # vLLM 0.32's qwen3_vl.py imports transformers' image_processing_qwen2_vl, which imports torchvision.
    vllm=VllmRoute("Qwen3VLForConditionalGeneration", qwen2_5_vl._vllm_prompt_frame, needs=("torchvision",)),
)
