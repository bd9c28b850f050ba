"""Recipes: YAML in, typed and validated objects out.

A recipe is read once, here, at the edge: :func:`load_recipe` parses the YAML
with ``yaml.safe_load`` (YAML 1.2 numbers, so ``lr: 1e-4`` is a float), applies
``key=value`` overrides from the command line, checks every field and raises
one :class:`~multimodal_lora.core.errors.ConfigError` listing *all* problems, each
naming its field and what is allowed. After that the rest of the code gets
plain dataclasses and never looks at a dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from multimodal_lora.core.errors import ConfigError
from multimodal_lora.core.quantization import QuantizationName
from multimodal_lora.core.runtime import DtypeName
from multimodal_lora.core.tasks import DEFAULT_VQA_TEMPLATE, TaskName


@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

    base: str = "tiny"
    """A built-in offline twin (``tiny``: BLIP-2 OPT, ``tiny-t5``: BLIP-2 Flan-T5,
    ``tiny-instructblip``: InstructBLIP), a hub id such as ``Salesforce/blip2-opt-2.7b``,
    or a local model directory."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``base``."""
    quantization: QuantizationName = "none"
    """Load the base with bitsandbytes in int8 or 4-bit; ``none`` keeps ``dtype``."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit only: the 4-bit data type (NF4, as in QLoRA, or FP4)."""
    dtype: DtypeName = "fp32"
    """Dtype of the unquantized weights (and compute dtype of 4-bit layers)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    def problems(self) -> list[str]:
        out = []
        if not self.base:
            out.append("model.base: must not be empty; use 'tiny', a hub id or a model directory")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            out.append(f"model.device: {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        return out


@dataclass
class LoraSettings:
    """Where LoRA goes and how big it is."""

    r: int = 16
    """Rank of each adapter matrix pair."""
    alpha: float = 32
    """Scaling numerator: the update is scaled by alpha / r (usually 2 × r)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """Which of the language model's attention projections get adapters. Their names are the
    base's family's (``multimodal_lora.families``; the README's Families table lists them), checked
    against that family before anything loads. ``null``: the family's default."""
    parts: list[Literal["attention", "mlp", "connector"]] = field(default_factory=lambda: ["attention"])
    """Which parts of the model LoRA trains: ``attention`` (the language model's attention
    projections, narrowed by ``target_modules``), ``mlp`` (every linear of the language model's
    MLP blocks), ``connector`` (what joins the image to the language model: BLIP-2's and
    InstructBLIP's Q-Former linears and ``language_projection``). Checked against the base's
    family before anything loads. Training the connector turns the frozen-feature cache off."""

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"lora.r: must be a positive integer (got {self.r}); 8 or 16 is typical")
        if self.alpha <= 0:
            out.append(f"lora.alpha: must be positive (got {self.alpha}); usually 2 × r")
        if not 0 <= self.dropout < 1:
            out.append(f"lora.dropout: must be in [0, 1) (got {self.dropout})")
        if not self.parts:
            out.append("lora.parts: name at least one part; choose from attention, mlp, connector")
        if len(set(self.parts)) != len(self.parts):
            out.append("lora.parts: lists a part twice")
        if self.target_modules is not None and self.parts and "attention" not in self.parts:
            out.append(
                "lora.target_modules: chooses attention projections, but lora.parts has no attention; "
                "add attention to lora.parts or drop target_modules"
            )
        return out

    def target_problems(self, base: str, revision: str | None) -> list[str]:
        """``target_modules`` checked against the family of ``base``, when that is known without a download.

        Tiny twins, shipped hub ids and local model directories are checked here, before
        anything loads; another hub id is checked when its config is fetched, still before
        its weights load.
        """
        from multimodal_lora.families import family_for_config, published_family, tiny_family

        family = tiny_family(base) or published_family(base)
        if family is None and (Path(base) / "config.json").is_file():
            from transformers import AutoConfig

            try:
                family = family_for_config(AutoConfig.from_pretrained(base, revision=revision))
            except (OSError, ValueError, ConfigError) as exc:
                return [f"model.base: {base!r} has no readable model config ({exc})"]
        if family is None:
            return []
        problems = family.target_problems(self.target_modules)
        problems = [p + _closest_hint(p, self.target_modules, family.lora_targets) for p in problems]
        return problems + _mlp_hint(family, self.target_modules) + family.part_problems(self.parts)


