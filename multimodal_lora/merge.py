"""Fold an adapter into its base and write a standalone model directory.

    python -m multimodal_lora.merge --adapter runs/tiny/adapter --out merged/tiny

The result is an ordinary ``transformers`` model directory (safetensors weights,
config, generation config, processor): the family's class
(``Blip2ForConditionalGeneration``, ``InstructBlipForConditionalGeneration``) ``.from_pretrained(OUT)``
loads it with neither PEFT nor this package, and it captions exactly as the base
with the adapter does.

Merging needs full-precision base weights. An int8 or 4-bit base stores rounded
weights; adding the LoRA update to them means dequantizing, adding, and
(to stay quantized) rounding again, which changes the model. So a merge into a
quantized base is refused unless the user asks for ``--dequantize``: then the
base is loaded unquantized (``--dtype``) and the adapter is merged into that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from multimodal_lora.adapter import attach, base_for, check_base_matches, check_fits, open_adapter
from multimodal_lora.config import ModelConfig
from multimodal_lora.core.atomic import atomic_dir
from multimodal_lora.core.errors import UserError
from multimodal_lora.core.quantization import scheme

logger = logging.getLogger(__name__)

MERGE_RECORD = "merged_from.json"


class MergeError(UserError):
    """A merge that cannot (or should not) be done as asked."""


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    quantization: str | None = None,
    dequantize: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter`` into its base and save the result to ``out``.

    Args:
        adapter: an adapter directory written by the trainer (or its run directory).
        out: where to write the merged model; written to a temporary directory
            beside it and renamed into place, so it is there whole or not at all.
        base: the base to merge into; defaults to the one the adapter records.
        dtype: dtype of the merged weights (``fp32``, ``bf16``, ``fp16``); defaults to
            the dtype the adapter's base was trained in (as recorded), else ``fp32``.
        device: where to do the merge (``cpu`` needs RAM for the whole base in ``dtype``;
            not the recorded device: merging needs the unquantized base, more than training held).
        quantization: how the adapter's base was loaded for training; defaults to
            what the adapter records, else what the run's saved ``recipe.yaml`` says, else ``none``.
        dequantize: merge into the unquantized base even though the adapter was
            trained on an int8/4-bit one.
        overwrite: replace ``out`` if it exists.

    Returns:
        The merged model directory.

    Raises:
        MergeError: the base is quantized and ``dequantize`` is not set, or
            ``out`` exists and ``overwrite`` is not set.
        AdapterError: the adapter is incomplete or belongs to another base.

    Example:
        >>> merge_adapter("runs/tiny/adapter", "merged/tiny")
        PosixPath('merged/tiny')
    """
    opened = open_adapter(adapter)
    directory, meta = opened.directory, opened.meta
    out = Path(out)
    quantization, dtype = _trained_as(opened, quantization, dtype, dequantize)
    _check_out(out, directory, overwrite)

    # The base the adapter belongs to, loaded unquantized in the merge's dtype on the merge's device.
    choice = base_for([opened], base, quantization="none", dtype=dtype, device=device)
    load = choice.settings
    cfg = ModelConfig(base=choice.name, revision=choice.revision, device=load.device, dtype=load.dtype, quantization=load.quantization)
    problems = cfg.problems()
    if problems:
        raise MergeError("; ".join(problems))

    from multimodal_lora.model.base import LoadedBase

    loaded = LoadedBase.load(cfg, for_training=False)
    info = loaded.info
    check_base_matches(directory, meta, info)
    check_fits(opened, loaded.model, loaded.family)
    model = attach(loaded.model, opened)
    # safe_merge: check the merged weights for NaNs before replacing the originals.
    model = model.merge_and_unload(safe_merge=True)
    model.eval()

    record = {
        "adapter": str(directory.resolve()),
        "base": asdict(info),
        "model_class": model.__class__.__name__,
        "dtype": dtype,
        "trained_quantization": quantization,
        "task": meta.task if meta else None,
        "prompt": meta.prompt if meta else None,
        "prompt_template": meta.prompt_template if meta else None,
    }
    _save(out, model, loaded.processor, record)
    logger.info("merged model written to %s", out)
    return out


def _trained_as(opened, quantization: str | None, dtype: str | None, dequantize: bool) -> tuple[str, str]:
    """``(quantization the base was trained in, dtype to merge in)``: given, else recorded; refused when the
    scheme's weights cannot take the update exactly (:attr:`~multimodal_lora.core.quantization.Scheme.mergeable`)
    unless ``dequantize``."""
    directory, meta = opened.directory, opened.meta
    recorded = meta.load if meta is not None else None
    if quantization is None:
        quantization = recorded.quantization if recorded is not None else _trained_quantization(directory)
    if dtype is None:
        dtype = recorded.dtype if recorded is not None else "fp32"
    try:
        trained = scheme(quantization)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    if not trained.mergeable and not dequantize:
        raise MergeError(
            f"adapter {str(directory)!r} was trained on a base quantized to {quantization}. Its weights are rounded to "
            f"{quantization}, and merging would add the LoRA update to them and round again, so the merged "
            "model would not caption like base + adapter. Pass --dequantize (dequantize=True) to merge into "
            f"the full-precision base instead (in --dtype, now {dtype}), or keep using the adapter unmerged."
        )
    return quantization, dtype


def _check_out(out: Path, directory: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    if out.resolve() == directory.resolve() or directory.resolve() in out.resolve().parents:
        raise MergeError(f"--out {out} is inside the adapter directory; write the merged model elsewhere")


def _save(out: Path, model, processor, record: dict) -> None:
    """The merged model, its processor and :data:`MERGE_RECORD`, all in ``out`` or none of them."""
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with atomic_dir(out, "the merged model", needed=needed) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _trained_quantization(directory: Path) -> str:
    """The quantization the run that wrote this adapter used, from its saved recipe (adapters without a record)."""
    recipe_path = directory.parent / "recipe.yaml"
    if not recipe_path.is_file():
        return "none"
    from multimodal_lora.config import load_recipe

    return load_recipe(recipe_path).model.quantization


if __name__ == "__main__":  # python -m multimodal_lora.merge
    from multimodal_lora.commands.merge import cli

    cli()
