"""Qwen3-VL: the real configs on the meta device, the anchored targets (the vision blocks' MLPs share the
mergers' names), the chat layout without a system turn, the connector's memory term against autograd,
and that its feature cache is refused only when the connector trains.

What every family's tiny recipe must do (learn, PEFT, merge, refusal by another family, CLI and
evaluate) is in tests/test_family_recipes.py, which trains ``recipes/tiny-qwen3vl.yaml`` too; the
vLLM route's frame and its torchvision refusal are in tests/test_vllm.py.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from multimodal_lora.config import LoraSettings, ModelConfig, load_recipe
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.families import IGNORE_INDEX, family_for_config, qwen2_5_vl, qwen3_vl
from multimodal_lora.model.base import (
    add_lora,
    count_lora_parts,
    count_parameters,
    load_base,
    meta_model,
    published_config,
)

from .conftest import RECIPES
from .test_parts import ALL
from .test_parts_families import _saved_values

FAMILY = qwen3_vl.FAMILY

# r=16 throughout. LoRA on a linear in→out holds r × (in + out) values. Qwen3-VL sets head_dim 128 explicitly.
REAL = {
    # 4B: 36 layers, hidden 2560, 32 query heads (q 2560→4096) and 8 key/value heads (k/v 2560→1024):
    #   q, o 16 × 6,656 = 106,496 each; k, v 16 × 3,584 = 57,344 each: 327,680 a layer × 36 = 11,796,480.
    # MLP 2560↔9728: 16 × 12,288 = 196,608 each, 589,824 a layer × 36 = 21,233,664.
    # Connector: vision width 1024, 2×2 merged: H = 4096. linear_fc1 4096→4096 16 × 8,192 = 131,072,
    #   linear_fc2 4096→2560 16 × 6,656 = 106,496: 237,568 a merger × 4 (the merger, 3 DeepStack) = 950,272.
    # 4,437,815,808 parameters on meta (the hub's count for the checkpoint; the head is tied).
    "Qwen/Qwen3-VL-4B-Instruct": (11_796_480, 21_233_664, 950_272, 4_437_815_808),
    # 8B: 36 layers, hidden 4096, q 4096→4096, k/v 4096→1024:
    #   q, o 16 × 8,192 = 131,072 each; k, v 16 × 5,120 = 81,920 each: 425,984 a layer × 36 = 15,335,424.
    # MLP 4096↔12288: 16 × 16,384 = 262,144 each, 786,432 a layer × 36 = 28,311,552.
    # Connector: vision width 1152, H = 4608. fc1 16 × 9,216 = 147,456, fc2 4608→4096 16 × 8,704 = 139,264:
    #   286,720 a merger × 4 = 1,146,880. 8,767,123,696 parameters (untied head).
    "Qwen/Qwen3-VL-8B-Instruct": (15_335_424, 28_311_552, 1_146_880, 8_767_123_696),
}


@pytest.mark.parametrize("name", list(REAL))
def test_lora_counts_per_part_on_the_real_configs(name):
    attention, mlp, connector, total = REAL[name]
    default = count_parameters(add_lora(meta_model(published_config(name)), LoraSettings(r=16)))
    assert default["language model"][0] == default["total"][0] == attention  # the default: attention only
    assert default["vision"][0] == default["projection"][0] == 0
    assert default["total"][1] == total + attention
    every = count_lora_parts(add_lora(meta_model(published_config(name)), LoraSettings(r=16, parts=ALL)))
    assert every == {"attention": attention, "mlp": mlp, "connector": connector}


def test_the_family_is_found_from_its_class_and_each_part_stays_in_its_place():
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    assert family_for_config(Qwen3VLConfig()) is FAMILY
    assert family_for_config(Qwen2_5_VLConfig()) is qwen2_5_vl.FAMILY  # no overlap with its predecessor
    assert FAMILY.model_cls().__name__ == "Qwen3VLForConditionalGeneration"
    names = [name for name, _ in meta_model(published_config("Qwen/Qwen3-VL-4B-Instruct")).named_modules()]
    hits = {part: [n for n in names if re.fullmatch(p, n)] for part, p in FAMILY.part_patterns(ALL).items()}
    assert len(hits["attention"]) == 36 * 4 and all(n.startswith("model.language_model.layers.") for n in hits["attention"])
    assert len(hits["mlp"]) == 36 * 3 and all(n.startswith("model.language_model.layers.") for n in hits["mlp"])
    mergers = ["model.visual.merger", *(f"model.visual.deepstack_merger_list.{i}" for i in range(3))]
    assert sorted(hits["connector"]) == sorted(f"{m}.linear_fc{k}" for m in mergers for k in (1, 2))
    # The vision blocks' attention (qkv, proj) and MLP (linear_fc1/2, the mergers' names) are never hit.
    vision = [n for n in names if n.startswith("model.visual.blocks.") and n.endswith(("qkv", "proj", "linear_fc1", "linear_fc2"))]
    assert len(vision) == 24 * 4 and not [n for n in vision if FAMILY.part_of(n)]
    with pytest.raises(ConfigError, match="has no 'q_norm'; choose from q_proj, k_proj, v_proj, o_proj"):
        FAMILY.target_pattern(["q_norm"])


def test_the_chat_layout_has_no_system_turn_and_learns_only_the_answer():
    from .test_family_qwen import chat_parts

    processor, layout, _ = chat_parts(qwen3_vl)
    tokenizer = processor.tokenizer
    encoded, _ = layout.encode(tokenizer, "What colour?", "a red circle", max_length=64)
    learned = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "a red circle<|im_end|>"
    prompt = tokenizer.decode(encoded["input_ids"][: -len(learned)])
    # Qwen2.5-VL's template would start with "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n".
    assert prompt == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n"
    assert layout.image_inputs.max_tokens == 16  # the tiny processor's 32×32 budget, 8×8 patches merged 2×2
    # The plan's 640×480 photo at patch 16 × merge 2 (32 px) within 65,536 … 16,777,216 pixels: 15 × 20.
    assert FAMILY.image_tokens(published_config("Qwen/Qwen3-VL-8B-Instruct")) == 300


def test_the_feature_cache_is_accepted_and_refused_only_when_the_connector_trains():
    """DeepStack's features are frozen functions of the image too, cached beside the merger's (their
    equality with pixels is in tests/test_feature_cache_ragged.py): ``true`` passes the family's check;
    what is refused, from the config alone, is the generic case of a trained connector."""
    from multimodal_lora.training import recipe as training_recipe

    assert FAMILY.no_feature_cache is None
    recipe = load_recipe(RECIPES / "tiny-qwen3vl.yaml", ["train.cache_image_features=true"])
    assert training_recipe.check_family(recipe) is FAMILY
    with pytest.raises(ConfigError, match="cache_image_features: true caches .* lora.parts trains the connector"):
        load_recipe(RECIPES / "tiny-qwen3vl.yaml", ["lora.parts=[attention,connector]", "train.cache_image_features=true"])


def test_the_connector_term_is_what_autograd_keeps_in_the_tiny_twin():
    """The mergers' memory term (merger and DeepStack merger) against the tensors autograd saves
    when their LoRA trains, one 32×32 image (16 merged tokens) more."""
    from multimodal_lora.model.base import load_processor, set_train_mode

    model = add_lora(load_base(ModelConfig(base="tiny-qwen3vl", device="cpu"))[0], LoraSettings(r=4, dropout=0.05, parts=["connector"]))
    set_train_mode(model)
    inner = model.get_base_model()
    assert inner.model.visual.merger.training and inner.model.visual.deepstack_merger_list.training
    assert not inner.model.visual.blocks.training
    processor = load_processor("tiny-qwen3vl").image_processor

    def per_batch(n):
        images = [Image.new("RGB", (32, 32), (40 * i, 80, 200)) for i in range(n)]
        batch = processor(images=images, return_tensors="pt")
        return _saved_values(inner, {k: batch[k] for k in ("pixel_values", "image_grid_thw")})

    measured = per_batch(2) - per_batch(1)
    # 2 mergers (1 + one DeepStack tap) × 16 rows × (4 × 256 + 2 × 4) = 33,024
    assert measured == qwen3_vl.merger_values(inner.config.vision_config, 4, rows=16) == 33_024


@pytest.mark.slow
def test_mixed_sizes_in_one_batch_equal_one_by_one_and_the_server_decodes_continuously():
    """Qwen3-VL's per-image token counts (and DeepStack's per-image features) in one padded batch give
    what each image gives alone; the server's decode loop takes it (Qwen2.5-VL's 3-D positions, whose
    equality with caption() tests/test_family_recipes.py checks for rows that join mid-way)."""
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.serve.continuous import continuous_problem

    captioner = Captioner("tiny-qwen3vl", device="cpu")
    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue"), Image.new("RGB", (40, 64), "green")]
    batch = captioner.generation_inputs(images, [""] * len(images))
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [16, 12, 15]
    assert captioner.caption(images, max_new_tokens=6) == [captioner.caption(i, max_new_tokens=6) for i in images]
    assert continuous_problem(captioner) is None
