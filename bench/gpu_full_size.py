"""The full-size BLIP-2 OPT-2.7B on a GPU, random weights, no download: speed and memory per base.

    python bench/gpu_full_size.py                 # on a GPU: the real architecture
    python bench/gpu_full_size.py --small --out /tmp/x   # anywhere, CPU included: a small config, same code

The architecture is the published ``Salesforce/blip2-opt-2.7b`` config shipped
in the package (``multimodal_lora.model.base.published_config``). A model with
random weights is built on the device, saved once as an ordinary bf16
checkpoint in a temporary directory, and then loaded through
``multimodal_lora.model.base.load_base`` — the trainer's own path — as an **int8**,
**4-bit NF4** and **bf16** base. For each base, with the football recipe's LoRA
(r=16 on the language model's q_proj and v_proj), it measures:

* LoRA training samples/s and peak GPU memory (``torch.cuda.max_memory_allocated``,
  weights included), for the four combinations of
  - the **frozen-feature cache**: off = every step runs the frozen vision
    encoder and Q-Former on the pixels; on = their output (the projected query
    tokens) was computed once beforehand and each step runs only the language
    model, which is what caching frozen image features buys;
  - **gradient checkpointing** (non-reentrant) on the language model;
* model FLOP/s and bf16 model-FLOPs utilisation (MFU) of each training
  variant: :func:`model_flops_per_sample` × samples/s over the GPU's dense bf16
  peak (from its name; ``--peak-tflops`` to set it);
* the memory plan (``multimodal_lora.model.plan``) for the same base and batch,
  beside the measured peak;
* caption latency for one image (greedy, exactly ``--new-tokens`` new tokens,
  the adapter active and unmerged).

Compute runs under bf16 autocast on a GPU, as the trainer's ``accelerate``
mixed precision does, with the trainer's optimizer (fused AdamW on a GPU),
train mode (frozen parts in eval) and no KV cache in the training forward. Text is random token ids and images random pixels:
speed and memory do not depend on the values.

On the ``device`` tool's H100/H200 (PyTorch, transformers, peft, accelerate
are installed; bitsandbytes is not), carry the bitsandbytes wheel that
``bench/fetch_wheels.sh`` puts in ``.whl/``::

    run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --no-compile
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
        PYTHONUNBUFFERED=1 && python3 bench/gpu_full_size.py --bases int8,bf16 --out $OUT")

Writes ``OUT/gpu_full_size.json`` (default ``bench/results/``; ``--small``
writes ``gpu_full_size_small.json``).
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import tempfile
import time
from pathlib import Path

from harness import median, quiet, table, write_result

LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
BASES = (("int8", "int8"), ("nf4", "4bit"), ("bf16", "none"))


def small_config():
    """A small BLIP-2 with the real one's structure, for CPU runs and tests."""
    from transformers import Blip2Config, OPTConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, encoder_hidden_size=64, cross_attention_frequency=1, vocab_size=512)
    text = OPTConfig(vocab_size=512, hidden_size=128, word_embed_proj_dim=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, eos_token_id=2, bos_token_id=2, pad_token_id=1)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=8, image_token_index=511)


def save_random_checkpoint(config, directory: Path, device) -> None:
    """Build the architecture with random weights on ``device`` and save it as a bf16 checkpoint."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: half the memory and time
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(directory)
    del model
    _free(device)


def make_batch(config, batch_size: int, max_length: int, device):
    """Random pixels and text, laid out as the trainer lays them out: ``<image>``×Q, then text."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, size = config.num_query_tokens, config.vision_config.image_size
    text = torch.randint(4, config.text_config.vocab_size - 2, (batch_size, max_length), generator=g)
    input_ids = torch.cat([torch.full((batch_size, q), config.image_token_index), text], dim=1)
    labels = input_ids.clone()
    labels[:, :q] = -100
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g).to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def image_features(model, pixel_values):
    """What the frozen-feature cache stores: the projected Q-Former outputs for each image."""
    import torch

    blip = model.get_base_model()
    with torch.no_grad():
        vision = blip.vision_model(pixel_values=pixel_values.to(blip.vision_model.dtype)).last_hidden_state
        query = blip.query_tokens.expand(vision.shape[0], -1, -1)
        mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        out = blip.qformer(query_embeds=query, encoder_hidden_states=vision, encoder_attention_mask=mask).last_hidden_state
        return blip.language_projection(out.to(blip.language_projection.weight.dtype if blip.language_projection.weight.is_floating_point() else out.dtype))


def cached_loss(model, features, batch, **kwargs):
    """The step with cached features: only the language model runs (``kwargs``: e.g. ``logits_to_keep``)."""
    import torch

    blip = model.get_base_model()
    embeds = blip.get_input_embeddings()(batch["input_ids"])
    mask = (batch["input_ids"] == blip.config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    with torch.autocast(embeds.device.type, dtype=torch.bfloat16, enabled=embeds.is_cuda):
        return blip.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False, **kwargs
        ).loss


