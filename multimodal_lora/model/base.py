"""The base model and its LoRA: loading, quantizing, adapting, counting.

This is the one module that knows bitsandbytes and PEFT's injection. What it
needs to know about an architecture (its class, its LoRA target names and
where they are, its token layout) it asks the base's family
(:mod:`multimodal_lora.families`), found from the base's config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from multimodal_lora.config import LoraSettings, ModelConfig
from multimodal_lora.core.errors import ConfigError, UserError
from multimodal_lora.core.host_memory import keep_large_blocks_off_the_heap, return_freed_memory
from multimodal_lora.core.quantization import scheme
from multimodal_lora.core.runtime import bitsandbytes_available, torch_dtype
from multimodal_lora.families import FAMILIES, Family, family_for_config, published_family, tiny_family
from multimodal_lora.families.base import attribute, image_features, stop_token_id  # noqa: F401 - part of this module's API
from multimodal_lora.model.loading import LoadSettings

logger = logging.getLogger(__name__)


# Keys of a model config that do not change the weights' shapes or meaning.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


@dataclass(frozen=True)
class BaseInfo:
    """What identifies a base model: where it came from and what it is."""

    name: str
    """As the user wrote it: ``tiny``, a hub id, or a path."""
    name_or_path: str
    """What ``from_pretrained`` was given (the tiny base's cache directory for ``tiny``)."""
    revision: str | None
    fingerprint: str
    """Hash of the architecture config; two bases with the same one take the same adapters."""
    family: str | None = None
    """The architecture family (``blip2-opt``, ``blip2-t5``, ...); ``None`` in adapters from before families."""


def resolve_base(base: str) -> str:
    """Turn the recipe's ``model.base`` into something ``from_pretrained`` takes."""
    from multimodal_lora.model.tiny import ensure_tiny_base

    if tiny_family(base) is not None:
        return str(ensure_tiny_base(name=base))
    return base


def pick_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {device!r} asked for, but no CUDA GPU is available; use device=cpu or auto")
    return torch.device(device)


def quantization_config(quantization: str, dtype: str, quant_type: str = "nf4", family: Family | None = None):
    """The ``BitsAndBytesConfig`` for ``int8`` or ``4bit``, ``None`` for ``none``.

    4-bit layers compute in ``dtype`` (fp32 for fp32) and use double quantization. The
    ``family``'s :meth:`~multimodal_lora.families.base.Family.keep_unquantized` modules (the
    frozen vision tower and connector of Qwen2.5-VL, PaliGemma, SmolVLM) stay unquantized.
    """
    try:
        row = scheme(quantization, "model.quantization")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return row.bnb_config(torch_dtype(dtype), quant_type, family.keep_unquantized() if family is not None else ())


def keep_unquantized_in_dtype(model, family: Family, dtype: str) -> None:
    """Cast the family's unquantized image path back to the recipe's ``dtype`` after PEFT's
    ``prepare_model_for_kbit_training`` cast every non-quantized weight to fp32: it is frozen and
    takes no gradient, so fp32 would only make it 2× the memory of bf16 (4× int8's). Not for a
    family that says it cannot (``Family.unquantized_in_dtype``)."""
    if not family.unquantized_in_dtype:
        return
    for path in family.keep_unquantized():
        attribute(model, path).to(torch_dtype(dtype))


def load_processor(base: str, revision: str | None = None, family: Family | None = None):
    """The processor (image processor + tokenizer(s)) of a base.

    ``family``: the base's, when the caller already knows it (not derived again).
    """
    from transformers import AutoProcessor

    family = family or _known_family(base, revision)
    path = resolve_base(base)
    try:
        if family is not None and family.load_processor is not None:
            return family.load_processor(path, revision)
        return AutoProcessor.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise UserError(_not_found_message(base, exc)) from None


def load_base(cfg: ModelConfig, *, for_training: bool = True, family: Family | None = None):
    """Load the base as the recipe says: hub id or path, dtype, quantization, device, with its family's class.

    Quantized bases go through PEFT's ``prepare_model_for_kbit_training`` when
    ``for_training`` (layer norms in fp32, input gradients enabled), as LoRA on
    int8/4-bit layers needs. Most callers want :meth:`LoadedBase.load`, which
    also gives the processor, family, token layout, load settings and positions.

    Args:
        family: the base's, when the caller already knows it (not derived again).

    Returns:
        ``(model, base_info)``.
    """
    family = family or base_family(cfg.base, cfg.revision)
    path = resolve_base(cfg.base)
    # Loading (and training an int8 base on a CPU) frees many large temporaries: let them go back.
    keep_large_blocks_off_the_heap()
    device = pick_device(cfg.device)
    quant = quantization_config(cfg.quantization, cfg.dtype, cfg.quant_type, family)
    kwargs = {"revision": cfg.revision, "dtype": torch_dtype(cfg.dtype)}
    if quant is not None:
        _require_bitsandbytes(cfg.quantization)
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    try:
        model = family.model_cls().from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(_not_found_message(cfg.base, exc)) from None
    if quant is None:
        model.to(device)
    model.requires_grad_(False)
    if quant is not None and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_unquantized_in_dtype(model, family, cfg.dtype)
    return_freed_memory()
    info = BaseInfo(
        name=cfg.base, name_or_path=path, revision=cfg.revision, fingerprint=config_fingerprint(model.config), family=family.name
    )
    return model, info


@dataclass(frozen=True)
class Positions:
    """How many positions the base's language model holds, and how many of them one image takes.

    Read from the base's config by its family (no weights), so a length is checked before
    any model loads; a loaded base carries the same figures (:attr:`LoadedBase.positions`).
    """

    limit: int | None
    """Positions the language model holds (image + text); ``None``: no table to run past (T5).

    A model that learns one position embedding per position (OPT) fails with an ``IndexError``
    deep in the model past it, so every length is checked against this first."""
    image: int
    """Positions one image takes (its family's figure; see :attr:`Family.image_tokens`)."""

    @classmethod
    def of(cls, family: Family, config, image_processor=None) -> Positions:
        """The positions of a base of ``family`` with ``config`` (its top-level model config); ``image_processor``:
        the base's, when the caller has it (a family whose image count depends on it, SmolVLM's tiles, reads it)."""
        return cls(limit=family.max_positions(config.text_config), image=family.image_tokens(config, image_processor))

    @classmethod
    def of_base(cls, base: str, revision: str | None = None, family: Family | None = None, image_processor=None) -> Positions:
        """The positions of the recipe's ``model.base``, from its config alone (no weights); ``family`` when known."""
        return cls.of(family or base_family(base, revision), base_config(base, revision), image_processor)

    @property
    def text(self) -> int | None:
        """Text tokens that fit after one image (``None``: no limit)."""
        return None if self.limit is None else self.limit - self.image


@dataclass(frozen=True)
class LoadedBase:
    """A base loaded once, with everything that follows from it.

    Loading used to hand back the model and its identity, and every caller then asked
    the model again for its family, its token layout and its position limits. Those are
    decided once here, and training, inference, merge and evaluate take them from this
    value; nothing after loading derives the family from the model again.
    """

    model: object
    """The base as loaded (no LoRA: callers wrap it, and keep the wrapper themselves)."""
    processor: object
    """Image processor and tokenizer(s)."""
    info: BaseInfo | None
    """Where the base came from and what it is (recorded in adapters)."""
    family: Family
    layout: object
    """The family's token layout (:mod:`multimodal_lora.families.layouts`), from the model's configs and the processor."""
    settings: LoadSettings | None
    """How it was loaded (``device`` is the kind it landed on); ``None`` for a model loaded elsewhere (:meth:`of_model`)."""
    positions: Positions

    @classmethod
    def load(
        cls, cfg: ModelConfig, *, for_training: bool = True, family: Family | None = None, processor=None
    ) -> LoadedBase:
        """Load the base ``cfg`` names (see :func:`load_base`) and what follows from it.

        Args:
            cfg: the recipe's ``model`` section (or one built from an adapter's record).
            for_training: prepare a quantized base for LoRA training.
            family: the base's family when the caller derived it already (before any weights load).
            processor: the base's processor when the caller loaded it already (the trainer: for its data).

        Example:
            >>> base = LoadedBase.load(ModelConfig(base="tiny", device="cpu"), for_training=False)
            >>> base.family.name, base.positions.limit
            ('blip2-opt', 128)
        """
        family = family or base_family(cfg.base, cfg.revision)
        if processor is None:
            processor = load_processor(cfg.base, cfg.revision, family=family)
        model, info = load_base(cfg, for_training=for_training, family=family)
        return cls._of(model, processor, info, family, LoadSettings.of(cfg, next(model.parameters()).device))

    @classmethod
    def of_model(cls, model, processor, info: BaseInfo | None) -> LoadedBase:
        """The value for a model loaded elsewhere (a merged model, a test's), its family read from its config.

        ``model`` may be a PEFT wrapper; the value holds the base inside it. ``settings`` is ``None``:
        how such a model was loaded is not known here.
        """
        inner = _blip2(model)
        return cls._of(inner, processor, info, family_of(inner), None)

    @classmethod
    def _of(cls, model, processor, info: BaseInfo | None, family: Family, settings: LoadSettings | None) -> LoadedBase:
        """The value for ``model`` of ``family``: its token layout and positions follow from its configs."""
        layout = family.make_layout(model.config, model.generation_config, processor)
        return cls(model, processor, info, family, layout, settings, Positions.of(family, model.config, getattr(processor, "image_processor", None)))


def _known_family(base: str, revision: str | None) -> Family | None:
    """The family of ``base`` when its config says (``None`` for one no family knows: AutoProcessor decides)."""
    try:
        return base_family(base, revision)
    except (ConfigError, UserError, ValueError):
        return None


def family_of(model) -> Family:
    """The family of a loaded (or ``meta``) model, from its config."""
    return family_for_config(_blip2(model).config)


def base_family(base: str, revision: str | None = None) -> Family:
    """The family of a recipe's ``model.base``, from its config alone (no weights)."""
    family = tiny_family(base) or published_family(base)
    return family if family is not None else family_for_config(base_config(base, revision))


def lora_targets(lora: LoraSettings, family: Family) -> list[str]:
    """The recipe's ``lora.target_modules``, or the family's default when it names none."""
    return list(lora.target_modules) if lora.target_modules is not None else list(family.default_targets)


def image_positions(config, image_processor=None) -> int:
    """Positions one image takes in the language model's sequence (its family's figure; see :class:`Family`),
    as ``image_processor`` (the base's, when the caller has it) makes it."""
    return family_for_config(config).image_tokens(config, image_processor)


def text_length_problem(max_length: int, positions: Positions, what: str = "data.max_length") -> str | None:
    """Why ``max_length`` text tokens after the image's query tokens do not fit the base, or ``None``."""
    limit, queries = positions.limit, positions.image
    if limit is None or queries + max_length <= limit:
        return None
    return (
        f"{what}={max_length}: with the {queries} image query tokens that is {queries + max_length} positions, "
        f"but the base holds {limit}; use at most {what}={limit - queries}"
    )


def is_lora_target(module_name: str, family: Family, parts=None) -> bool:
    """Whether ``module_name`` (relative to the model) is a LoRA target of one of ``parts`` (default: any the family offers)."""
    part = family.part_of(module_name)
    return part is not None and (parts is None or part in parts)


def add_lora(model, lora: LoraSettings, family: Family | None = None):
    """Wrap ``model`` with fresh LoRA adapters on the parts ``lora.parts`` names (by default the language model's attention).

    ``family``: the model's (:attr:`LoadedBase.family`); read from its config when not given.

    Raises:
        ConfigError: a requested part or projection is not one of the family's, or is
            not in the model.
    """
    from peft import LoraConfig, get_peft_model

    family = family or family_of(model)
    targets = lora_targets(lora, family)
    patterns = family.part_patterns(lora.parts, targets)
    names = [name for name, _ in model.named_modules()]
    if "attention" in patterns:
        hits = {name.rsplit(".", 1)[-1] for name in names if re.fullmatch(patterns["attention"], name)}
        missing = [t for t in targets if t not in hits]
        if missing:
            raise ConfigError(
                f"lora.target_modules: the language model has no {', '.join(missing)} in its attention layers "
                f"(it has: {', '.join(sorted(hits)) or 'none of ' + '/'.join(family.lora_targets)})"
            )
    empty = [part for part, pattern in patterns.items() if not any(re.fullmatch(pattern, n) for n in names)]
    if empty:
        raise ConfigError(f"lora.parts: this {family.name} model has no modules of its {', '.join(empty)} part")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=family.lora_pattern(lora.parts, targets),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    # What trains is LoRA, and only in the parts asked for: never the frozen vision encoder, never a part not named.
    stray = [
        n for n, p in peft_model.named_parameters()
        if p.requires_grad and ("lora_" not in n or family.part_of(_lora_module(n)) not in lora.parts)
    ]  # fmt: skip
    assert not stray, f"LoRA reached outside lora.parts={lora.parts}: {stray[:3]}"
    return peft_model


def _lora_module(parameter_name: str) -> str:
    """``base_model.model.X.lora_A.default.weight`` → ``X``: the module a LoRA parameter adapts."""
    return _strip_peft_prefix(parameter_name).partition(".lora_")[0]


def count_lora_parts(model, family: Family | None = None) -> dict[str, int]:
    """Trainable LoRA parameters per part (``attention``, ``mlp``, ``connector``), for the parts that have any."""
    family = family or family_of(model)
    out: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and ".lora_" in name:
            part = family.part_of(_lora_module(name)) or "other"
            out[part] = out.get(part, 0) + _numel(param)
    return {p: out[p] for p in (*family.parts(), "other") if p in out}


def count_parameters(model, family: Family | None = None) -> dict[str, tuple[int, int]]:
    """Trainable and total parameters per component (vision, Q-Former, projection, language model), plus ``total``."""
    components = (family or family_of(model)).components
    counts = {name: [0, 0] for name, _ in components}
    counts["total"] = [0, 0]
    for name, param in model.named_parameters():
        name = _strip_peft_prefix(name)
        numel = _numel(param)
        for component, prefixes in components:
            if name.startswith(prefixes):
                counts[component][1] += numel
                counts[component][0] += numel if param.requires_grad else 0
                break
        counts["total"][1] += numel
        counts["total"][0] += numel if param.requires_grad else 0
    return {k: (v[0], v[1]) for k, v in counts.items()}


def format_parameter_table(counts: dict[str, tuple[int, int]], parts: dict[str, int] | None = None) -> str:
    """The trainable-parameter table printed before training; ``parts`` (:func:`count_lora_parts`) adds a line by part."""
    lines = [f"{'component':<16}{'trainable':>14}{'total':>16}{'trainable %':>13}"]
    for name, (trainable, total) in counts.items():
        share = 100 * trainable / total if total else 0.0
        lines.append(f"{name:<16}{trainable:>14,}{total:>16,}{share:>12.3f}%")
    if parts:
        lines.append("LoRA by part: " + ", ".join(f"{part} {n:,}" for part, n in parts.items()))
    return "\n".join(lines)


def config_fingerprint(config) -> str:
    """A short hash of what makes two BLIP-2 bases interchangeable for an adapter."""
    data = _strip_volatile(config.to_dict())
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def published_config(name: str = "Salesforce/blip2-opt-2.7b"):
    """The published config of a real checkpoint, shipped with the package (no download).

    Args:
        name: a hub id (``Salesforce/blip2-flan-t5-xl``) or its last part (``blip2-flan-t5-xl``).
    """
    hub_id = name if "/" in name else f"Salesforce/{name}"
    family = published_family(hub_id)
    if family is None:
        shipped = sorted(h for f in FAMILIES for h in f.published)
        raise ConfigError(f"no published config of {name!r} ships with the package; shipped: {', '.join(shipped)}")
    return family.published_config(hub_id)


def base_config(base: str, revision: str | None = None):
    """The config of a base, without loading its weights.

    A shipped architecture (``Salesforce/blip2-opt-2.7b`` ...) is read from the
    package; tiny twins and model directories from their ``config.json``; other
    hub ids fetch only ``config.json``.
    """
    if published_family(base) is not None:
        return published_config(base)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_base(base), revision=revision)
    except OSError as exc:
        raise UserError(_not_found_message(base, exc)) from None


