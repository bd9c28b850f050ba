"""``lora.parts``: LoRA on the language model's attention (the default), its MLP, and the connector.

Real tiny models and real training; the real configs on the ``meta`` device for the counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch
from safetensors import safe_open

from multimodal_lora.config import LoraSettings, load_recipe
from multimodal_lora.core.errors import AdapterError, ConfigError, UserError
from multimodal_lora.families import FAMILIES, blip2_opt
from multimodal_lora.model.base import add_lora, count_lora_parts, count_parameters, meta_model, published_config

from .conftest import RECIPES

ALL = ["attention", "mlp", "connector"]


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def adapted_modules(adapter_dir) -> set[str]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.").partition(".lora_")[0] for k in f.keys()}


# --- the recipe field, checked at the edge ------------------------------------------------------


def test_an_unknown_part_names_the_field_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "lora:\n  parts: [attention, vision]\n"))
    assert "lora.parts: expected a list drawn from attention, mlp, connector, got ['attention', 'vision']" in str(err.value)
    with pytest.raises(ConfigError, match="lora.parts: name at least one part"):
        load_recipe(write(tmp_path, "lora:\n  parts: []\n"))
    with pytest.raises(ConfigError, match="lora.parts: lists a part twice"):
        load_recipe(write(tmp_path, "lora:\n  parts: [mlp, mlp]\n"))
    with pytest.raises(ConfigError, match="lora.parts has no attention; add attention to lora.parts or drop target_modules"):
        load_recipe(write(tmp_path, "lora:\n  parts: [mlp]\n  target_modules: [q_proj]\n"))


def test_an_mlp_linear_in_target_modules_points_to_parts(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "lora:\n  target_modules: [q_proj, fc1]\n"))
    assert "lora.target_modules: fc1 belong to the MLP; to train it, add mlp to lora.parts" in str(err.value)


def test_the_default_is_attention_and_its_pattern_is_unchanged(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml")
    assert recipe.lora.parts == ["attention"] == LoraSettings().parts
    for family in FAMILIES:
        # Adapters of the default are byte for byte what they were before lora.parts existed.
        assert family.lora_pattern(["attention"], family.default_targets) == family.target_pattern(family.default_targets)


def test_a_family_without_mlp_or_connector_refuses_them_before_weights_load():
    # A family built with only the fields every family had before parts (as the new families may be).
    plain = dataclasses.replace(blip2_opt.FAMILY, name="plain", mlp_targets=(), mlp_pattern=None, connector=None)
    assert plain.parts() == ("attention",)
    assert plain.part_problems(["attention", "mlp", "connector"]) == [
        "lora.parts: the plain family has no 'mlp' part to train; it offers attention",
        "lora.parts: the plain family has no 'connector' part to train; it offers attention",
    ]
    for family in FAMILIES:
        assert family.parts() == tuple(ALL)


def test_feature_cache_true_with_the_connector_is_refused_in_one_line_before_weights_load(tmp_path):
    path = write(tmp_path, "lora:\n  parts: [attention, connector]\ntrain:\n  cache_image_features: true\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    line = next(line for line in str(err.value).splitlines() if "cache_image_features" in line)
    assert "lora.parts trains the connector" in line and "set it to auto" in line
    # With mlp the image path stays frozen: the cache is fine.
    load_recipe(write(tmp_path, "lora:\n  parts: [attention, mlp]\ntrain:\n  cache_image_features: true\n"))


def test_feature_cache_auto_turns_itself_off_when_the_connector_trains(tiny_base, caplog):
    from multimodal_lora.config import ModelConfig
    from multimodal_lora.model.base import load_base
    from multimodal_lora.training.loaders import cache_features

    recipe = load_recipe(RECIPES / "tiny.yaml", ["lora.parts=[attention,connector]"])
    assert recipe.train.cache_image_features == "auto"
    model = add_lora(load_base(ModelConfig(base="tiny", device="cpu"))[0], recipe.lora)
    with caplog.at_level(logging.INFO, logger="multimodal_lora.training.loaders"):
        assert cache_features(recipe, model, epochs=8) is False
    expected = "cache_image_features=auto: lora.parts=[attention, connector] trains qformer, language_projection of the image path"
    assert f"image feature cache: off ({expected})" in caplog.text
    attention_only = add_lora(load_base(ModelConfig(base="tiny", device="cpu"))[0], LoraSettings())
    assert cache_features(load_recipe(RECIPES / "tiny.yaml"), attention_only, epochs=8) is True


def test_a_training_connector_runs_in_train_mode_and_the_vision_encoder_does_not(tiny_base):
    from multimodal_lora.config import ModelConfig
    from multimodal_lora.model.base import load_base, set_train_mode

    model = add_lora(load_base(ModelConfig(base="tiny", device="cpu"))[0], LoraSettings(parts=["attention", "connector"]))
    set_train_mode(model)
    inner = model.get_base_model()
    assert inner.qformer.training and inner.language_projection.training and inner.language_model.training
    assert not inner.vision_model.training
    frozen = add_lora(load_base(ModelConfig(base="tiny", device="cpu"))[0], LoraSettings())
    set_train_mode(frozen)
    assert not frozen.get_base_model().qformer.training  # the default keeps the image path's dropout off


# --- counts: the tiny twin and the real architecture --------------------------------------------


def test_parameter_counts_per_part_on_the_tiny_twin(tiny_base):
    from multimodal_lora.config import ModelConfig
    from multimodal_lora.model.base import load_base

    model = add_lora(load_base(ModelConfig(base="tiny", device="cpu"))[0], LoraSettings(r=16, parts=ALL))
    parts = count_lora_parts(model)
    # OPT, 2 layers, hidden 128: q/k/v/out each 16 × (128 + 128) = 4,096 → 2 × 4 × 4,096 = 32,768.
    assert parts["attention"] == 32_768
    # fc1 128→256 and fc2 256→128, each 16 × (128 + 256) = 6,144 → 2 × 2 × 6,144 = 24,576.
    assert parts["mlp"] == 24_576
    # Q-Former, 2 layers of width 128 (FFN 256), cross-attention in both (over the vision width 64):
    # self q/k/v/out 4 × 16 × 256 = 16,384; cross q/out 2 × 16 × 256 = 8,192, cross k/v 2 × 16 × (64 + 128) = 6,144;
    # query FFN 2 × 16 × (128 + 256) = 12,288: 43,008 per layer → 2 × 43,008 = 86,016;
    # language_projection 128→128: 16 × 256 = 4,096. 86,016 + 4,096 = 90,112.
    assert parts["connector"] == 90_112
    counts = count_parameters(model)
    assert counts["Q-Former"][0] == 86_016 and counts["projection"][0] == 4_096 and counts["vision"][0] == 0
    assert counts["total"][0] == 32_768 + 24_576 + 90_112


def test_parameter_counts_per_part_on_blip2_opt_2_7b():
    model = add_lora(meta_model(published_config("Salesforce/blip2-opt-2.7b")), LoraSettings(r=16, parts=ALL))
    parts = count_lora_parts(model)
    # 32 OPT layers, hidden 2560: q/k/v/out 4 × 16 × (2560 + 2560) = 327,680 per layer → 10,485,760.
    assert parts["attention"] == 10_485_760
    # fc1 2560→10240 and fc2 10240→2560: 2 × 16 × (2560 + 10240) = 409,600 per layer → 13,107,200.
    assert parts["mlp"] == 13_107_200
    # Q-Former, 12 layers of width 768 (FFN 3072), cross-attention every 2nd layer over the 1408-wide ViT-g:
    # self q/k/v/out: 12 × 4 × 16 × 1,536 = 1,179,648; query FFN: 12 × 2 × 16 × 3,840 = 1,474,560;
    # cross q/out 2 × 16 × 1,536 = 49,152 and k/v 2 × 16 × (1408 + 768) = 69,632, in 6 layers: 712,704;
    # language_projection 768→2560: 16 × 3,328 = 53,248. 1,179,648 + 1,474,560 + 712,704 + 53,248 = 3,420,160.
    assert parts["connector"] == 3_420_160
    counts = count_parameters(model)
    assert counts["projection"][0] == 53_248 and counts["vision"][0] == 0
    assert counts["total"][0] == 10_485_760 + 13_107_200 + 3_420_160


def test_the_plan_counts_the_parts():
    from multimodal_lora.families.base import qformer_activation_values
    from multimodal_lora.model.plan import plan_memory

    config = published_config("Salesforce/blip2-opt-2.7b")
    shape = dict(quantization="none", dtype="bf16", batch_size=4, max_length=32)
    default = plan_memory(config, lora=LoraSettings(r=16), **shape)
    every = plan_memory(config, lora=LoraSettings(r=16, parts=ALL), **shape)
    assert every.lora_parameters == 27_013_120 and default.lora_parameters == 10_485_760
    assert "LoRA by part: attention 10,485,760, mlp 13,107,200, connector 3,420,160" in every.format()
    # Q-Former per image (r=16): every layer 32 × (17 × 768 + 3 × 3072 + 6 × 16 + 4) + 3 × 12 × 32² = 752,768,
    # × 12 = 9,033,216; the 6 cross-attention layers add 32 × (7 × 768 + 2 × 16 + 2) + 2 × 257 × (1408 + 16)
    # + 2 × 257 × 768 + 3 × 12 × 32 × 257 = 1,595,872 each, 9,575,232; the projection 32 × (2 × 768 + 16) = 49,664.
    assert qformer_activation_values(config, 16) == 9_033_216 + 9_575_232 + 49_664 == 18_658_112
    # MLP LoRA dropout inputs per token: 32 layers × (fc1's 2560 + fc2's 10240) = 409,600; 4 × 64 tokens; bf16.
    assert every.activations - default.activations == 4 * 64 * 409_600 * 2 + 4 * 18_658_112 * 2


def test_the_connector_term_is_what_autograd_was_measured_to_keep():
    from multimodal_lora.families.base import qformer_activation_values

    result = json.loads((RECIPES.parent / "bench" / "results" / "connector_activations.json").read_text())
    assert result["base"] == "Salesforce/blip2-opt-2.7b" and result["lora"]["r"] == 16
    planned = 4 * qformer_activation_values(published_config(result["base"]), 16)
    assert planned == result["per_image_bytes_planned"]
    assert abs(planned - result["per_image_bytes_measured"]) <= 0.05 * result["per_image_bytes_measured"]


# --- where the adapter's tensors sit ------------------------------------------------------------


def test_the_default_adapter_holds_attention_only(quick_adapter):
    family = blip2_opt.FAMILY
    modules = adapted_modules(quick_adapter)
    assert modules and all(re.fullmatch(family.target_pattern(family.lora_targets), m) for m in modules)
    assert json.loads((quick_adapter / "multimodal_lora.json").read_text())["parts"] == ["attention"]


@pytest.mark.parametrize("name", ["Salesforce/blip2-opt-2.7b", "Salesforce/blip2-flan-t5-xl", "Salesforce/instructblip-vicuna-7b"])
def test_each_part_lands_where_its_family_says_and_nowhere_else(name):
    model = add_lora(meta_model(published_config(name)), LoraSettings(r=4, parts=["mlp", "connector"]))
    adapted = {n.removeprefix("base_model.model.").partition(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    leaves = {re.sub(r"\.\d+\.", ".N.", m) for m in adapted}
    assert not any(m.startswith("vision_model") or "self_attn" in m or "SelfAttention" in m for m in adapted)
    assert "language_projection" in adapted
    assert any(m.startswith("qformer.encoder.layer.") and m.endswith("crossattention.attention.key") for m in adapted)
    mlp = {m.rsplit(".", 1)[-1] for m in adapted if m.startswith("language_model.")}
    assert mlp == {"Salesforce/blip2-opt-2.7b": {"fc1", "fc2"}, "Salesforce/blip2-flan-t5-xl": {"wi_0", "wi_1", "wo"},
                   "Salesforce/instructblip-vicuna-7b": {"gate_proj", "up_proj", "down_proj"}}[name]  # fmt: skip
    # InstructBLIP's Q-Former also runs the instruction through its own FFN: adapted too.
    assert ("qformer.encoder.layer.N.intermediate.dense" in leaves) == name.startswith("Salesforce/instructblip")


def test_every_part_takes_lora_on_an_int8_base_and_gets_gradients(tiny_base, shapes_dir):
    import bitsandbytes as bnb

    from multimodal_lora.config import ModelConfig
    from multimodal_lora.data.images import load_image
    from multimodal_lora.model.base import load_base, load_processor

    model, _ = load_base(ModelConfig(base="tiny", device="cpu", quantization="int8"))
    # The projection and the MLP are int8 (the Q-Former stays fp32, as transformers keeps it).
    assert isinstance(model.language_projection, bnb.nn.Linear8bitLt)
    assert isinstance(model.language_model.model.decoder.layers[0].fc1, bnb.nn.Linear8bitLt)
    model = add_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0, parts=ALL))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # so that every lora_A gets a gradient too
    processor = load_processor("tiny")
    image = load_image(sorted((shapes_dir / "train").glob("*.png"))[0])
    inputs = processor(images=image, text="a red circle", return_tensors="pt")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {part: 0.0 for part in ALL}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grads[blip2_opt.FAMILY.part_of(name.removeprefix("base_model.model.").partition(".lora_")[0])] += float(param.grad.abs().sum())
    assert all(g > 0 for g in grads.values()), grads


@pytest.mark.parametrize("base", ["tiny-t5", "tiny-instructblip", "tiny-qwen2vl", "tiny-qwen3vl", "tiny-smolvlm"])
def test_other_families_all_parts_adapter_loads_in_plain_peft_and_merges_to_the_same_logits(base, shapes_dir, tmp_path):
    from peft import PeftModel

    from multimodal_lora import Captioner
    from multimodal_lora.adapter import AdapterMeta, save_adapter
    from multimodal_lora.config import ModelConfig
    from multimodal_lora.data.images import load_image
    from multimodal_lora.merge import merge_adapter
    from multimodal_lora.model.base import family_of, load_base

    model, info = load_base(ModelConfig(base=base, device="cpu"))
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, parts=ALL))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a non-zero update in every part, as training would leave
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    family = family_of(model)
    adapter = save_adapter(model, tmp_path / "adapter", AdapterMeta(base=info, parts=tuple(ALL)))
    assert {family.part_of(m) for m in adapted_modules(adapter)} == set(ALL)

    captioner = Captioner(base, device="cpu")
    name = captioner.load_adapter(adapter, name="all")
    images = sorted((shapes_dir / "validation").glob("*.png"))[:2]
    batch = captioner.generation_inputs([load_image(p) for p in images], ["a"] * 2)
    forward = {**batch, "decoder_input_ids": batch["input_ids"][:, :1]} if "t5" in base else batch
    with torch.no_grad(), captioner.using(name):
        ours = captioner.model(**forward).logits
    plain = PeftModel.from_pretrained(family.model_cls().from_pretrained(info.name_or_path), str(adapter)).eval()
    merged = family.model_cls().from_pretrained(merge_adapter(adapter, tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**forward).logits, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(**forward).logits, ours, rtol=0, atol=1e-4)
        with captioner.using(None):
            assert (captioner.model(**forward).logits - ours).abs().max() > 1e-2


# --- a real run with every part ----------------------------------------------------------------


def train_all_parts(recipe: str, data, out):
    """12 steps of a tiny recipe with LoRA on every part (dropout on, as the plan's terms assume)."""
    from multimodal_lora import train

    overrides = [
        f"output_dir={out}", f"data.path={data}", "train.batch_size=8", "train.max_steps=12",
        "train.eval_captions=false", "lora.parts=[attention,mlp,connector]", "lora.dropout=0.05",
    ]  # fmt: skip
    return train(load_recipe(RECIPES / recipe, overrides))


@pytest.fixture(scope="module")
def all_parts_run(small_shapes_dir, tmp_path_factory):
    return train_all_parts("tiny.yaml", small_shapes_dir, tmp_path_factory.mktemp("all-parts"))


@pytest.fixture(scope="module")
def images(shapes_dir):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted((shapes_dir / "validation").glob("*.png"))[:4]]