DATA_SOURCES = ("auto", "builtin", "imagefolder", "manifest", "coco", "saved", "hub")


@dataclass
class DataConfig:
    """Where the image–text pairs come from, how they are split, and how they become tokens."""

    path: str = "shapes"
    """A built-in data set (``shapes``, ``shapes-vqa``), a local imagefolder
    directory, a JSONL/CSV manifest, a COCO captions JSON, a directory written
    by ``datasets.save_to_disk``, or a hub data set id (``owner/name``)."""
    source: Literal["auto", "builtin", "imagefolder", "manifest", "coco", "saved", "hub"] = "auto"
    """How to read ``path``; ``auto`` decides from what ``path`` is (see the README's Data section)."""
    revision: str | None = None
    """Hub revision of a hub data set."""
    image_dir: str | None = None
    """Manifest and COCO: the directory image paths are relative to (default: the file's own directory)."""
    val_path: str | None = None
    """Manifest and COCO: a second file of the same kind holding the validation examples."""
    train_split: str = "train"
    val_split: str | None = "validation"
    """The source's validation split; when the source has none (or this is ``null``),
    ``val_fraction`` of the images are held out instead."""
    val_fraction: float = 0.1
    """Fraction of the *images* held out for validation when the source has no validation split
    (0 holds out nothing). Chosen by ``split_seed``, so the same recipe always holds out the same images."""
    split_seed: int = 0
    """Seed of that hold-out; separate from the training seed so that changing one keeps the other."""
    image_column: str = "image"
    """Column with the image (hub, saved data sets, manifests); imagefolders use ``file_name``."""
    text_column: str = "text"
    """Column with the caption (task ``caption``); a list of captions gives one pair per caption."""
    question_column: str = "question"
    """Column with the question (task ``vqa``)."""
    answer_column: str = "answer"
    """Column with the answer (task ``vqa``)."""
    task: TaskName = "caption"
    prompt: str | None = None
    """Caption task: optional text before the caption (not trained on)."""
    prompt_template: str = DEFAULT_VQA_TEMPLATE
    """VQA task: how the question is put to the model (not trained on)."""
    max_length: int = 32
    """Most text tokens per example (prompt + target + stop token); longer targets are truncated."""
    on_bad_example: Literal["error", "skip"] = "error"
    """An unreadable image or an empty caption: ``error`` stops before training, naming it;
    ``skip`` leaves it out and reports how many were skipped and why."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes that decode and resize images. ``auto``: none when the
    image features are cached (there is nothing to decode), else one per spare CPU core, at most 4."""

    def problems(self) -> list[str]:
        out = []
        if not self.path:
            out.append("data.path: must not be empty; use shapes, a local path or a hub data set id")
        if self.max_length < 4:
            out.append(f"data.max_length: must be at least 4 tokens (got {self.max_length})")
        if self.num_workers != "auto" and self.num_workers < 0:
            out.append(f"data.num_workers: must be 0 or more (got {self.num_workers})")
        if not 0 <= self.val_fraction < 1:
            out.append(f"data.val_fraction: must be in [0, 1) (got {self.val_fraction}); 0.1 holds out a tenth of the images")
        if self.task == "vqa" and "{question}" not in self.prompt_template:
            out.append("data.prompt_template: must contain {question} for task vqa")
        if self.task == "vqa":
            try:
                self.prompt_template.format(question="q")
            except (KeyError, IndexError, ValueError) as exc:
                out.append(f"data.prompt_template: only {{question}} may appear in braces ({type(exc).__name__}: {exc}); write {{{{ }}}} for a literal brace")
        columns = {"text_column": self.text_column} if self.task == "caption" else {"question_column": self.question_column, "answer_column": self.answer_column}
        for name, value in columns.items():
            if value == self.image_column:
                out.append(f"data.{name}: must differ from data.image_column ({value!r})")
        if self.task == "vqa" and self.question_column == self.answer_column:
            out.append("data.answer_column: must differ from data.question_column")
        if self.val_path is not None and self.source not in ("auto", "manifest", "coco"):
            out.append(f"data.val_path: only manifest and coco sources take a separate validation file (source is {self.source})")
        return out


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 3
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs`` when set)."""
    batch_size: int = 16
    grad_accum: int = 1
    """Micro-batches per optimizer step: effective batch = batch_size × grad_accum × processes."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up from 0."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; ``null`` disables clipping."""
    log_every: int = 10
    """Optimizer steps between log lines (and lines of ``metrics.jsonl``)."""
    checkpoint_every: int | None = None
    """Optimizer steps between checkpoints; one is also written at the end of each epoch."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (older ones are deleted)."""
    gradient_checkpointing: bool = False
    """Recompute the language model's activations in the backward pass: less memory, ~30% slower."""
    cache_image_features: bool | Literal["auto"] = "auto"
    """Compute the frozen vision encoder + Q-Former + projection once per image and train from
    that cache (memory-mapped under the cache directory) instead of on every step. ``auto``: on
    when the run sees its images more than once (more than one epoch), since building the cache
    costs about one epoch's image path; the choice is logged."""
    eval_every: int | None = None
    """Optimizer steps between validations, for long epochs; ``null``: at each epoch's end only.
    The run's last step is always validated."""
    plot_every_seconds: float = 60.0
    """``loss.png`` is redrawn after a validation at most this often (and always at the end)."""
    eval_captions: bool = True
    """At the end of each epoch, caption the validation images and compute BLEU-4, CIDEr-D, ROUGE-L,
    METEOR (when java is installed) and exact match against all their references."""
    eval_max_images: int | None = 64
    """Caption at most this many validation images per evaluation (``null``: all of them)."""
    eval_max_new_tokens: int = 30
    """The longest caption generated during evaluation, in tokens."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | Literal["all", "none"] = field(default_factory=list)
    """Experiment trackers that get the scalars of ``metrics.jsonl`` and the recipe, through accelerate:
    a list of ``tensorboard``, ``wandb``, ``mlflow``, or ``all`` (those installed). Each is an extra:
    ``pip install 'multimodal-lora[wandb]'``."""

    def problems(self) -> list[str]:
        out = []
        if self.epochs < 1:
            out.append(f"train.epochs: must be at least 1 (got {self.epochs})")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"train.max_steps: must be at least 1 or null (got {self.max_steps})")
        if self.batch_size < 1:
            out.append(f"train.batch_size: must be at least 1 (got {self.batch_size})")
        if self.grad_accum < 1:
            out.append(f"train.grad_accum: must be at least 1 (got {self.grad_accum})")
        if not 0 < self.lr < 1:
            out.append(f"train.lr: must be in (0, 1) (got {self.lr}); 1e-4 to 3e-3 is typical for LoRA")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay: must be 0 or more (got {self.weight_decay})")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"train.warmup_ratio: must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            out.append(f"train.max_grad_norm: must be positive or null (got {self.max_grad_norm})")
        if self.log_every < 1:
            out.append(f"train.log_every: must be at least 1 (got {self.log_every})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            out.append(f"train.checkpoint_every: must be at least 1 or null (got {self.checkpoint_every})")
        if self.keep_checkpoints < 1:
            out.append(f"train.keep_checkpoints: must be at least 1 (got {self.keep_checkpoints}); resume needs one")
        if self.eval_every is not None and self.eval_every < 1:
            out.append(f"train.eval_every: must be at least 1 or null (got {self.eval_every})")
        if self.plot_every_seconds < 0:
            out.append(f"train.plot_every_seconds: must be 0 or more (got {self.plot_every_seconds})")
        if self.eval_max_images is not None and self.eval_max_images < 1:
            out.append(f"train.eval_max_images: must be at least 1 or null (got {self.eval_max_images})")
        if self.eval_max_new_tokens < 1:
            out.append(f"train.eval_max_new_tokens: must be at least 1 (got {self.eval_max_new_tokens})")
        if isinstance(self.report_to, list) and len(set(self.report_to)) != len(self.report_to):
            out.append("train.report_to: lists a tracker twice")
        return out


@dataclass
class Recipe:
    """A whole training recipe."""

    output_dir: str = "runs/default"
    """Where the run writes its adapter and logs."""
    seed: int = 0
    resume: bool | str = False
    """``true``: continue from the newest complete checkpoint in ``output_dir``;
    a path: continue from that checkpoint directory; ``false``: start afresh."""
    overwrite: bool = False
    """``true``: a fresh run into an ``output_dir`` that holds another run's checkpoints or
    adapter deletes them first. Without it (and without ``resume``) such a run stops before
    loading anything: two runs never mix in one directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str | None = None
    """The recipe file this was read from (set by :func:`load_recipe`)."""
    overrides: list[str] = field(default_factory=list)
    """The ``key=value`` overrides it was read with (set by :func:`load_recipe`), to repeat them in hints."""

    def problems(self) -> list[str]:
        out = []
        for section in (self.model, self.lora, self.data, self.train):
            out.extend(section.problems())
        if self.model.base:
            out.extend(self.lora.target_problems(self.model.base, self.model.revision))
        if self.train.cache_image_features is True and "connector" in self.lora.parts:
            out.append(
                "train.cache_image_features: true caches the frozen image path's output, but lora.parts trains the "
                "connector, whose output changes every step; set it to auto (turns itself off) or false"
            )
        if self.overwrite and self.resume is not False:
            out.append("overwrite: true deletes the run that resume would continue; set only one of them")
        if not str(self.output_dir).strip():
            out.append("output_dir: must not be empty; e.g. runs/mine")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out.pop("overrides")
        # Not saved in OUTPUT_DIR/recipe.yaml: re-running that file must never delete the run it describes.
        out.pop("overwrite")
        return out


