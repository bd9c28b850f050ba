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
PARTS = ("attention", "mlp", "connector")
"""What ``lora.parts`` may name, in the order they are listed everywhere."""
DEFAULT_PARTS = ("attention",)
PRINTABLE = [chr(c) for c in range(33, 127)]
PROMPTS = "Question: What colour is the shape? Answer: A short image description:"
PLAN_IMAGE = (480, 640)
"""Height and width of the image the memory plan and config-level length checks assume for a family
whose image tokens vary with the image (a common COCO photo, 640×480)."""


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
    attention: int = 0
    """Width of the queries and of the attention output (heads × head width); 0: ``hidden``."""
    kv: int = 0
    """Width of the keys and of the values (key-value heads × head width: narrower than the
    queries under grouped-query attention); 0: ``hidden``."""

    @property
    def attention_width(self) -> int:
        return self.attention or self.hidden

    @property
    def kv_width(self) -> int:
        return self.kv or self.hidden


def decoder_plan_dims(text) -> PlanDims:
    """:class:`PlanDims` of a LLaMA-style decoder config (Qwen2, LLaMA, Gemma 2): ``intermediate_size``
    wide MLP, and the attention's widths from its heads, key-value heads and head width (grouped-query
    attention: Qwen2.5-VL-3B has 16 query heads and 2 key-value heads of 128)."""
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return PlanDims(
        hidden=text.hidden_size,
        ffn=text.intermediate_size,
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        attention=heads * head_dim,
        kv=kv_heads * head_dim,
    )


@dataclass(frozen=True)
class Connector:
    """What joins the image path to the language model, when LoRA may train it (``lora.parts: [connector]``)."""

    pattern: str
    """A regex over full module names of its linear layers (only Linear: PEFT refuses to wrap a LayerNorm or a block)."""
    modules: tuple[str, ...]
    """Its top-level modules, for messages (``("qformer", "language_projection")``)."""
    activation_values: Callable[[object, int], int]
    """``(model config, LoRA rank) -> `` values autograd keeps per image in it while it trains (the memory plan's term)."""