def test_the_run_records_its_parts_and_adapts_exactly_them(all_parts_run):
    adapter = all_parts_run.adapter_dir
    assert json.loads((adapter / "multimodal_lora.json").read_text())["parts"] == ALL
    card = (adapter / "README.md").read_text()
    assert "the language model's MLP (`fc1`, `fc2`) and the connector (`qformer`, `language_projection`)" in card
    modules = adapted_modules(adapter)
    family = blip2_opt.FAMILY
    assert {family.part_of(m) for m in modules} == set(ALL)
    assert not any(m.startswith("vision_model") for m in modules)
    # Every linear of every part has its tensors: the Q-Former's 2 layers × 10 linears (self- and
    # cross-attention 4 each, the query FFN 2), the projection, the decoder's 2 layers × (4 attention + 2 MLP).
    assert len(modules) == 2 * 10 + 1 + 2 * 6


def test_peft_from_pretrained_equals_our_loading(all_parts_run, images):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    from multimodal_lora import Captioner

    captioner = Captioner("tiny", device="cpu")
    name = captioner.load_adapter(all_parts_run.adapter_dir, name="all")
    base = Blip2ForConditionalGeneration.from_pretrained(captioner.base.name_or_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(all_parts_run.adapter_dir)).eval()
    batch = captioner.generation_inputs(images, [""] * len(images))
    with torch.no_grad(), captioner.using(name):
        ours = captioner.model(**batch).logits
    with torch.no_grad():
        theirs = peft_model(**batch).logits
        bare = captioner.model.get_base_model()
        with captioner.model.disable_adapter():
            without = bare(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - without).abs().max() > 1e-2  # the adapter changes the output


