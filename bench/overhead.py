"""How close our training loop gets to the bare model: step time over bare forward+backward time.

    python bench/overhead.py [--steps 40] [--repeats 3]

"Bare" is the limit any training loop can reach: the same model (the tiny
base with the tiny recipe's LoRA) running forward, backward and the AdamW step
on batches that were collated before the clock started — no data loading, no
accelerate, no clipping, no scheduler, no logging. It is measured fairly: the
frozen vision encoder and Q-Former in eval mode (as our loop has them: their
dropout would cost the bare step ~5 ms that our loop never pays), no KV cache
in the forward, and the same multi-tensor AdamW. "Ours" is
``multimodal_lora.train.train`` on ``recipes/tiny.yaml`` with the same batch
size, its loop's own time per step (reading and processing images included).

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


def ours_step_seconds(workdir: Path, steps: int, extra: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds per optimizer step of our loop (its own timers: the loop, not the model load)."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.train import train

    recipe = load_recipe(RECIPE, [f"output_dir={workdir}", "overwrite=true", f"train.max_steps={steps}", "data.val_split=null", "data.val_fraction=0", *extra])
    result = train(recipe)
    return result.seconds / result.steps, result.cpu_seconds / result.steps


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
    layout = text_layout(model, processor)
    model = add_lora(model, recipe.lora)
    encoder = ExampleEncoder(processor.tokenizer, layout, task="caption", prompt=None, prompt_template="", max_length=recipe.data.max_length)
    dataset = PairDataset(examples, encoder.encode_all(examples), processor.image_processor)
    collate = Collator(layout.pad_token_id, layout.padding())
    size = recipe.train.batch_size
    batches = [collate([dataset[(i * size + j) % len(dataset)] for j in range(size)]) for i in range(steps)]
    from multimodal_lora.train import build_optimizer

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], recipe.train.lr, 0.0, torch.device("cpu"))
    return model, optimizer, batches


def bare_step_seconds(model, optimizer, batches, features=None) -> tuple[float, float]:
    """Seconds per step of forward + backward + optimizer step on ready tensors.

    With ``features`` (the frozen image path's output per batch, computed
    beforehand), only the language model runs, as with the feature cache.
    """
    from gpu_full_size import cached_loss

    from multimodal_lora.model import set_train_mode

    set_train_mode(model)  # the frozen parts in eval mode, as in our loop
    start, cpu = time.perf_counter(), time.process_time()
    for i, batch in enumerate(batches):
        loss = model(**batch, use_cache=False).loss if features is None else cached_loss(model, features[i], batch)
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
    features = [image_features(model, b["pixel_values"]) for b in batches]
    regimes = {"cache off": (["train.cache_image_features=false"], None), "cache on": (["train.cache_image_features=true"], features)}
    ours = {name: [] for name in regimes}
    bare = {name: [] for name in regimes}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for extra, feats in regimes.values():  # warm-up: first imports, the feature cache built
            bare_step_seconds(model, optimizer, batches[:3], feats and feats[:3])
            ours_step_seconds(Path(tmp), 2, extra)
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
            f"{name}: multimodal_lora.train", 1000 * med(ours[name], 0), ratios[name], 1000 * med(ours[name], 1), cpu_ratios[name]
        ])  # fmt: skip
    print(table(
        ["loop", "ms / step", "ratio", "CPU ms / step", "CPU ratio"], rows,
        title=f"tiny recipe, batch {len(batches[0]['input_ids'])}, {args.steps} steps, median of {args.repeats} alternating runs",
    ))  # fmt: skip
    for name, ratio in ratios.items():
        print(f"{name}: ours / bare = {ratio:.3f}, in CPU time {cpu_ratios[name]:.3f} (target ≤ {TARGET})")
    print("(CPU time is this process's: with the cache off, the DataLoader worker's decoding runs beside it, not in it)")
    path = write_result("overhead", {
        "steps": args.steps, "repeats": args.repeats, "target": TARGET, "ratios": ratios, "cpu_ratios": cpu_ratios,
        "ours_seconds_per_step": ours, "bare_seconds_per_step": bare, "per_step": "[wall, cpu] seconds",
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