@dataclass(frozen=True)
class VllmRoute:
    """What vLLM needs to serve a family with its adapters (:mod:`multimodal_lora.vllm`).

    vLLM builds the model from its own registry and turns the image into its own
    placeholders; what it must be told is which of its architectures this is, and
    what text surrounds our prompt so that it sees the tokens our layout generates
    from (the start token, a chat frame, the image placeholder where the family's
    prompt holds one).
    """

    architecture: str
    """vLLM's registered architecture, one that supports LoRA (``SupportsLoRA``) in the release
    ``python -m multimodal_lora.vllm install`` builds (``tests/test_vllm.py`` asks it)."""
    prompt_frame: Callable[[object, TokenLayout], tuple[str, str]]
    """``(tokenizer, layout) -> (before, after)``: the text written before and after the prompt
    text (a caption prompt, or the question in its VQA template). Tokenized without special tokens
    added, ``before + prompt + after`` must give the ids our layout puts after the image
    placeholders; ``tests/test_vllm.py`` checks that against ``generation_inputs``."""
    needs: tuple[str, ...] = ()
    """Modules vLLM's interpreter must have for this architecture beyond vLLM itself (checked before it
    starts: the CPU install has no torchvision)."""


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
    image_tokens: Callable[..., int] = lambda config, image_processor=None: int(config.num_query_tokens)
    """``(config, image_processor=None) -> `` positions one image takes in the language model's
    sequence, for length checks and the memory plan. A family whose count varies with the image
    gives the count of :data:`PLAN_IMAGE` as ``image_processor`` (the base's own, when the caller
    has it) processes it, and without one as its published checkpoints' processor does (see its module)."""
    unquantized: tuple[str, ...] | None = None
    """Module-name prefixes (from the root) that bitsandbytes leaves unquantized in an int8 / 4-bit
    base, and that stay in the recipe's dtype while it trains; ``None``: the whole :attr:`image_path`
    (the frozen vision tower and connector: small, and quantizing them costs quality). ``()``:
    transformers' own choice (BLIP-2 keeps its Q-Former in fp32 and quantizes its vision encoder)."""
    unquantized_in_dtype: bool = True
    """Whether a base being trained has its :meth:`keep_unquantized` modules cast back to the recipe's
    dtype after PEFT's ``prepare_model_for_kbit_training`` made them fp32 (``False``: they stay fp32, for a
    model that casts its image features to the dtype of its first parameter rather than its embeddings')."""
    no_feature_cache: str | None = None
    """Why the frozen-feature cache cannot serve this family (``None``: it can)."""
    no_continuous_batching: str | None = None
    """Why the server's decode loop cannot run this family's rows together (``None``: it can)."""
    decoding: object | None = None
    """How the server's decode loop runs its model a token at a time: a
    :class:`~multimodal_lora.families.decoding.Decoding` (its prefill and its steps: positions, masks,
    head); ``None``: the family does not decode there (an encoder–decoder)."""
    load_processor: Callable[[str, str | None], object] | None = None
    """``(path or hub id, revision) -> processor`` when ``AutoProcessor`` cannot build the family's
    processor here (see :class:`ProcessorParts`); ``None``: ``AutoProcessor``."""
    vllm: VllmRoute | None = None
    """How vLLM serves it (``serve --engine vllm``, ``caption --engine vllm``); ``None``: it does not."""
    vllm_refusal: str = ""
    """Why vLLM cannot serve it (``vllm`` is ``None``), for the one-line refusal."""

    mlp_targets: tuple[str, ...] = ()
    """The language model's MLP (feed-forward) linears that ``lora.parts: [mlp]`` adapts, all of them;
    empty: this family offers no ``mlp`` part."""
    mlp_pattern: str | None = None
    """A regex with ``{names}`` for :attr:`mlp_targets`, anchored on the language model's MLP blocks
    (the vision encoder's MLP must never match)."""
    connector: Connector | None = None
    """What ``lora.parts: [connector]`` adapts; ``None``: this family offers no ``connector`` part."""

    def keep_unquantized(self) -> tuple[str, ...]:
        """The module-name prefixes an int8 / 4-bit load leaves unquantized (:attr:`unquantized`)."""
        return self.image_path if self.unquantized is None else self.unquantized

    def parts(self) -> tuple[str, ...]:
        """The parts ``lora.parts`` may name for this family, in :data:`PARTS` order."""
        mlp = bool(self.mlp_targets) and self.mlp_pattern is not None
        offered = {"attention": True, "mlp": mlp, "connector": self.connector is not None}
        return tuple(p for p in PARTS if offered[p])

    def part_problems(self, parts: Sequence[str]) -> list[str]:
        """What is wrong with a recipe's ``lora.parts`` for this family (empty when fine)."""
        offered = self.parts()
        return [
            f"lora.parts: the {self.name} family has no {part!r} part to train; it offers {', '.join(offered)}"
            for part in parts
            if part in PARTS and part not in offered
        ]

    def part_patterns(self, parts: Sequence[str], targets: Sequence[str] | None = None) -> dict[str, str]:
        """Each chosen part's regex over full module names (``targets``: the attention projections, default all)."""
        problems = self.part_problems(parts)
        if problems:
            from multimodal_lora.core.errors import ConfigError

            raise ConfigError("; ".join(problems))
        out = {}
        for part in (p for p in PARTS if p in parts):
            if part == "attention":
                out[part] = self.target_pattern(self.lora_targets if targets is None else targets)
            elif part == "mlp":
                out[part] = self.mlp_pattern.format(names="|".join(re.escape(t) for t in self.mlp_targets))
            else:
                out[part] = self.connector.pattern
        return out

    def lora_pattern(self, parts: Sequence[str], targets: Sequence[str]) -> str:
        """The one regex PEFT's ``target_modules`` gets for ``parts``.

        Attention alone gives exactly :meth:`target_pattern`, so adapters of the default
        ``lora.parts: [attention]`` are byte for byte what they were before parts existed.
        """
        patterns = list(self.part_patterns(parts, targets).values())
        return patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)

    def describe_part(self, part: str) -> str:
        """``mlp (fc1, fc2)``: a part and the modules it adapts, for messages."""
        connector = self.connector.modules if self.connector is not None else ()
        names = {"attention": self.lora_targets, "mlp": self.mlp_targets, "connector": connector}[part]
        return f"{part} ({', '.join(names)})"

    def part_of(self, module_name: str) -> str | None:
        """Which part (``attention``, ``mlp``, ``connector``) a full module name is a LoRA target of, else ``None``."""
        for part, pattern in self.part_patterns(self.parts()).items():
            if re.fullmatch(pattern, module_name):
                return part
        return None
    def target_pattern(self, targets: Sequence[str]) -> str:
        """The regex PEFT matches against full module names: only the language model's attention."""
        problems = self.target_problems(targets)
        if problems:
            from multimodal_lora.core.errors import ConfigError

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


