"""Caption latency: base, base + LoRA unmerged, base with LoRA merged; batched vs one by one.

    python bench/inference.py [--repeats 3]

LoRA's promise is that a merged adapter costs nothing at inference: the
merged model has the base's shapes. Each variant captions the same validation
images one at a time with greedy decoding and exactly ``--tokens`` new tokens
(``min_new_tokens = max_new_tokens``), so that every variant does the same
work whatever it says; variants alternate image by image, in rotating
order, and the median
latency per image is reported, in wall-clock time and in this process's CPU
time (steadier on a shared machine). The target is merged / base ≤ 1.05.

Then ``Captioner.caption`` captions the same images with ``batch_size=8`` and
with ``batch_size=1``, twice each (images/s, median). Writes ``bench/results/inference.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness import median, quiet, set_threads, table, write_result

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.05


def train_adapter(workdir: Path, steps: int) -> Path:
    """A real adapter from the tiny recipe (a short run: latency does not depend on quality)."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"output_dir={workdir / 'run'}", f"train.max_steps={steps}", "data.val_split=null", "data.val_fraction=0"])
    return train(recipe).adapter_dir


def merged_model(base, adapter_dir: Path):
    """The base with the adapter merged into its weights, by PEFT's ``merge_and_unload``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_variants(adapter_dir: Path) -> dict:
    """Three copies of the tiny base: bare, with the adapter unmerged, with it merged."""
    from peft import PeftModel

    from multimodal_lora.config import ModelConfig
    from multimodal_lora.model.base import load_base

    cfg = ModelConfig(base="tiny", device="cpu")
    fresh = lambda: load_base(cfg, for_training=False)[0].eval()  # noqa: E731
    return {
        "base": fresh(),
        "unmerged": PeftModel.from_pretrained(fresh(), str(adapter_dir)).eval(),
        "merged": merged_model(fresh(), adapter_dir).eval(),
    }


def single_inputs(processor, layout, image) -> dict:
    """``<image>``×Q ``</s>``: the caption prompt of one image, as the Captioner builds it."""
    import torch

    ids = [layout.image_token_id] * layout.num_query_tokens + [layout.bos_token_id]
    return {
        "pixel_values": processor.image_processor(image, return_tensors="pt").pixel_values,
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="validation images to caption")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per caption")
    parser.add_argument("--train-steps", type=int, default=30, help="steps of the tiny recipe that make the adapter")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    import torch

    from multimodal_lora.data.images import load_image
    from multimodal_lora.data.shapes import ensure_builtin
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.model.base import load_processor, text_layout

    images = sorted((ensure_builtin("shapes") / "validation").glob("*.png"))[: args.images]
    pictures = [load_image(p) for p in images]
    with tempfile.TemporaryDirectory(prefix="inference-") as tmp:
        adapter_dir = train_adapter(Path(tmp), args.train_steps)
        variants = load_variants(adapter_dir)
        processor = load_processor("tiny")
        layout = text_layout(variants["base"], processor.tokenizer)
        inputs = [single_inputs(processor, layout, p) for p in pictures]
        gen = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False, "num_beams": 1}
        latencies: dict[str, list[float]] = {name: [] for name in variants}
        # CPU seconds of this process too: on a shared machine, wall time also counts others' work.
        cpu_times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.no_grad():
            for model in variants.values():
                model.generate(**inputs[0], **gen)  # warm-up
            names = list(variants)
            for _ in range(args.repeats):
                for i, batch in enumerate(inputs):
                    # Rotate the order image by image, so that no variant always runs first.
                    for name in names[i % 3 :] + names[: i % 3]:
                        model = variants[name]
                        start, cpu = time.perf_counter(), time.process_time()
                        model.generate(**batch, **gen)
                        latencies[name].append(time.perf_counter() - start)
                        cpu_times[name].append(time.process_time() - cpu)
        same = torch.equal(
            variants["merged"].generate(**inputs[0], **gen), variants["unmerged"].generate(**inputs[0], **gen)
        )

        captioner = Captioner("tiny", device="cpu")
        name = captioner.load_adapter(adapter_dir, name="shapes")
        captioner.caption(pictures[:2], adapter=name, batch_size=2)  # warm-up
        throughput: dict[str, list[float]] = {"batch 8": [], "one by one": []}
        for _ in range(2):
            for label, size in (("batch 8", 8), ("one by one", 1)):
                start = time.perf_counter()
                captioner.caption(pictures, adapter=name, batch_size=size, max_new_tokens=args.tokens)
                throughput[label].append(len(pictures) / (time.perf_counter() - start))

    base = median(latencies["base"])
    base_cpu = median(cpu_times["base"])
    rows = [
        [name, 1000 * median(v), median(v) / base, 1000 * median(cpu_times[name]), median(cpu_times[name]) / base_cpu]
        for name, v in latencies.items()
    ]
    print(table(["variant", "ms / image", "× base", "CPU ms / image", "CPU × base"], rows, title=f"tiny base, CPU, {args.tokens} new tokens per caption, {len(inputs)} images × {args.repeats}"))
    ratio = median(latencies["merged"]) / base
    cpu_ratio = median(cpu_times["merged"]) / base_cpu
    print(
        f"\nmerged / base = {ratio:.3f} wall, {cpu_ratio:.3f} CPU time (target ≤ {TARGET}); "
        f"merged and unmerged generate the same tokens: {same}\n"
    )
    tput = {k: median(v) for k, v in throughput.items()}
    print(table(["Captioner.caption", "images/s", "× one by one"], [[k, v, v / tput["one by one"]] for k, v in tput.items()]))
    path = write_result("inference", {
        "tokens": args.tokens, "images": len(inputs), "repeats": args.repeats,
        "latency_seconds": {k: median(v) for k, v in latencies.items()},
        "cpu_seconds": {k: median(v) for k, v in cpu_times.items()},
        "merged_over_base": ratio, "merged_over_base_cpu": cpu_ratio, "unmerged_over_base": median(latencies["unmerged"]) / base, "target": TARGET,
        "merged_equals_unmerged": same, "images_per_second": tput,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
