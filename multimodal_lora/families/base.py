"""The interface every family fills in, and what all Q-Former families share.

A :class:`Family` is a plain frozen dataclass of values and functions, not a
class hierarchy: a new architecture is one module that builds one (or a few)
of these. See :mod:`multimodal_lora.families` for the list of what a family
must provide.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from multimodal_lora.families.layouts import TokenLayout

# The parts of a Q-Former model (BLIP-2, InstructBLIP), by parameter-name prefix,
# for the trainable-parameter table. Everything but the language model is frozen.
QFORMER_COMPONENTS = (
    ("vision", "vision_model."),
    ("Q-Former", ("qformer.", "query_tokens")),
    ("projection", "language_projection."),
    ("language model", "language_model."),
)
# The frozen image path: what turns pixels into the language model's visual prefix.
QFORMER_IMAGE_PATH = ("vision_model", "qformer", "language_projection", "query_tokens")
PRINTABLE = [chr(c) for c in range(33, 127)]
PROMPTS = "Question: What colour is the shape? Answer: A short image description:"


@dataclass(frozen=True)
class PlanDims:
    """What the memory plan needs to know about a language model's shape."""

    hidden: int
    """Width of the residual stream."""
    ffn: int
    """Width of the MLP's inner layer."""
    layers: int
    """Transformer blocks the tokens pass through (an encoder–decoder counts both stacks)."""
    vocab: int


@dataclass(frozen=True)
class Family:
    """One architecture: its names, its token layout, its plan dimensions, its configs and its tiny twin."""

    name: str
    """Recorded in adapters (``blip2-opt``); loading an adapter onto another family is refused."""
    description: str
    model_class: str
    """The ``transformers`` class that loads it (``Blip2ForConditionalGeneration``)."""
    config_class: str
    """The ``transformers`` config class of its published configs (``Blip2Config``)."""
    lora_targets: tuple[str, ...]
    """The names ``lora.target_modules`` may use: the language model's attention projections."""
    default_targets: tuple[str, ...]
    """Used when a recipe names none."""
    attention_pattern: str
    """A regex over full module names with ``{names}`` for the chosen projections, anchored
    on the language model (the vision MLP has fc1/fc2, the Q-Former query/key/value)."""
    matches: Callable[[object], bool]
    """Whether a model config (``Blip2Config`` ...) is of this family."""
    make_layout: Callable[[object, object, object], TokenLayout]
    """``(config, generation_config, processor) -> TokenLayout``."""
    plan_dims: Callable[[object], PlanDims]
    """``text_config -> PlanDims``."""
    published: Mapping[str, str] = field(default_factory=dict)
    """Hub id → file in ``families/configs/`` of the published configs shipped with the package."""
    tiny_name: str | None = None
    """The recipe's ``model.base`` that means this family's tiny offline twin (``tiny``)."""
    tiny_dirname: str | None = None
    """Its cache directory's name; changes whenever the build changes, so old caches are rebuilt."""
    build_tiny: Callable[[object], None] | None = None
    """Writes the tiny twin (weights, config, processor) into a directory."""
    max_positions: Callable[[object], int | None] = lambda text: getattr(text, "max_position_embeddings", None)
    """``text_config -> `` how many positions its language model holds (learned or rotary position
    tables: OPT, LLaMA); ``None`` for relative positions with no table to run past (T5)."""
    components: tuple = QFORMER_COMPONENTS
    """``(name, parameter-name prefixes)`` for the trainable-parameter table, first match wins;
    the language model last (LoRA must stay inside it)."""
    image_path: tuple[str, ...] = QFORMER_IMAGE_PATH
    """The frozen parts that turn pixels into the language model's input, as attribute paths
    from the model (``model.visual``): kept in eval mode, hashed for the feature cache."""
    language_model: str = "language_model"
    """Attribute path from the model to its language model (gradient checkpointing)."""
    image_tokens: Callable[[object], int] = lambda config: int(config.num_query_tokens)
    """``config -> `` positions one image takes in the language model's sequence, for length checks
    and the memory plan; a family whose count varies with the image gives its documented
    planning figure (see its module)."""
    no_feature_cache: str | None = None
    """Why the frozen-feature cache cannot serve this family (``None``: it can)."""
    no_continuous_batching: str | None = None
    """Why the server's decode loop cannot run this family's rows together (``None``: it can)."""
    load_processor: Callable[[str, str | None], object] | None = None
    """``(path or hub id, revision) -> processor`` when ``AutoProcessor`` cannot build the family's
    processor here (see :class:`ProcessorParts`); ``None``: ``AutoProcessor``."""

    def target_pattern(self, targets: Sequence[str]) -> str:
        """The regex PEFT matches against full module names: only the language model's attention."""
        problems = self.target_problems(targets)
        if problems:
            from multimodal_lora.errors import ConfigError

            raise ConfigError("; ".join(problems))
        return self.attention_pattern.format(names="|".join(re.escape(t) for t in targets))

    def target_problems(self, targets: Sequence[str] | None) -> list[str]:
        """What is wrong with a recipe's ``lora.target_modules`` for this family (empty when fine)."""
        if targets is None:
            return []
        choose = f"choose from {', '.join(self.lora_targets)} (the {self.name} family's attention projections)"
        if not targets:
            return [f"lora.target_modules: name at least one projection; {choose}"]
        out = []
        for name in targets:
            if name not in self.lora_targets:
                out.append(f"lora.target_modules: the {self.name} language model's attention has no {name!r}; {choose}")
        if len(set(targets)) != len(targets):
            out.append("lora.target_modules: lists a module twice")
        return out

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def published_config(self, hub_id: str):
        """The published config of one of this family's checkpoints, from the package (no download)."""
        import transformers

        text = resources.files("multimodal_lora.families").joinpath("configs", self.published[hub_id]).read_text()
        return getattr(transformers, self.config_class).from_dict(json.loads(text))


