"""BLIP-2 with a Flan-T5 language model (``Salesforce/blip2-flan-t5-xl`` and kin): encoder–decoder.

**Token layout** (encoder–decoder, see :mod:`multimodal_lora.families.layouts`):
the encoder reads the 32 query outputs and the prompt (``<image>×32 prompt </s>``),
the decoder is trained on the target (labels ``target </s>``, decoder start =
``<pad>``), and generation stops on ``</s>``, the published generation config's
end-of-sequence token. The prompt is never in the labels, so nothing needs
masking there.

**LoRA targets.** T5 names its attention projections ``q``, ``k``, ``v``, ``o``,
in three places per model: the encoder's self-attention
(``language_model.encoder.block.N.layer.0.SelfAttention``), the decoder's
self-attention (``language_model.decoder.block.N.layer.0.SelfAttention``) and
the decoder's cross-attention (``language_model.decoder.block.N.layer.1.EncDecAttention``).
A name in ``lora.target_modules`` is placed in all three. The default is
``[q, v]``, for three reasons: the LoRA paper's choice (W_q, W_v) and PEFT's own
default for T5, so results compare with the literature; it includes the
cross-attention, which is where the decoder reads the image (the encoder's
output over the query tokens), the path a new captioning domain most needs to
change; and it halves the adapter against q/k/v/o at a small cost in quality.
Use ``[q, k, v, o]`` for the most capacity (the tiny recipe does, to learn in a minute).

**The tiny twin** (``base: tiny-t5``): the same vision encoder and Q-Former as
``tiny``, a two-layer T5 (128 wide, gated-GELU like Flan-T5), and a
SentencePiece-style (Metaspace) BPE tokenizer trained locally, with T5's
special ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).
"""

from __future__ import annotations

from pathlib import Path

from multimodal_lora.families import blip2_opt
from multimodal_lora.families.base import (
    QFORMER_CONNECTOR,
    Family,
    PlanDims,
    metaspace_tokenizer,
    stop_token_id,
)
from multimodal_lora.families.layouts import EncoderDecoderLayout

LORA_TARGETS = ("q", "k", "v", "o")
DEFAULT_TARGETS = ("q", "v")
# Every T5 attention (encoder self, decoder self, decoder cross), from the root, inside the language model.
ATTENTION_PATTERN = (
    r"language_model\.(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)\.({names})"
)
# lora.parts: [mlp]: the feed-forward of every encoder and decoder block. Flan-T5's is gated
# (wi_0, wi_1, wo); the original T5's ReLU one has a single wi.
MLP_TARGETS = ("wi", "wi_0", "wi_1", "wo")
MLP_PATTERN = r"language_model\.(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.({names})"

TINY_NAME = "tiny-t5"
TINY_SEED = 0
TINY_VERSION = 1
IMAGE_TOKEN = "<image>"
_SPECIALS = ["<pad>", "</s>", "<unk>"]


def is_t5(text_config) -> bool:
    """A T5 language model (Flan-T5): encoder–decoder."""
    return getattr(text_config, "model_type", None) == "t5" and bool(getattr(text_config, "is_encoder_decoder", True))


def _matches(config) -> bool:
    return getattr(config, "model_type", None) == "blip-2" and is_t5(config.text_config)


def make_layout(config, generation_config, processor, qformer_tokenizer=None) -> EncoderDecoderLayout:
    """The encoder–decoder layout with ids from the base (T5: ``<pad>`` pads and starts the decoder)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    text = config.text_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    return EncoderDecoderLayout(
        image_token_id=int(config.image_token_index),
        num_query_tokens=int(config.num_query_tokens),
        pad_token_id=int(pad),
        stop_token_id=stop_token_id(generation_config, text),
        qformer_tokenizer=qformer_tokenizer,
    )


def _layout(config, generation_config, processor) -> EncoderDecoderLayout:
    return make_layout(config, generation_config, processor)


def plan_dims(text) -> PlanDims:
    """T5: d_model, d_ff, and both stacks' blocks."""
    return PlanDims(
        hidden=text.d_model, ffn=text.d_ff, layers=text.num_layers + text.num_decoder_layers, vocab=text.vocab_size
    )


def no_position_limit(text) -> None:
    """T5's relative position buckets have no table a long sequence could run past."""
    return None


# --- the tiny twin ------------------------------------------------------------------------------


def build_tokenizer():
    """A SentencePiece-style (Metaspace) BPE trained on the shapes corpus, framed like T5's: ``text </s>``."""
    lines = [line.strip() for line in blip2_opt.CORPUS.strip().splitlines()] * 20
    return metaspace_tokenizer(
        lines, _SPECIALS, ("$A </s>", "$A </s> $B </s>"), "</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_t5_config(tokenizer):
    """A two-layer Flan-T5-like language model config for a tiny twin."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def scale_t5_queries(model) -> None:
    """T5 does not divide q·k by sqrt(d_kv) (its init folds that into q); the tiny init does it here,
    or random 1/sqrt(fan_in) weights would give one-hot attention maps."""
    import torch

    d_kv = model.language_model.config.d_kv
    with torch.no_grad():
        for name, module in model.language_model.named_modules():
            if name.endswith(("SelfAttention.q", "EncDecAttention.q")):
                module.weight.mul_(d_kv**-0.5)


def build_tiny_model(tokenizer, seed: int = TINY_SEED):
    """Build the tiny BLIP-2 Flan-T5 (``Blip2ForConditionalGeneration``) with deterministic weights."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    # The same Q-Former as `tiny` (its vocabulary is sized like that twin's tokenizer; BLIP-2 feeds it no text).
    vision, qformer = blip2_opt.tiny_vision_qformer(blip2_opt.TOKENIZER_VOCAB)
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=tiny_t5_config(tokenizer).to_dict(),
        num_query_tokens=blip2_opt.NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    blip2_opt.init_tiny_weights(model, seed)
    scale_t5_queries(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    model.generation_config.max_new_tokens = 20
    return model


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny BLIP-2 Flan-T5 (weights, config, tokenizer, processor) to ``directory``."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    blip2_opt.build_processor(tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)


FAMILY = Family(
    name="blip2-t5",
    description="BLIP-2 with an encoder-decoder Flan-T5 language model",
    model_class="Blip2ForConditionalGeneration",
    config_class="Blip2Config",
    lora_targets=LORA_TARGETS,
    default_targets=DEFAULT_TARGETS,
    attention_pattern=ATTENTION_PATTERN,
    mlp_targets=MLP_TARGETS,
    mlp_pattern=MLP_PATTERN,
    connector=QFORMER_CONNECTOR,
    matches=_matches,
    make_layout=_layout,
    unquantized=(),  # transformers' choice: the Q-Former in fp32, the vision encoder quantized
    plan_dims=plan_dims,
    max_positions=no_position_limit,
    published={
        "Salesforce/blip2-flan-t5-xl": "blip2-flan-t5-xl.json",
        "Salesforce/blip2-flan-t5-xxl": "blip2-flan-t5-xxl.json",
    },
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-blip2-t5-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    vllm_refusal="vLLM has no T5 language model for Blip2ForConditionalGeneration",
)
