"""How close our training loop gets to the bare model: step time over bare forward+backward time.

    python bench/overhead.py [--steps 40] [--repeats 3]

"Bare" is the limit any training loop can reach: the same model (the tiny
base with the tiny recipe's LoRA) running forward, backward and the AdamW step
on batches that were collated before the clock started — no data loading, no
accelerate, no clipping, no scheduler, no logging. It is measured fairly: the
frozen vision encoder and Q-Former in eval mode (as our loop has them: their
dropout would cost the bare step ~5 ms that our loop never pays), no KV cache
in the forward, the same AdamW, and logits only where the loss reads
them (``TokenLayout.for_loss``), as in our loop. "Ours" is
``multimodal_lora.training.train`` on ``recipes/tiny.yaml`` with the same batch
size, its loop's own time per step (reading and processing images included):
what one more step costs, from a loop of N steps and one of 3N (the one-off
costs of a loop, the worker's start and the checkpoint at the end, are left
to ``train_vs_reference.py``), and the N-step loop's time over N beside it.

Both regimes in one command: **without the feature cache** (our loop reads and
processes the images; bare runs the whole model on ready pixels) and **with
it** (bare runs the language model alone on image features computed
beforehand, which is what the cache gives the loop). Runs alternate; medians
are reported. Target: ours / bare ≤ 1.10 in both. Writes
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
TARGET = 1.10


def ours_loop_seconds(workdir: Path, steps: int, extra: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of our loop for ``steps`` optimizer steps (its own timers: the loop, not the model load)."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    recipe = load_recipe(RECIPE, [f"output_dir={workdir}", "overwrite=true", f"train.max_steps={steps}", "data.val_split=null", "data.val_fraction=0", *extra])
    result = train(recipe)
    return result.seconds, result.cpu_seconds


def ours_step_seconds(workdir: Path, steps: int, extra: list[str]) -> tuple[float, float, float, float]:
    """Our loop's wall and CPU seconds per step: the marginal cost of a step, then the whole loop's per step.

    A run's loop also pays once for things no step repeats: the DataLoader
    worker's start and first batch, the checkpoint and adapter written at the
    end. Those are counted end to end by ``train_vs_reference.py``; here the loop
    runs ``steps`` and ``3 × steps`` steps, and the difference over ``2 × steps``
    is what one more step costs. The whole loop over ``steps`` is kept beside it.
    """
    short = ours_loop_seconds(workdir, steps, extra)
    long = ours_loop_seconds(workdir, 3 * steps, extra)
    return (
        (long[0] - short[0]) / (2 * steps),
        (long[1] - short[1]) / (2 * steps),
        short[0] / steps,
        short[1] / steps,
    )


def bare_setup(steps: int):
    """The same model and ``steps`` pre-collated batches, built before any timing."""
    import torch

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model.base import add_lora, load_base, load_processor, text_layout

    recipe = load_recipe(RECIPE)
    torch.manual_seed(recipe.seed)
    processor = load_processor(recipe.model.base)
    examples = load_splits(recipe.data).train
    model, _ = load_base(recipe.model)
    layout = text_layout(model, processor)
    model = add_lora(model, recipe.lora)
    encoder = ExampleEncoder(processor.tokenizer, layout, task="caption", prompt=None, prompt_template="", max_length=recipe.data.max_length)
    dataset = PairDataset(examples, encoder.encode_all(examples), processor.image_processor)
    collate = Collator(layout.pad_token_id, layout.padding())
    size = recipe.train.batch_size
    # With the output head only where the loss reads it, as our loop computes it (the layout's for_loss).
    batches = [layout.for_loss(collate([dataset[(i * size + j) % len(dataset)] for j in range(size)])) for i in range(steps)]
    from multimodal_lora.training.optim import build_optimizer

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], recipe.train.lr, 0.0, torch.device("cpu"))
    return model, optimizer, batches


def bare_step_seconds(model, optimizer, batches, features=None) -> tuple[float, float]:
    """Seconds per step of forward + backward + optimizer step on ready tensors.

    With ``features`` (the frozen image path's output per batch, computed
    beforehand), only the language model runs, as with the feature cache.
    """
    from gpu_full_size import cached_loss

    from multimodal_lora.model.base import set_train_mode

    set_train_mode(model)  # the frozen parts in eval mode, as in our loop
    start, cpu = time.perf_counter(), time.process_time()
    for i, (batch, keep) in enumerate(batches):
        extra = {"logits_to_keep": keep} if keep else {}
        loss = model(**batch, use_cache=False, **extra).loss if features is None else cached_loss(model, features[i], batch, **extra)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / len(batches), (time.process_time() - cpu) / len(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    from gpu_full_size import image_features

    model, optimizer, batches = bare_setup(args.steps)
    features = [image_features(model, b["pixel_values"]) for b, _ in batches]
    regimes = {"cache off": (["train.cache_image_features=false"], None), "cache on": (["train.cache_image_features=true"], features)}
    ours = {name: [] for name in regimes}
    bare = {name: [] for name in regimes}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for extra, feats in regimes.values():  # warm-up: first imports, the feature cache built
            bare_step_seconds(model, optimizer, batches[:3], feats and feats[:3])
            ours_loop_seconds(Path(tmp), 2, extra)
        for _ in range(args.repeats):
            for name, (extra, feats) in regimes.items():
                ours[name].append(ours_step_seconds(Path(tmp), args.steps, extra))
                bare[name].append(bare_step_seconds(model, optimizer, batches, feats))
    rows, ratios, cpu_ratios = [], {}, {}

    def med(values, which):
        return median(v[which] for v in values)

    for name in regimes:
        ratios[name] = med(ours[name], 0) / med(bare[name], 0)
        cpu_ratios[name] = med(ours[name], 1) / med(bare[name], 1)
        what = "whole model on ready pixels" if name == "cache off" else "language model on ready features"
        rows.append([f"{name}: bare ({what})", 1000 * med(bare[name], 0), 1.0, 1000 * med(bare[name], 1), 1.0])
        rows.append([
            f"{name}: multimodal_lora.train, one more step", 1000 * med(ours[name], 0), ratios[name], 1000 * med(ours[name], 1), cpu_ratios[name]
        ])  # fmt: skip
        rows.append([
            f"{name}: multimodal_lora.train, {args.steps}-step loop / {args.steps}", 1000 * med(ours[name], 2),
            med(ours[name], 2) / med(bare[name], 0), 1000 * med(ours[name], 3), med(ours[name], 3) / med(bare[name], 1),
        ])  # fmt: skip
    print(table(
        ["loop", "ms / step", "ratio", "CPU ms / step", "CPU ratio"], rows,
        title=f"tiny recipe, batch {len(batches[0][0]['input_ids'])}, {args.steps} steps, median of {args.repeats} alternating runs",
    ))  # fmt: skip
    for name, ratio in ratios.items():
        print(f"{name}: ours / bare = {ratio:.3f}, in CPU time {cpu_ratios[name]:.3f} (target ≤ {TARGET})")
    print("(CPU time is this process's: with the cache off, the DataLoader worker's decoding runs beside it, not in it)")
    path = write_result("overhead", {
        "steps": args.steps, "repeats": args.repeats, "target": TARGET, "ratios": ratios, "cpu_ratios": cpu_ratios,
        "ours_seconds_per_step": ours, "bare_seconds_per_step": bare,
        "per_step": "bare: [wall, cpu] seconds; ours: [wall, cpu] of one more step (3N-step loop minus N-step loop, over 2N), "
        "then [wall, cpu] of the N-step loop over N",
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
