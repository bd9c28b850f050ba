"""Qwen2.5-VL: the real configs on the meta device, the anchored targets, per-image token counts with
mixed image sizes, the chat layout, and what the family refuses (continuous batching; its feature
cache is in tests/test_feature_cache_ragged.py).

What every family's tiny recipe must do (learn, PEFT, merge, refusal by another family, CLI and
evaluate) is in tests/test_family_recipes.py, which trains ``recipes/tiny-qwen2vl.yaml`` too.
"""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from multimodal_lora.config import LoraSettings, load_recipe
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.data.encoding import Collator
from multimodal_lora.families import IGNORE_INDEX, qwen2_5_vl
from multimodal_lora.model.base import add_lora, count_parameters, meta_model, published_config

from .conftest import RECIPES

FAMILY = qwen2_5_vl.FAMILY


# --- the real configs on the meta device ----------------------------------------------------------


def test_3b_default_lora_count():
    # 36 layers; hidden 2048, 16 query heads and 2 key/value heads of 128: k and v project to 256.
    # r=16 adds A (16 × in) + B (out × 16) per projection:
    #   q: 16 × 2048 + 2048 × 16 = 65,536     k, v: 16 × 2048 + 256 × 16 = 36,864 each
    #   o: 16 × 2048 + 2048 × 16 = 65,536     → 204,800 a layer × 36 = 7,372,800.
    counts = count_parameters(add_lora(meta_model(published_config("Qwen/Qwen2.5-VL-3B-Instruct")), LoraSettings(r=16)))
    assert counts["language model"][0] == counts["total"][0] == 7_372_800
    assert counts["vision"][0] == counts["projection"][0] == 0
    assert counts["total"][1] == 3_754_622_976 + 7_372_800  # 3.75 B (embeddings tied) plus the adapters


def test_7b_default_lora_count():
    # 28 layers; hidden 3584, 28 query heads and 4 key/value heads of 128: k and v project to 512.
    #   q, o: 16 × 3584 + 3584 × 16 = 114,688 each     k, v: 16 × 3584 + 512 × 16 = 65,536 each
    #   → 360,448 a layer × 28 = 10,092,544.
    counts = count_parameters(add_lora(meta_model(published_config("Qwen/Qwen2.5-VL-7B-Instruct")), LoraSettings(r=16)))
    assert counts["language model"][0] == counts["total"][0] == 10_092_544
    assert counts["total"][1] == 8_292_166_656 + 10_092_544  # 8.29 B (untied head) plus the adapters


def test_the_pattern_reaches_only_the_language_models_attention():
    model = meta_model(published_config("Qwen/Qwen2.5-VL-3B-Instruct"))
    pattern = FAMILY.target_pattern(FAMILY.lora_targets)
    names = [name for name, _ in model.named_modules()]
    hits = [n for n in names if re.fullmatch(pattern, n)]
    assert len(hits) == 36 * 4 and all(n.startswith("model.language_model.layers.") for n in hits)
    # The vision tower has attention (qkv, proj) and MLPs named like the text model's: none is hit.
    vision_linears = [n for n in names if n.startswith("model.visual.") and n.endswith(("qkv", "proj"))]
    assert vision_linears and not [n for n in vision_linears if re.fullmatch(pattern, n)]
    with pytest.raises(ConfigError, match="has no 'qkv'; choose from q_proj, k_proj, v_proj, o_proj"):
        FAMILY.target_pattern(["qkv"])


# --- the chat layout and per-image token counts (tokenizer and image processor only) ---------------


def chat_parts(module):
    """A Qwen family module's tiny tokenizer and image processor, and a layout on its ids (no model weights)."""
    from types import SimpleNamespace

    from multimodal_lora.families.base import ProcessorParts

    tokenizer = module.build_tokenizer()
    processor = ProcessorParts(tokenizer, qwen2_5_vl.image_processor())
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    config = SimpleNamespace(
        image_token_id=image_pad,
        text_config=SimpleNamespace(pad_token_id=None, bos_token_id=0, eos_token_id=tokenizer.eos_token_id),
        vision_config=SimpleNamespace(spatial_merge_size=2),
    )
    return processor, module.FAMILY.make_layout(config, None, processor), image_pad


@pytest.fixture(scope="module")
def parts():
    return chat_parts(qwen2_5_vl)


