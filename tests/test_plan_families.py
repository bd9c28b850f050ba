"""The memory plan, the quantization config and the data check for the families whose attention is
grouped (fewer key-value heads than query heads), whose image tokens vary with the image, and whose
frozen image path stays unquantized."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from multimodal_lora.config import LoraSettings, ModelConfig, load_recipe
from multimodal_lora.families import family_for_config, qwen2_5_vl, smolvlm
from multimodal_lora.model.base import (
    base_config,
    load_base,
    load_processor,
    meta_model,
    published_config,
    quantization_config,
)
from multimodal_lora.model.plan import base_weight_bytes, measured_weight_bytes, plan_memory, plan_recipe

from .conftest import RECIPES


def test_grouped_query_attention_keeps_narrow_keys_and_values():
    config = published_config("Qwen/Qwen2.5-VL-3B-Instruct")
    dims = family_for_config(config).plan_dims(config.text_config)
    # 16 query heads and 2 key-value heads of 128: keys and values are 256 wide, not 2,048.
    assert (dims.hidden, dims.attention_width, dims.kv_width, dims.ffn, dims.layers) == (2048, 2048, 256, 11008, 36)
    plan = plan_memory(config, quantization="none", dtype="bf16", lora=LoraSettings(r=16, dropout=0.0), batch_size=1, max_length=9)
    tokens = 391 + 9  # the 640×480 plan image: 17 × 23 tokens
    per_layer = 4 * 2048 + 2 * 2048 + 2 * 256 + 2 * 11008  # 34,816 values; full attention would be 38,400
    logits = tokens * 151_936 * (2 + 4 + 4 + 4)
    assert plan.sequence_length == tokens
    assert plan.activations == tokens * per_layer * 36 * 2 + logits
    assert plan.activations_checkpointed == tokens * (2048 * 36 + per_layer) * 2 + logits
    # LoRA is counted on the meta model, so the narrow k and v are in it already:
    # 36 × (q, o 16 × (2048 + 2048) + k, v 16 × (2048 + 256)).
    assert plan.lora_parameters == 36 * (2 * 16 * 4096 + 2 * 16 * 2304) == 7_372_800
    # SmolVLM2-500M: 15 heads and 5 key-value heads of 64; PaliGemma 2: 8 and 4 of 256 (queries 2,048 < hidden 2,304).
    for hub_id, widths in (("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", (960, 320)), ("google/paligemma2-3b-pt-448", (2048, 1024))):
        text = published_config(hub_id).text_config
        dims = family_for_config(published_config(hub_id)).plan_dims(text)
        assert (dims.attention_width, dims.kv_width) == widths


def test_smolvlm_plans_the_tiles_of_a_split_image():
    # 640×480 is resized to a longest edge of 4 tiles and split into 4 × 3 tiles and the global view:
    # each tile <fake><row_R_col_C> and N <image>, a newline per row and one more, the global view N + 3.
    big = published_config("HuggingFaceTB/SmolVLM2-2.2B-Instruct")  # 384 px tiles, N = 81
    small = published_config("HuggingFaceTB/SmolVLM2-500M-Video-Instruct")  # 512 px tiles, N = 64
    assert smolvlm.published_image_processor(big).get_number_of_image_patches(480, 640, {}) == (13, 3, 4)
    assert smolvlm.SMOLVLM.image_tokens(big) == 12 * (81 + 2) + 4 + 84 == 1084
    assert smolvlm.SMOLVLM.image_tokens(small) == 12 * (64 + 2) + 4 + 67 == 863
    # The tiny twin's processor does not split: one view of 16 tokens and its three markers.
    tiny = load_processor("tiny-smolvlm").image_processor
    assert smolvlm.SMOLVLM.image_tokens(base_config("tiny-smolvlm"), tiny) == 16 + 3
    assert plan_recipe(load_recipe(RECIPES / "smolvlm2-2.2b.yaml")).sequence_length == 1084 + 64
    assert plan_recipe(load_recipe(RECIPES / "smolvlm2-500m.yaml")).sequence_length == 863 + 64
    assert plan_recipe(load_recipe(RECIPES / "tiny-smolvlm.yaml")).sequence_length == 19 + 24
    # Qwen's tiny twin: 640×480 within its 1,024-pixel bound is 3 × 4 merged patches, not the published 391.
    assert plan_recipe(load_recipe(RECIPES / "tiny-qwen2vl.yaml")).sequence_length == 12 + 40
    assert qwen2_5_vl.FAMILY.image_tokens(published_config("Qwen/Qwen2.5-VL-7B-Instruct")) == 17 * 23


def test_the_image_path_stays_out_of_the_quantization_config():
    qwen = family_for_config(published_config("Qwen/Qwen2.5-VL-3B-Instruct"))
    config = quantization_config("4bit", "bf16", family=qwen)
    assert config.llm_int8_skip_modules == ["model.visual.patch_embed", "model.visual.blocks", "model.visual.merger", "lm_head"]
    # BLIP-2 as before: transformers' own choice (its Q-Former in fp32, the vision encoder quantized).
    blip2 = family_for_config(published_config("Salesforce/blip2-opt-2.7b"))
    assert quantization_config("int8", "bf16", family=blip2).llm_int8_skip_modules is None


@pytest.mark.parametrize(
    ("base", "quantization", "vision", "lm", "kept"),
    [
        # Qwen: 2 vision blocks × (qkv, proj, gate, up, down) + the merger's 2; 2 text layers × (q, k, v, o, gate, up, down).
        ("tiny-qwen2vl", "int8", 2 * 5 + 2, 2 * 7, torch.bfloat16),
        ("tiny-qwen2vl", "4bit", 2 * 5 + 2, 2 * 7, torch.bfloat16),
        # SmolVLM: 2 vision layers × (q, k, v, out, fc1, fc2) + the connector's 1; it stays fp32 (Family.unquantized_in_dtype).
        ("tiny-smolvlm", "4bit", 2 * 6 + 1, 2 * 7, torch.float32),
    ],
)
def test_a_quantized_base_keeps_its_image_path_unquantized_and_trains(base, quantization, vision, lm, kept):
    import bitsandbytes as bnb

    from multimodal_lora.model.base import add_lora, family_of, text_layout

    model, _ = load_base(ModelConfig(base=base, device="cpu", quantization=quantization, dtype="bf16"))
    family = family_of(model)
    quantized = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    image = [m for n, m in linears.items() if n.startswith(family.keep_unquantized())]
    text = [m for n, m in linears.items() if n.startswith(family.language_model + ".")]
    assert len(image) == vision and all(type(m) is torch.nn.Linear for m in image)
    assert len(text) == lm and all(isinstance(m, quantized) for m in text)
    # PEFT's prepare_model_for_kbit_training made every other weight fp32; Qwen's image path is cast back.
    assert {p.dtype for m in image for p in m.parameters()} == {kept}
    planned = base_weight_bytes(meta_model(base_config(base)), quantization, "bf16")
    assert planned == pytest.approx(measured_weight_bytes(model), rel=0.01)
    # One step's forward and backward through the mixed dtypes.
    processor = load_processor(base)
    layout = text_layout(model, processor)
    peft_model = add_lora(model, LoraSettings(r=4))
    items = layout.image_inputs.split(processor.image_processor([Image.new("RGB", (32, 32))], return_tensors="pt"))
    encoded = layout.with_image(layout.encode(processor.tokenizer, "Describe the image.", "a red circle", 40)[0], items[0])
    ids = torch.tensor([encoded["input_ids"]])
    batch = {k: torch.tensor([v]) for k, v in encoded.items()} | layout.image_inputs.collate(items) | layout.image_inputs.token_inputs(ids)
    loss = peft_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_data_check_reports_the_image_tokens_each_image_takes(small_shapes_dir, tmp_path):
    from multimodal_lora.data.check import check_data

    # Half the training images at 64×48: the tiny twin's processor (1,024 pixels) gives them 3 × 4 tokens.
    root = tmp_path / "mixed"
    shutil.copytree(small_shapes_dir, root)
    files = sorted((root / "train").glob("*.png"))
    for path in files[::2]:
        Image.open(path).convert("RGB").resize((64, 48)).save(path)
    recipe = load_recipe(RECIPES / "tiny-qwen2vl.yaml", [f"data.path={root}"])
    report = check_data(recipe, progress=False)
    assert sorted(report.image_tokens) == [12] * 12 + [16] * 20 and report.image_sizes == 2
    assert report.text_limit == 32768 - 16
    assert "image tokens per image:    min 12 / median 16 / p95 16 / max 16  (the base's processor, 2 image sizes)" in report.format()
