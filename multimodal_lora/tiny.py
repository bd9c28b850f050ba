"""The tiny BLIP-2: the embedded default base, built offline from a config.

``base: tiny`` in a recipe means this model. It is a real
``Blip2ForConditionalGeneration`` with an OPT language model, the same classes
and module names as ``Salesforce/blip2-opt-2.7b``
(``language_model.model.decoder.layers.N.self_attn.q_proj`` ...), about a
million parameters, random weights, and a byte-level BPE tokenizer trained
here on a small English corpus. It is saved as an ordinary Hugging Face model
directory, so it loads through the same ``from_pretrained`` path as the real
checkpoint.

Two choices make it useful rather than merely small:

* The text model is initialised with std 0.2 instead of OPT's 0.02. A frozen,
  randomly initialised OPT at 0.02 cannot produce confident tokens through its
  tied head, so LoRA could not teach it anything; at 0.2 it learns real
  captions on a CPU in seconds.
* Its generation config stops on "\\n", like the real BLIP-2 OPT checkpoints
  (id 50118 there), so training teaches it the same stop token.

The build is deterministic: the same seed gives bit-identical weights and
tokenizer files. It is cached under :func:`multimodal_lora.cache.cache_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from multimodal_lora.atomic import staging_dir

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

logger = logging.getLogger(__name__)

# Words the tokenizer is trained on: the bundled data's vocabulary plus enough
# general English that other captions tokenize into sensible pieces.
_CORPUS = """
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


def tiny_dir(cache_root: Path | None = None) -> Path:
    """Where the tiny base lives (built on demand by :func:`ensure_tiny_base`)."""
    from multimodal_lora.cache import cache_dir

    root = cache_root if cache_root is not None else cache_dir()
    return root / f"tiny-blip2-v{TINY_VERSION}"


def ensure_tiny_base(cache_root: Path | None = None) -> Path:
    """Build the tiny base once and return its directory.

    The directory appears atomically (built in a temporary directory beside it,
    then renamed), so a crash mid-build never leaves a half-written model, and
    two processes building at once both end up with the same files.
    """
    target = tiny_dir(cache_root)
    if _is_complete(target):
        return target
    if _is_secondary_rank():
        # transformers' save_pretrained writes no weights on a rank other than 0 of a
        # torch.distributed job (accelerate launch): rank 0 builds, the others wait.
        return _wait_for(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    try:
        import torch

        # Building seeds torch's global generator; keep the caller's (a training run that
        # builds the base on first use must draw the same numbers as one that finds it cached).
        with torch.random.fork_rng(devices=[]):
            save_tiny_base(tmp)
        if not _is_complete(tmp):
            raise RuntimeError(f"building the tiny base in {tmp} wrote no weights")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (its files are identical to ours), or an
            # older, broken build left an incomplete directory: replace that one.
            if not _is_complete(target):
                shutil.rmtree(target)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the tiny BLIP-2 base in %s", target)
    return target


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _is_secondary_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _wait_for(target: Path, timeout: float = 600.0) -> Path:
    import time

    deadline = time.monotonic() + timeout
    while not _is_complete(target):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not build the tiny base in {target} within {timeout:.0f} s")
        time.sleep(0.2)
    return target


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
        vocab_size=1024,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in _CORPUS.strip().splitlines()]
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


def build_tiny_model(tokenizer, seed: int = TINY_SEED):
    """Build the tiny ``Blip2ForConditionalGeneration`` with deterministic weights."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    newline_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = Blip2VisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=2 * VISION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=4,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=QFORMER_WIDTH,
        intermediate_size=2 * QFORMER_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=VISION_WIDTH,
        cross_attention_frequency=1,
        vocab_size=tokenizer.vocab_size,
    )
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
    # The composite model initialises every part with Blip2Config's 0.02; the
    # text model needs its own, larger scale (see the module docstring).
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.language_model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * TEXT_INIT_STD)
            elif isinstance(module, torch.nn.Linear) and module is not model.language_model.lm_head:
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
    # The frozen vision encoder and Q-Former must pass on *where* the colour
    # is, not only how much of it there is. At std 0.02 every attention map is
    # uniform and the zero-initialised query tokens are all alike, so the
    # visual prefix is an average of patches and the shape is lost. Scale each
    # weight by 1/sqrt(fan_in) (attention becomes selective, activations stay
    # in range) and give each query token its own random vector.
    # A generator of its own, so the vision side does not change when the text side does.
    generator = torch.Generator().manual_seed(seed + VISION_SEED_OFFSET)
    with torch.no_grad():
        for part in (model.vision_model, model.qformer, model.language_projection):
            for module in part.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)
        embeddings = model.vision_model.embeddings
        embeddings.position_embedding.copy_(torch.randn(embeddings.position_embedding.shape, generator=generator))
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=generator))
    model.generation_config.eos_token_id = newline_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 20
    return model


def build_processor(tokenizer):
    """The BLIP-2 processor for the tiny base (BLIP image processing at 32×32)."""
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    # The PIL backend: the default one needs torchvision, which has no CPU wheel here.
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)


def save_tiny_base(directory: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny base (weights, config, tokenizer, processor) to ``directory``."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    processor = build_processor(tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "TINY_BASE.json").write_text(
        json.dumps({"name": TINY_NAME, "version": TINY_VERSION, "seed": seed}, indent=2) + "\n"
    )