def quantized_linears(model, family: Family | None = None) -> set[str]:
    """Names of the ``nn.Linear`` layers bitsandbytes replaces when the base loads in int8 or 4-bit.

    transformers quantizes every linear layer except those of the modules the
    model keeps in fp32 (BLIP-2: the Q-Former), the output head, and the modules
    its family keeps unquantized (:func:`quantization_config`). Works on a
    ``meta`` model.
    """
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    skip = (family or family_of(model)).keep_unquantized()
    out = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if any(part in keep for part in name.split(".")) or any(name.startswith(prefix + ".") for prefix in skip):
            continue
        out.add(name)
    return out


def is_quantized(model) -> bool:
    """Whether the loaded base holds bitsandbytes int8 or 4-bit weights (which must not be merged into)."""
    return any(type(p).__module__.startswith("bitsandbytes") or p.dtype in (torch.int8, torch.uint8) for p in model.parameters())


def meta_model(config):
    """Build a model of ``config``'s family on the ``meta`` device: shapes without memory, for counting and planning."""
    cls = family_for_config(config).model_cls()
    with torch.device("meta"):
        return cls(config)


def _strip_volatile(value):
    if isinstance(value, dict):
        return {
            k: _strip_volatile(v)
            for k, v in value.items()
            if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")
        }
    return value


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _numel(param) -> int:
    # bitsandbytes 4-bit packs two weights per byte; count the logical weights.
    shape = getattr(param, "quant_state", None)
    if shape is not None and hasattr(shape, "shape"):
        return int(torch.Size(shape.shape).numel())
    return param.numel()