@dataclass
class ProcessorParts:
    """A processor made of its two parts, for a family whose ``transformers`` processor class cannot be
    built here: Qwen2.5-VL's processor also holds a video processor, which needs torchvision (not a
    dependency of this package). Everything here reads only ``.tokenizer`` and ``.image_processor``.
    """

    tokenizer: object
    image_processor: object

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None) -> ProcessorParts:
        """The tokenizer (with its chat template) and the image processor (its PIL backend when
        torchvision is missing) of a model directory or hub id."""
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.utils import cached_file

        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        if getattr(tokenizer, "chat_template", None) is None:
            # Some checkpoints keep the template with the processor (chat_template.json), not the tokenizer.
            found = cached_file(path, "chat_template.json", revision=revision, _raise_exceptions_for_missing_entries=False)
            if found is not None:
                tokenizer.chat_template = json.loads(Path(found).read_text())["chat_template"]
        return cls(tokenizer, AutoImageProcessor.from_pretrained(path, revision=revision))


def attribute(model, path: str):
    """``model.a.b`` for ``path="a.b"``."""
    for name in path.split("."):
        model = getattr(model, name)
    return model


# --- what every Q-Former family does the same way ----------------------------------------------


def stop_token_id(generation_config, text_config) -> int:
    """The token the base stops on, from its generation config (else its text config), never hard-coded."""
    from multimodal_lora.errors import UserError

    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = text_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise UserError(
            "the base model defines no end-of-sequence token in its generation config; cannot teach it to stop"
        )
    return int(eos)


def image_features(model, pixel_values: torch.Tensor, qformer_inputs: dict | None = None) -> torch.Tensor:
    """``language_projection(Q-Former(vision(x)[, instruction]))``: the visual prefix, ``(batch, Q, hidden)``."""
    out = model.get_image_features(pixel_values=pixel_values, return_dict=True, **(qformer_inputs or {}))
    return out.pooler_output


def generation_embeddings(model, batch: dict[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """The language model's input embeddings for a generation batch: the prompt's token embeddings
    with the visual prefix written over the ``<image>`` placeholders, as the Q-Former models'
    ``generate`` makes them before handing over to the language model's own ``generate``.

    Args:
        model: the Q-Former model (not a PEFT wrapper).
        batch: a layout's ``generation_inputs`` with ``pixel_values`` (and InstructBLIP's
            ``qformer_input_ids``/``qformer_attention_mask``).
        image_token_id: the placeholder token the layout put where the prefix goes.
    """
    qformer = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    prefix = image_features(model, batch["pixel_values"], qformer)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    placeholders = (batch["input_ids"] == image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(placeholders, prefix.to(embeds.device, embeds.dtype))


def prefix_inputs(prefix: torch.Tensor) -> dict:
    """Forward keyword arguments that feed a precomputed visual prefix instead of ``pixel_values``."""
    from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

    # InstructBLIP's forward reads the same three fields, so BLIP-2's output class serves both.
    return {
        "pixel_values": None,
        "mm_encoder_outputs": {"image": BaseModelOutputWithVisionQformerOutputs(pooler_output=prefix)},
    }


def scaled_init(modules, generator: torch.Generator) -> None:
    """Tiny twins: every linear and conv weight at std 1/sqrt(fan_in), so a frozen random image path
    passes on *where* things are, not an average of patches (see ``blip2_opt``'s docstring)."""
    with torch.no_grad():
        for module in modules:
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)


def metaspace_tokenizer(corpus: list[str], specials: list[str], frame: tuple[str, str], framing_token: str, **named):
    """Tiny twins: a SentencePiece-style (Metaspace) BPE trained on ``corpus``, wrapped for transformers.

    Args:
        corpus: lines to train on.
        specials: special tokens, in id order (``["<pad>", "</s>", "<unk>"]`` for T5's ids).
        frame: how a text and a pair are framed (``("$A </s>", "$A </s> $B </s>")`` for T5).
        framing_token: the special token the frame adds.
        named: ``eos_token="</s>"``, ``pad_token=...``: the wrapper's named special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # Every printable ASCII character, and the prompts' words: prompts ("Question: ... Answer:",
    # InstructBLIP's "A short image description:") tokenize without <unk>.
    corpus = [*corpus, " ".join(PRINTABLE), *[PROMPTS] * 20]
    tok.train_from_iterator(
        corpus, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single=frame[0], pair=frame[1], special_tokens=[(framing_token, tok.token_to_id(framing_token))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", model_max_length=512, **named)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer
