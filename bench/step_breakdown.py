"""Where a training step's time goes: each cause of the speed-up over the reference, measured alone.

    python bench/step_breakdown.py [--steps 20] [--repeats 3]

On the tiny recipe's model and batches (batch 16), one process, one torch
thread, each pair of variants timed over the same pre-built batches,
alternating, medians of ``--repeats``:

* the frozen image path in train mode (its dropout on, as the reference
  has it) against eval mode (ours);
* the KV cache filled in the training forward (``use_cache`` left on) against not;
* AdamW's single-tensor loop against the multi-tensor (``foreach``) one;
* the reference's ``generate`` every 10 steps, spread over the steps;
* the whole model on pixels against the language model on cached features;
* per-row ``torch.tensor`` collation against the vectorised collator, and the
  image processor called per image against once per batch (per step, on the
  main thread; with the cache off these run in DataLoader workers).

Each row gives ms per step and the saving as a share of the reference-like
step (train mode, KV cache, single-tensor AdamW, pixels). Times are this
process's CPU time (one thread: equal to wall time on an idle machine, and
far steadier on a busy one). Writes
``bench/results/step_breakdown.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import median, quiet, set_threads, table, write_result


def step_seconds(
    model, optimizer, batches, *, frozen_eval: bool, use_cache: bool, features=None, generate_every=None
) -> float:
    """Seconds per step of forward + backward + optimizer step over ready batches."""
    import torch
    from gpu_full_size import cached_loss

    from multimodal_lora.model.base import set_train_mode

    if frozen_eval:
        set_train_mode(model)
    else:
        model.train()
    start = time.process_time()
    for i, batch in enumerate(batches):
        if features is not None:
            loss = cached_loss(model, features[i], batch)
        else:
            loss = model(**batch, use_cache=use_cache).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if generate_every and i % generate_every == 0:
            with torch.no_grad():
                model.generate(pixel_values=batch["pixel_values"])
    return (time.process_time() - start) / len(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    import torch
    from gpu_full_size import image_features
    from overhead import RECIPE, bare_setup

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.encoding import Collator, PairDataset
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model.base import load_processor

    model, _, batches = bare_setup(args.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    single = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    multi = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    features = [image_features(model, b["pixel_values"]) for b in batches]

    # Data: per-row collation and per-image processing, as before, against ours.
    processor = load_processor("tiny")
    examples = load_splits(load_recipe(RECIPE).data).train[:16]
    items = [{"input_ids": list(range(32 + 6)), "labels": [-100] * 33 + [5, 6, 7, 8, 9]} for _ in range(16)]
    dataset = PairDataset(examples, items, processor.image_processor)
    collate = Collator(1)

    def per_row_collate():
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((16, length), 1)
        labels = torch.full((16, length), -100)
        mask = torch.zeros((16, length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1

    def per_image_processing():
        from multimodal_lora.data.encoding import _load

        return [processor.image_processor(_load(e), return_tensors="pt").pixel_values[0] for e in examples]

    def batched_processing():
        return dataset.__getitems__(list(range(16)))

    def timed(fn, n=20):
        start = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - start) / n

    variants = {
        "reference-like step": lambda: step_seconds(model, single, batches, frozen_eval=False, use_cache=True),
        "frozen path in eval mode": lambda: step_seconds(model, single, batches, frozen_eval=True, use_cache=True),
        "+ no KV cache": lambda: step_seconds(model, single, batches, frozen_eval=True, use_cache=False),
        "+ foreach AdamW (ours, cache off)": lambda: step_seconds(
            model, multi, batches, frozen_eval=True, use_cache=False
        ),
        "+ cached features (ours, cache on)": lambda: step_seconds(
            model, multi, batches, frozen_eval=True, use_cache=False, features=features
        ),
        "reference-like step + generate every 10": lambda: step_seconds(
            model, single, batches, frozen_eval=False, use_cache=True, generate_every=10
        ),
        "collate: per-row torch.tensor": lambda: timed(per_row_collate, 200),
        "collate: vectorised": lambda: timed(lambda: collate(items), 200),
        "images: processor per image": lambda: timed(per_image_processing, 5),
        "images: processor per batch": lambda: timed(batched_processing, 5),
    }
    for fn in variants.values():  # warm-up
        fn()
    found = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            found[name].append(fn())
    ms = {name: 1000 * median(v) for name, v in found.items()}
    ref = ms["reference-like step"]
    order = list(variants)
    rows = []
    for i, name in enumerate(order):
        if name.startswith(("collate", "images")):
            continue
        previous = ms[order[i - 1]] if 0 < i < 5 else ref
        rows.append([name, ms[name], (previous - ms[name]) / ref if name != "reference-like step" else 0.0])
    shares = {
        "frozen-path dropout (train vs eval mode)": (ms["reference-like step"] - ms["frozen path in eval mode"]) / ref,
        "KV cache in the training forward": (ms["frozen path in eval mode"] - ms["+ no KV cache"]) / ref,
        "single-tensor vs foreach AdamW": (ms["+ no KV cache"] - ms["+ foreach AdamW (ours, cache off)"]) / ref,
        "image path (feature cache)": (
            ms["+ foreach AdamW (ours, cache off)"] - ms["+ cached features (ours, cache on)"]
        )
        / ref,
        "reference's generate every 10 steps": (ms["reference-like step + generate every 10"] - ref) / ref,
        "per-row collation": (ms["collate: per-row torch.tensor"] - ms["collate: vectorised"]) / ref,
        "image processor per image vs per batch": (
            ms["images: processor per image"] - ms["images: processor per batch"]
        )
        / ref,
    }
    print(
        table(
            ["variant", "ms / step", "saved (share of reference-like step)"],
            rows,
            title=f"tiny recipe, batch 16, {args.steps} steps, median of {args.repeats} alternating runs, {args.threads} thread(s)",
        )
    )
    print()
    print(table(["cause", "share of a reference-like step"], [[k, f"{v:+.1%}"] for k, v in shares.items()]))
    path = write_result(
        "step_breakdown",
        {"steps": args.steps, "repeats": args.repeats, "ms_per_step": ms, "shares": shares, "runs": found},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
