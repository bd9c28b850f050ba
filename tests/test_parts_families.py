"""``lora.parts`` on Qwen2.5-VL, PaliGemma 2 and SmolVLM2 / Idefics3: the language model's MLP and the connector.

The real architectures on the ``meta`` device for the counts (worked out in the comments), the tiny twins
for where every tensor lands and what autograd keeps, and one short real training on the tiny PaliGemma
for PEFT's loading and the merge.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from PIL import Image

from multimodal_lora.config import LoraSettings, ModelConfig, load_recipe
from multimodal_lora.families import family_for_config
from multimodal_lora.model.base import (
    add_lora,
    count_lora_parts,
    count_parameters,
    load_base,
    meta_model,
    published_config,
)

from .conftest import RECIPES
from .test_parts import ALL, adapted_modules, train_all_parts

NEW_TINY = ["tiny-qwen2vl", "tiny-paligemma", "tiny-smolvlm"]

# r=16 throughout. LoRA on a linear in→out holds r × (in + out) values.
REAL = {
    # Qwen2.5-VL-3B: 36 layers, hidden 2048, 16 heads of 128, 2 KV heads (k/v 2048→256), MLP 11008:
    # q/o 16 × 4,096 = 65,536 each, k/v 16 × 2,304 = 36,864 each: 204,800 per layer → 7,372,800;
    # gate/up/down 16 × 13,056 = 208,896 each, 626,688 per layer → 22,560,768;
    # merger (vision width 1280, 2×2 merge: 5120): mlp.0 5120→5120 16 × 10,240 = 163,840,
    # mlp.2 5120→2048 16 × 7,168 = 114,688 → 278,528.
    "Qwen/Qwen2.5-VL-3B-Instruct": (7_372_800, 22_560_768, 278_528, "projection"),
    # PaliGemma 2 3B: 26 Gemma 2 layers, hidden 2304, 8 heads of 256 (q 2304→2048), 4 KV heads (k/v 2304→1024):
    # q/o 16 × 4,352 = 69,632 each, k/v 16 × 3,328 = 53,248 each: 245,760 per layer → 6,389,760;
    # MLP 2304↔9216: 16 × 11,520 = 184,320 each, 552,960 per layer → 14,376,960;
    # projector 1152→2304: 16 × 3,456 = 55,296.
    "google/paligemma2-3b-pt-224": (6_389_760, 14_376_960, 55_296, "projection"),
    # SmolVLM2-2.2B: 24 layers, hidden 2048, 32 heads and 32 KV heads of 64: q/k/v/o 16 × 4,096 each,
    # 262,144 per layer → 6,291,456; MLP 2048↔8192: 16 × 10,240 = 163,840 each, 491,520 per layer → 11,796,480;
    # connector 1152 × 3² = 10,368 → 2048: 16 × 12,416 = 198,656.
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": (6_291_456, 11_796_480, 198_656, "connector"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_parameter_counts_per_part_on_the_real_architectures(name):
    attention, mlp, connector, component = REAL[name]
    model = add_lora(meta_model(published_config(name)), LoraSettings(r=16, parts=ALL))
    assert count_lora_parts(model) == {"attention": attention, "mlp": mlp, "connector": connector}
    counts = count_parameters(model)
    assert counts[component][0] == connector and counts["vision"][0] == 0
    assert counts["language model"][0] == attention + mlp
    assert counts["total"][0] == attention + mlp + connector


@pytest.mark.parametrize("name", list(REAL))
def test_mlp_and_connector_land_in_the_language_model_and_the_connector_never_the_vision_tower(name):
    config = published_config(name)
    family = family_for_config(config)
    model = add_lora(meta_model(config), LoraSettings(r=4, parts=["mlp", "connector"]))
    adapted = {n.removeprefix("base_model.model.").partition(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    leaves = {re.sub(r"\.\d+\.", ".N.", m) for m in adapted}
    language_model = {"qwen2.5-vl": "model.language_model", "paligemma": "model.language_model", "smolvlm": "model.text_model"}
    lm = language_model[family.name]
    connector = {
        "qwen2.5-vl": {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"},
        "paligemma": {"model.multi_modal_projector.linear"},
        "smolvlm": {"model.connector.modality_projection.proj"},
    }[family.name]
    # Qwen's vision blocks have gate_proj/up_proj/down_proj too; none of them may be adapted.
    assert leaves == {f"{lm}.layers.N.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")} | connector
    assert sum(m.startswith(f"{lm}.layers.") for m in adapted) == 3 * config.text_config.num_hidden_layers


# --- the connector's memory term: counted against what autograd keeps --------------------------


def _saved_values(model, batch: dict) -> int:
    """Values in the tensors autograd saves while the image path runs (each storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.get_image_features(**batch)
    return sum(storages.values())


@pytest.mark.parametrize("base", NEW_TINY)
def test_the_connector_term_is_what_autograd_keeps_in_the_tiny_twin(base):
    from multimodal_lora.families import qwen2_5_vl, smolvlm
    from multimodal_lora.model.base import load_processor, set_train_mode

    model = add_lora(load_base(ModelConfig(base=base, device="cpu"))[0], LoraSettings(r=4, dropout=0.05, parts=["connector"]))
    set_train_mode(model)
    inner = model.get_base_model()
    processor = load_processor(base).image_processor
    keys = ("pixel_values", "image_grid_thw", "pixel_attention_mask")

    def per_batch(n):
        images = [Image.new("RGB", (32, 32), (40 * i, 80, 200)) for i in range(n)]
        return _saved_values(inner, {k: v for k, v in processor(images=images, return_tensors="pt").items() if k in keys})

    measured = per_batch(2) - per_batch(1)  # one image more
    family = family_for_config(inner.config)
    if family is qwen2_5_vl.FAMILY:
        # The plan's figure is for its 640×480 image; the tiny twin's 32×32 image is 16 merged tokens.
        assert measured == qwen2_5_vl.merger_values(inner.config.vision_config, 4, rows=16)
    elif family is smolvlm.SMOLVLM:
        # The plan's figure is every view of its split 640×480 image; the tiny twin's image is one view.
        assert measured == smolvlm.view_activation_values(inner.config, 4)
    else:
        assert measured == family.connector.activation_values(inner.config, 4)
    assert measured > 0


def test_the_plan_adds_the_connector_term():
    from multimodal_lora.model.plan import plan_memory

    config = published_config("google/paligemma2-3b-pt-224")
    shape = dict(quantization="none", dtype="bf16", batch_size=4, max_length=32)
    without = plan_memory(config, lora=LoraSettings(r=16, parts=["attention", "mlp"]), **shape)
    every = plan_memory(config, lora=LoraSettings(r=16, parts=ALL), **shape)
    assert "LoRA by part: attention 6,389,760, mlp 14,376,960, connector 55,296" in every.format()
    # 256 patches × (SigLIP's 1152 + r) per image, 4 images, bf16.
    assert every.activations - without.activations == 4 * 256 * (1152 + 16) * 2


# --- the tiny twins: every tensor where it is asked for ------------------------------------------


@pytest.mark.parametrize("base", NEW_TINY)
def test_an_all_parts_adapter_holds_every_part_exactly(base, tmp_path):
    from multimodal_lora.adapter import AdapterMeta, save_adapter

    model, info = load_base(ModelConfig(base=base, device="cpu"))
    family = family_for_config(model.config)
    layers = model.config.text_config.num_hidden_layers
    model = add_lora(model, LoraSettings(r=4, parts=ALL))
    modules = adapted_modules(save_adapter(model, tmp_path / "adapter", AdapterMeta(base=info, parts=tuple(ALL))))
    by_part = {part: {m for m in modules if family.part_of(m) == part} for part in ALL}
    assert set().union(*by_part.values()) == modules
    assert len(by_part["attention"]) == 4 * layers and len(by_part["mlp"]) == 3 * layers
    assert len(by_part["connector"]) == (2 if family.name == "qwen2.5-vl" else 1)
    vision = {"qwen2.5-vl": "model.visual.blocks", "paligemma": "model.vision_tower", "smolvlm": "model.vision_model"}
    assert not any(m.startswith(vision[family.name]) for m in modules)


@pytest.mark.parametrize("base,trained", [("tiny-paligemma", "model.multi_modal_projector"), ("tiny-qwen2vl", "model.visual.merger")])
def test_only_the_connector_of_the_image_path_runs_in_train_mode(base, trained):
    from multimodal_lora.model.base import attribute, family_of, image_path_trainable, set_train_mode

    model = add_lora(load_base(ModelConfig(base=base, device="cpu"))[0], LoraSettings(parts=["attention", "connector"]))
    set_train_mode(model)
    inner = model.get_base_model()
    assert image_path_trainable(model) == [trained]
    for path in family_of(inner).image_path:
        assert attribute(inner, path).training == (path == trained), path


def test_the_feature_cache_turns_itself_off_when_paligemmas_projector_trains(caplog):
    from multimodal_lora.core.errors import ConfigError
    from multimodal_lora.training.loaders import cache_features

    recipe = load_recipe(RECIPES / "tiny-paligemma.yaml", ["lora.parts=[attention,connector]"])
    model = add_lora(load_base(ModelConfig(base="tiny-paligemma", device="cpu"))[0], recipe.lora)
    with caplog.at_level(logging.INFO, logger="multimodal_lora.training.loaders"):
        assert cache_features(recipe, model, epochs=8) is False
    expected = "lora.parts=[attention, connector] trains model.multi_modal_projector of the image path"
    assert f"image feature cache: off (cache_image_features=auto: {expected})" in caplog.text
    with pytest.raises(ConfigError, match="lora.parts trains the connector"):
        load_recipe(RECIPES / "tiny-paligemma.yaml", ["lora.parts=[attention,connector]", "train.cache_image_features=true"])


# --- a real run with every part on the tiny PaliGemma ---------------------------------------------


@pytest.fixture(scope="module")
def paligemma_all_parts(small_shapes_dir, tmp_path_factory):
    return train_all_parts("tiny-paligemma.yaml", small_shapes_dir, tmp_path_factory.mktemp("paligemma-all-parts"))


def test_paligemma_all_parts_loads_in_plain_peft_and_merges_to_the_same_logits(paligemma_all_parts, shapes_dir, tmp_path):
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration

    from multimodal_lora import Captioner
    from multimodal_lora.data.images import load_image
    from multimodal_lora.merge import merge_adapter

    adapter = paligemma_all_parts.adapter_dir
    assert json.loads((adapter / "multimodal_lora.json").read_text())["parts"] == ALL
    assert "the connector (`multi_modal_projector`)" in (adapter / "README.md").read_text()
    captioner = Captioner("tiny-paligemma", device="cpu")
    name = captioner.load_adapter(adapter, name="all")
    images = [load_image(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:4]]
    batch = captioner.generation_inputs(images, [captioner.caption_prompt(name)] * len(images))
    with torch.no_grad(), captioner.using(name):
        ours = captioner.model(**batch).logits
    with torch.no_grad(), captioner.using(None):
        bare = captioner.model(**batch).logits
    base_path = captioner.base.name_or_path
    plain = PeftModel.from_pretrained(PaliGemmaForConditionalGeneration.from_pretrained(base_path), str(adapter)).eval()
    merged_model = PaliGemmaForConditionalGeneration.from_pretrained(merge_adapter(adapter, tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged_model(**batch).logits, ours, rtol=0, atol=1e-4)
    assert (ours - bare).abs().max() > 1e-2  # the adapter changes the output
    # The projector really was trained and merged.
    base = PaliGemmaForConditionalGeneration.from_pretrained(base_path)
    assert not torch.equal(merged_model.model.multi_modal_projector.linear.weight, base.model.multi_modal_projector.linear.weight)