def full_loss(model, batch):
    import torch

    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=batch["input_ids"].is_cuda):
        return model(**batch, use_cache=False).loss


def model_flops_per_sample(config, text_tokens: int, cache: bool) -> float:
    """Model FLOPs of one training sample: matmuls of the linear layers and of attention, nothing else.

    The language model runs forward and backward; its weights are frozen (LoRA's own
    gradients are negligible), so a linear layer costs 2 FLOPs per weight per token
    forward and 2 more backward (the input's gradient): 4·N·tokens. Attention's two
    matmuls cost 4·s²·d a layer forward and twice that backward (both operands need
    gradients). Without the cache the frozen image path runs forward only: the vision
    transformer on its patches, the Q-Former's queries (cross-attention keys and values
    on the patches), the projection. Layer norms, softmax, embeddings: not counted.
    """
    from multimodal_lora.model.base import meta_model

    model = meta_model(config)
    q = config.num_query_tokens
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1

    def linear_weights(module, skip=()):
        import torch

        return sum(m.weight.numel() for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and not any(k in n for k in skip))

    text = config.text_config
    seq = q + text_tokens
    lm = linear_weights(model.language_model) + model.language_model.get_output_embeddings().weight.numel()
    flops = 4 * lm * seq + 12 * text.num_hidden_layers * seq**2 * text.hidden_size
    if not cache:
        vision = config.vision_config
        conv = 3 * vision.patch_size**2 * vision.hidden_size * (patches - 1)
        flops += 2 * (linear_weights(model.vision_model) * patches + conv) + 4 * vision.num_hidden_layers * patches**2 * vision.hidden_size
        qformer = config.qformer_config
        # The Q-Former's text branch (intermediate/output) is unused in BLIP-2; its cross-attention
        # keys and values run on the patches, everything else on the query tokens.
        cross_kv = linear_weights(model.qformer, skip=("query",)) - linear_weights(
            model.qformer, skip=("crossattention.attention.key", "crossattention.attention.value", "query")
        )
        text_branch = sum(
            m.weight.numel() for n, m in model.qformer.named_modules()
            if re.search(r"layer\.\d+\.(intermediate|output)\.dense$", n)
        )  # fmt: skip
        flops += 2 * (linear_weights(model.qformer) - cross_kv - text_branch) * q + 2 * cross_kv * patches
        flops += 4 * qformer.num_hidden_layers * (q * q + q * patches) * qformer.hidden_size
        flops += 2 * model.language_projection.weight.numel() * q
    return float(flops)


def peak_bf16_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Dense bf16 tensor-core peak of the GPU (vendor data sheets), or ``None`` when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    name = device_name.upper()
    table = (("H100 PCIE", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312), ("L40S", 362), ("A10G", 125))
    return next((tflops * 1e12 for key, tflops in table if key in name), None)


