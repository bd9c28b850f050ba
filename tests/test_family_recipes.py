"""The tiny recipes of the new families, trained once each: they learn, and every tool works on them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from multimodal_lora.config import load_recipe
from multimodal_lora.core.errors import AdapterError
from multimodal_lora.data.images import load_image
from multimodal_lora.data.sources import group_references, load_splits
from multimodal_lora.families import family_named
from multimodal_lora.inference.captioner import Captioner

from .conftest import RECIPES

# Each family's recipe trains for real (a minute or more each on 2 cores): in the full run only.
pytestmark = pytest.mark.slow

FAMILY = {
    "tiny-t5": "blip2-t5",
    "tiny-instructblip": "instructblip-vicuna",
    "tiny-qwen2vl": "qwen2.5-vl",
    "tiny-qwen3vl": "qwen3-vl",
    "tiny-paligemma": "paligemma",
    "tiny-smolvlm": "smolvlm",
}
HELD_OUT = 60


@pytest.fixture(scope="module", params=sorted(FAMILY))
def run(request, tmp_path_factory):
    """One full run of recipes/<name>.yaml (about a minute each on 2 cores)."""
    from multimodal_lora.training import train

    name = request.param
    out = tmp_path_factory.mktemp(name)
    recipe = load_recipe(RECIPES / f"{name}.yaml", [f"output_dir={out}", "train.eval_max_images=8"])
    result = train(recipe)
    groups = group_references(load_splits(recipe.data).validation)[:HELD_OUT]
    return name, recipe, result, groups


@pytest.fixture(scope="module")
def captioner(run):
    name, _, result, _ = run
    captioner = Captioner(name, device="cpu")
    captioner.load_adapter(result.adapter_dir, name="shapes")
    return captioner


def exact_match(captions, groups) -> float:
    return sum(c in refs for c, (_, refs) in zip(captions, groups)) / len(groups)


def test_the_recipe_teaches_captions_the_bare_base_does_not_know(run, captioner):
    _, recipe, _, groups = run
    images = [first.image for first, _ in groups]
    assert len(groups) == HELD_OUT
    adapted = exact_match(captioner.caption(images, adapter="shapes"), groups)
    bare = exact_match(captioner.caption(images, adapter=None), groups)
    assert adapted >= 0.5, adapted
    assert bare <= 0.05, bare


def test_every_adapter_tensor_is_in_the_familys_language_model_attention(run):
    name, recipe, result, _ = run
    family = family_named(FAMILY[name])
    pattern = family.target_pattern(recipe.lora.target_modules)
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys
    for key in keys:
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        assert re.fullmatch(pattern, module), key
    meta = json.loads((result.adapter_dir / "multimodal_lora.json").read_text())
    assert meta["base"]["family"] == FAMILY[name]


def test_plain_peft_loads_the_adapter_and_captions_the_same(run, captioner):
    from peft import PeftModel

    name, _, result, groups = run
    family = family_named(FAMILY[name])
    base = family.model_cls().from_pretrained(captioner.base.name_or_path)
    peft_model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    plain = Captioner.from_model(peft_model, captioner.processor, captioner.base, {"default": captioner.adapters["shapes"]})
    images = [first.image for first, _ in groups[:12]]
    assert plain.caption(images, adapter="default") == captioner.caption(images, adapter="shapes")


def test_merged_equals_unmerged(run, captioner, tmp_path):
    from multimodal_lora.merge import merge_adapter

    _, _, result, groups = run
    merged_dir = merge_adapter(result.adapter_dir, tmp_path / "merged")
    merged = Captioner(str(merged_dir), device="cpu")
    images = [first.image for first, _ in groups[:12]]
    batch = merged.generation_inputs([load_image(i) for i in images], [""] * 12)
    with torch.no_grad():
        tokens_merged = merged.model.generate(**batch, max_new_tokens=12, eos_token_id=merged.layout.stop_token_id)
        with captioner.using("shapes"):
            tokens_unmerged = captioner.model.generate(**batch, max_new_tokens=12, eos_token_id=captioner.layout.stop_token_id)
    assert torch.equal(tokens_merged, tokens_unmerged)


def test_an_adapter_is_refused_by_another_family(run):
    name, _, result, _ = run
    other = "tiny-instructblip" if name == "tiny-t5" else "tiny-t5"
    with pytest.raises(AdapterError, match=f"was trained on a {FAMILY[name]} model .* is a {FAMILY[other]} model"):
        Captioner(other, device="cpu").load_adapter(result.adapter_dir)


def test_caption_cli_and_evaluate(run, tmp_path):
    from multimodal_lora.commands.caption import main as caption_main
    from multimodal_lora.evaluate.run import evaluate

    _, recipe, result, groups = run
    out = tmp_path / "captions.jsonl"
    images = [first.image for first, _ in groups[:4]]
    assert caption_main([*images, "--adapter", str(result.adapter_dir), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(row["caption"] for row in rows)
    report, table = evaluate(recipe, result.adapter_dir, tmp_path / "eval", max_images=8, samples=2, meteor=False)
    assert (report / "report.md").is_file()
    assert table["adapter"]["exact_match"] > table["base"]["exact_match"]
    assert table["adapter"]["val_loss"] < table["base"]["val_loss"]


def test_requests_that_join_a_running_batch_get_what_caption_and_ask_give(run, captioner):
    """The server's continuous batching (``serve/continuous.py``) on each family's trained adapter and
    bare base: rows of images of three sizes (Qwen2.5-VL: three grids, so rows of other lengths and
    other rope deltas) and prompts of three lengths arrive a few ms apart, and bare-base requests join a
    running 60-token row for certain; every text equals ``caption()`` / ``ask()`` alone. A T5 is refused by name."""
    from PIL import Image

    from multimodal_lora.serve.continuous import continuous_problem

    from .test_continuous import job, join_a_running_row, run_staggered

    name, _, _, groups = run
    if name == "tiny-t5":
        assert "encoder–decoder" in continuous_problem(captioner)
        return
    assert continuous_problem(captioner) is None
    shapes = [load_image(first.image) for first, _ in groups[:6]]
    images = [*shapes, shapes[0].resize((48, 32)), Image.new("RGB", (40, 64), "green")]
    question = "What shape is it?"
    want = captioner.caption(images, "shapes") + captioner.caption(images[::2], None, max_new_tokens=8)
    jobs = [job(captioner, "shapes", image, captioner.caption_prompt("shapes")) for image in images]
    jobs += [job(captioner, None, image, captioner.caption_prompt(None), max_tokens=8) for image in images[::2]]
    assert set(want[:8]).isdisjoint(want[8:])  # a row decoded with the wrong adapter would show
    counters = run_staggered(captioner, jobs, max_batch_size=4)
    assert [j.sink.text for j in jobs] == want
    assert counters["decoded_rows"] > counters["decode_steps"], counters  # rows decoded together

    prompts = [captioner.caption_prompt(None), captioner.vqa_prompt(None, question), captioner.caption_prompt(None, "a photo of")]
    joiners = [job(captioner, None, image, prompts[i % 3], max_tokens=8) for i, image in enumerate(images[1:])]
    want_joiners = [
        captioner.ask(image, question, None, max_new_tokens=8) if i % 3 == 1
        else captioner.caption(image, None, prompt=None if i % 3 == 0 else "a photo of", max_new_tokens=8)
        for i, image in enumerate(images[1:])
    ]  # fmt: skip
    long, counters = join_a_running_row(captioner, images[0], joiners)
    assert long.sink.tokens == 60 and long.sink.text == captioner.caption(images[0], None, max_new_tokens=60)
    assert [j.sink.text for j in joiners] == want_joiners
    assert counters["joined_running"] == len(joiners), counters

