"""Bytes on disk of an adapter against its base: the tiny recipe, and the real BLIP-2 OPT-2.7B.

    python bench/adapter_size.py

* tiny: trains ``recipes/tiny.yaml`` for one step and weighs the adapter
  directory the trainer writes against the tiny base's model directory.
* football: builds BLIP-2 OPT-2.7B from its published config on the ``meta``
  device (no download, no memory), adds ``recipes/football.yaml``'s LoRA,
  gives only the adapter's tensors real storage, and writes the adapter with
  the trainer's own ``save_adapter`` — so the bytes are those of a real
  adapter file. The base's bytes are its parameters at fp32 (the published
  checkpoint), fp16, and as loaded in int8.

Writes ``bench/results/adapter_size.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from harness import quiet, table, write_result

REPO = Path(__file__).resolve().parents[1]


def tiny_sizes(workdir: Path) -> dict:
    """Train the tiny recipe for one step; the adapter's and the base's bytes on disk."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.model.tiny import ensure_tiny_base
    from multimodal_lora.training import train

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"output_dir={workdir / 'tiny'}", "train.max_steps=1"])
    result = train(recipe)
    base_dir = ensure_tiny_base()
    weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    return {"adapter_bytes": result.adapter_bytes, "base_bytes": weights, "base_files": "model.safetensors (fp32)"}


def real_sizes(recipe_path: Path, workdir: Path) -> dict:
    """The recipe's adapter on the published architecture, written for real from a meta model."""
    import torch

    from multimodal_lora.adapter import AdapterMeta, adapter_size_bytes, save_adapter
    from multimodal_lora.config import load_recipe
    from multimodal_lora.model.base import BaseInfo, add_lora, base_config, config_fingerprint, meta_model
    from multimodal_lora.model.plan import base_weight_bytes

    recipe = load_recipe(recipe_path)
    config = base_config(recipe.model.base, recipe.model.revision)
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    int8_bytes = base_weight_bytes(model, "int8", recipe.model.dtype, for_training=False)
    peft_model = add_lora(model, recipe.lora)
    lora_params = 0
    for module in peft_model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad:
                # Real (zero) storage for the adapter only; the 3.7 B base stays on meta.
                setattr(module, name, torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype)))
                lora_params += param.numel()
    info = BaseInfo(name=recipe.model.base, name_or_path=recipe.model.base, revision=recipe.model.revision, fingerprint=config_fingerprint(config))
    directory = save_adapter(peft_model, workdir / "real-adapter", AdapterMeta(base=info))
    return {
        "base": recipe.model.base,
        "lora": {"r": recipe.lora.r, "target_modules": recipe.lora.target_modules},
        "lora_parameters": lora_params,
        "base_parameters": params,
        "adapter_bytes": adapter_size_bytes(directory),
        "base_bytes_fp32": 4 * params,
        "base_bytes_fp16": 2 * params,
        "base_bytes_int8_loaded": int8_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "football.yaml"), help="the real-model recipe")
    args = parser.parse_args(argv)
    quiet()
    with tempfile.TemporaryDirectory(prefix="adapter-size-") as tmp:
        tiny = tiny_sizes(Path(tmp))
        real = real_sizes(Path(args.recipe), Path(tmp))
    rows = [
        ["tiny (recipes/tiny.yaml)", tiny["adapter_bytes"], tiny["base_bytes"], tiny["base_bytes"] / tiny["adapter_bytes"]],
        [f"{Path(args.recipe).name}: fp32 base", real["adapter_bytes"], real["base_bytes_fp32"], real["base_bytes_fp32"] / real["adapter_bytes"]],
        [f"{Path(args.recipe).name}: fp16 base", real["adapter_bytes"], real["base_bytes_fp16"], real["base_bytes_fp16"] / real["adapter_bytes"]],
        [f"{Path(args.recipe).name}: int8 base", real["adapter_bytes"], real["base_bytes_int8_loaded"], real["base_bytes_int8_loaded"] / real["adapter_bytes"]],
    ]
    print(table(["model", "adapter bytes", "base bytes", "base / adapter"], rows, title="Adapter size on disk"))
    print(f"\n{real['base']}: {real['lora_parameters']:,} LoRA parameters of {real['base_parameters']:,} ({real['lora']})")
    path = write_result("adapter_size", {"tiny": tiny, "real": real})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
