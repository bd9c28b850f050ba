"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``; ``Qwen/Qwen2.5-VL-3B-Instruct``, ``-7B-Instruct``).

A ViT (``model.visual``: patch embedding, window-attention blocks whose
attention is ``attn.qkv``/``attn.proj``, and an MLP "merger" that folds 2×2
patches into one token of the language model's width) feeds a decoder-only
Qwen2 language model (``model.language_model``). LoRA goes into the language
model's self-attention projections
(``model.language_model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj}``),
default all four; the pattern is anchored from the root, so nothing in the
vision tower or the merger matches. ``lora.parts`` may add the language
model's MLP (``model.language_model.layers.N.mlp.{gate_proj,up_proj,down_proj}``,
anchored there too: the vision blocks' MLPs use the same three names) and the
connector, the merger's two linears ``model.visual.merger.mlp.{0,2}`` (see
:func:`merger_activation_values`). The vision tower stays frozen.

What differs from the Q-Former families, and how this family says it:

* **Image tokens vary per image**: an image of H×W pixels is resized to
  multiples of 28 (``patch_size`` 14 × ``merge_size`` 2) within the
  processor's pixel bounds and takes (H/28)·(W/28) ``<|image_pad|>`` tokens.
  The text holds one placeholder per image; :class:`PatchGrid` expands it once
  the image is processed (see :mod:`~multimodal_lora.families.image_inputs`).
* **Visual inputs**: ``pixel_values`` are the patches of every image in the
  batch, concatenated, with ``image_grid_thw`` (one row per image) saying which
  are whose; ``mm_token_type_ids`` (1 on image tokens) lets the model place
  them by 3-D ("mrope") positions.
* **Chat template**: the instruct checkpoints are prompted through it
  (:class:`~multimodal_lora.families.layouts.ChatLayout`); the target is the
  assistant's answer, ended by ``<|im_end|>``, the first ``eos_token_id`` of
  the published generation config, where generation stops.
* **Processor**: ``Qwen2_5_VLProcessor`` also holds a video processor, which
  in transformers 5.25 cannot be built without torchvision (its class check
  looks up ``VideoProcessorMixin``, exported only with torchvision). This
  family loads the tokenizer and the image processor (its PIL backend,
  ``Qwen2VLImageProcessorPil``) as a :class:`~multimodal_lora.families.base.ProcessorParts`.
* **The frozen-feature cache** stores each image's merged tokens (their count
  varies with the image) and its ``image_grid_thw`` row, which still gives the
  placeholder count and the 3-D positions (``PatchGrid.cache_keeps``); the
  cached tokens go back in through the model's ``mm_encoder_outputs``.
* **3-D positions in the server's decode loop** (:class:`MropeDecoding`): a
  prefill computes each row's positions as ``generate`` does (``get_rope_index``
  over the image grid) and keeps the row's ``rope_delta``; a step continues
  every row at its token count plus its own delta.

**The plan's image**: a variable count needs a figure for the memory plan and
length checks: :data:`~multimodal_lora.families.base.PLAN_IMAGE`, a 640×480 photo
(COCO's common size), which the published processor turns into 476×644 pixels:
17 × 23 = 391 tokens; the tiny twin's processor (1,024 pixels at most) into 3 × 4 = 12.

**The tiny twin** (``base: tiny-qwen2vl``): the real class from a tiny config
(two text layers of width 128, a two-block vision tower of width 64 with
4-pixel patches), random weights at the scales that let LoRA learn (as
:mod:`~multimodal_lora.families.blip2_opt` explains), a byte-level BPE trained
here with Qwen's special tokens and the published chat template, and an image
processor that resizes to 32×32: 8×8 patches, 16 image tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from multimodal_lora.families.base import (
    PLAN_IMAGE,
    PROMPTS,
    Connector,
    Family,
    ProcessorParts,
    VllmRoute,
    decoder_plan_dims,
    stop_token_id,
)
from multimodal_lora.families.decoding import ModelDecoding, held, text_positions
from multimodal_lora.families.image_inputs import ImageInputs
from multimodal_lora.families.layouts import ChatLayout
from multimodal_lora.families.twins import init_weights

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The language model's attention and nothing else: model.visual.blocks.N.attn.{qkv,proj} must not match.
ATTENTION_PATTERN = r"model\.language_model\.layers\.\d+\.self_attn\.({names})"
# lora.parts: [mlp]: the language model's gated MLP, from the root: model.visual.blocks.N.mlp has
# gate_proj/up_proj/down_proj too.
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
MLP_PATTERN = r"model\.language_model\.layers\.\d+\.mlp\.({names})"
COMPONENTS = (
    ("projection", "model.visual.merger."),  # before "vision": the merger sits inside model.visual
    ("vision", "model.visual."),
    ("language model", ("model.language_model.", "lm_head.")),
)
# The vision tower and the merger separately, so that a training merger (lora.parts: [connector])
# alone runs in train mode and is what the messages name.
IMAGE_PATH = ("model.visual.patch_embed", "model.visual.blocks", "model.visual.merger")

CHAT_TEMPLATE_FILE = "qwen2.5-vl-chat_template.jinja"
PREPROCESSOR_FILE = "qwen2.5-vl-preprocessor_config.json"

TINY_NAME = "tiny-qwen2vl"
TINY_SEED = 0
TINY_VERSION = 1
TINY_IMAGE = 32
TEXT_INIT_STD = 0.2
TOKENIZER_VOCAB = 1024
# Qwen2's special tokens, in the order of their ids in the real tokenizer (151643 ...).
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip


@dataclass(frozen=True)
class PatchGrid(ImageInputs):
    """Qwen2-VL-style images: all images' patches in one ``pixel_values``, an ``image_grid_thw`` row
    per image, ``(t·h·w) / merge_size²`` image tokens each, marked in ``mm_token_type_ids``."""

    image_token_id: int = 0
    merge_size: int = 2
    # Without pixels, the grid still gives the placeholder count and the 3-D positions.
    cache_keeps = ("image_grid_thw",)

    def split(self, processed) -> list[dict[str, torch.Tensor]]:
        grids = processed["image_grid_thw"]
        patches = torch.split(processed["pixel_values"], grids.prod(-1).tolist())
        return [{"pixel_values": p, "image_grid_thw": g} for p, g in zip(patches, grids)]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items or "image_grid_thw" not in items[0]:
            return {}
        out = {"image_grid_thw": torch.stack([item["image_grid_thw"] for item in items])}
        if "pixel_values" in items[0]:  # not for cached features, which need the grid alone
            out["pixel_values"] = torch.cat([item["pixel_values"] for item in items])
        return out

    def image_tokens(self, item) -> int:
        return int(item["image_grid_thw"].prod()) // self.merge_size**2

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int()}