def _require_bitsandbytes(quantization: str) -> None:
    if not bitsandbytes_available():
        raise UserError(
            f"model.quantization={quantization} needs bitsandbytes; pip install 'bitsandbytes>=0.49' "
            "or set model.quantization=none"
        ) from None


def _not_found_message(base: str, exc: Exception) -> str:
    if Path(base).exists():
        return f"model.base: {base!r} is a directory but not a model of a supported family ({exc}); it needs config.json and weights"
    return (
        f"model.base: cannot load {base!r}: not a local directory, and the hub could not provide it ({exc}). "
        "Use base=tiny (or tiny-t5, tiny-instructblip) for a built-in offline model, a local model directory, or a hub id with network access."
    )


def text_layout(model, processor):
    """How this base frames text around the image, for training and generation: its family's layout.

    Args:
        model: the base (or its PEFT wrapper).
        processor: its processor (InstructBLIP's carries the Q-Former tokenizer), or just its tokenizer.
    """
    return LoadedBase.of_model(model, processor, None).layout


# --- the frozen image path: train mode, visual prefix, feature-cache identity ------------------

def _blip2(model):
    """The model inside a PEFT (and/or DDP) wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_train_mode(model, family: Family | None = None) -> None:
    """Train mode for what trains: the language model, and the connector when ``lora.parts`` has it.

    A frozen part of the image path (the vision encoder always; the Q-Former and
    projection unless the connector trains) should see each image the same way every
    step: its dropout (0.1 in the Q-Former of BLIP-2) stays off. That is also what makes
    a cached visual prefix equal to a computed one. A connector that trains is trained
    as the language model is, with its dropout on.
    """
    model.train()
    blip2 = _blip2(model)
    family = family or family_of(blip2)
    trained = set(image_path_trainable(blip2, family))
    for name in family.image_path:
        part = attribute(blip2, name)
        if isinstance(part, torch.nn.Module) and name not in trained:
            part.eval()


def visual_prefix(model, pixel_values: torch.Tensor, qformer_inputs: dict | None = None) -> torch.Tensor:
    """What the language model receives for each image: ``language_projection(Q-Former(vision(x)))``.

    Shape ``(batch, num_query_tokens, text hidden size)``. ``qformer_inputs`` is the
    instruction for a family whose Q-Former reads one (InstructBLIP).
    """
    return image_features(_blip2(model), pixel_values, qformer_inputs)


def ragged_features(model, image_inputs, items: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Each image's named features, ``(tokens, hidden)`` of a length that varies with the image, for a
    family whose image inputs name ``cache_keeps`` (Qwen2.5-VL, Qwen3-VL, SmolVLM): its model's own ``get_image_features``."""
    return image_inputs.image_features(_blip2(model), items)