def test_the_chat_layout_learns_only_the_answer_and_its_end_of_turn(parts):
    processor, layout, image_pad = parts
    tokenizer = processor.tokenizer
    encoded, truncated = layout.encode(tokenizer, "What colour?", "a red circle", max_length=64)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert not truncated and ids.count(image_pad) == 1  # one placeholder, expanded per image later
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "a red circle<|im_end|>"
    assert learned[-1] == layout.stop_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.decode(ids[: len(ids) - len(learned)])
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n")
    assert layout.text_length(encoded) == len(ids) - 1  # the placeholder is not text
    # Generation starts from exactly the prompt the answer was learned after.
    assert layout.generation_rows(tokenizer, ["What colour?"])[0] == ids[: len(ids) - len(learned)]


def test_images_of_different_sizes_get_their_own_token_counts_in_one_batch(parts):
    processor, layout, image_pad = parts
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (48, 32), "blue")]
    items = layout.image_inputs.split(processor.image_processor(images, return_tensors="pt"))
    # 64×64 → 32×32 (the tiny processor's pixel budget): 8×8 patches of 4 px, 2×2 merged: 16 tokens.
    # 48×32 is 1,536 pixels, over the 1,024 budget: 24×32 (multiples of 8): 6×8 patches, 12 tokens.
    assert [layout.image_inputs.image_tokens(i) for i in items] == [16, 12]
    encoded = layout.encode(processor.tokenizer, "", "a shape", max_length=64)[0]
    rows = [{**item, **layout.with_image(encoded, item)} for item in items]
    for row, count in zip(rows, [16, 12]):
        assert row["input_ids"].count(image_pad) == count
        assert len(row["labels"]) == len(row["input_ids"])
        assert all(label == IGNORE_INDEX for t, label in zip(row["input_ids"], row["labels"]) if t == image_pad)
    batch = Collator.of(layout)(rows)
    assert batch["pixel_values"].shape[0] == 64 + 48  # patches of both images, concatenated
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 8]]
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [16, 12]
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_pad)


# --- on the tiny twin (building it takes ~25 s on a loaded machine) ---------------------------------


@pytest.fixture(scope="module")
def captioner():
    from multimodal_lora.inference.captioner import Captioner

    return Captioner("tiny-qwen2vl", device="cpu")


@pytest.mark.slow
def test_mixed_sizes_captioned_in_one_batch_equal_one_by_one(captioner, shapes_dir):
    from multimodal_lora.data.images import load_image

    paths = sorted((shapes_dir / "validation").glob("*.png"))[:3]
    images = [load_image(p) for p in paths] + [load_image(paths[0]).resize((48, 32)), Image.new("RGB", (40, 64), "green")]
    batch = captioner.generation_inputs(images, [""] * len(images))
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [16, 16, 16, 12, 15]
    together = captioner.caption(images, max_new_tokens=6)
    alone = [captioner.caption(image, max_new_tokens=6) for image in images]
    assert together == alone
    # Prepared per image (a server does this as requests arrive), then batched: the same.
    prepared = [captioner.pixels(image) for image in images]
    tokens = captioner.generate_batch(prepared, [""] * len(images), max_new_tokens=6)
    texts = captioner.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert [t.strip() for t in texts] == together
    # The server's usage count is what the model reads for that image; without one, the most an image takes.
    assert [captioner.prompt_tokens("", p) for p in prepared] == batch["attention_mask"].sum(dim=1).tolist()
    assert captioner.prompt_tokens("") == captioner.prompt_tokens("", prepared[0]) == batch["attention_mask"][0].sum()


