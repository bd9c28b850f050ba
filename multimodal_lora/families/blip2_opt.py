"""BLIP-2 with an OPT language model (``Salesforce/blip2-opt-2.7b`` and kin): decoder-only.

LoRA goes into the OPT decoder's self-attention projections
(``language_model.model.decoder.layers.N.self_attn.{q_proj,k_proj,v_proj,out_proj}``);
the default is all four. The token layout is decoder-only (see
:mod:`multimodal_lora.families.layouts`): ``<image>×32 </s> prompt target \\n``,
the stop token being "\\n" (id 50118), which the published generation config
stops on.

**The tiny twin** (``base: tiny``) is a real ``Blip2ForConditionalGeneration``
with an OPT language model, the same classes and module names as the real
checkpoint, about a million parameters, random weights, and a byte-level BPE
tokenizer trained here on a small English corpus. Two choices make it useful
rather than merely small:

* The text model is initialised with std 0.2 instead of OPT's 0.02. A frozen,
  randomly initialised OPT at 0.02 cannot produce confident tokens through its
  tied head, so LoRA could not teach it anything; at 0.2 it learns real
  captions on a CPU in seconds.
* Its generation config stops on "\\n", like the real BLIP-2 OPT checkpoints,
  so training teaches it the same stop token.

The build is deterministic: the same seed gives bit-identical weights and
tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

from multimodal_lora.families.base import (
    QFORMER_CONNECTOR,
    Family,
    PlanDims,
    VllmRoute,
    scaled_init,
    stop_token_id,
)
from multimodal_lora.families.decoding import LANGUAGE_MODEL
from multimodal_lora.families.layouts import DecoderOnlyLayout

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Attention projections of the OPT decoder, and nothing else: match from the root.
ATTENTION_PATTERN = r"language_model\.model\.decoder\.layers\.\d+\.self_attn\.({names})"
# lora.parts: [mlp]: the decoder layers' two MLP linears (the vision encoder's MLP has fc1/fc2 too).
MLP_TARGETS = ("fc1", "fc2")
MLP_PATTERN = r"language_model\.model\.decoder\.layers\.\d+\.({names})"

TINY_NAME = "tiny"
TINY_SEED = 0
# Bump when the architecture, corpus or init changes so old caches are rebuilt.
TINY_VERSION = 2
TEXT_INIT_STD = 0.2
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 32
VISION_WIDTH = 64
QFORMER_WIDTH = 128
VISION_SEED_OFFSET = 2
TOKENIZER_VOCAB = 1024

# Words the tokenizers are trained on: the bundled data's vocabulary plus enough
# general English that other captions tokenize into sensible pieces.
CORPUS = """
a an the this that is are of on in at with and or to it its there what which where how many
red green blue yellow purple orange black white grey gray pink brown cyan colour color
circle square triangle star diamond cross shape shapes ball box small large big tiny little
question answer yes no one two three four five left right top bottom middle centre center
photo picture image of a man woman person people player players football soccer field ball
game team running kicking standing sitting playing grass stadium crowd goal match
dog cat car street house tree sky water table room
"""

# The same special tokens, in the same order, as OPT's tokenizer.
_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"


def _matches(config) -> bool:
    return getattr(config, "model_type", None) == "blip-2" and getattr(config.text_config, "model_type", None) == "opt"


def _layout(config, generation_config, processor) -> DecoderOnlyLayout:
    tokenizer = getattr(processor, "tokenizer", processor)
    text = config.text_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    return DecoderOnlyLayout(
        image_token_id=int(config.image_token_index),
        num_query_tokens=int(config.num_query_tokens),
        pad_token_id=int(pad),
        stop_token_id=stop_token_id(generation_config, text),
        bos_token_id=int(text.bos_token_id),
        # A byte-level BPE marks a new word by its leading space.
        target_prefix=" ",
    )


def _vllm_prompt_frame(tokenizer, layout: DecoderOnlyLayout) -> tuple[str, str]:
    """vLLM's BLIP-2 puts the image's 32 query tokens before the text itself; the text starts, as
    our layout's does, with the start token ``</s>``."""
    return tokenizer.convert_ids_to_tokens(layout.bos_token_id), ""


def _plan_dims(text) -> PlanDims:
    return PlanDims(hidden=text.hidden_size, ffn=text.ffn_dim, layers=text.num_hidden_layers, vocab=text.vocab_size)


# --- the tiny twin ------------------------------------------------------------------------------


