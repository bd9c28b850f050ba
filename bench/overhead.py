"""How close our training loop gets to the bare model: step time over bare forward+backward time.

    python bench/overhead.py [--steps N] [--repeats 3]

"Bare" is the limit any training loop can reach: the same model (the tiny
base with the tiny recipe's LoRA) running forward, backward and the AdamW step
on batches that were collated before the clock started — no data loading, no
accelerate, no clipping, no scheduler, no logging. "Ours" is
``multimodal_lora.train.train`` on ``recipes/tiny.yaml`` with the same batch
size, its loop's own time per step (reading and processing images included).
Runs alternate; medians are reported. The target is ours / bare ≤ 1.15.
With ``cache_image_features=true`` the bare step is the language model alone
on image features computed beforehand (what the cache gives the loop), and
the result goes to ``bench/results/overhead_cache.json``; otherwise to
``bench/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness import median, quiet, set_threads, table, write_result

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
TARGET = 1.15


def ours_step_seconds(workdir: Path, steps: int, extra: list[str]) -> float:
    """Seconds per optimizer step of our loop (its own timer: the loop, not the model load)."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.train import train

    recipe = load_recipe(RECIPE, [f"output_dir={workdir}", "overwrite=true", f"train.max_steps={steps}", "data.val_split=null", "data.val_fraction=0", *extra])
    result = train(recipe)
    return result.seconds / result.steps


def bare_setup(steps: int):
    """The same model and ``steps`` pre-collated batches, built before any timing."""
    import torch

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model import add_lora, load_base, load_processor, text_layout

    recipe = load_recipe(RECIPE)
    torch.manual_seed(recipe.seed)
    processor = load_processor(recipe.model.base)
    examples = load_splits(recipe.data).train
    model, _ = load_base(recipe.model)
    layout = text_layout(model, processor.tokenizer)
    model = add_lora(model, recipe.lora)
    encoder = ExampleEncoder(processor.tokenizer, layout, task="caption", prompt=None, prompt_template="", max_length=recipe.data.max_length)
    dataset = PairDataset(examples, encoder.encode_all(examples), processor.image_processor)
    collate = Collator(layout.pad_token_id)
    size = recipe.train.batch_size
    batches = [collate([dataset[(i * size + j) % len(dataset)] for j in range(size)]) for i in range(steps)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.train.lr)
    return model, optimizer, batches


def bare_step_seconds(model, optimizer, batches, features=None) -> float:
    """Seconds per step of forward + backward + optimizer step on ready tensors.

    With ``features`` (the frozen image path's output per batch, computed
    beforehand), only the language model runs, as with the feature cache.
    """
    from gpu_full_size import cached_loss

    model.train()
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        loss = model(**batch).loss if features is None else cached_loss(model, features[i], batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / len(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for our loop, e.g. cache_image_features=true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    model, optimizer, batches = bare_setup(args.steps)
    cached = any(o.split("=")[0].endswith("cache_image_features") and o.endswith("=true") for o in args.overrides)
    features = None
    if cached:
        from gpu_full_size import image_features

        features = [image_features(model, b["pixel_values"]) for b in batches]
    bare_step_seconds(model, optimizer, batches[:3], features)  # warm-up
    ours, bare = [], []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        ours_step_seconds(Path(tmp), 2, args.overrides)  # warm-up
        for _ in range(args.repeats):
            ours.append(ours_step_seconds(Path(tmp), args.steps, args.overrides))
            bare.append(bare_step_seconds(model, optimizer, batches, features))
    ratio = median(ours) / median(bare)
    print(table(
        ["loop", "ms / step", "ratio"],
        [
            ["bare forward+backward+step" + (" (LM only, features ready)" if cached else ""), 1000 * median(bare), 1.0],
            ["multimodal_lora.train", 1000 * median(ours), ratio],
        ],
        title=f"tiny recipe, batch {len(batches[0]['input_ids'])}, {args.steps} steps, median of {args.repeats} alternating runs"
        + (f", {' '.join(args.overrides)}" if args.overrides else ""),
    ))
    print(f"\nours / bare = {ratio:.3f} (target ≤ {TARGET})")
    name = "overhead_cache" if cached else "overhead"
    path = write_result(name, {
        "steps": args.steps, "repeats": args.repeats, "overrides": args.overrides,
        "ours_seconds_per_step": ours, "bare_seconds_per_step": bare, "ratio": ratio, "target": TARGET,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