@dataclass(frozen=True)
class MropeDecoding(ModelDecoding):
    """The server's decode loop for a model with Qwen2-VL-style 3-D ("mrope") positions.

    transformers 5.25's ``generate`` gives such a model ``position_ids`` of shape
    ``(4, rows, length)``: text positions (``attention_mask`` counted, 0 on the padding)
    over the three mrope rows from ``model.model.get_rope_index`` (time, height, width;
    an image's tokens take its grid's coordinates, so the text after it runs
    ``rope_delta`` ahead of the token count, a delta per row that depends on its image's
    grid). Each step adds 1 to the last column of all four rows: text at the row's
    token count, mrope at that count plus its delta, which is what :meth:`step_positions`
    builds from the mask and the delta the prefill kept as the row's offset. The text
    row only sizes masks for packed sequences (the loop always passes a mask).
    """

    def prefill_positions(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["attention_mask"]
        mrope, deltas = model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"), attention_mask=mask,
        )  # fmt: skip
        return torch.cat([text_positions(mask)[None], mrope]), deltas.view(-1).to(mask.device)

    def step_positions(self, mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        count = held(mask)
        return torch.stack([count, *[count + offsets[:, None]] * 3])


def _matches(config) -> bool:
    return getattr(config, "model_type", None) == "qwen2_5_vl"


def _grid_tokens(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Tokens of an image of ``height``×``width`` pixels, resized as the processor resizes it
    (to multiples of ``factor``, patch size × merge size, within its pixel bounds)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)


def _published_preprocessor() -> dict:
    return json.loads(resources.files("multimodal_lora.families").joinpath("configs", PREPROCESSOR_FILE).read_text())


def _plan_image_tokens(config, image_processor=None) -> int:
    """Tokens of :data:`PLAN_IMAGE` as ``image_processor`` resizes it (its pixel bounds and patch
    size: the tiny twin's takes 16), else as the published processor does (391)."""
    if image_processor is not None:
        factor = image_processor.patch_size * image_processor.merge_size
        bounds = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    else:
        pre = _published_preprocessor()
        factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        bounds = pre["min_pixels"], pre["max_pixels"]
    return _grid_tokens(*PLAN_IMAGE, factor, *bounds)


def merger_values(vision, r: int, rows: int) -> int:
    """Values autograd keeps for ``rows`` merged image tokens in a merger whose LoRA (rank ``r``) trains.

    The merger normalizes the frozen vision output (no gradient: nothing saved), folds
    2×2 patches into rows of width ``H = v m²`` (``v`` the vision width, ``m`` the
    merge size) and runs ``Linear(H, H)``, GELU, ``Linear(H, out)``. Saved per row:
    the first linear's LoRA A and B inputs (``H + r``; its input needs no gradient, so
    neither the frozen linear nor LoRA's dropout saves anything), GELU's input (``H``),
    at the second linear, whose input now carries a gradient, LoRA's dropout mask, A's
    input and B's input (``2 H + r``; the frozen weight is a parameter, not an
    activation), and the index that undoes the window order after the merger (1).
    ``rows (4 H + 2 r + 1)``. Dropout masks count as values, as for the Q-Former
    (:func:`~multimodal_lora.families.base.qformer_activation_values`); without LoRA
    dropout it is ``H`` less per row. ``tests/test_parts.py`` counts what autograd saves
    in the tiny twin's image path against it.
    """
    width = vision.hidden_size * vision.spatial_merge_size**2
    return rows * (4 * width + 2 * r + 1)


def merger_activation_values(config, r: int) -> int:
    """:func:`merger_values` for the plan image's tokens (:data:`PLAN_IMAGE`)."""
    return merger_values(config.vision_config, r, _plan_image_tokens(config))


CONNECTOR = Connector(
    pattern=r"model\.visual\.merger\.mlp\.(?:0|2)", modules=("visual.merger",), activation_values=merger_activation_values
)


def _layout(config, generation_config, processor, plan_tokens=None, grid: type[PatchGrid] = PatchGrid) -> ChatLayout:
    """The chat layout on the base's ids; ``plan_tokens(config)`` (default this family's) sizes an image
    when no image processor says the most one may take, and ``grid`` is the image inputs' class
    (Qwen3-VL reuses this with its own of both)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    text = config.text_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    if pad is None:
        pad = text.bos_token_id
    most = None
    if image_processor is not None:  # the largest image the processor lets through
        edge = image_processor.size["longest_edge"]
        most = edge // (image_processor.patch_size * image_processor.merge_size) ** 2
    return ChatLayout(
        image_token_id=int(config.image_token_id),
        num_query_tokens=1,  # the template writes one <|image_pad|>; PatchGrid expands it
        pad_token_id=int(pad),
        stop_token_id=stop_token_id(generation_config, text),
        image_inputs=grid(
            max_tokens=most or (plan_tokens or _plan_image_tokens)(config),
            image_token_id=int(config.image_token_id),
            merge_size=int(config.vision_config.spatial_merge_size),
        ),
    )


def chat_template() -> str:
    """The published chat template of the Qwen2-VL / Qwen2.5-VL instruct checkpoints (see ``configs/SOURCES.md``)."""
    return resources.files("multimodal_lora.families").joinpath("configs", CHAT_TEMPLATE_FILE).read_text()


# --- the tiny twin ------------------------------------------------------------------------------


def build_tokenizer():
    """A byte-level BPE with Qwen's special tokens and chat template: eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from multimodal_lora.families.blip2_opt import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in CORPUS.strip().splitlines()]
    # Repeated so that frequent words become single tokens; the template's own words too.
    tok.train_from_iterator([*lines, PROMPTS, "system You are a helpful assistant. user assistant"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left", model_max_length=4096
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tokenizer.chat_template = chat_template()
    return tokenizer


def image_processor(size: int = TINY_IMAGE):
    """Qwen2-VL image processing (the PIL backend: the default one needs torchvision) to ``size``² pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": size * size, "longest_edge": size * size}
    )


def build_tiny_model(tokenizer, seed: int = TINY_SEED):
    """The tiny ``Qwen2_5_VLForConditionalGeneration`` with deterministic weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        # head_dim 32: rotary over 16 frequency pairs, split over (time, height, width) as Qwen's 16/24/24 of 64.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, window_size=TINY_IMAGE, out_hidden_size=128, fullatt_block_indexes=[1],
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,  # as Qwen2.5-VL-3B: the head is the embedding table, at std 0.2
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Embeddings at std 0.2, linears at 1/sqrt(fan_in), biases at zero; the vision tower and merger
    # scaled the same way with their own generator (see blip2_opt's docstring for why).
    init_weights(model.model.language_model, (model.model.visual,), seed, TEXT_INIT_STD)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]  # as the published one
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.max_new_tokens = 20
    return model


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny Qwen2.5-VL (weights, config, generation config, tokenizer, image processor)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    ProcessorParts(tokenizer, image_processor()).save_pretrained(directory)
    model.save_pretrained(directory)


def _vllm_prompt_frame(tokenizer, layout: ChatLayout) -> tuple[str, str]:
    """The chat template's user turn around the prompt, with its one ``<|image_pad|>``, which vLLM's
    Qwen2.5-VL expands per image as :class:`PatchGrid` does."""
    return layout.frame(tokenizer)


FAMILY = Family(
    name="qwen2.5-vl",
    description="Qwen2.5-VL: a ViT with a patch merger feeding a decoder-only Qwen2, prompted through its chat template",
    model_class="Qwen2_5_VLForConditionalGeneration",
    config_class="Qwen2_5_VLConfig",
    lora_targets=LORA_TARGETS,
    default_targets=LORA_TARGETS,
    attention_pattern=ATTENTION_PATTERN,
    matches=_matches,
    make_layout=_layout,
    plan_dims=decoder_plan_dims,
    published={
        "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b-instruct.json",
        "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b-instruct.json",
    },
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-qwen2vl-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    components=COMPONENTS,
    image_path=IMAGE_PATH,
    language_model="model.language_model",
    image_tokens=_plan_image_tokens,
    mlp_targets=MLP_TARGETS,
    mlp_pattern=MLP_PATTERN,
    connector=CONNECTOR,
    decoding=MropeDecoding(),
    load_processor=ProcessorParts.from_pretrained,
    # vLLM 0.32's qwen2_vl.py imports transformers' image_processing_qwen2_vl, which imports torchvision.
    vllm=VllmRoute("Qwen2_5_VLForConditionalGeneration", _vllm_prompt_frame, needs=("torchvision",)),
)
