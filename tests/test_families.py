"""The families seam: detection, targets, layouts, the real configs on the meta device, and the tiny twins."""

from __future__ import annotations

import pytest
import torch

from multimodal_lora.config import LoraSettings, ModelConfig, load_recipe
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.data.sources import Example
from multimodal_lora.families import FAMILIES, family_for_config, family_named
from multimodal_lora.families.layouts import IGNORE_INDEX
from multimodal_lora.model.base import (
    add_lora,
    count_parameters,
    load_base,
    load_processor,
    meta_model,
    published_config,
    text_layout,
)

from .conftest import RECIPES

TINY = {"tiny": "blip2-opt", "tiny-t5": "blip2-t5", "tiny-instructblip": "instructblip-vicuna"}


def test_every_shipped_config_is_recognised_by_exactly_one_family():
    shipped = {hub: f for f in FAMILIES for hub in f.published}
    assert set(shipped) >= {
        "Salesforce/blip2-opt-2.7b",
        "Salesforce/blip2-flan-t5-xl",
        "Salesforce/blip2-flan-t5-xxl",
        "Salesforce/instructblip-vicuna-7b",
    }
    for hub, family in shipped.items():
        config = published_config(hub)
        assert [f.name for f in FAMILIES if f.matches(config)] == [family.name], hub


def test_an_unknown_architecture_is_refused_with_the_supported_ones():
    from transformers import Blip2Config, GPT2Config

    config = Blip2Config(text_config=GPT2Config().to_dict())
    with pytest.raises(
        ConfigError, match="'gpt2' language model is not a supported architecture; supported: blip2-opt"
    ):
        family_for_config(config)


# --- the real configs on the meta device ------------------------------------------------------


def test_flan_t5_xl_default_lora_count():
    # Default targets [q, v] in every T5 attention: 24 encoder self + 24 decoder self + 24 decoder cross = 72
    # attentions × 2 projections = 144 adapted Linear(2048 -> 32 heads × 64 = 2048); each adds
    # A (16 × 2048) + B (2048 × 16) = 65,536 parameters: 144 × 65,536 = 9,437,184.
    model = meta_model(published_config("Salesforce/blip2-flan-t5-xl"))
    counts = count_parameters(add_lora(model, LoraSettings(r=16)))
    assert counts["language model"][0] == counts["total"][0] == 9_437_184
    assert counts["vision"][0] == counts["Q-Former"][0] == counts["projection"][0] == 0
    assert 3.8e9 < counts["total"][1] < 4.0e9  # "3.94B" on the hub card


def test_flan_t5_xxl_lora_count():
    # [q, v], d_model 4096, 64 heads × 64 = 4096: 144 × (16 × 4096 + 4096 × 16) = 144 × 131,072 = 18,874,368.
    model = meta_model(published_config("Salesforce/blip2-flan-t5-xxl"))
    assert count_parameters(add_lora(model, LoraSettings(r=16)))["total"][0] == 18_874_368


def test_instructblip_vicuna_7b_default_lora_count():
    # Default [q_proj, v_proj] in 32 LLaMA layers, Linear(4096 -> 4096):
    # 2 × 32 × (16 × 4096 + 4096 × 16) = 64 × 131,072 = 8,388,608.
    model = meta_model(published_config("Salesforce/instructblip-vicuna-7b"))
    counts = count_parameters(add_lora(model, LoraSettings(r=16)))
    assert counts["language model"][0] == counts["total"][0] == 8_388_608
    assert counts["Q-Former"][0] == counts["vision"][0] == 0


def test_t5_cross_attention_is_adapted_and_only_language_model_attention():
    model = meta_model(published_config("Salesforce/blip2-flan-t5-xl"))
    peft_model = add_lora(model, LoraSettings(r=4, target_modules=["o"]))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".EncDecAttention.o.lora_A" in n for n in names)
    assert all(".language_model." in n and (".SelfAttention.o." in n or ".EncDecAttention.o." in n) for n in names)
    # 72 attentions × (4 × 2048 + 2048 × 4)
    assert (
        len(names) == 2 * 72
        and sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) == 72 * 16_384
    )


# --- targets are checked against the base's family, before anything loads ----------------------