def qformer_activation_values(config, r: int) -> int:
    """Values autograd keeps per image in a Q-Former and projection whose LoRA (rank ``r``) trains.

    Counted from the tensors autograd saves in BLIP-2's Q-Former in train mode with LoRA
    dropout on (``bench/connector_activations.py`` lists them; the frozen vision encoder
    keeps nothing). With ``Q`` query tokens, Q-Former width ``h``, FFN width ``f``,
    ``n`` heads, ``V`` vision tokens of width ``v``:

    * every layer, per query token: ``17 h`` (layer-norm inputs, the q/k/v/out
      LoRA inputs and dropout masks, the per-head q/k/v), ``3 f`` (the FFN's inner
      activations and the down projection's LoRA input), ``6 r`` (LoRA's A outputs)
      and 4 layer-norm statistics; and ``3 n Q²`` of attention maps (softmax, dropout
      mask, dropped-out probabilities);
    * a layer with cross-attention (every ``cross_attention_frequency``-th) adds
      ``Q (7 h + 2 r + 2)``, the key and value LoRA inputs over the vision output
      ``2 V (v + r)``, the per-head keys and values ``2 V h``, and ``3 n Q V`` of maps;
    * the projection's LoRA: ``Q (2 h + r)``.

    Dropout masks count as values here, as the CPU saves them; a GPU keeps them as
    bytes, so there this is an upper bound. InstructBLIP's instruction tokens, which
    also pass through its Q-Former, are left out: a prompt is short beside ``V``.
    """
    qformer, vision = config.qformer_config, config.vision_config
    q, h, f, n = int(config.num_query_tokens), qformer.hidden_size, qformer.intermediate_size, qformer.num_attention_heads
    layers = qformer.num_hidden_layers
    cross_layers = len(range(0, layers, max(1, qformer.cross_attention_frequency)))
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches and the class token
    per_layer = q * (17 * h + 3 * f + 6 * r + 4) + 3 * n * q * q
    per_cross = q * (7 * h + 2 * r + 2) + 2 * tokens * (vision.hidden_size + r) + 2 * tokens * h + 3 * n * q * tokens
    return layers * per_layer + cross_layers * per_cross + q * (2 * h + r)


# The Q-Former families' connector: every linear layer of the Q-Former (self- and cross-attention,
# the query FFN, InstructBLIP's instruction FFN too) and the projection into the language model.
# The query tokens are a bare parameter, not a layer LoRA can wrap: they stay frozen.
QFORMER_CONNECTOR = Connector(
    pattern=(
        r"qformer\.encoder\.layer\.\d+\.(?:(?:attention|crossattention)\.(?:attention\.(?:query|key|value)|output\.dense)"
        r"|(?:intermediate|output)(?:_query)?\.dense)|language_projection"
    ),
    modules=("qformer", "language_projection"),
    activation_values=qformer_activation_values,
)


def stop_token_id(generation_config, text_config) -> int:
    """The token the base stops on, from its generation config (else its text config), never hard-coded."""
    from multimodal_lora.core.errors import UserError

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
