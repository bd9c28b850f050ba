"""InstructBLIP (``InstructBlipForConditionalGeneration``): the instruction also goes to the Q-Former.

Two families, by language model:

* ``instructblip-vicuna`` (``Salesforce/instructblip-vicuna-7b``): a decoder-only
  LLaMA. LoRA targets are the LLaMA self-attention projections
  (``language_model.model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj}``),
  default ``[q_proj, v_proj]`` (the LoRA paper's choice; a 7B model's adapter
  stays small). The layout is decoder-only with the tokenizer's BOS and stop
  token ``</s>``, which is what LAVIS (the authors' code) appends to every target
  and what HF's converted tokenizer uses as BOS and EOS: the stop token is read
  from the tokenizer, not from the published generation config, whose
  ``eos_token_id`` (1) is not the tokenizer's ``</s>``.
* ``instructblip-t5`` (``Salesforce/instructblip-flan-t5-xl``): the Flan-T5 of
  :mod:`~multimodal_lora.families.blip2_t5`, its names, default and layout.

In both, the prompt (a caption prefix, or the VQA question in its template) is
also tokenized by the Q-Former's own BERT tokenizer (``qformer_input_ids``), so
the visual prefix depends on it: the frozen-feature cache keys on it.

**The tiny twin** (``base: tiny-instructblip``): the tiny vision encoder and
Q-Former of ``tiny`` (as InstructBLIP classes), a two-layer LLaMA, a
SentencePiece-style BPE for the language model and a BERT WordPiece for the
Q-Former, both trained locally.
"""

from __future__ import annotations

from pathlib import Path

from multimodal_lora.families import blip2_opt, blip2_t5
from multimodal_lora.families.base import (
    PRINTABLE,
    PROMPTS,
    QFORMER_CONNECTOR,
    Family,
    PlanDims,
    metaspace_tokenizer,
)
from multimodal_lora.families.decoding import LANGUAGE_MODEL
from multimodal_lora.families.layouts import DecoderOnlyLayout

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_DEFAULT = ("q_proj", "v_proj")
LLAMA_ATTENTION = r"language_model\.model\.layers\.\d+\.self_attn\.({names})"
LLAMA_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
LLAMA_MLP = r"language_model\.model\.layers\.\d+\.mlp\.({names})"
T5_ATTENTION = blip2_t5.ATTENTION_PATTERN

TINY_NAME = "tiny-instructblip"
TINY_SEED = 0
TINY_VERSION = 1
IMAGE_TOKEN = "<image>"
_LM_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _is_instructblip(config) -> bool:
    return getattr(config, "model_type", None) == "instructblip"


def _matches_vicuna(config) -> bool:
    return _is_instructblip(config) and getattr(config.text_config, "model_type", None) == "llama"


def _matches_t5(config) -> bool:
    return _is_instructblip(config) and blip2_t5.is_t5(config.text_config)


def _qformer_tokenizer(processor):
    tokenizer = getattr(processor, "qformer_tokenizer", None)
    if tokenizer is None:
        from multimodal_lora.core.errors import UserError

        raise UserError(
            "an InstructBLIP base needs its processor (with the Q-Former tokenizer), not only its tokenizer"
        )
    return tokenizer


def _vicuna_layout(config, generation_config, processor) -> DecoderOnlyLayout:
    tokenizer = processor.tokenizer
    text = config.text_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    return DecoderOnlyLayout(
        image_token_id=int(config.image_token_index),
        num_query_tokens=int(config.num_query_tokens),
        pad_token_id=int(pad),
        stop_token_id=int(tokenizer.eos_token_id),
        qformer_tokenizer=_qformer_tokenizer(processor),
        bos_token_id=int(tokenizer.bos_token_id),
        # SentencePiece starts every text with a word boundary: no extra space before the target.
        target_prefix="",
    )


def _t5_layout(config, generation_config, processor):
    return blip2_t5.make_layout(config, generation_config, processor, qformer_tokenizer=_qformer_tokenizer(processor))


def _llama_dims(text) -> PlanDims:
    return PlanDims(
        hidden=text.hidden_size, ffn=text.intermediate_size, layers=text.num_hidden_layers, vocab=text.vocab_size
    )


