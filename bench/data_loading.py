"""How much memory and time reading a data set of many small images costs.

    python bench/data_loading.py [--images 10000] [--workers 0]

Writes an imagefolder of N small PNG images (64×64 noise, so they do not
compress to nothing) into a temporary directory, then measures, in this
process: listing it (``load_splits``), the pre-scan that decodes every image
once (``screen_examples``), and one epoch through the DataLoader the trainer
uses. Prints wall time and the growth of peak resident memory for each step,
next to the size of the images on disk and decoded, to show that images are
never all held in memory at once.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the epoch")
    args = parser.parse_args()

    from PIL import Image

    from multimodal_lora.config import DataConfig
    from multimodal_lora.data.encoding import Collator, PairDataset
    from multimodal_lora.data.screen import screen_examples
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model.base import load_processor

    processor = load_processor("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        with open(root / "metadata.jsonl", "w") as f:
            for i in range(args.images):
                Image.effect_noise((64, 64), 40).convert("RGB").save(root / f"{i:05d}.png")
                f.write(json.dumps({"file_name": f"{i:05d}.png", "text": "noise"}) + "\n")
        on_disk = sum(p.stat().st_size for p in root.glob("*.png")) / 2**20
        decoded = args.images * 64 * 64 * 3 / 2**20
        print(f"{args.images} images: {on_disk:.1f} MB on disk, {decoded:.1f} MB decoded; written in {time.perf_counter() - start:.1f} s")

        cfg = DataConfig(path=str(root), num_workers=args.workers)
        base = peak_mb()
        start = time.perf_counter()
        splits = load_splits(cfg)
        print(f"list:   {time.perf_counter() - start:6.2f} s, peak RSS +{peak_mb() - base:6.1f} MB ({len(splits.train)} train pairs)")

        base = peak_mb()
        start = time.perf_counter()
        splits = screen_examples(splits, cfg, progress=False)
        print(f"scan:   {time.perf_counter() - start:6.2f} s, peak RSS +{peak_mb() - base:6.1f} MB (every image decoded once)")

        import torch

        dataset = PairDataset(splits.train, [{"input_ids": [0, 1], "labels": [-100, 1]}] * len(splits.train), processor.image_processor)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=Collator(0), num_workers=args.workers)
        base = peak_mb()
        start = time.perf_counter()
        batches = sum(1 for _ in loader)
        print(f"epoch:  {time.perf_counter() - start:6.2f} s, peak RSS +{peak_mb() - base:6.1f} MB ({batches} batches, {args.workers} workers)")


if __name__ == "__main__":
    main()
