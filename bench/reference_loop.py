"""The usual way people fine-tune BLIP-2 with LoRA, re-implemented faithfully, to measure against.

This reproduces the training loop of PEFT's public BLIP-2 int8 LoRA example,
``huggingface/peft`` ``examples/int8_training/fine_tune_blip2_int8.py`` (the
script most BLIP-2 LoRA tutorials copy), step for step:

* ``ImageCaptioningDataset.__getitem__`` calls the **processor per item**
  (``processor(images=item["image"], padding="max_length", return_tensors="pt")``)
  and squeezes the batch dimension away; the caption travels as a string.
* The collator stacks the pixel values and **tokenizes the captions of each
  batch** with ``processor.tokenizer(texts, padding=True)``.
* The step is ``model(input_ids=input_ids, pixel_values=pixel_values,
  labels=input_ids)``: **labels are the input ids, padding included**, and
  **no attention mask** is passed (the collator builds one; the loop drops it).
* ``torch.optim.AdamW(model.parameters(), lr)`` over all parameters.
* ``loss.item()`` every step (the example prints it), and **``model.generate(
  pixel_values=pixel_values)`` every 10 steps** (``if idx % 10 == 0``), decoded
  with ``processor.batch_decode``.

One adaptation to today's transformers, without which the example no longer
trains on the image at all: BLIP-2 now places the Q-Former's outputs at
``<image>`` placeholder tokens in ``input_ids`` (the processor inserts them
when it is given text). The collator therefore puts ``num_query_tokens``
placeholders before the tokenized captions, and ``labels=input_ids`` is then,
as with today's processor, the whole sequence: placeholders, captions and
padding. (Labels of the captions alone no longer work: transformers 5 slices
the logits to the labels' length and fails on the non-contiguous view.)

The model (base, dtype, LoRA) is built by the caller, so that the reference
and multimodal_lora train the same model on the same data; only the loop differs.
"""

from __future__ import annotations

import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class ImageCaptioningDataset(Dataset):
    """Rows of ``{"image": path, "text": caption}``; the processor runs per item, as in the example."""

    def __init__(self, rows: list[dict], processor):
        self.rows = rows
        self.processor = processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict:
        item = self.rows[idx]
        # The example's datasets.Dataset decodes the image on every access; so do we.
        image = Image.open(item["image"]).convert("RGB")
        encoding = self.processor(images=image, padding="max_length", return_tensors="pt")
        # remove batch dimension
        encoding = {k: v.squeeze() for k, v in encoding.items()}
        encoding["text"] = item["text"]
        return encoding


def make_collator(processor, image_token_id: int, num_query_tokens: int):
    """The example's collator (plus the ``<image>`` placeholders today's BLIP-2 needs)."""

    def collator(batch: list[dict]) -> dict:
        processed_batch = {}
        for key in batch[0].keys():
            if key != "text":
                processed_batch[key] = torch.stack([example[key] for example in batch])
            else:
                text_inputs = processor.tokenizer([example["text"] for example in batch], padding=True, return_tensors="pt")
                processed_batch["input_ids"] = text_inputs["input_ids"]
                processed_batch["attention_mask"] = text_inputs["attention_mask"]
        processed_batch["image_tokens"] = torch.full((len(batch), num_query_tokens), image_token_id)
        return processed_batch

    return collator


def reference_train(
    model, processor, rows: list[dict], *, batch_size: int, lr: float, max_steps: int, seed: int = 0, generate_every: int | None = 10
) -> dict:
    """Train ``model`` (a PEFT model) the example's way for ``max_steps`` batches.

    ``generate_every=None`` leaves out the example's ``generate`` calls, to show what they cost.

    Returns:
        ``{"steps", "samples", "seconds", "samples_per_second", "loss", "generations"}``;
        the time covers the loop (data loading, steps, generations), not model loading.
    """
    config = model.config
    loader = DataLoader(
        ImageCaptioningDataset(rows, processor),
        shuffle=True,
        batch_size=batch_size,
        collate_fn=make_collator(processor, int(config.image_token_index), int(config.num_query_tokens)),
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    device = next(p for p in model.parameters() if p.requires_grad).device
    dtype = model.get_input_embeddings().weight.dtype
    model.train()
    steps, samples, generations, loss_value = 0, 0, 0, float("nan")
    start = time.perf_counter()
    while steps < max_steps:
        for idx, batch in enumerate(loader):
            text_ids = batch.pop("input_ids").to(device)
            input_ids = torch.cat([batch.pop("image_tokens").to(device), text_ids], dim=1)
            pixel_values = batch.pop("pixel_values").to(device, dtype if dtype.is_floating_point else torch.float32)

            outputs = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
            loss = outputs.loss
            loss_value = loss.item()  # the example prints it every step
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

            if generate_every is not None and idx % generate_every == 0:
                generated_output = model.generate(pixel_values=pixel_values)
                processor.batch_decode(generated_output, skip_special_tokens=True)
                generations += 1
            steps += 1
            samples += text_ids.shape[0]
            if steps >= max_steps:
                break
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "samples": samples,
        "seconds": seconds,
        "samples_per_second": samples / seconds,
        "loss": loss_value,
        "generations": generations,
    }


def main(argv: list[str] | None = None) -> int:
    """The reference as a whole process, as a user runs it: imports, model, loop, adapter saved.

        python bench/reference_loop.py OUT_DIR [--steps N] [--no-generate] [--recipe recipes/tiny.yaml]

    Trains the recipe's base and LoRA on its training images (all of them, no hold-out) for
    ``--steps`` batches (default: the recipe's epochs × batches per epoch), then saves the adapter
    with ``save_pretrained`` as the example does.
    """
    import argparse
    import json
    import math
    import sys
    from pathlib import Path

    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    from harness import quiet, set_threads

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model.base import add_lora, load_base, load_processor

    parser = argparse.ArgumentParser(description="PEFT's BLIP-2 LoRA example loop, as one process")
    parser.add_argument("out", help="directory for the adapter and result.json")
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=0, help="batches (0: the recipe's epochs)")
    parser.add_argument("--no-generate", action="store_true", help="leave out the generate call every 10 steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    recipe = load_recipe(args.recipe, ["data.val_split=null", "data.val_fraction=0"])
    torch.manual_seed(recipe.seed)
    processor = load_processor(recipe.model.base, recipe.model.revision)
    rows = [{"image": e.image, "text": e.target} for e in load_splits(recipe.data).train]
    steps = args.steps or recipe.train.epochs * math.ceil(len(rows) / recipe.train.batch_size)
    model = add_lora(load_base(recipe.model)[0], recipe.lora)
    result = reference_train(
        model, processor, rows, batch_size=recipe.train.batch_size, lr=recipe.train.lr, max_steps=steps, seed=recipe.seed,
        generate_every=None if args.no_generate else 10,
    )  # fmt: skip
    out = Path(args.out)
    model.save_pretrained(out / "adapter")
    (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
