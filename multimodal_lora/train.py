"""Fine-tune BLIP-2's language model with LoRA.

    python -m multimodal_lora.train RECIPE [key=value ...]
    accelerate launch -m multimodal_lora.train RECIPE [key=value ...]

The run, top to bottom: read and validate the recipe → read the data (before
any weights load, so a bad data set fails in seconds) → load the base and its
processor → add LoRA to the language model's attention → loop → save the
adapter. The loop runs on ``accelerate``: one CPU, one GPU, or many GPUs,
unchanged.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from multimodal_lora.adapter import AdapterMeta, adapter_size_bytes, save_adapter
from multimodal_lora.cli import run_cli, setup_logging
from multimodal_lora.config import Recipe, load_recipe
from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
from multimodal_lora.data.screen import describe_bad, screen_examples
from multimodal_lora.data.sources import load_splits
from multimodal_lora.errors import ConfigError
from multimodal_lora.model import (
    add_lora,
    count_parameters,
    format_parameter_table,
    load_base,
    load_processor,
    text_layout,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    adapter_dir: Path
    adapter_bytes: int
    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    samples_per_second: float


def train(recipe: Recipe) -> TrainResult:
    """Run the recipe and return where the adapter is."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output_dir = prepare_output_dir(Path(recipe.output_dir))
    accelerator = Accelerator(
        cpu=recipe.model.device == "cpu",
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=_mixed_precision(recipe),
    )
    set_seed(recipe.seed)
    if accelerator.is_main_process:
        # The resolved recipe, overrides applied: what this run really was.
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    # Data before weights: a missing file should not cost a model load.
    processor = load_processor(recipe.model.base, recipe.model.revision)
    splits = load_splits(recipe.data)
    # Every image decoded once now, so a bad file stops the run here (or is skipped), never mid-training.
    splits = screen_examples(splits, recipe.data)
    logger.info("data: %s — %d train / %d validation pairs", splits.description, len(splits.train), len(splits.validation))
    if splits.bad:
        logger.warning("%s", describe_bad(splits.bad))

    model, base = load_base(recipe.model)
    layout = text_layout(model, processor.tokenizer)
    model = add_lora(model, recipe.lora)
    logger.info("trainable parameters:\n%s", format_parameter_table(count_parameters(model)))

    encoder = ExampleEncoder(
        processor.tokenizer,
        layout,
        task=recipe.data.task,
        prompt=recipe.data.prompt,
        prompt_template=recipe.data.prompt_template,
        max_length=recipe.data.max_length,
    )
    train_set = PairDataset(splits.train, encoder.encode_all(splits.train), processor.image_processor)
    val_set = PairDataset(splits.validation, encoder.encode_all(splits.validation), processor.image_processor)
    collate = Collator(layout.pad_token_id)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=recipe.train.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=recipe.data.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=recipe.train.batch_size, collate_fn=collate, num_workers=recipe.data.num_workers
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.grad_accum)
    total_steps = recipe.train.max_steps or steps_per_epoch * recipe.train.epochs
    scheduler = _scheduler(recipe, optimizer, total_steps)

    result = fit(recipe, accelerator, model, optimizer, scheduler, train_loader, val_loader, total_steps, steps_per_epoch)

    adapter_dir = output_dir / "adapter"
    if accelerator.is_main_process:
        meta = AdapterMeta(
            base=base, task=recipe.data.task, prompt=recipe.data.prompt, prompt_template=recipe.data.prompt_template
        )
        save_adapter(accelerator.unwrap_model(model), adapter_dir, meta)
        size = adapter_size_bytes(adapter_dir)
        logger.info(
            "adapter saved to %s (%.1f KB) after %d steps in %.1f s (%.1f samples/s); final loss %.4f%s",
            adapter_dir,
            size / 1024,
            result["steps"],
            result["seconds"],
            result["samples_per_second"],
            result["loss"],
            f", validation loss {result['val_loss']:.4f}" if result["val_loss"] is not None else "",
        )
        if splits.bad:
            logger.warning("%s", describe_bad(splits.bad))
    accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=adapter_dir,
        adapter_bytes=adapter_size_bytes(adapter_dir),
        steps=result["steps"],
        final_loss=result["loss"],
        val_loss=result["val_loss"],
        seconds=result["seconds"],
        samples_per_second=result["samples_per_second"],
    )


def fit(recipe, accelerator, model, optimizer, scheduler, train_loader, val_loader, total_steps, steps_per_epoch) -> dict:
    """The optimisation loop: forward, backward, clip, step, until ``total_steps``."""
    from tqdm.auto import tqdm

    cfg = recipe.train
    step, samples, loss_value, val_loss = 0, 0, float("nan"), None
    start = time.perf_counter()
    progress = tqdm(total=total_steps, desc="training", unit="step", disable=not accelerator.is_local_main_process)
    model.train()
    epoch = 0
    while step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            samples += batch["input_ids"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise ConfigError(
                    f"the loss became {loss_value} at step {step}; lower train.lr (now {cfg.lr}) or check the data"
                )
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step >= total_steps:
                break
        epoch += 1
        if len(val_loader) > 0 and (step >= total_steps or step % steps_per_epoch == 0):
            val_loss = evaluate_loss(model, val_loader, accelerator)
            logger.info("epoch %d: validation loss %.4f", epoch, val_loss)
            model.train()
    progress.close()
    seconds = time.perf_counter() - start
    return {
        "steps": step,
        "loss": loss_value,
        "val_loss": val_loss,
        "seconds": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def evaluate_loss(model, loader, accelerator) -> float:
    """Mean loss per target token over a data loader."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in loader:
        loss = model(**batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([loss.detach().float() * tokens, tokens.float()])
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def prepare_output_dir(path: Path) -> Path:
    """Create the output directory, refusing a path that is a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {str(path)!r} is a file; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot create {str(path)!r} ({exc.strerror})") from None
    return path


def _scheduler(recipe: Recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.train.scheduler]
    warmup = int(recipe.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _mixed_precision(recipe: Recipe) -> str:
    # Autocast only on a GPU; on CPU fp32 is both faster and exact.
    if recipe.model.device == "cpu" or not torch.cuda.is_available():
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.model.dtype]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.train",
        description="Fine-tune BLIP-2's language model with LoRA, as a recipe says.",
        epilog="Example: python -m multimodal_lora.train recipes/tiny.yaml output_dir=runs/mine train.epochs=2",
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value, e.g. lora.r=8")
    args = parser.parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