@pytest.mark.slow
def test_the_decode_loop_keeps_a_rope_delta_per_row(captioner, shapes_dir):
    """Images of three sizes take three grids: their rows get three rope deltas from one prefill, and
    decoded together (joining a running batch) each row still gives caption()'s text, with the
    generation config's repetition penalty too."""
    from multimodal_lora.data.images import load_image
    from multimodal_lora.serve.continuous import continuous_problem

    from .test_continuous import job, run_staggered

    assert continuous_problem(captioner) is None
    first = load_image(sorted((shapes_dir / "validation").glob("*.png"))[0])
    images = [first, first.resize((48, 32)), Image.new("RGB", (40, 64), "green")] * 2
    batch = captioner.generation_inputs(images[:3], [""] * 3)
    _, deltas = qwen2_5_vl.FAMILY.decoding.prefill_positions(captioner.model, batch)
    assert len(set(deltas.tolist())) == 3, deltas
    jobs = [job(captioner, None, image, captioner.caption_prompt(None), max_tokens=8) for image in images]
    counters = run_staggered(captioner, jobs, max_batch_size=4)
    plain = captioner.caption(images, None, max_new_tokens=8)
    assert [j.sink.text for j in jobs] == plain
    assert counters["decoded_rows"] > counters["decode_steps"], counters
    # The published checkpoints' generation config sets repetition_penalty 1.05; the loop applies it
    # over each row's own prompt and tokens (here 1.5, so that it shows on the random twin).
    config = captioner.model.generation_config
    before, config.repetition_penalty = config.repetition_penalty, 1.5
    try:
        assert continuous_problem(captioner) is None
        penalized = captioner.caption(images, None, max_new_tokens=8)
        jobs = [job(captioner, None, image, captioner.caption_prompt(None), max_tokens=8) for image in images]
        run_staggered(captioner, jobs, max_batch_size=4)
    finally:
        config.repetition_penalty = before
    assert penalized != plain and [j.sink.text for j in jobs] == penalized


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "4bit"])
def test_quantized_training_on_cpu(quantization, small_shapes_dir, tmp_path):
    import bitsandbytes as bnb

    from multimodal_lora import train

    overrides = [
        f"output_dir={tmp_path}", f"data.path={small_shapes_dir}", f"model.quantization={quantization}",
        "train.max_steps=6", "train.batch_size=4", "train.eval_captions=false",
    ]  # fmt: skip
    result = train(load_recipe(RECIPES / "tiny-qwen2vl.yaml", overrides))
    inner = result.model.get_base_model()
    quantized = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    lm = [m for n, m in inner.named_modules() if n.startswith("model.language_model.") and isinstance(m, quantized)]
    assert len(lm) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    # The frozen vision tower and merger stay plain linears in the recipe's dtype (Family.unquantized).
    visual = [m for n, m in inner.named_modules() if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)]
    assert len(visual) == 2 * 5 + 2 and all(type(m) is torch.nn.Linear for m in visual)  # 2 blocks: qkv, proj, gate, up, down; merger: 2
    assert all(p.dtype == torch.float32 for p in inner.model.visual.parameters())
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.final_loss))
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    # It captions through the quantized base (a string, whatever 6 steps taught it).
    from multimodal_lora.inference.captioner import caption

    text = caption(Image.new("RGB", (32, 32), (200, 30, 30)), adapter=result.adapter_dir, device="cpu", max_new_tokens=4)
    assert isinstance(text, str)


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_same_adapter(small_shapes_dir, tmp_path):
    """A run resumed from its mid-epoch checkpoint (step 4 of 12; lora dropout on, so the random
    state matters) ends with the adapter of the run that never stopped, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from multimodal_lora import train

    def run(out, *extra):
        overrides = [
            f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=4", "train.epochs=2",
            "train.eval_captions=false", "lora.dropout=0.1", "train.checkpoint_every=4", "train.keep_checkpoints=5",
            *extra,
        ]  # fmt: skip
        return train(load_recipe(RECIPES / "tiny-qwen2vl.yaml", overrides))

    whole = run(tmp_path / "whole")
    assert whole.steps == 12  # 24 images, batches of 4: 6 steps an epoch
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "adapter")
    for checkpoint in (tmp_path / "cut" / "checkpoints").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > 4:
            shutil.rmtree(checkpoint)
    resumed = run(tmp_path / "cut", "resume=true")
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert resumed.steps == 12 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def short_adapters(small_shapes_dir, tmp_path_factory):
    """Two adapters of four steps each (seeds 0 and 1) on the tiny twin, saved the trainer's way."""
    from multimodal_lora import train

    dirs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"qwen-seed{seed}")
        overrides = [
            f"output_dir={out}", f"data.path={small_shapes_dir}", f"seed={seed}",
            "train.max_steps=4", "train.batch_size=4", "train.eval_captions=false",
        ]  # fmt: skip
        dirs.append(train(load_recipe(RECIPES / "tiny-qwen2vl.yaml", overrides)).adapter_dir)
    return dirs


