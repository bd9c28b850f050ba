"""PaliGemma 2 and SmolVLM2: detection, LoRA placement and counts on the real configs, the tiny twins,
and each family's token layout checked against the processor transformers ships for it."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from multimodal_lora.config import LoraSettings, ModelConfig
from multimodal_lora.core.errors import UserError
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

TINY = {"tiny-paligemma": "paligemma", "tiny-smolvlm": "smolvlm"}
LM_PREFIX = {"paligemma": "model.language_model.layers.", "smolvlm": "model.text_model.layers."}
VISION_PREFIX = {"paligemma": "model.vision_tower.", "smolvlm": "model.vision_model."}


def lora_parameters(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


# --- the real configs on the meta device ------------------------------------------------------


def test_the_published_configs_are_their_familys_and_no_other():
    from transformers import Idefics3Config

    expect = {
        "google/paligemma2-3b-pt-224": "paligemma",
        "google/paligemma2-3b-pt-448": "paligemma",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct": "smolvlm",
        "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": "smolvlm",
    }
    for hub, name in expect.items():
        config = published_config(hub)
        assert [f.name for f in FAMILIES if f.matches(config)] == [name], hub
    # SmolVLM v1 / Idefics3: the same shape under its own model type and class.
    assert [f.name for f in FAMILIES if f.matches(Idefics3Config())] == ["idefics3"]


def test_paligemma2_3b_lora_count_and_frozen_image_path():
    # Gemma 2 2B: hidden 2304, 8 query heads and 4 key/value heads of 256, 26 layers. r = 16, q/k/v/o:
    # q 2304 -> 2048: 16 × (2304 + 2048) = 69,632;  k, v 2304 -> 1024: 16 × 3,328 = 53,248 each;
    # o 2048 -> 2304: 69,632.  Per layer 245,760; × 26 layers = 6,389,760.
    counts = {}
    for size in (224, 448):
        model = meta_model(published_config(f"google/paligemma2-3b-pt-{size}"))
        counts[size] = count_parameters(add_lora(model, LoraSettings(r=16)))
        assert counts[size]["language model"][0] == counts[size]["total"][0] == 6_389_760
        assert counts[size]["vision"][0] == counts[size]["projection"][0] == 0
    assert 3.0e9 < counts[224]["total"][1] < 3.1e9  # "3B": 3.03 B with the adapters
    # The two checkpoints differ only in the SigLIP position table: (32² - 16²) patches × 1152 wide.
    assert counts[448]["vision"][1] - counts[224]["vision"][1] == (1024 - 256) * 1152
    assert counts[448]["language model"][1] == counts[224]["language model"][1]


def test_smolvlm2_lora_counts():
    # 2.2B: SmolLM2-1.7B, hidden 2048, 32 heads and 32 key/value heads of 64, 24 layers:
    # 4 projections 2048 -> 2048, 16 × (2048 + 2048) = 65,536 each; 24 × 4 × 65,536 = 6,291,456.
    model = meta_model(published_config("HuggingFaceTB/SmolVLM2-2.2B-Instruct"))
    counts = count_parameters(add_lora(model, LoraSettings(r=16)))
    assert counts["language model"][0] == counts["total"][0] == 6_291_456
    assert counts["vision"][0] == counts["connector"][0] == 0
    assert 2.1e9 < counts["total"][1] < 2.3e9
    # 500M: hidden 960, 15 heads and 5 key/value heads of 64, 32 layers:
    # q, o 960 <-> 960: 16 × 1,920 = 30,720;  k, v 960 -> 320: 16 × 1,280 = 20,480.  32 × 102,400 = 3,276,800.
    model = meta_model(published_config("HuggingFaceTB/SmolVLM2-500M-Video-Instruct"))
    assert count_parameters(add_lora(model, LoraSettings(r=16)))["total"][0] == 3_276_800


@pytest.mark.parametrize("hub", ["google/paligemma2-3b-pt-224", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"])
def test_the_vision_towers_attention_has_the_same_names_and_none_of_it_is_adapted(hub):
    model = meta_model(published_config(hub))
    family = family_for_config(model.config)
    vision = [n for n, _ in model.named_modules() if n.startswith(VISION_PREFIX[family.name]) and n.endswith("self_attn.q_proj")]
    assert len(vision) == 27  # SigLIP So400m: 27 layers, each with q/k/v/out_proj
    names = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in lora_parameters(add_lora(model, LoraSettings(r=4)))}
    assert names and all(n.startswith(LM_PREFIX[family.name]) for n in names)
    assert not names & set(vision)


# --- the tiny twins --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    return {name: (load_base(ModelConfig(base=name, device="cpu"))[0], load_processor(name)) for name in TINY}


def test_the_tiny_twins_load_with_their_familys_class_and_give_logits(tiny_models):
    classes = {"tiny-paligemma": "PaliGemmaForConditionalGeneration", "tiny-smolvlm": "SmolVLMForConditionalGeneration"}
    stops = {"tiny-paligemma": "<eos>", "tiny-smolvlm": "<end_of_utterance>"}
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    for name, (model, processor) in tiny_models.items():
        family = family_named(TINY[name])
        assert type(model).__name__ == classes[name] == family.model_class
        assert family_for_config(model.config) is family
        layout = text_layout(model, processor)
        assert processor.tokenizer.convert_ids_to_tokens(layout.stop_token_id) == stops[name]
        assert model.generation_config.eos_token_id == layout.stop_token_id
        encoded, _ = layout.encode(processor.tokenizer, "", "a red circle", max_length=32)
        batch = {k: torch.tensor([v]) for k, v in encoded.items()}
        pixels = layout.image_inputs.collate(layout.image_inputs.split(processor.image_processor([image], return_tensors="pt")))
        with torch.no_grad():
            out = model(**batch, **pixels)
        assert out.logits.shape == (1, len(encoded["input_ids"]), model.config.text_config.vocab_size)
        assert torch.isfinite(out.loss) and all(not p.requires_grad for p in model.parameters())


def test_lora_lands_only_in_the_language_models_attention_of_each_tiny_twin(tiny_models):
    for name, (model, _) in tiny_models.items():
        family = family_named(TINY[name])
        pattern = family.target_pattern(family.default_targets)
        modules = [n for n, _ in model.named_modules()]
        vision_attention = [n for n in modules if n.startswith(VISION_PREFIX[family.name]) and re.search(r"self_attn\.(q|k|v|out)_proj$", n)]
        assert len(vision_attention) == 2 * 4  # two tower layers, four projections each: present, not matched
        matched = [n for n in modules if re.fullmatch(pattern, n)]
        assert len(matched) == 2 * 4 and all(n.startswith(LM_PREFIX[family.name]) for n in matched)
        peft_model = add_lora(model, LoraSettings(r=2, alpha=4))
        adapted = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in lora_parameters(peft_model)}
        assert adapted == set(matched)
        peft_model.unload()


# --- PaliGemma: prefix / suffix, as PaliGemmaProcessor lays it out --------------------------------


def test_paligemma_layout_is_the_processors_prefix_and_suffix(tiny_models):
    model, processor = tiny_models["tiny-paligemma"]
    layout = text_layout(model, processor)
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    # The processor's own training encoding: text = prefix, suffix = target (labels from token_type_ids).
    reference = processor(text="<image>caption en", images=image, suffix="a blue square")
    encoded, truncated = layout.encode(processor.tokenizer, "caption en", "a blue square", max_length=32)
    assert not truncated
    assert encoded["input_ids"] == list(reference["input_ids"][0])
    assert encoded["token_type_ids"] == list(reference["token_type_ids"][0])
    assert encoded["labels"] == [int(x) for x in reference["labels"][0]]
    n = layout.num_query_tokens
    assert n == 16 and encoded["input_ids"][:n] == [model.config.image_token_index] * n
    suffix = [i for i, t in enumerate(encoded["token_type_ids"]) if t == 1]
    assert [encoded["labels"][i] for i in suffix] == [encoded["input_ids"][i] for i in suffix]
    assert all(encoded["labels"][i] == IGNORE_INDEX for i in range(suffix[0]))
    tokens = processor.tokenizer.convert_ids_to_tokens(encoded["input_ids"][n:])
    assert tokens[:4] == ["<bos>", "▁caption", "▁en", "\n"] and tokens[-1] == "<eos>"
    assert processor.tokenizer.decode([encoded["input_ids"][i] for i in suffix]).strip() == "a blue square<eos>"
    # Generation: the prefix alone, left-padded, all of type 0.
    gen = layout.generation_inputs(processor.tokenizer, ["caption en", ""])
    assert gen["input_ids"].shape == gen["token_type_ids"].shape and int(gen["token_type_ids"].sum()) == 0
    assert list(gen["input_ids"][0]) == list(processor(text="<image>caption en", images=image)["input_ids"][0])


def test_paligemma_prefix_attends_both_ways_and_the_suffix_causally(tiny_models):
    """How transformers 5.25 builds the mask from token_type_ids, observed on the logits."""
    model, processor = tiny_models["tiny-paligemma"]
    layout = text_layout(model, processor)
    encoded, _ = layout.encode(processor.tokenizer, "caption en", "a blue square", max_length=32)
    ids = torch.tensor([encoded["input_ids"]])
    types = torch.tensor([encoded["token_type_ids"]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prefix_end = int((types[0] == 0).sum())  # the "\n"
    first = layout.num_query_tokens  # <bos>, early in the prefix

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=ids, token_type_ids=types, pixel_values=pixels).logits[0]

    base = logits(ids)
    changed_prefix = ids.clone()
    changed_prefix[0, prefix_end - 2] = processor.tokenizer.convert_tokens_to_ids("▁red")
    changed_suffix = ids.clone()
    changed_suffix[0, prefix_end + 1] = processor.tokenizer.convert_tokens_to_ids("▁red")
    # A later prefix token changes what an earlier one sees (bidirectional block) ...
    assert not torch.allclose(logits(changed_prefix)[first], base[first])
    # ... a suffix token changes nothing before it (causal).
    after = logits(changed_suffix)
    torch.testing.assert_close(after[: prefix_end + 1], base[: prefix_end + 1])
    assert not torch.allclose(after[prefix_end + 2], base[prefix_end + 2])
    # Without token_type_ids the whole sequence is causal: the early position no longer sees the later one.
    with torch.no_grad():
        causal = model(input_ids=changed_prefix, pixel_values=pixels).logits[0]
        causal_base = model(input_ids=ids, pixel_values=pixels).logits[0]
    torch.testing.assert_close(causal[first], causal_base[first])


def test_paligemma_loss_from_the_kept_logits_is_the_full_loss(tiny_models):
    model, processor = tiny_models["tiny-paligemma"]
    layout = text_layout(model, processor)
    from multimodal_lora.data.encoding import Collator

    rows = [layout.encode(processor.tokenizer, p, t, 32)[0] for p, t in [("caption en", "a red circle"), ("", "an orange star")]]
    batch = Collator(layout.pad_token_id, layout.padding())([{**r, "pixel_values": torch.randn(3, 32, 32)} for r in rows])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    trimmed, keep = layout.for_loss(batch)
    with torch.no_grad():
        full = model(**batch).loss
        cut = model(**trimmed, logits_to_keep=keep)
    assert cut.logits.shape[1] == keep < batch["input_ids"].shape[1]
    torch.testing.assert_close(cut.loss, full)


# --- SmolVLM: the chat template and the image block, as the processor lays them out ------------------


def test_smolvlm_layout_is_the_processors_chat_template(tiny_models):
    from transformers import Idefics3Processor

    from multimodal_lora.families.smolvlm import CHAT_TEMPLATE

    model, parts = tiny_models["tiny-smolvlm"]
    layout = text_layout(model, parts)
    # The family loads tokenizer and image processor as parts (SmolVLMProcessor needs torchvision here);
    # the reference is the transformers processor built from them, with the checkpoints' chat template.
    processor = Idefics3Processor(parts.image_processor, parts.tokenizer, image_seq_len=16, chat_template=CHAT_TEMPLATE)
    image = Image.new("RGB", (32, 32), (30, 200, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"
    reference = processor(text=[text], images=[[image]])["input_ids"][0]
    gen = layout.generation_inputs(processor.tokenizer, ["Describe the image."])
    assert list(gen["input_ids"][0]) == list(reference)
    tokens = processor.tokenizer.convert_ids_to_tokens(reference)
    n = model.model.image_seq_len
    assert n == 16 and tokens.count("<image>") == n and tokens.count("<fake_token_around_image>") == 2
    assert layout.num_query_tokens == n + 3  # <fake><global-img> <image>×16 <fake>
    encoded, _ = layout.encode(processor.tokenizer, "Describe the image.", "a green square", max_length=32)
    assert encoded["input_ids"][: len(reference)] == list(reference)
    learned = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(learned) == " a green square<end_of_utterance>"
    assert encoded["labels"][: len(reference)] == [IGNORE_INDEX] * len(reference)


def test_smolvlm_lays_out_tiled_images_as_the_processor_does_and_pads_their_views(tiny_models):
    """With splitting on (as the published SmolVLM2 processors have it), each image takes its own tile
    grid's block: the layout's ids equal Idefics3Processor's, for grids 2×2, 2×1 and one view."""
    from transformers import Idefics3Processor

    from multimodal_lora.families.smolvlm import CHAT_TEMPLATE

    model, _ = tiny_models["tiny-smolvlm"]
    parts = load_processor("tiny-smolvlm")  # its own copy: the image processor is changed below
    image_processor = parts.image_processor
    image_processor.do_image_splitting = True
    image_processor.size, image_processor.max_image_size = {"longest_edge": 64}, {"longest_edge": 32}
    layout = text_layout(model, parts)
    assert set(layout.tile_blocks) == {(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    reference = Idefics3Processor(image_processor, parts.tokenizer, image_seq_len=16, chat_template=CHAT_TEMPLATE)
    images = [Image.new("RGB", size, (200, 30, 30)) for size in [(64, 48), (20, 60), (32, 32)]]
    prompt = "Describe the image."
    text = reference.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True)
    want = [list(reference(text=[text], images=[[image]])["input_ids"][0]) for image in images]
    items = layout.image_inputs.split(image_processor(images, return_tensors="pt"))
    assert [tuple(int(x) for x in item["tile_grid"]) for item in items] == [(2, 2), (2, 1), (2, 2)]
    assert [len(item["pixel_values"]) for item in items] == [5, 3, 5]  # the tiles and the global view
    gen = layout.generation_inputs(parts.tokenizer, [prompt] * 3, [layout.image_inputs.image_tokens(i) for i in items])
    got = [row[mask.bool()].tolist() for row, mask in zip(gen["input_ids"], gen["attention_mask"])]
    assert got == want
    assert layout.image_positions == len(layout.tile_blocks[(2, 2)])  # length checks use the largest block
    # Training: the encoded text gets the same block, labels -100 over it; views padded with zeros per batch.
    encoded = [layout.with_image(layout.encode(parts.tokenizer, prompt, "a red circle", 32)[0], item) for item in items]
    assert [e["input_ids"][: len(w)] for e, w in zip(encoded, want)] == want
    assert all(e["labels"][: len(w)] == [IGNORE_INDEX] * len(w) for e, w in zip(encoded, want))
    from multimodal_lora.data.encoding import Collator

    batch = Collator.of(layout)([{**item, **e} for item, e in zip(items, encoded)])
    assert batch["pixel_values"].shape == (3, 5, 3, 32, 32) and float(batch["pixel_values"][1, 3:].abs().sum()) == 0
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**Collator.of(layout)([{**items[1], **encoded[1]}])).logits
    n = len(encoded[1]["input_ids"])
    torch.testing.assert_close(together[1, :n], alone[0, :n], atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="needs its processor"):
        text_layout(model, parts.tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_the_tiny_twin_build_is_deterministic(name, tmp_path):
    build = family_named(TINY[name]).build_tiny
    build(tmp_path / "a")
    build(tmp_path / "b")
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


# --- the frozen-feature cache and the server's decode loop -----------------------------------------


def test_paligemma_cached_image_features_give_the_loss_pixels_give(tiny_models, small_shapes_dir, tmp_path):
    from multimodal_lora.config import DataConfig
    from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
    from multimodal_lora.data.feature_cache import CachedPairDataset, PrefixCollator, forward_inputs, open_or_build
    from multimodal_lora.data.sources import read_imagefolder

    model, processor = tiny_models["tiny-paligemma"]
    layout = text_layout(model, processor)
    examples = read_imagefolder(small_shapes_dir / "train", DataConfig())[:6]
    encoder = ExampleEncoder(processor.tokenizer, layout, task="caption", prompt="caption en", prompt_template="{question}", max_length=16)
    encoded = [encoder.encode(e) for e in examples]
    model.eval()
    cache, keys = open_or_build(examples, model, processor.image_processor, tmp_path, progress=False, layout=layout)
    assert cache.features.shape == (6, layout.num_query_tokens, model.config.text_config.hidden_size)
    collate = Collator.of(layout)
    pixels = collate(PairDataset(examples, encoded, processor.image_processor, layout).__getitems__(list(range(6))))
    cached = PrefixCollator(collate)([CachedPairDataset(encoded, cache, keys)[i] for i in range(6)])
    with torch.no_grad():
        loss_pixels = model(**forward_inputs(pixels, torch.device("cpu"))).loss
        loss_cached = model(**forward_inputs(cached, torch.device("cpu"))).loss
    torch.testing.assert_close(loss_cached, loss_pixels)


@pytest.mark.parametrize("name", ["tiny-paligemma", "tiny-smolvlm"])
def test_the_server_decodes_these_families_continuously(name, shapes_dir):
    """The server's default batching for them is the decode loop (PaliGemma: its bidirectional prefix and
    1-based positions; SmolVLM: the outer model's head): requests that join mid-way, with prompts of
    three lengths, get caption()'s text."""
    from multimodal_lora.data.images import load_image
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.serve.continuous import continuous_problem
    from multimodal_lora.serve.engine_process import EngineSpec, make_batcher

    from .test_continuous import job, submit_staggered, wait

    captioner = Captioner(name, device="cpu")
    assert continuous_problem(captioner) is None
    images = [load_image(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:6]]
    prefixes = [None, "a photo of", "a picture of a small"]
    batcher = make_batcher(captioner, EngineSpec(batching="continuous"))
    jobs = [job(captioner, None, im, captioner.caption_prompt(None, prefixes[i % 3]), max_tokens=6) for i, im in enumerate(images)]
    try:
        submit_staggered(batcher, jobs)
        wait(jobs)
        counters = batcher.counters()
    finally:
        batcher.close()
    assert counters["batching"] == "continuous" and counters["decoded_rows"] > counters["decode_steps"], counters
    want = [captioner.caption(im, None, prompt=prefixes[i % 3], max_new_tokens=6) for i, im in enumerate(images)]
    assert [j.sink.text for j in jobs] == want


# --- VQA: the question is the prompt (masked), the answer is learned ---------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_vqa_learns_only_the_answer(tiny_models, name):
    from multimodal_lora.data.encoding import ExampleEncoder
    from multimodal_lora.data.sources import Example

    model, processor = tiny_models[name]
    layout = text_layout(model, processor)
    encoder = ExampleEncoder(processor.tokenizer, layout, task="vqa", prompt=None, prompt_template="Question: {question} Answer:", max_length=32)
    encoded = encoder.encode(Example(Image.new("RGB", (32, 32)), "red", "0", "x", question="What colour is the shape?"))
    learned = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(learned, skip_special_tokens=True).strip() == "red"
    assert learned[-1] == layout.stop_token_id
    prompt = processor.tokenizer.decode(encoded["input_ids"][: len(encoded["input_ids"]) - len(learned)], skip_special_tokens=True)
    assert "What colour is the shape? Answer:" in prompt


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_the_vqa_recipe_on_each_tiny_twin_answers_held_out_questions(name, tmp_path):
    """recipes/tiny-vqa.yaml with this base (400 steps, about a minute): held-out answers against ~0 bare."""
    from multimodal_lora import train
    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.inference.captioner import Captioner

    from .conftest import RECIPES

    overrides = [f"output_dir={tmp_path}", f"model.base={name}", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                 "train.max_steps=400", "train.eval_max_images=8"]  # fmt: skip
    recipe = load_recipe(RECIPES / "tiny-vqa.yaml", overrides)
    result = train(recipe)
    held_out = load_splits(recipe.data).validation[:40]
    captioner = Captioner(name, device="cpu")
    captioner.load_adapter(result.adapter_dir, name="vqa")

    def accuracy(adapter):
        answers = [captioner.ask(e.image, e.question, adapter) for e in held_out]
        return sum(a.strip() == e.target.strip() for a, e in zip(answers, held_out)) / len(held_out)

    assert accuracy("vqa") >= 0.5
    assert accuracy(None) <= 0.05


def test_the_real_recipes_plan_from_the_shipped_configs():
    from multimodal_lora.config import load_recipe
    from multimodal_lora.model.plan import plan_recipe

    from .conftest import RECIPES

    # PaliGemma 2: 256 image tokens at 224 px, 1,024 at 448, + data.max_length 64; SmolVLM2: a 640×480 image
    # split into 4 × 3 tiles and the global view (tests/test_plan_families.py), + 64.
    for recipe, lora, sequence in (
        ("paligemma2-3b-224", 6_389_760, 256 + 64),
        ("paligemma2-3b-448", 6_389_760, 1024 + 64),
        ("smolvlm2-2.2b", 6_291_456, 1084 + 64),
        ("smolvlm2-500m", 3_276_800, 863 + 64),
    ):
        plan = plan_recipe(load_recipe(RECIPES / f"{recipe}.yaml"))
        assert plan.lora_parameters == lora and plan.sequence_length == sequence
        assert plan.lora_weights == 4 * lora and plan.total(True) < plan.total(False)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        # r=8, 2 layers: q, o 128 <-> 128: 8 × 256 = 2,048; Gemma's k, v 128 -> 2 × 32: 8 × 192 = 1,536. 2 × 7,168.
        ("tiny-paligemma", 14_336),
        # r=8, 2 layers, four 128 -> 128 projections: 2 × 4 × 2,048.
        ("tiny-smolvlm", 16_384),
    ],
)
def test_an_int8_base_on_cpu_takes_lora_and_trains(name, count):
    import bitsandbytes as bnb

    model, _ = load_base(ModelConfig(base=name, device="cpu", quantization="int8"))
    processor = load_processor(name)
    layout = text_layout(model, processor)
    family = family_named(TINY[name])
    attention = [m for n, m in model.named_modules() if re.fullmatch(family.target_pattern(family.default_targets), n)]
    assert attention and all(isinstance(m, bnb.nn.Linear8bitLt) for m in attention)
    peft_model = add_lora(model, LoraSettings(r=8, alpha=16))
    assert count_parameters(peft_model)["language model"][0] == count_parameters(peft_model)["total"][0] == count
    encoded, _ = layout.encode(processor.tokenizer, "", "a red circle", 24)
    pixels = layout.image_inputs.collate(layout.image_inputs.split(processor.image_processor([Image.new("RGB", (32, 32))], return_tensors="pt")))
    loss = peft_model(**{k: torch.tensor([v]) for k, v in encoded.items()}, **pixels).loss
    loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_the_server_answers_what_caption_gives_through_the_openai_client(name, shapes_dir, tmp_path):
    """A short caption run (80 steps), served with its base: the real OpenAI client gets caption()'s
    text for the adapter and for the bare base, plain and streamed (decoded continuously, logged)."""
    import openai

    from multimodal_lora import train
    from multimodal_lora.config import load_recipe
    from multimodal_lora.inference.captioner import caption, clear_cache

    from .conftest import RECIPES
    from .test_serve import chat, start_server, stop_server, stream

    run = train(load_recipe(RECIPES / f"{name}.yaml", [f"output_dir={tmp_path / 'run'}", "train.max_steps=80", "train.eval_max_images=4"]))
    images = sorted((shapes_dir / "validation").glob("*.png"))[:3]
    try:
        want = [caption(str(p), adapter=run.adapter_dir) for p in images]
        bare = [caption(str(p), base_model=name) for p in images]
    finally:
        clear_cache()
    assert want != bare
    proc, url = start_server(["--adapter", f"shapes={run.adapter_dir}", "--adapters-dir", str(tmp_path / "none")], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [name, "shapes"]
        got = [chat(client, "shapes", p.read_bytes()).choices[0].message.content for p in images]
        got_bare = [chat(client, name, p.read_bytes()).choices[0].message.content for p in images]
        streamed = stream(client, "shapes", images[0].read_bytes())[0]
    finally:
        stop_server(proc)
    assert got == want and got_bare == bare and streamed == want[0]
    assert "(batching: continuous" in (tmp_path / "server.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_the_demo_captions_with_each_familys_adapter(name, small_shapes_dir, shapes_dir, tmp_path, monkeypatch):
    """The Gradio demo finds a run of this family, loads its base, and captions as caption() does
    (the real gradio_client against demo.serve)."""
    import socket

    from gradio_client import Client, handle_file

    from multimodal_lora import demo, train
    from multimodal_lora.config import load_recipe
    from multimodal_lora.inference.captioner import Captioner

    from .conftest import RECIPES

    overrides = [f"output_dir={tmp_path / 'runs' / 'shapes'}", f"data.path={small_shapes_dir}", "train.max_steps=4",
                 "train.batch_size=4", "train.eval_captions=false"]  # fmt: skip
    adapter = train(load_recipe(RECIPES / f"{name}.yaml", overrides)).adapter_dir
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "unused"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = str(sorted((shapes_dir / "validation").glob("*.png"))[0])
    want = Captioner.for_adapter(adapter, name="shapes").caption(image, adapter="shapes")
    app = demo.serve(tmp_path / "runs", device="cpu", port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, text, _ = client.predict(handle_file(image), "shapes", False, "", 30, 1, False, 1.0, 1.0, api_name="/caption")
    finally:
        app.close()
    assert text == want  # an adapter's text is shown as it is (only the bare base's goes through legible())