def test_merged_equals_unmerged(all_parts_run, images, tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from multimodal_lora import Captioner
    from multimodal_lora.merge import merge_adapter

    captioner = Captioner("tiny", device="cpu")
    name = captioner.load_adapter(all_parts_run.adapter_dir, name="all")
    batch = captioner.generation_inputs(images, [""] * len(images))
    with torch.no_grad(), captioner.using(name):
        unmerged = captioner.model(**batch).logits
    out = merge_adapter(all_parts_run.adapter_dir, tmp_path / "merged")
    merged_model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        merged = merged_model(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)
    # The Captioner's in-place merge (evaluate, the server) too.
    assert captioner.merge(name)
    with torch.no_grad(), captioner.using(name):
        torch.testing.assert_close(captioner.model(**batch).logits, unmerged, rtol=0, atol=1e-4)
    # The merged Q-Former and projection differ from the base's: the connector really was merged.
    base = Blip2ForConditionalGeneration.from_pretrained(captioner.base.name_or_path)
    assert not torch.equal(merged_model.language_projection.weight, base.language_projection.weight)
    assert AutoProcessor.from_pretrained(out) is not None


def test_an_adapter_holding_more_parts_than_it_records_is_refused(all_parts_run, tmp_path):
    import shutil

    from multimodal_lora import Captioner

    copy = tmp_path / "adapter"
    shutil.copytree(all_parts_run.adapter_dir, copy)
    record = json.loads((copy / "multimodal_lora.json").read_text())
    record["parts"] = ["attention", "mlp"]
    (copy / "multimodal_lora.json").write_text(json.dumps(record))
    with pytest.raises(AdapterError, match="adapts language_projection, which is not in the parts the adapter trained"):
        Captioner("tiny", device="cpu").load_adapter(copy)


def test_continuous_batching_prefills_through_the_connector(all_parts_run, images):
    from multimodal_lora import Captioner

    from .test_continuous import job, join_a_running_row

    captioner = Captioner("tiny", device="cpu")
    name = captioner.load_adapter(all_parts_run.adapter_dir, name="all")
    prompt = captioner.caption_prompt(name)
    joiners = [job(captioner, name, image, prompt) for image in images[1:]]
    join_a_running_row(captioner, images[0], joiners)
    assert [j.sink.text.strip() for j in joiners] == captioner.caption(images[1:], adapter=name)


def test_vllm_refuses_a_connector_adapter_in_one_line(all_parts_run):
    from multimodal_lora.vllm.plan import make_plan

    with pytest.raises(UserError) as err:
        make_plan({"all": all_parts_run.adapter_dir}, None)
    message = str(err.value)
    assert "\n" not in message
    assert "adapter 'all' trains the connector (lora.parts), but vLLM applies LoRA to the language model only" in message


def test_resuming_with_other_parts_is_refused(all_parts_run):
    from multimodal_lora import train
    from multimodal_lora.training.checkpoint import CheckpointError

    out = all_parts_run.adapter_dir.parent
    recipe = load_recipe(out / "recipe.yaml", ["resume=true", "lora.parts=[attention,mlp]", "train.max_steps=13"])
    with pytest.raises(CheckpointError, match=r"lora.parts: checkpoint has \['attention', 'connector', 'mlp'\]"):
        train(recipe)


# --- attention + MLP learns -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_run(small_shapes_dir, tmp_path_factory):
    from multimodal_lora import train

    out = tmp_path_factory.mktemp("mlp")
    overrides = [
        f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=8", "train.max_steps=24",
        "train.log_every=3", "train.eval_captions=false", "lora.parts=[attention,mlp]",
    ]  # fmt: skip
    return out, train(load_recipe(RECIPES / "tiny.yaml", overrides))


def test_attention_and_mlp_learn(mlp_run):
    out, result = mlp_run
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]  # fmt: skip
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    assert {blip2_opt.FAMILY.part_of(m) for m in adapted_modules(result.adapter_dir)} == {"attention", "mlp"}