# --- the tiny twin ------------------------------------------------------------------------------


def _corpus() -> list[str]:
    return [line.strip() for line in blip2_opt.CORPUS.strip().splitlines()] * 20


def build_tokenizer():
    """The language model's tokenizer: SentencePiece-style BPE, LLaMA's ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2)."""
    return metaspace_tokenizer(
        _corpus(),
        _LM_SPECIALS,
        ("<s> $A", "<s> $A <s> $B"),
        "<s>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_qformer_tokenizer():
    """The Q-Former's tokenizer: a lower-casing BERT WordPiece, ``[CLS] text [SEP]``, like bert-base-uncased's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=_QFORMER_SPECIALS, show_progress=False)
    tok.train_from_iterator([*_corpus(), " ".join(PRINTABLE), *[PROMPTS] * 20], trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        model_max_length=512,
    )


def build_tiny_model(tokenizer, qformer_tokenizer, seed: int = TINY_SEED):
    """Build the tiny ``InstructBlipForConditionalGeneration`` (LLaMA language model), deterministic weights."""
    import torch
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig
    from transformers.models.instructblip.configuration_instructblip import (
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    vision, qformer = blip2_opt.tiny_vision_qformer(
        len(qformer_tokenizer), qformer_cls=InstructBlipQFormerConfig, vision_cls=InstructBlipVisionConfig
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=blip2_opt.NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    blip2_opt.init_tiny_weights(model, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 20
    return model


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny InstructBLIP (weights, config, both tokenizers, processor) to ``directory``."""
    from transformers import InstructBlipProcessor

    tokenizer, qformer_tokenizer = build_tokenizer(), build_qformer_tokenizer()
    model = build_tiny_model(tokenizer, qformer_tokenizer, seed=seed)
    processor = InstructBlipProcessor(
        image_processor=blip2_opt.image_processor(),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=blip2_opt.NUM_QUERY_TOKENS,
    )
    processor.save_pretrained(directory)
    model.save_pretrained(directory)


VICUNA = Family(
    name="instructblip-vicuna",
    description="InstructBLIP with a decoder-only Vicuna (LLaMA) language model; the Q-Former reads the instruction",
    model_class="InstructBlipForConditionalGeneration",
    config_class="InstructBlipConfig",
    lora_targets=LLAMA_TARGETS,
    default_targets=LLAMA_DEFAULT,
    attention_pattern=LLAMA_ATTENTION,
    mlp_targets=LLAMA_MLP_TARGETS,
    mlp_pattern=LLAMA_MLP,
    connector=QFORMER_CONNECTOR,
    matches=_matches_vicuna,
    make_layout=_vicuna_layout,
    unquantized=(),  # transformers' choice: the Q-Former in fp32, the vision encoder quantized
    plan_dims=_llama_dims,
    published={"Salesforce/instructblip-vicuna-7b": "instructblip-vicuna-7b.json"},
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-instructblip-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    decoding=LANGUAGE_MODEL,
    vllm_refusal="vLLM has no InstructBlipForConditionalGeneration",
)

FLAN_T5 = Family(
    name="instructblip-t5",
    description="InstructBLIP with an encoder-decoder Flan-T5 language model; the Q-Former reads the instruction",
    model_class="InstructBlipForConditionalGeneration",
    config_class="InstructBlipConfig",
    lora_targets=blip2_t5.LORA_TARGETS,
    default_targets=blip2_t5.DEFAULT_TARGETS,
    attention_pattern=T5_ATTENTION,
    mlp_targets=blip2_t5.MLP_TARGETS,
    mlp_pattern=blip2_t5.MLP_PATTERN,
    connector=QFORMER_CONNECTOR,
    matches=_matches_t5,
    make_layout=_t5_layout,
    unquantized=(),  # transformers' choice: the Q-Former in fp32, the vision encoder quantized
    plan_dims=blip2_t5.plan_dims,
    max_positions=blip2_t5.no_position_limit,
    vllm_refusal="vLLM has no InstructBlipForConditionalGeneration",
)
