"""Model cards: the ``README.md`` the hub shows for an adapter repository.

:func:`render_card` writes the card with ``huggingface_hub``'s ``ModelCard`` and
``ModelCardData`` from ``templates/adapter_card.md``: YAML front matter the hub
indexes (``base_model``, ``library_name: peft``, ``pipeline_tag: image-to-text``,
tags, and ``datasets`` when the data came from the hub), then the recipe as run,
the last evaluation's metrics with their scales, the trainable-parameter table
and usage snippets. The trainer passes the text to
:func:`multimodal_lora.adapter.save_adapter`, which writes it in the same
staging directory as the weights, so a card never describes other weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources

import yaml

from multimodal_lora.adapter import AdapterMeta
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.core.metrics import LABELS, SCALES
from multimodal_lora.core.tasks import TASKS
from multimodal_lora.families import tiny_names

TEMPLATE = "adapter_card.md"

# The hub accepts only repository ids in ``base_model``: owner/name, letters, digits, "-", "_", ".".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class CardFacts:
    """What a card says about an adapter beyond its ``multimodal_lora.json``.

    Every field may be empty: a card for an adapter written by hand still renders.
    """

    recipe: dict | None = None
    """The recipe as run (``Recipe.to_dict()``)."""
    metrics: dict | None = None
    """The last evaluation's results (``val_loss``, ``bleu4``, ...)."""
    metrics_step: int | None = None
    """The optimizer step of that evaluation."""
    eval_images: int | None = None
    """How many validation images were captioned for the metrics."""
    parameters: dict | None = None
    """``count_parameters()``: component → (trainable, total)."""
    datasets: tuple[str, ...] = ()
    """Hub data set ids the adapter was trained on."""
    adapter_ref: str = "path/to/adapter"
    """How the usage snippet names the adapter (its directory)."""
    model_class: str = "Blip2ForConditionalGeneration"
    """The ``transformers`` class that loads the base (its family's), for the plain-PEFT snippet."""
    chat_template: bool = False
    """Whether the base is prompted through its chat template (the snippet builds the prompt with it)."""


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing local path: what the hub takes as ``base_model``."""
    return bool(HUB_ID.fullmatch(name)) and not os.path.exists(name)


def render_card(meta: AdapterMeta, facts: CardFacts):
    """The adapter's model card as a ``huggingface_hub.ModelCard``.

    ``base_model`` is the base's hub id; a base loaded from a local directory
    (or the built-in tiny base) is named by its path, with a note in the body
    saying so (the hub accepts only ids: push with ``--base-model`` then).

    Example:
        >>> card = render_card(meta, CardFacts(recipe=recipe.to_dict()))
        >>> card.data.library_name
        'peft'
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = meta.base
    local = not is_hub_id(base.name)
    base_ref = base.name_or_path if local else base.name
    note = None
    if base.name in tiny_names():
        note = (
            f"`{base.name}`, an offline tiny model that multimodal_lora builds from a config (random weights, "
            f"for tests and try-outs), here at `{base.name_or_path}`. It is not on the hub."
        )
    elif local:
        note = f"a local model directory, `{base.name_or_path}`; the hub only links hub ids, so name it with `--base-model` when pushing."
    if base.revision:
        note = (note + " " if note else "") + f"Revision `{base.revision}`."
    task = TASKS[meta.task]
    tags = ["peft", "lora", "blip-2", "multimodal_lora", task.hub_tag]
    data = ModelCardData(
        base_model=base_ref,
        library_name="peft",
        pipeline_tag="image-to-text",
        tags=tags,
        datasets=list(facts.datasets) or None,
        model_name=_model_name(facts),
    )
    recipe = facts.recipe or {}
    targets = recipe.get("lora", {}).get("target_modules")
    # The plain-PEFT snippet must put the text in the prompt the adapter was trained with.
    prompt = task.prompt(question="What colour is the shape?", prefix=meta.prompt, template=meta.prompt_template)
    return ModelCard.from_template(
        data,
        template_str=resources.files("multimodal_lora").joinpath("templates", TEMPLATE).read_text(encoding="utf-8"),
        model_name=data.model_name,
        base_description=f"`{base.name}`" + ("" if local else f" ([hub](https://huggingface.co/{base.name}))"),
        base_note=note,
        base_ref=base_ref,
        task=task,
        task_description=task.purpose,
        target_modules=", ".join(f"`{t}`" for t in targets) if targets else "see `adapter_config.json`",
        parts=list(meta.parts),
        parts_description=_parts_description(meta, targets),
        metrics=_metric_rows(facts.metrics),
        metrics_step=facts.metrics_step,
        eval_images=f"{facts.eval_images} validation images captioned" if facts.eval_images else "validation split",
        parameters=_parameter_rows(facts.parameters),
        recipe=yaml.safe_dump(facts.recipe, sort_keys=False) if facts.recipe else None,
        adapter_ref=facts.adapter_ref,
        prompt_code=repr(prompt),
        model_class=facts.model_class,
        chat_template=facts.chat_template,
    )


def _parts_description(meta: AdapterMeta, targets) -> str:
    """``the language model's attention (`q_proj`, `v_proj`), the language model's MLP (`fc1`, `fc2`) and ...``."""
    from multimodal_lora.families import family_named

    try:
        family = family_named(meta.base.family or "")
    except ConfigError:
        return " and ".join(meta.parts)
    names = {
        "attention": ("the language model's attention", targets or family.default_targets),
        "mlp": ("the language model's MLP", family.mlp_targets),
        "connector": ("the connector", family.connector.modules if family.connector else ()),
    }
    described = [f"{names[p][0]} ({', '.join(f'`{n}`' for n in names[p][1])})" for p in meta.parts]
    return ", ".join(described[:-1]) + (" and " if len(described) > 1 else "") + described[-1]


def _model_name(facts: CardFacts) -> str:
    out = (facts.recipe or {}).get("output_dir")
    name = os.path.basename(os.path.normpath(out)) if out else os.path.basename(os.path.normpath(facts.adapter_ref))
    return f"{name} (LoRA adapter)"


def _metric_rows(metrics: dict | None) -> list[dict]:
    rows = []
    for key, value in (metrics or {}).items():
        if value is None or key not in SCALES:
            continue
        label = "validation loss" if key == "val_loss" else LABELS[key]
        rows.append({"label": label, "value": f"{value:.4f}", "scale": SCALES[key]})
    return rows


def _parameter_rows(parameters: dict | None) -> list[dict]:
    rows = []
    for name, (trainable, total) in (parameters or {}).items():
        share = 100 * trainable / total if total else 0.0
        rows.append({"name": name, "trainable": f"{trainable:,}", "total": f"{total:,}", "share": f"{share:.3f}%"})
    return rows
