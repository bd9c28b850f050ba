"""Is the adapter better than the base? Validation loss and captioning metrics, side by side.

    python -m multimodal_lora.evaluate RECIPE --adapter DIR [key=value ...]

Captions every validation image (at most ``--max-images``) with the bare base
and with the adapter, scores both against *all* references of each image
(validation rows are grouped by ``image_id``), and writes ``report.md`` and
``report.html`` with the metrics table and, for a sample of images, a
thumbnail, the references, the base caption and the adapter caption.

The same functions evaluate the model being trained at the end of each epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from multimodal_lora.core.errors import UserError
from multimodal_lora.core.metrics import caption_metrics, meteor_available
from multimodal_lora.core.tasks import TASKS
from multimodal_lora.data.sources import Example
from multimodal_lora.data.sources import group_references as data_group_references
from multimodal_lora.evaluate.report import write_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageReferences:
    """One validation image (with its question, for VQA) and every reference for it."""

    image_id: str
    image: str | bytes
    references: list[str]
    question: str | None = None


def group_references(examples: list[Example]) -> list[ImageReferences]:
    """Group validation rows by image (and question): several captions of one image are its references."""
    return [
        ImageReferences(first.image_id, first.image, references, first.question)
        for first, references in data_group_references(examples)
    ]


def generate(captioner, adapter: str | None, groups: list[ImageReferences], task: str, max_new_tokens: int) -> list[str]:
    """Caption (or answer) each group's image with ``adapter`` (``None``: the bare base)."""
    images = [g.image for g in groups]
    if TASKS[task].asks:
        return captioner.ask(images, [g.question for g in groups], adapter=adapter, max_new_tokens=max_new_tokens)
    return captioner.caption(images, adapter=adapter, max_new_tokens=max_new_tokens)


def score(predictions: list[str], groups: list[ImageReferences], *, meteor: bool) -> dict[str, float | None]:
    """Captioning metrics of ``predictions`` against each group's references."""
    return caption_metrics(predictions, [g.references for g in groups], meteor=meteor)


@torch.no_grad()
def token_loss_sums(model, loader, device: torch.device, layout=None) -> torch.Tensor:
    """``[sum of per-token losses, number of target tokens]`` over a loader (reduce across processes, then divide).

    With the family's ``layout``, logits are computed only where the loss reads them (see ``for_loss``).
    """
    from multimodal_lora.data.feature_cache import forward_inputs

    total = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in loader:
        batch, keep = layout.for_loss(batch) if layout is not None else (batch, None)
        extra = {"logits_to_keep": keep} if keep else {}
        inputs = forward_inputs(batch, device, layout.image_inputs) if layout is not None else forward_inputs(batch, device)
        loss = model(**inputs, use_cache=False, **extra).loss
        # The model's loss is the mean over the learned labels (a decoder-only model shifts them by
        # one, but its first label is always an image placeholder's -100, so the count is the same).
        tokens = (batch["labels"] != -100).sum().to(device)
        total += torch.stack([loss.detach().double() * tokens, tokens.double()])
    return total