def test_targets_are_validated_against_the_family_and_the_error_lists_its_names(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  base: tiny-t5\nlora:\n  target_modules: [q_proj, v]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert "blip2-t5 language model's attention has no 'q_proj'" in str(err.value)
    assert "choose from q, k, v, o" in str(err.value)
    recipe.write_text("model:\n  base: Salesforce/instructblip-vicuna-7b\nlora:\n  target_modules: [out_proj]\n")
    with pytest.raises(ConfigError, match="choose from q_proj, k_proj, v_proj, o_proj") as err:
        load_recipe(recipe)
    assert "did you mean o_proj?" in str(err.value)


# --- token layouts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    return {name: (load_base(ModelConfig(base=name, device="cpu"))[0], load_processor(name)) for name in TINY}


def test_each_tiny_twin_is_its_family_and_stops_on_its_stop_token(tiny_models):
    stops = {"tiny": "\n", "tiny-t5": "</s>", "tiny-instructblip": "</s>"}
    for name, (model, processor) in tiny_models.items():
        layout = text_layout(model, processor)
        assert family_for_config(model.config) is family_named(TINY[name])
        assert processor.tokenizer.decode([layout.stop_token_id]) == stops[name]
        assert model.generation_config.eos_token_id == layout.stop_token_id
        assert all(not p.requires_grad for p in model.parameters())


def test_encoder_decoder_layout_puts_the_prompt_in_the_encoder_and_learns_every_label(tiny_models):
    model, processor = tiny_models["tiny-t5"]
    layout, tok = text_layout(model, processor), processor.tokenizer
    encoded, truncated = layout.encode(tok, "Question: what colour? Answer:", "red", max_length=32)
    q = model.config.num_query_tokens
    assert encoded["input_ids"][:q] == [model.config.image_token_index] * q
    assert tok.decode(encoded["input_ids"][q:]) == "Question: what colour? Answer:</s>"
    assert tok.decode(encoded["labels"]) == "red</s>" and IGNORE_INDEX not in encoded["labels"]
    assert not truncated
    gen = layout.generation_inputs(tok, ["", "a photo of"])
    assert gen["input_ids"].shape[0] == 2 and gen["attention_mask"][0].sum() == q + 1  # right-padded: <image>×Q </s>


def test_instructblip_layout_gives_the_instruction_to_the_qformer(tiny_models):
    model, processor = tiny_models["tiny-instructblip"]
    layout = text_layout(model, processor)
    encoded, _ = layout.encode(processor.tokenizer, "What colour is it?", "red", max_length=32)
    qformer = processor.qformer_tokenizer
    assert (
        encoded["qformer_input_ids"][0] == qformer.cls_token_id
        and encoded["qformer_input_ids"][-1] == qformer.sep_token_id
    )
    assert qformer.decode(encoded["qformer_input_ids"], skip_special_tokens=True) == "what colour is it?"
    assert layout.reads_instruction
    # Same image, other instruction: another visual prefix.
    pixels = torch.randn(1, 3, 32, 32)
    a = model.get_image_features(pixel_values=pixels, **layout.qformer_inputs(["a"]), return_dict=True).pooler_output
    b = model.get_image_features(
        pixel_values=pixels, **layout.qformer_inputs(["what colour is it?"]), return_dict=True
    ).pooler_output
    assert not torch.allclose(a, b)


def test_lora_lands_only_in_each_familys_language_model_attention(tiny_models):
    import re

    for name, (model, _) in tiny_models.items():
        family = family_named(TINY[name])
        peft_model = add_lora(model, LoraSettings(r=2, alpha=4))
        pattern = family.target_pattern(family.default_targets)
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert trainable
        for n in trainable:
            module = n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            assert re.fullmatch(pattern, module), n
        peft_model.unload()


def test_recipes_of_every_family_load():
    for name in ("tiny-t5", "tiny-instructblip", "flan-t5-xl", "instructblip-vicuna-7b"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert recipe.lora.target_modules


def test_instructblip_feature_cache_keys_on_the_instruction(tiny_models, small_shapes_dir, tmp_path):
    from multimodal_lora.config import DataConfig
    from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
    from multimodal_lora.data.feature_cache import CachedPairDataset, PrefixCollator, forward_inputs, open_or_build
    from multimodal_lora.data.sources import read_imagefolder

    model, processor = tiny_models["tiny-instructblip"]
    layout = text_layout(model, processor)
    examples = read_imagefolder(small_shapes_dir / "train", DataConfig())[:4]
    examples = examples + [
        Example(e.image, "red", e.image_id, e.origin, question="What colour is it?") for e in examples
    ]
    # The same four images twice: captioned (no instruction), then asked a question.
    encoded = [
        ExampleEncoder(
            processor.tokenizer, layout, task=task, prompt=None, prompt_template="Q: {question}", max_length=24
        ).encode(e)
        for task, e in zip(["caption"] * 4 + ["vqa"] * 4, examples)
    ]
    instructions = [""] * 4 + ["Q: What colour is it?"] * 4
    model.eval()
    cache, keys = open_or_build(
        examples, model, processor.image_processor, tmp_path, progress=False, instructions=instructions, layout=layout
    )
    assert len(set(keys)) == 8 and cache.features.shape[0] == 8
    assert not torch.allclose(cache.prefix(keys[0]), cache.prefix(keys[4]))
    collate = Collator(layout.pad_token_id, layout.padding())
    pixels = collate([PairDataset(examples, encoded, processor.image_processor)[i] for i in range(8)])
    cached = PrefixCollator(collate)([CachedPairDataset(encoded, cache, keys)[i] for i in range(8)])
    with torch.no_grad():
        loss_pixels = model(**forward_inputs(pixels, torch.device("cpu"))).loss
        loss_cached = model(**forward_inputs(cached, torch.device("cpu"))).loss
    torch.testing.assert_close(loss_cached, loss_pixels)


def test_t5_int8_base_on_cpu_takes_lora(tiny_models):
    import bitsandbytes as bnb

    model, _ = load_base(ModelConfig(base="tiny-t5", device="cpu", quantization="int8"))
    assert isinstance(model.language_model.encoder.block[0].layer[0].SelfAttention.k, bnb.nn.Linear8bitLt)
    # Default [q, v] in 6 attentions (2 encoder self, 2 decoder self, 2 decoder cross) of width 128:
    # 6 × 2 × (8 × 128 + 128 × 8) = 24,576.
    assert count_parameters(add_lora(model, LoraSettings(r=8, alpha=16)))["language model"][0] == 24_576


@pytest.mark.parametrize("name", ["tiny", "tiny-instructblip", "tiny-t5"])
def test_the_loss_from_logits_kept_only_where_labels_are_learned_is_the_full_loss(tiny_models, small_shapes_dir, name):
    from multimodal_lora.config import DataConfig
    from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
    from multimodal_lora.data.feature_cache import forward_inputs
    from multimodal_lora.data.sources import read_imagefolder

    model, processor = tiny_models[name]
    layout = text_layout(model, processor)
    examples = read_imagefolder(small_shapes_dir / "train", DataConfig())[:4]
    # Captions and questions of different lengths: the earliest learned label differs by row.
    examples = examples[:2] + [
        Example(e.image, "red", e.image_id, e.origin, question="What colour is this shape here?") for e in examples[2:]
    ]
    encoded = [
        ExampleEncoder(processor.tokenizer, layout, task=t, prompt=None, prompt_template="Q: {question}", max_length=24).encode(e)
        for t, e in zip(["caption"] * 2 + ["vqa"] * 2, examples)
    ]
    batch = Collator(layout.pad_token_id, layout.padding())([PairDataset(examples, encoded, processor.image_processor)[i] for i in range(4)])
    trimmed, keep = layout.for_loss(batch)
    model.eval()
    with torch.no_grad():
        full = model(**forward_inputs(batch, torch.device("cpu")), use_cache=False)
        if keep is None:  # T5's decoder reads only the target: nothing to leave out
            assert name == "tiny-t5" and trimmed is batch
            return
        cut = model(**forward_inputs(trimmed, torch.device("cpu")), use_cache=False, logits_to_keep=keep)
    first = int((batch["labels"] != -100).int().argmax(dim=1).min())
    assert keep == batch["labels"].shape[1] - first + 1 < batch["labels"].shape[1]
    assert cut.logits.shape[1] == keep  # the output head ran on K positions, not all
    torch.testing.assert_close(cut.loss, full.loss)