@pytest.mark.slow
def test_several_adapters_on_one_base_and_questions(short_adapters, shapes_dir):
    """Two adapters share one loaded base and switch per call, each answering as it does alone;
    ask() puts each question through the chat template, batched like one by one."""
    from multimodal_lora.inference.captioner import Captioner

    dirs = short_adapters
    # The model card's plain-transformers snippet prompts through the chat template, as training did.
    card = (dirs[0] / "README.md").read_text()
    assert "processor.apply_chat_template(messages, add_generation_prompt=True)" in card
    assert "Qwen2_5_VLForConditionalGeneration.from_pretrained" in card
    images = sorted((shapes_dir / "validation").glob("*.png"))[:4]
    both = Captioner("tiny-qwen2vl", device="cpu")
    for name, directory in zip("ab", dirs):
        both.load_adapter(directory, name=name)
    for name, directory in zip("ab", dirs):
        alone = Captioner("tiny-qwen2vl", device="cpu")
        alone.load_adapter(directory, name=name)
        assert both.caption(images, adapter=name, max_new_tokens=6) == alone.caption(images, adapter=name, max_new_tokens=6)
    assert both.caption(images, adapter="a", max_new_tokens=6) != both.caption(images, adapter=None, max_new_tokens=6)
    questions = ["What colour is the shape?", "What shape is it?", "Is it red?", "Where is it?"]
    together = both.ask(images, questions, adapter="b", max_new_tokens=4)
    assert together == [both.ask(i, q, adapter="b", max_new_tokens=4) for i, q in zip(images, questions)]


@pytest.mark.slow
def test_the_built_in_server_answers_as_the_python_api(short_adapters, shapes_dir, tmp_path):
    """The real OpenAI client against ``python -m multimodal_lora.serve`` on the tiny twin: concurrent
    requests with images of two sizes (two grids, two rope deltas) decoded continuously (said in the
    log), the same captions as caption(), and the usage count of each image."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from multimodal_lora.data.images import load_image
    from multimodal_lora.inference.captioner import Captioner

    from .test_serve import chat, start_server, stop_server

    images = sorted((shapes_dir / "validation").glob("*.png"))[:2]
    load_image(images[0]).resize((48, 32)).save(tmp_path / "wide.png")
    images = [*images, tmp_path / "wide.png"] * 2
    captioner = Captioner("tiny-qwen2vl", device="cpu")
    captioner.load_adapter(short_adapters[0], name="shapes")
    want = captioner.caption(images, adapter="shapes", max_new_tokens=8)
    log = tmp_path / "server.log"
    proc, url = start_server(["--adapter", f"shapes={short_adapters[0]}", "--adapters-dir", str(tmp_path)], log)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with ThreadPoolExecutor(len(images)) as pool:
            replies = list(pool.map(lambda path: chat(client, "shapes", path.read_bytes(), max_tokens=8), images))
    finally:
        stop_server(proc)
    assert [r.choices[0].message.content for r in replies] == want
    assert replies[0].usage.prompt_tokens == captioner.prompt_tokens("", captioner.pixels(load_image(images[0])))
    assert replies[2].usage.prompt_tokens == captioner.prompt_tokens("", captioner.pixels(load_image(images[2])))
    assert "(batching: continuous" in log.read_text()


@pytest.mark.slow
def test_the_demo_captions_with_a_qwen_adapter(short_adapters, shapes_dir, tmp_path, monkeypatch):
    """The Gradio demo finds a Qwen2.5-VL run, loads its base, and captions as caption() does."""
    import shutil
    import socket

    from gradio_client import Client, handle_file

    from multimodal_lora import demo
    from multimodal_lora.evaluate.report import legible
    from multimodal_lora.inference.captioner import Captioner

    shutil.copytree(short_adapters[0], tmp_path / "runs" / "shapes" / "adapter")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "unused"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = str(sorted((shapes_dir / "validation").glob("*.png"))[0])
    want = Captioner.for_adapter(tmp_path / "runs" / "shapes" / "adapter", name="shapes").caption(image, adapter="shapes")
    app = demo.serve(tmp_path / "runs", device="cpu", port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, text, _ = client.predict(handle_file(image), "shapes", False, "", 30, 1, False, 1.0, 1.0, api_name="/caption")
    finally:
        app.close()
    assert text == legible(want)