def build_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it like OPT's.

    Like OPT's tokenizer it prepends ``</s>`` as BOS, pads with ``<pad>`` (id 1)
    and has ``<image>`` as an added special token for BLIP-2's placeholders.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in CORPUS.strip().splitlines()]
    # Repeat so that frequent words become single tokens, as in a real vocabulary.
    tok.train_from_iterator(lines * 20, trainer=trainer)
    bos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def tiny_vision_qformer(qformer_vocab: int, qformer_cls=None, vision_cls=None):
    """The tiny vision encoder and Q-Former configs every tiny twin shares (32×32 images)."""
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    vision = (vision_cls or Blip2VisionConfig)(
        hidden_size=VISION_WIDTH,
        intermediate_size=2 * VISION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=4,
    )
    qformer = (qformer_cls or Blip2QFormerConfig)(
        hidden_size=QFORMER_WIDTH,
        intermediate_size=2 * QFORMER_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=VISION_WIDTH,
        cross_attention_frequency=1,
        vocab_size=qformer_vocab,
    )
    return vision, qformer


def init_tiny_weights(model, seed: int) -> None:
    """The tiny twins' weights: a text model at std 0.2, a selective frozen image path.

    The composite model initialises every part with the config's 0.02; the text
    model needs its own, larger scale (see the module docstring). The frozen
    vision encoder and Q-Former must pass on *where* the colour is, not only how
    much of it there is: at std 0.02 every attention map is uniform and the
    zero-initialised query tokens are all alike, so the visual prefix is an
    average of patches and the shape is lost. So each image-path weight is
    scaled by 1/sqrt(fan_in) and each query token gets its own random vector.
    """
    import torch

    lm = model.language_model
    head = lm.get_output_embeddings()
    # A head tied to the input embeddings (OPT) gets their std 0.2; an untied one (T5, LLaMA) is a Linear like the rest.
    if head is not None and head.weight is not lm.get_input_embeddings().weight:
        head = None
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * TEXT_INIT_STD)
            elif isinstance(module, torch.nn.Linear) and module is not head:
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
    # A generator of its own, so the vision side does not change when the text side does.
    generator = torch.Generator().manual_seed(seed + VISION_SEED_OFFSET)
    parts = (model.vision_model, model.qformer, model.language_projection)
    scaled_init([m for part in parts for m in part.modules()], generator)
    with torch.no_grad():
        embeddings = model.vision_model.embeddings
        embeddings.position_embedding.copy_(torch.randn(embeddings.position_embedding.shape, generator=generator))
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=generator))


def build_tiny_model(tokenizer, seed: int = TINY_SEED):
    """Build the tiny ``Blip2ForConditionalGeneration`` with deterministic weights."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    newline_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision, qformer = tiny_vision_qformer(tokenizer.vocab_size)
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        word_embed_proj_dim=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        init_std=TEXT_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        # As in Salesforce/blip2-opt-2.7b, whose text config ends on "\n".
        eos_token_id=newline_id,
        dropout=0.0,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    init_tiny_weights(model, seed)
    model.generation_config.eos_token_id = newline_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 20
    return model


def image_processor():
    """BLIP image processing at 32×32 (the PIL backend: the default one needs torchvision)."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_processor(tokenizer):
    """The BLIP-2 processor for the tiny base."""
    from transformers import Blip2Processor

    return Blip2Processor(image_processor=image_processor(), tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny base (weights, config, tokenizer, processor) to ``directory``."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    build_processor(tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)


FAMILY = Family(
    name="blip2-opt",
    description="BLIP-2 with a decoder-only OPT language model",
    model_class="Blip2ForConditionalGeneration",
    config_class="Blip2Config",
    lora_targets=LORA_TARGETS,
    default_targets=LORA_TARGETS,
    attention_pattern=ATTENTION_PATTERN,
    mlp_targets=MLP_TARGETS,
    mlp_pattern=MLP_PATTERN,
    connector=QFORMER_CONNECTOR,
    matches=_matches,
    make_layout=_layout,
    unquantized=(),  # transformers' choice: the Q-Former in fp32, the vision encoder quantized
    plan_dims=_plan_dims,
    published={"Salesforce/blip2-opt-2.7b": "blip2-opt-2.7b.json"},
    tiny_name=TINY_NAME,
    tiny_dirname=f"tiny-blip2-v{TINY_VERSION}",
    build_tiny=save_tiny_base,
    decoding=LANGUAGE_MODEL,
    vllm=VllmRoute(architecture="Blip2ForConditionalGeneration", prompt_frame=_vllm_prompt_frame),
)