SECTIONS = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "train": TrainConfig}


# --- YAML -----------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats: ``1e-4`` is a float, not a string."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML safely; tags such as ``!!python/object`` are refused, never run."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{where}: refused to load: {exc.problem} {exc.problem_mark or ''}".rstrip()
            + ". Recipes are plain YAML; Python object tags are never executed."
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None


# --- loading and validation ------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply ``key=value`` overrides, and validate everything.

    Args:
        path: the YAML recipe.
        overrides: strings such as ``output_dir=runs/x``, ``lora.r=8`` or, for a
            key that only one section has, ``lr=1e-4``.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        ConfigError: naming every unknown key, wrong type or bad value at once.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ConfigError(f"recipe {str(path)!r} does not exist{hint}; pass the path of a YAML recipe, e.g. recipes/tiny.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text") from None
    raw = parse_yaml(text, str(path))
    if raw is None or raw == {}:
        # An empty file (or only comments) is a mistake, not a request for every default.
        raise ConfigError(
            f"recipe {str(path)!r} is empty; a recipe needs at least output_dir and the model, lora, data and "
            "train sections you mean to set (start from recipes/tiny.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values, not a {type(raw).__name__}")
    problems: list[str] = []
    for item in overrides:
        apply_override(raw, item, problems)
    recipe = recipe_from_dict(raw, problems)
    if recipe is not None:
        recipe.source = str(path)
        recipe.overrides = list(overrides)
        problems.extend(recipe.problems())
    if problems:
        raise ConfigError(f"{path}: invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))
    return recipe


def apply_override(raw: dict, item: str, problems: list[str]) -> None:
    """Apply one ``key=value`` override to the raw recipe mapping."""
    if "=" not in item:
        problems.append(f"override {item!r}: write it as key=value, e.g. train.lr=1e-4")
        return
    key, _, value_text = item.partition("=")
    key = key.strip()
    value = parse_yaml(value_text, f"override {item!r}") if value_text.strip() else None
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in _top_level_fields():
        owners = [name for name, cls in SECTIONS.items() if parts[0] in _field_names(cls)]
        if len(owners) == 1:
            parts = [owners[0], parts[0]]
        elif len(owners) > 1:
            problems.append(f"override {key!r}: several sections have it; write one of " + ", ".join(f"{o}.{key}" for o in owners))
            return
    if len(parts) > 2:
        problems.append(f"override {key!r}: keys are key or section.key")
        return
    target = raw
    if len(parts) == 2:
        section = target.get(parts[0])
        if section is None:
            section = target[parts[0]] = {}
        if not isinstance(section, dict):
            problems.append(f"override {key!r}: {parts[0]} is not a section")
            return
        target = section
    target[parts[-1]] = value


def recipe_from_dict(raw: dict, problems: list[str]) -> Recipe | None:
    """Build a :class:`Recipe` from a mapping, appending every problem found."""
    kwargs: dict[str, Any] = {}
    top = _top_level_fields()
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a section (a mapping), got {_describe(value)}")
                continue
            kwargs[key] = _build_section(SECTIONS[key], value, key, problems)
        elif key in top:
            checked = _check_type(value, _hints(Recipe)[key], key, problems)
            if checked is not _INVALID:
                kwargs[key] = checked
        else:
            valid = list(top) + list(SECTIONS)
            problems.append(f"{key}: unknown key{_closest(str(key), valid)}; valid keys: {', '.join(valid)}")
    if problems:
        # Build what we can so that range checks still run, but do not fail on bad types.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return Recipe(**kwargs)
    except TypeError:
        return None


_INVALID = object()


def _build_section(cls, values: dict, prefix: str, problems: list[str]):
    names = _field_names(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            problems.append(
                f"{prefix}.{key}: unknown key{_closest(str(key), names, prefix + '.')}; "
                f"valid keys in {prefix}: {', '.join(names)}"
            )
            continue
        checked = _check_type(value, hints[key], f"{prefix}.{key}", problems)
        if checked is not _INVALID:
            kwargs[key] = checked
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, name: str, problems: list[str]) -> Any:
    """Return ``value`` (coerced int → float where a float is asked) or ``_INVALID``."""
    ok, coerced = _matches(value, hint)
    if ok:
        return coerced
    problems.append(f"{name}: expected {_describe_hint(hint)}, got {_describe(value)}")
    return _INVALID


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, coerced = _matches(value, arg)
            if ok:
                return True, coerced
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is Literal:
        return value in args and isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list):
            return False, None
        items = [_matches(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [c for _, c in items]
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported recipe field type {hint!r}")


def _describe_hint(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_hint(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(args)
    if origin is list and typing.get_origin(args[0]) is Literal:
        return "a list drawn from " + ", ".join(typing.get_args(args[0]))
    if origin is list:
        return f"a list of {_describe_hint(args[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


# Names people bring from other tools (PEFT, transformers' Trainer) for our keys.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "model_name_or_path": "base",
}


def _closest(name: str, valid, prefix: str = "") -> str:
    valid = list(valid)
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if not match and _ALIASES.get(name) in valid:
        match = [_ALIASES[name]]
    if not match:
        # Short keys (``r``) are too short for difflib's ratio: "rnak" still begins with "r".
        match = [v for v in valid if name.startswith(v) or v.startswith(name)][:1]
    return f" (did you mean {prefix}{match[0]}?)" if match else ""


def _closest_hint(problem: str, names, valid) -> str:
    """For a "has no 'x'" problem, the closest valid name, if one is close."""
    for name in names or ():
        if f"no {name!r}" in problem:
            hint = _closest(name, valid)
            return f" {hint.strip()}" if hint else ""
    return ""


def _mlp_hint(family, targets) -> list[str]:
    """An MLP linear named as an attention projection: say how to train the MLP instead."""
    named = [t for t in targets or () if t in family.mlp_targets]
    if not named:
        return []
    return [f"lora.target_modules: {', '.join(named)} belong to the MLP; to train it, add mlp to lora.parts"]


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _top_level_fields() -> list[str]:
    return [name for name in _field_names(Recipe) if name not in SECTIONS and name not in ("source", "overrides")]


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)