def evaluate(
    recipe,
    adapter: str | Path,
    out: Path | None = None,
    *,
    max_images: int | None = None,
    samples: int = 8,
    meteor: bool = True,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> tuple[Path, dict[str, dict]]:
    """Evaluate the base and ``adapter`` on the recipe's validation split and write the report.

    The base is loaded the way the adapter was trained (its recorded
    quantization, dtype and device kind; the recipe's ``model`` section for an
    adapter that records none), unless ``quantization``, ``dtype`` or ``device`` say otherwise.

    Returns:
        ``(report directory, {"base": metrics, "adapter": metrics})``.

    Raises:
        UserError: the data has no validation split, or the adapter cannot be used with the base.
    """
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.inference.captioner import Captioner

    opened = _check_adapter_and_lengths(recipe, adapter)
    adapter_dir, meta = opened.directory, opened.meta
    splits = load_splits(recipe.data)
    if not splits.validation:
        raise UserError(f"data.path {recipe.data.path!r} has no validation split ({recipe.data.val_split}); nothing to evaluate on")
    out = Path(out) if out is not None else adapter_dir.parent / "eval"
    cfg = recipe.model
    if meta is None or meta.load is None:
        # Written before load settings were recorded: the recipe says how, as it always did.
        quantization, dtype, device = quantization or cfg.quantization, dtype or cfg.dtype, device or cfg.device
    captioner = Captioner.for_adapter(
        opened, name="adapter", base=cfg.base, quantization=quantization, dtype=dtype, device=device
    )
    groups = group_references(splits.validation)[:max_images]
    # The loss is measured on the same images as the captions: every reference of each.
    chosen = {g.image_id for g in groups}
    rows = [e for e in splits.validation if e.image_id in chosen]
    loader = _loss_loader(captioner, recipe, rows)
    use_meteor = meteor and meteor_available()
    table, captions = _base_and_adapter(captioner, "adapter", loader, groups, recipe, use_meteor)

    notes = [f"{len(groups)} validation images ({len(rows)} references) from {splits.description}; adapter {adapter_dir}"]
    if not use_meteor:
        notes.append("METEOR not computed: " + ("java is not on the PATH (METEOR 1.5 is a Java program)" if meteor else "--no-meteor"))
    notes.append("Outputs are lower-cased and stripped of punctuation before scoring. The base column is the base model with no adapter.")
    sample_rows = [
        {
            "image_id": g.image_id,
            "image": g.image,
            "references": g.references,
            "question": g.question,
            "base": captions["base"][i],
            "adapter": captions["adapter"][i],
        }
        for i, g in enumerate(groups[:samples])
    ]
    task = TASKS[recipe.data.task].description
    subtitle = f"Base {cfg.base} alone against base + adapter, {task}, on {len(groups)} validation images of {recipe.data.path}."
    write_report(out, f"Evaluation of {adapter_dir.parent.name if adapter_dir.name == 'adapter' else adapter_dir.name}", table, sample_rows, notes, subtitle=subtitle)
    return out, table


def _check_adapter_and_lengths(recipe, adapter: str | Path):
    """The opened adapter, once its task is the recipe's and the recipe's lengths fit the base (before any weights load)."""
    from multimodal_lora.adapter import open_adapter
    from multimodal_lora.data.check import recipe_length_problems
    from multimodal_lora.model.base import Positions, base_family, load_processor

    opened = open_adapter(adapter)  # read once: for_adapter takes this value
    adapter_dir, meta = opened.directory, opened.meta
    if meta is not None and meta.task != recipe.data.task:
        raise UserError(
            f"adapter {adapter_dir} was trained for task {meta.task!r}, but the recipe's data.task is "
            f"{recipe.data.task!r}: its scores would be meaningless. Evaluate it with the recipe it was trained with "
            f"({adapter_dir.parent / 'recipe.yaml'} when it is there)"
        )
    base, revision = recipe.model.base, recipe.model.revision
    family = base_family(base, revision)  # from the name, before weights; the loaded captioner carries its own
    processor = load_processor(base, revision, family=family)
    positions = Positions.of_base(base, revision, family, getattr(processor, "image_processor", None))
    lengths = recipe_length_problems(recipe, processor.tokenizer, positions)
    if lengths:
        raise UserError("lengths the base cannot hold: " + "; ".join(lengths))
    return opened


def _loss_loader(captioner, recipe, rows: list[Example]):
    """Batches of ``rows`` encoded as training encodes them, for the validation loss."""
    from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset

    encoder = ExampleEncoder(
        captioner.processor.tokenizer,
        captioner.layout,
        task=recipe.data.task,
        prompt=recipe.data.prompt,
        prompt_template=recipe.data.prompt_template,
        max_length=recipe.data.max_length,
    )
    layout = captioner.layout
    val_set = PairDataset(rows, encoder.encode_all(rows), captioner.processor.image_processor, layout)
    return torch.utils.data.DataLoader(val_set, batch_size=recipe.train.batch_size, collate_fn=Collator.of(layout))


def _base_and_adapter(captioner, name: str, loader, groups: list[ImageReferences], recipe, use_meteor: bool):
    """``(table, captions)``: the validation loss, the outputs and their metrics of the bare base, then of adapter ``name``."""
    table, captions = {}, {}
    for column, adapter_name in (("base", None), ("adapter", name)):
        if adapter_name is not None:
            # One adapter serves every image from here on: merged, it costs nothing per token (never on int8/4-bit).
            captioner.merge(adapter_name)
        with captioner.using(adapter_name):
            sums = token_loss_sums(captioner.model, loader, captioner.device, captioner.layout)
        captions[column] = generate(captioner, adapter_name, groups, recipe.data.task, recipe.train.eval_max_new_tokens)
        table[column] = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item(), **score(captions[column], groups, meteor=use_meteor)}
        logger.info("%s: %s", column, _format(table[column]))
    return table, captions


def _format(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)