def test_vllm_commands_refuse_a_connector_adapter_in_one_line_before_anything_starts(all_parts_run, shapes_dir, tmp_path):
    import shutil

    from .test_vllm import run_cli

    shutil.copytree(all_parts_run.adapter_dir, tmp_path / "runs" / "all" / "adapter")
    image = str(next((shapes_dir / "validation").glob("*.png")))
    for command in (
        ["multimodal_lora.serve", "--engine", "vllm", "--adapters-dir", str(tmp_path / "runs")],
        ["multimodal_lora.caption", "--engine", "vllm", "--adapter", str(all_parts_run.adapter_dir), image],
    ):
        result = run_cli(*command, "--vllm-python", "/nonexistent/python")  # refused before vLLM is looked for
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "trains the connector (lora.parts), but vLLM applies LoRA to the language model only" in lines[0]


@pytest.mark.vllm
@pytest.mark.slow
def test_an_mlp_adapter_captions_on_vllm_as_on_the_builtin_engine(mlp_run, shapes_dir):
    from .test_vllm import run_cli, vllm_python

    vllm_python()
    adapter = str(mlp_run[1].adapter_dir)
    images = [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:16]]
    builtin = run_cli("multimodal_lora.caption", "--adapter", adapter, *images)
    on_vllm = run_cli("multimodal_lora.caption", "--engine", "vllm", "--adapter", adapter, *images, timeout=900)
    assert builtin.returncode == 0 and on_vllm.returncode == 0, on_vllm.stderr[-3000:]
    assert on_vllm.stdout == builtin.stdout and len(builtin.stdout.splitlines()) == 16
