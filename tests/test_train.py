"""The foundation's promise, end to end: recipe → adapter → captions that are right and stop."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from multimodal_lora.config import load_recipe
from multimodal_lora.data.images import load_image
from multimodal_lora.data.sources import load_splits
from multimodal_lora.inference.captioner import Captioner

from .conftest import RECIPES, REPO

LM_ATTENTION = re.compile(r"language_model\.model\.decoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.lora_[AB]\.weight")


@pytest.fixture(scope="module")
def validation():
    return load_splits(load_recipe(RECIPES / "tiny.yaml").data).validation


@pytest.fixture(scope="module")
def captioner(tiny_run):
    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(tiny_run.adapter_dir, name="shapes")
    return captioner


def test_adapter_is_peft_format_and_only_in_language_model_attention(tiny_run):
    adapter = tiny_run.adapter_dir
    assert (adapter / "adapter_config.json").is_file()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == 2 * 4 * 2  # A and B × 4 projections × 2 layers
    for name in tensors:
        assert LM_ATTENTION.search(name), name
        assert "vision_model" not in name and "qformer" not in name
    assert tiny_run.adapter_bytes < 1_000_000  # kilobytes, not the base
    assert not list(adapter.parent.glob(".adapter-*"))  # no temporary left behind


def test_adapter_records_its_base(tiny_run, tiny_base):
    config = json.loads((tiny_run.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base)
    meta = json.loads((tiny_run.adapter_dir / "multimodal_lora.json").read_text())
    assert meta["base"]["name"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{16}", meta["base"]["fingerprint"])
    assert meta["task"] == "caption"


@pytest.mark.slow
def test_adapter_learns_held_out_captions(captioner, validation):
    assert len(validation) >= 40
    images = [e.image for e in validation]
    references = [e.target for e in validation]
    tuned = captioner.caption(images, adapter="shapes")
    base = captioner.caption(images[:40], adapter=None)
    tuned_match = sum(c == r for c, r in zip(tuned, references)) / len(references)
    base_match = sum(c == r for c, r in zip(base, references)) / 40
    # The recipe's promise (issues 22 and 24): 0.90. Seeds 0, 1 and 2 gave 187, 187 and 188 of 200 on
    # 2026-12-07; with 8 epochs it was 172, which rounding-level changes moved by up to 10 images.
    assert tuned_match >= 0.9, f"held-out exact match {tuned_match:.2f}"
    assert base_match <= 0.05


def test_captions_stop_on_the_end_token(captioner, validation):
    images = [e.image for e in validation[:16]]
    batch = captioner.generation_inputs([load_image(i) for i in images], [""] * 16)
    with torch.no_grad(), captioner.using("shapes"):
        out = captioner.model.generate(**batch, max_new_tokens=20)
    new = out[:, batch["input_ids"].shape[1] :]
    stop = captioner.layout.stop_token_id
    for row in new.tolist():
        assert stop in row, "generation ran to max_new_tokens without the stop token"
        assert row.index(stop) <= 6  # "a red circle" is 4-5 tokens: no run-on repetition
    for text in captioner.caption(images, adapter="shapes"):
        assert re.fullmatch(r"an? \w+ \w+", text), text


def test_peft_reload_matches_captioner(tiny_run, captioner, validation):
    # Plain PEFT on the plain transformers base gives the same greedy captions.
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    base = Blip2ForConditionalGeneration.from_pretrained(captioner.base.name_or_path)
    model = PeftModel.from_pretrained(base, str(tiny_run.adapter_dir)).eval()
    images = [e.image for e in validation[:8]]
    batch = captioner.generation_inputs([load_image(i) for i in images], [""] * 8)
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=20)[:, batch["input_ids"].shape[1] :]
    peft_captions = [t.strip() for t in captioner.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert peft_captions == captioner.caption(images, adapter="shapes")


def test_train_and_caption_cli(tmp_path, shapes_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "multimodal_lora.train", str(RECIPES / "tiny.yaml"), f"output_dir={out}", "train.max_steps=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable parameters" in result.stderr
    assert "adapter saved to" in result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "recipe.yaml").is_file()
    images = sorted((shapes_dir / "validation").glob("*.png"))[:3]
    result = subprocess.run(
        [sys.executable, "-m", "multimodal_lora.caption", *map(str, images), "--adapter", str(out / "adapter")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == list(map(str, images))