def prefix_shape(model) -> tuple[int, int]:
    """``(query tokens, text hidden size)``: the shape of one image's visual prefix."""
    config = _blip2(model).config
    return image_positions(config), config.text_config.hidden_size


def image_path_trainable(model, family: Family | None = None) -> list[str]:
    """The parts of the image path (vision, Q-Former, queries, projection) with trainable parameters."""
    blip2 = _blip2(model)
    parts = []
    for name in (family or family_of(blip2)).image_path:
        part = attribute(blip2, name)
        params = part.parameters() if isinstance(part, torch.nn.Module) else [part]
        if any(p.requires_grad for p in params):
            parts.append(name)
    return parts


def prefix_inputs(prefix: torch.Tensor) -> dict:
    """Forward keyword arguments that feed a precomputed visual prefix instead of ``pixel_values``."""
    from multimodal_lora.families.base import prefix_inputs as family_prefix_inputs

    return family_prefix_inputs(prefix)


def image_path_fingerprint(model) -> str:
    """A hash of the frozen image path's weights (vision, Q-Former, queries, projection).

    ``config_fingerprint`` only hashes shapes; cached features also depend on the
    weights, so two bases with equal configs but other weights get other caches.
    """
    blip2 = _blip2(model)
    image_path = tuple(family_of(blip2).image_path)
    digest = hashlib.sha256()
    for name, tensor in sorted(blip2.state_dict().items()):
        name = _strip_peft_prefix(name)
        if name.startswith(image_path):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(name.encode())
            digest.update(str(data.dtype).encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def enable_gradient_checkpointing(model, family: Family | None = None) -> None:
    """Recompute the language model's activations in backward (non-reentrant, so frozen inputs are fine)."""
    blip2 = _blip2(model)
    attribute(blip2, (family or family_of(blip2)).language_model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
