"""Shared fixtures. Tests never reach the network: the hub is switched off here,
and the tiny base and bundled data are built into a per-session cache."""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub: no test may reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One cache per test session (subprocesses inherit it), unless the caller chose one.
os.environ.setdefault("MULTIMODAL_LORA_CACHE", tempfile.mkdtemp(prefix="mmlora-test-cache-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny BLIP-2 directory (built once per session)."""
    from multimodal_lora.model.tiny import ensure_tiny_base

    return ensure_tiny_base()


@pytest.fixture(scope="session")
def shapes_dir() -> Path:
    """The bundled shapes imagefolder (generated once per session)."""
    from multimodal_lora.data.shapes import ensure_builtin

    return ensure_builtin("shapes")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full training run of recipes/tiny.yaml, shared by the tests that need a trained adapter."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    out = tmp_path_factory.mktemp("tiny-run")
    recipe = load_recipe(RECIPES / "tiny.yaml", [f"output_dir={out}"])
    return train(recipe)


@pytest.fixture(scope="session")
def small_shapes_dir(shapes_dir, tmp_path_factory) -> Path:
    """A 24-train / 8-validation imagefolder cut from the shapes data, for runs of a few seconds."""
    import shutil

    root = tmp_path_factory.mktemp("small-shapes")
    for split, count in (("train", 24), ("validation", 8)):
        (root / split).mkdir()
        lines = (shapes_dir / split / "metadata.jsonl").read_text().splitlines()[:count]
        for line in lines:
            name = line.split('"file_name": "')[1].split('"')[0]
            shutil.copy(shapes_dir / split / name, root / split / name)
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def quick_adapter(tmp_path_factory, tiny_base) -> Path:
    """A real adapter on the tiny base in seconds: fresh LoRA with random (non-zero) B matrices, saved
    the trainer's way. It captions differently from the base, which is all the loading tests need."""
    import torch

    from multimodal_lora.adapter import AdapterMeta, save_adapter
    from multimodal_lora.config import LoraSettings, ModelConfig
    from multimodal_lora.model.base import add_lora, load_base

    model, base = load_base(ModelConfig(base="tiny", device="cpu"))
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("quick") / "adapter"
    return save_adapter(model, out, AdapterMeta(base=base))


@pytest.fixture(scope="session")
def shapes_adapters(tmp_path_factory, tiny_base):
    """A captioning and a VQA adapter from short runs (a few seconds each)."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    root = tmp_path_factory.mktemp("serve-runs")
    caption_run = train(
        load_recipe(RECIPES / "tiny.yaml", [f"output_dir={root / 'shapes'}", "train.max_steps=40"])
    )
    vqa_run = train(
        load_recipe(
            RECIPES / "tiny-vqa.yaml",
            [f"output_dir={root / 'shapes-vqa'}", "train.max_steps=40", "data.max_length=24"],
        )
    )
    return {"shapes": caption_run.adapter_dir, "shapes-vqa": vqa_run.adapter_dir}