def train_speed(model, batch, *, cache: bool, steps: int, warmup: int, device) -> dict:
    """Samples/s and peak memory of LoRA training steps (forward, backward, AdamW)."""
    import torch

    from multimodal_lora.model.base import set_train_mode
    from multimodal_lora.training.optim import build_optimizer

    # The trainer's own optimizer (fused AdamW on a GPU) and train mode (frozen parts in eval).
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], 1e-5, 0.0, device)
    features = image_features(model, batch["pixel_values"]) if cache else None
    set_train_mode(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = cached_loss(model, features, batch) if cache else full_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del optimizer
    return {
        "samples_per_second": batch["input_ids"].shape[0] / median(times),
        "peak_bytes": peak,
        "loss": loss.item(),
    }


def caption_latency(model, config, device, new_tokens: int, repeats: int) -> float:
    """Median seconds to caption one image with exactly ``new_tokens`` new tokens."""
    import torch

    batch = make_batch(config, 1, 0, device)
    inputs = {
        "pixel_values": batch["pixel_values"],
        "input_ids": torch.cat([batch["input_ids"], torch.tensor([[config.text_config.bos_token_id]], device=device)], 1),
    }
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    model.eval()
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1}
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model.generate(**inputs, **gen)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(**inputs, **gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return median(times)


def bench_base(checkpoint: Path, config, label: str, quantization: str, args, device) -> list[dict]:
    """Every measurement for one base: load it, add LoRA, train four ways, caption."""
    import torch

    from multimodal_lora.config import LoraSettings, ModelConfig
    from multimodal_lora.model.base import add_lora, enable_gradient_checkpointing, load_base
    from multimodal_lora.model.plan import plan_memory

    lora = LoraSettings(**LORA)
    cfg = ModelConfig(base=str(checkpoint), quantization=quantization, dtype="bf16", device=str(device))
    start = time.perf_counter()
    model, _ = load_base(cfg)
    load_seconds = time.perf_counter() - start
    model = add_lora(model, lora)
    weights = torch.cuda.memory_allocated() if device.type == "cuda" else None
    batch = make_batch(config, args.batch_size, args.max_length, device)
    plan = plan_memory(config, quantization=quantization, dtype="bf16", lora=lora, batch_size=args.batch_size, max_length=args.max_length)
    rows = []
    for gc_on in (False, True):
        if gc_on:
            enable_gradient_checkpointing(model)  # the trainer's own switch
        for cache in (False, True):
            found = train_speed(model, batch, cache=cache, steps=args.steps, warmup=args.warmup, device=device)
            flops = model_flops_per_sample(config, args.max_length, cache) * found["samples_per_second"]
            found.update(model_tflops_per_second=flops / 1e12, mfu=flops / args.peak if args.peak else None)
            rows.append({
                "base": label, "cache": cache, "gradient_checkpointing": gc_on, **found,
                "planned_bytes": plan.total(gc_on), "load_seconds": load_seconds, "weights_and_lora_bytes": weights,
            })
            _free(device)
        if gc_on:
            model.get_base_model().language_model.gradient_checkpointing_disable()
    latency = caption_latency(model, config, device, args.new_tokens, args.caption_repeats)
    for row in rows:
        row["caption_seconds"] = latency
    del model, batch
    _free(device)
    return rows


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small config (runs on CPU; for tests)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32, help="text tokens per example (the image adds 32 query tokens)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens per caption")
    parser.add_argument("--caption-repeats", type=int, default=3)
    parser.add_argument("--bases", default="int8,nf4,bf16", help="which of int8, nf4, bf16")
    parser.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: from its name)")
    args = parser.parse_args(argv)
    quiet()
    import torch

    from multimodal_lora.model.base import published_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.small and device.type != "cuda":
        print("error: the full-size architecture needs a CUDA GPU; use --small to run the same code on a small config", file=sys.stderr)
        return 2
    config = small_config() if args.small else published_config()
    args.peak = peak_bf16_flops(torch.cuda.get_device_name(0), args.peak_tflops) if device.type == "cuda" else args.peak_tflops and args.peak_tflops * 1e12
    wanted = [b.strip() for b in args.bases.split(",")]
    unknown = [b for b in wanted if b not in dict(BASES)]
    if unknown:
        print(f"error: --bases: unknown {unknown}; choose from int8, nf4, bf16", file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401

        has_bnb = True
    except ImportError:
        has_bnb = False
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="blip2-random-") as tmp:
        checkpoint = Path(tmp)
        start = time.perf_counter()
        save_random_checkpoint(config, checkpoint, device)
        print(f"random {'small' if args.small else 'BLIP-2 OPT-2.7B'} checkpoint saved in {time.perf_counter() - start:.0f} s", flush=True)
        for label, quantization in BASES:
            if label not in wanted:
                continue
            if quantization != "none" and not has_bnb:
                skipped.append(f"{label}: bitsandbytes is not installed")
                continue
            rows += bench_base(checkpoint, config, label, quantization, args, device)
            print(f"{label}: done", flush=True)
    gib = 2**30
    print(table(
        ["base", "feature cache", "grad ckpt", "samples/s", "model TFLOP/s", "bf16 MFU", "peak GiB", "planned GiB", "caption s"],
        [[
            r["base"], "on" if r["cache"] else "off", "on" if r["gradient_checkpointing"] else "off", r["samples_per_second"],
            r["model_tflops_per_second"], f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
            r["peak_bytes"] / gib if r["peak_bytes"] is not None else "-", r["planned_bytes"] / gib, r["caption_seconds"],
        ] for r in rows],
        title=f"{'small config' if args.small else 'BLIP-2 OPT-2.7B (random weights)'} on {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}, "
        f"LoRA r=16 q_proj,v_proj, batch {args.batch_size} × {config.num_query_tokens}+{args.max_length} tokens, caption {args.new_tokens} tokens",
    ))
    for note in skipped:
        print(f"skipped {note}")
    print(
        "model FLOPs: linear layers and attention matmuls (frozen weights: 4·N per token in the language model, "
        "2·N in the image path, forward only); bf16 MFU = model FLOP/s over the GPU's dense bf16 peak"
        + (f" ({args.peak / 1e12:.0f} TFLOP/s)" if args.peak else " (unknown here: --peak-tflops)")
    )
    name = "gpu_full_size_small" if args.small else "gpu_full_size"
    path = write_result(name, {
        "config": "small" if args.small else "Salesforce/blip2-opt-2.7b (published config, random weights)",
        "batch_size": args.batch_size, "max_length": args.max_length, "lora": LORA, "rows": rows, "skipped": skipped,
        "peak_bf16_flops": args.peak,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
