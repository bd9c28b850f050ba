"""The frozen-feature cache for families whose image features vary in length (Qwen2.5-VL, Qwen3-VL with
its DeepStack features, SmolVLM): cached features give the loss and LoRA gradients pixels give, the files are reused and keyed on the
processor's settings, and a run with the cache trains the adapter a run without it trains."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from multimodal_lora.config import LoraSettings, ModelConfig, load_recipe
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
from multimodal_lora.data.feature_cache import INDEX_FILE, SHARD_FILE, RaggedFeatureCache, forward_inputs, open_or_build
from multimodal_lora.data.sources import Example
from multimodal_lora.model.base import add_lora, load_base, load_processor, set_train_mode, text_layout

from .conftest import RECIPES

CPU = torch.device("cpu")
# Sizes the tiny processors resize differently: Qwen's 1,024-pixel budget gives 16, 12, 15 and 16
# tokens (both Qwen twins share the processor); SmolVLM's one 32×32 view gives 16 each.
SIZES = [(32, 32), (48, 32), (40, 64), (32, 32), (64, 48)]
VISION = {"tiny-qwen2vl": "model.visual", "tiny-qwen3vl": "model.visual", "tiny-smolvlm": "model.vision_model"}
# What each caches per image: the merged features, and Qwen3-VL's one DeepStack tap beside them.
STREAMS = {"tiny-qwen2vl": ["pooler_output"], "tiny-qwen3vl": ["deepstack_0", "pooler_output"], "tiny-smolvlm": ["pooler_output"]}


def examples(directory) -> list[Example]:
    out = []
    for i, size in enumerate(SIZES):
        path = directory / f"{i}.png"
        image = Image.new("RGB", size, (40 * i, 200 - 30 * i, 90))
        image.paste((250, 250, 250), (4, 4, 4 + 3 * i, 12))  # something for the vision tower to see
        image.save(path)
        out.append(Example(image=str(path), target=f"a shape {i}", question=None, origin=str(path), image_id=str(i)))
    return out


def loss_and_grads(model, batch, layout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**forward_inputs(batch, CPU, layout.image_inputs), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("base", sorted(VISION))
def test_cached_features_give_the_loss_and_lora_gradients_pixels_give_and_are_built_once(base, tmp_path, monkeypatch):
    from multimodal_lora.data import feature_cache
    from multimodal_lora.model.base import attribute

    # Shards of about 20 KB a stream: three of the five images' fp32 features (8 KB a stream for 16
    # tokens of 128), then two.
    monkeypatch.setattr(feature_cache, "SHARD_BYTES", 20_000 * len(STREAMS[base]))

    model = add_lora(load_base(ModelConfig(base=base, device="cpu"))[0], LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B non-zero, so that the gradient reaches every LoRA matrix
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    processor = load_processor(base)
    layout = text_layout(model, processor)
    data = examples(tmp_path)
    encoder = ExampleEncoder(processor.tokenizer, layout, task="caption", prompt=None, prompt_template="{question}", max_length=40)
    encoded = encoder.encode_all(data)
    computed = []  # calls of the vision tower
    vision = attribute(model.get_base_model(), VISION[base])
    vision.register_forward_hook(lambda *_: computed.append(1))

    model.eval()
    cache, keys = open_or_build(data, model, processor.image_processor, tmp_path / "cache", batch_size=3, progress=False, layout=layout)
    assert isinstance(cache, RaggedFeatureCache) and len(computed) == 2  # 5 images, batches of 3: two calls
    assert sorted(p.name for p in cache.directory.iterdir()) == [SHARD_FILE.format(0), SHARD_FILE.format(1), INDEX_FILE]
    # The files: safetensors shards, the features end to end, and what each image keeps.
    index = json.loads((cache.directory / INDEX_FILE).read_text())
    shards = [load_file(cache.directory / SHARD_FILE.format(i)) for i in range(2)]
    tokens = [index["rows"][k][3] for k in keys]
    assert index["streams"] == STREAMS[base]
    for stream in STREAMS[base]:  # each stream a token per image token, in the language model's width
        assert sum(s[f"features.{stream}"].shape[0] for s in shards) == sum(tokens), stream
        assert shards[0][f"features.{stream}"].shape[1] == model.config.text_config.hidden_size, stream
    kept = layout.image_inputs.cache_keeps[0]
    assert [s[f"keep.{kept}"].shape[0] for s in shards] == [3, 2]
    if base != "tiny-smolvlm":  # images of different sizes take different token counts, grids kept
        assert tokens == [16, 12, 15, 16, 12] and shards[0][f"keep.{kept}"].tolist() == [[1, 8, 8], [1, 6, 8], [1, 10, 6]]

    # The same batch from pixels and from the cache: one loss, one gradient on every LoRA matrix.
    set_train_mode(model)
    collate = Collator.of(layout)
    pixels = collate(PairDataset(data, encoded, processor.image_processor, layout).__getitems__(list(range(5))))
    dataset = cache.dataset(encoded, keys, layout)
    cached = cache.collator(collate)([dataset[i] for i in range(5)])
    assert torch.equal(cached["input_ids"], pixels["input_ids"]) and torch.equal(cached["labels"], pixels["labels"])
    before = len(computed)
    loss_p, grads_p = loss_and_grads(model, pixels, layout)
    loss_c, grads_c = loss_and_grads(model, cached, layout)
    assert len(computed) == before + 1  # the cached batch never ran the vision tower
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_p.keys() and len(grads_p) == 2 * 4 * 2  # A and B, q/k/v/o, 2 layers
    for name, grad in grads_p.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # And the DeepStack stream is what the language model adds: without it, another loss.
    if "deepstack_0" in STREAMS[base]:
        with torch.no_grad():
            for image in cached[feature_cache.FEATURES_KEY]:
                image["deepstack_0"] = torch.zeros_like(image["deepstack_0"])
            assert abs(model(**forward_inputs(cached, CPU, layout.image_inputs), use_cache=False).loss - loss_p) > 1e-3

    # Opened again (the next epoch, the next run): the same files, nothing computed.
    model.eval()
    again, _ = open_or_build(data, model, processor.image_processor, tmp_path / "cache", batch_size=3, progress=False, layout=layout)
    assert again.directory == cache.directory and len(computed) == before + 1
    # Another image-processor setting is another key: built anew.
    settings = processor.image_processor.to_dict()
    if base != "tiny-smolvlm":  # the pixel budget (max_pixels, as transformers 5 names it in size)
        processor.image_processor.size["longest_edge"] = 24 * 24
    else:
        processor.image_processor.do_image_splitting = True
    assert processor.image_processor.to_dict() != settings
    other, _ = open_or_build(data, model, processor.image_processor, tmp_path / "cache", batch_size=8, progress=False, layout=layout)
    assert other.directory != cache.directory and len(computed) == before + 2
    if base != "tiny-smolvlm":  # and it mattered: 32×32 now resizes to 24×24, 9 tokens
        assert other.rows[keys[0]][3] == 9


def test_the_cache_is_refused_when_the_connector_trains_or_the_family_says_why_not(monkeypatch):
    import dataclasses

    from multimodal_lora.families import qwen2_5_vl
    from multimodal_lora.training import recipe as training_recipe

    for name in ("tiny-qwen2vl", "tiny-smolvlm"):
        with pytest.raises(ConfigError, match="lora.parts trains the connector"):
            load_recipe(RECIPES / f"{name}.yaml", ["lora.parts=[attention,connector]", "train.cache_image_features=true"])
    # A family that cannot cache (none of the shipped ones) is refused with its reason, from the config alone.
    recipe = load_recipe(RECIPES / "tiny-qwen2vl.yaml", ["train.cache_image_features=true"])
    assert training_recipe.check_family(recipe) is qwen2_5_vl.FAMILY
    refusing = dataclasses.replace(qwen2_5_vl.FAMILY, no_feature_cache="its features depend on the prompt")
    monkeypatch.setattr(training_recipe, "base_family", lambda base, revision=None: refusing)
    with pytest.raises(ConfigError, match="cache_image_features: true, but its features depend on the prompt; set it to false or auto"):
        training_recipe.check_family(recipe)


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(VISION))
def test_a_run_with_the_cache_trains_the_adapter_a_run_without_it_trains(base, small_shapes_dir, tmp_path):
    from multimodal_lora import train

    adapters = {}
    for cached in (False, True):
        overrides = [
            f"output_dir={tmp_path / str(cached)}", f"data.path={small_shapes_dir}", "train.max_steps=4",
            "train.batch_size=4", "train.eval_captions=false", f"train.cache_image_features={str(cached).lower()}",
        ]  # fmt: skip
        result = train(load_recipe(RECIPES / f"{base}.yaml", overrides))
        assert (result.feature_cache_seconds is not None) == cached
        adapters[cached] = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for name, tensor in adapters[False].items():
        assert not torch.equal(tensor, torch.zeros_like(tensor)), name  # it trained
        torch.testing.assert_close(adapters[True][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
