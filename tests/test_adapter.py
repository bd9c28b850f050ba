"""Adapter directories: save → load round trip, and every broken one refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multimodal_lora import caption
from multimodal_lora.adapter import AdapterMeta, read_adapter, save_adapter
from multimodal_lora.config import LoraSettings, ModelConfig
from multimodal_lora.core.errors import AdapterError, ImageError
from multimodal_lora.data.images import load_image
from multimodal_lora.inference.captioner import Captioner
from multimodal_lora.model.base import add_lora, load_base, load_processor, text_layout


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_base, shapes_dir):
    """An adapter trained a few steps in memory, its logits and captions, then saved."""
    torch.manual_seed(0)
    model, base = load_base(ModelConfig(base="tiny", device="cpu"))
    processor = load_processor("tiny")
    model = add_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
    layout = text_layout(model, processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images = [load_image(p) for p in sorted((shapes_dir / "train").glob("*.png"))[:4]]
    pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
    ids = torch.tensor([[layout.image_token_id] * 8 + [2, 68, 224, 408, layout.stop_token_id]] * 4)
    labels = ids.clone()
    labels[:, :9] = -100
    for _ in range(3):
        loss = model(pixel_values=pixel_values, input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=ids).logits
    # Greedy captions of the in-memory model, through the Captioner's own input layout.
    inputs = Captioner("tiny", device="cpu").generation_inputs(images, [""] * len(images))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=20)[:, inputs["input_ids"].shape[1] :]
    captions = [t.strip() for t in processor.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    out = tmp_path_factory.mktemp("saved") / "adapter"
    save_adapter(model, out, AdapterMeta(base=base))
    return {"dir": out, "logits": logits, "pixel_values": pixel_values, "ids": ids, "images": images, "captions": captions}


def test_round_trip_gives_identical_logits_and_captions(saved):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    directory, meta = read_adapter(saved["dir"])
    base = Blip2ForConditionalGeneration.from_pretrained(meta.base.name_or_path)
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    with torch.no_grad():
        logits = model(pixel_values=saved["pixel_values"], input_ids=saved["ids"]).logits
    assert torch.equal(logits, saved["logits"])
    assert caption(saved["images"], adapter=saved["dir"]) == saved["captions"]


def test_missing_adapter_config(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved["dir"], broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        read_adapter(broken)
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")


def test_truncated_weights(saved, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(saved["dir"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors: truncated or corrupt"):
        caption(saved["images"][0], adapter=broken)


def test_adapter_for_another_base_is_refused_naming_both(saved, tmp_path, tiny_base):
    from transformers import Blip2ForConditionalGeneration

    # Another base: the tiny one with a third decoder layer.
    config = Blip2ForConditionalGeneration.from_pretrained(tiny_base).config
    config.text_config.num_hidden_layers = 3
    other = tmp_path / "other-base"
    Blip2ForConditionalGeneration(config).save_pretrained(other)
    load_processor("tiny").save_pretrained(other)
    captioner = Captioner(str(other), device="cpu")
    with pytest.raises(AdapterError) as err:
        captioner.load_adapter(saved["dir"])
    message = str(err.value)
    assert "trained on base 'tiny'" in message and str(other) in message


def test_bad_images_name_the_file(saved, tmp_path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        caption(str(tmp_path / "missing.png"), adapter=saved["dir"])
    fake = tmp_path / "notes.jpg"
    fake.write_text("these are not pixels")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        caption(str(fake), adapter=saved["dir"])


def test_save_is_atomic_over_an_existing_adapter(saved, tmp_path):
    # Overwriting keeps a complete adapter at every moment and leaves no temporaries.
    target = tmp_path / "adapter"
    shutil.copytree(saved["dir"], target)
    config = json.loads((target / "adapter_config.json").read_text())
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    base = Blip2ForConditionalGeneration.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(target))
    _, meta = read_adapter(target)
    save_adapter(model, target, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    read_adapter(target)
