"""The tiny base, loading, LoRA placement and counts, int8 on CPU."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from multimodal_lora.config import LoraSettings, ModelConfig, load_recipe
from multimodal_lora.families.blip2_opt import build_tiny_model, build_tokenizer
from multimodal_lora.model.base import (
    add_lora,
    config_fingerprint,
    count_parameters,
    load_base,
    load_processor,
    meta_model,
    published_config,
    text_layout,
)

from .conftest import RECIPES


def test_tiny_base_is_deterministic():
    tokenizer_a, tokenizer_b = build_tokenizer(), build_tokenizer()
    assert tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
    a = build_tiny_model(tokenizer_a, seed=0).state_dict()
    b = build_tiny_model(tokenizer_b, seed=0).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_tiny_model(tokenizer_a, seed=1).state_dict()
    assert not torch.equal(a["language_model.model.decoder.layers.0.self_attn.q_proj.weight"], c["language_model.model.decoder.layers.0.self_attn.q_proj.weight"])


def test_tiny_base_loads_like_the_real_one(tiny_base):
    from transformers import Blip2ForConditionalGeneration, OPTForCausalLM

    # The plain transformers path, as for Salesforce/blip2-opt-2.7b.
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_base)
    assert isinstance(model.language_model, OPTForCausalLM)
    names = dict(model.named_modules())
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"language_model.model.decoder.layers.1.self_attn.{proj}" in names
    total = sum(p.numel() for p in model.parameters())
    assert 100_000 < total < 5_000_000
    # Weight files on disk are bit-identical to a fresh build.
    fresh = build_tiny_model(build_tokenizer(), seed=0).state_dict()
    saved = load_file(tiny_base / "model.safetensors")
    assert all(torch.equal(saved[k], fresh[k]) for k in saved)


def test_tiny_stops_on_newline_like_blip2_opt(tiny_base):
    processor = load_processor("tiny")
    model, _ = load_base(ModelConfig(base="tiny", device="cpu"))
    layout = text_layout(model, processor)
    assert processor.tokenizer.decode([layout.stop_token_id]) == "\n"
    assert layout.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert layout.bos_token_id == 2 and layout.pad_token_id == 1  # OPT's ids


def test_football_lora_on_the_real_architecture_has_the_papers_count():
    # 2 matrices (q, v) × 32 layers × (2560 × 16 + 16 × 2560) = 5,242,880; built on the meta device.
    recipe = load_recipe(RECIPES / "football.yaml")
    model = meta_model(published_config("blip2-opt-2.7b"))
    peft_model = add_lora(model, recipe.lora)
    counts = count_parameters(peft_model)
    assert counts["total"][0] == 5_242_880
    assert counts["language model"][0] == 5_242_880
    assert counts["vision"][0] == counts["Q-Former"][0] == counts["projection"][0] == 0
    assert 3.7e9 < counts["total"][1] < 3.9e9


def test_lora_only_in_language_model_attention(tiny_base):
    model, _ = load_base(ModelConfig(base="tiny", device="cpu"))
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "out_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable, "LoRA added no parameters"
    for name in trainable:
        assert ".language_model.model.decoder.layers." in name
        assert ".self_attn.q_proj.lora_" in name or ".self_attn.out_proj.lora_" in name
    # Q-Former attention has query/key/value and the vision MLP fc1/fc2: none adapted.
    assert not any("qformer" in n or "vision_model" in n for n in trainable)


def test_lora_starts_as_the_identity(tiny_base):
    model, _ = load_base(ModelConfig(base="tiny", device="cpu"))
    batch = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "input_ids": torch.tensor([[model.config.image_token_index] * 8 + [2, 68, 200]] * 2),
    }
    with torch.no_grad():
        before = model(**batch).logits
        peft_model = add_lora(model, LoraSettings(r=8, alpha=16))
        after = peft_model(**batch).logits
    assert torch.equal(before, after)  # lora_B starts at zero


def test_int8_base_on_cpu_uses_real_bitsandbytes_layers(tiny_base):
    import bitsandbytes as bnb

    model, info = load_base(ModelConfig(base="tiny", device="cpu", quantization="int8"))
    q_proj = model.language_model.model.decoder.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt)
    assert q_proj.weight.dtype == torch.int8
    peft_model = add_lora(model, LoraSettings(r=8, alpha=16))
    assert count_parameters(peft_model)["language model"][0] == 2 * 4 * (128 * 8 + 8 * 128)
    # The fingerprint ignores quantization: an adapter trained on int8 fits the fp32 base.
    fp32, fp32_info = load_base(ModelConfig(base="tiny", device="cpu"))
    assert info.fingerprint == fp32_info.fingerprint == config_fingerprint(fp32.config)


def test_int8_training_lowers_the_loss(tiny_base, shapes_dir):
    from multimodal_lora.data.images import load_image

    torch.manual_seed(0)
    model, _ = load_base(ModelConfig(base="tiny", device="cpu", quantization="int8"))
    processor = load_processor("tiny")
    layout = text_layout(model, processor)
    model = add_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
    images = [load_image(p) for p in sorted((shapes_dir / "train").glob("*.png"))[:8]]
    pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
    captions = [line for line in (shapes_dir / "train" / "metadata.jsonl").read_text().splitlines()[:8]]
    import json

    rows = [[layout.bos_token_id, *processor.tokenizer(" " + json.loads(c)["text"], add_special_tokens=False).input_ids, layout.stop_token_id] for c in captions]
    width = max(map(len, rows))
    ids = torch.full((8, 8 + width), layout.pad_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : 8 + len(row)] = torch.tensor([layout.image_token_id] * 8 + row)
        labels[i, 9 : 8 + len(row)] = torch.tensor(row[1:])
        mask[i, : 8 + len(row)] = 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_building_the_tiny_base_leaves_the_global_rng_alone(tmp_path):
    # A run that builds the base on first use must draw the same numbers as one that finds it cached.
    from multimodal_lora.model.tiny import ensure_tiny_base

    torch.manual_seed(123)
    state = torch.get_rng_state()
    ensure_tiny_base(tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
