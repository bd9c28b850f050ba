"""The memory planner's arithmetic, the reference loop's behaviour, and the GPU benchmark's code path on CPU.

Speed and memory *figures* live in bench/ scripts, never in tests; these tests
check that the scripts compute what they claim to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal_lora.families.blip2_opt import NUM_QUERY_TOKENS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_plan_counts_lora_and_weights_exactly_on_the_tiny_base(tiny_base):
    from multimodal_lora.config import LoraSettings, ModelConfig
    from multimodal_lora.model.base import add_lora, base_config, load_base
    from multimodal_lora.model.plan import plan_memory

    lora = LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    plan = plan_memory(base_config("tiny"), quantization="none", dtype="fp32", lora=lora, batch_size=4, max_length=16)
    model, _ = load_base(ModelConfig(base="tiny", device="cpu"))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peft_model = add_lora(model, lora)
    lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # 2 layers × (q, v) × (A: 8×128 + B: 128×8)
    assert lora_params == plan.lora_parameters == 2 * 2 * (8 * 128 + 128 * 8)
    assert plan.lora_weights == plan.lora_gradients == 4 * lora_params
    assert plan.optimizer_state == 8 * lora_params
    assert plan.weights == weight_bytes
    assert plan.sequence_length == NUM_QUERY_TOKENS + 16  # query tokens + text
    assert plan.activations_checkpointed < plan.activations
    assert plan.total(True) < plan.total(False)


@pytest.mark.parametrize("quantization", ["int8", "4bit"])
def test_plan_matches_the_bytes_of_a_quantized_base(tiny_base, quantization):
    from multimodal_lora.config import ModelConfig
    from multimodal_lora.model.base import base_config, load_base, meta_model
    from multimodal_lora.model.plan import base_weight_bytes, measured_weight_bytes

    model, _ = load_base(ModelConfig(base="tiny", device="cpu", quantization=quantization, dtype="bf16"))
    # Parameters, int8 row scales, 4-bit block scales and code books (tied weights once).
    measured = measured_weight_bytes(model)
    planned = base_weight_bytes(meta_model(base_config("tiny")), quantization, "bf16")
    assert planned == pytest.approx(measured, rel=0.01)


def test_train_plan_flag_prints_the_football_plan_without_loading_weights(capsys):
    from multimodal_lora.commands.train import main

    assert main([str(REPO / "recipes" / "football.yaml"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "5,242,880" in out  # r=16 on q_proj and v_proj of 32 layers, 2560 wide
    line = next(row for row in out.splitlines() if row.startswith("base weights"))
    assert 3.5 < float(line.split()[2]) < 4.5  # int8 OPT-2.7B + ViT-g: about 4 GiB


def test_reference_loop_generates_every_ten_steps_and_trains(tiny_base, shapes_dir):
    from reference_loop import reference_train

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model.base import add_lora, load_base, load_processor

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", ["lora.dropout=0.0"])
    processor = load_processor("tiny")
    rows = [{"image": e.image, "text": e.target} for e in load_splits(recipe.data).train[:64]]
    model = add_lora(load_base(recipe.model)[0], recipe.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = reference_train(model, processor, rows, batch_size=4, lr=1e-3, max_steps=11)
    assert result["steps"] == 11 and result["samples"] == 44
    assert result["generations"] == 2  # steps 0 and 10, as in the PEFT example
    assert torch.isfinite(torch.tensor(result["loss"]))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_cached_features_step_computes_the_same_loss_as_the_full_step():
    from gpu_full_size import cached_loss, full_loss, make_batch, small_config
    from transformers import Blip2ForConditionalGeneration

    from multimodal_lora.config import LoraSettings
    from multimodal_lora.model.base import add_lora

    config = small_config()
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    model.requires_grad_(False)
    model = add_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"])).eval()
    batch = make_batch(config, 2, 6, torch.device("cpu"))
    from gpu_full_size import image_features

    with torch.no_grad():
        full = full_loss(model, batch)
        cached = cached_loss(model, image_features(model, batch["pixel_values"]), batch)
    torch.testing.assert_close(cached, full)


@pytest.mark.slow
def test_gpu_full_size_runs_on_cpu_with_small(tmp_path):
    cmd = [
        sys.executable, str(REPO / "bench" / "gpu_full_size.py"), "--small", "--out", str(tmp_path),
        "--bases", "int8,bf16", "--steps", "1", "--warmup", "0", "--new-tokens", "2", "--caption-repeats", "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "samples/s" in done.stdout and "planned GiB" in done.stdout
    result = json.loads((tmp_path / "gpu_full_size_small.json").read_text())
    rows = result["rows"]
    assert [(r["base"], r["cache"], r["gradient_checkpointing"]) for r in rows] == [
        (b, c, g) for b in ("int8", "bf16") for g in (False, True) for c in (False, True)
    ]
    assert all(r["samples_per_second"] > 0 and r["planned_bytes"] > 0 and r["caption_seconds"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_gpu_full_size_refuses_the_full_size_model_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_full_size.py")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--small" in done.stderr


@pytest.mark.slow
def test_full_size_cpu_bench_runs_its_phases_on_a_small_config(tmp_path):
    from full_size_cpu import small_config

    from multimodal_lora.model.base import count_parameters, meta_model

    cmd = [sys.executable, str(REPO / "bench" / "full_size_cpu.py"), "--small", "--in-process", "--threads", "1"]
    cmd += ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--steps", "2", "--new-tokens", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "full_size_cpu_small.json").read_text())
    assert result["problems"] == []
    assert result["total_parameters"] == count_parameters(meta_model(small_config()))["total"][1]
    assert result["trainable_parameters"] == 2 * 2 * (128 * 16 + 16 * 128)  # q_proj, v_proj × 2 layers, r=16
    phases = result["phases"]
    assert list(phases) == ["build", *(f"{k}-{q}" for q in ("int8", "4bit") for k in ("train", "caption", "merge"))]
    for q, layer, loaded in (
        ("int8", "Linear8bitLt", "int8, fp32, cpu"),
        ("4bit", "Linear4bit", "4bit nf4 (compute fp32), fp32, cpu"),
    ):
        train, caption, merge = (phases[f"{k}-{q}"] for k in ("train", "caption", "merge"))
        assert train["steps"] == 2 and train["record"]["quantization"] == q
        # caption(img, adapter=DIR) loaded the base as recorded, and generates what the trained model did.
        assert caption["layer_class"] == layer and caption["loaded_as"] == loaded
        assert caption["greedy_tokens"] == train["greedy_tokens"] and len(train["greedy_tokens"]) == 2
        assert caption["captions"] == train["captions"]
        assert merge["exit_status"] == 0 and "model.safetensors" in merge["files"]
        assert train["planned_bytes"] > 0 and train["peak_rss_bytes"] >= train["peak_anonymous_rss_bytes"] > 0
        assert 0 < train["loop_peak_rss_bytes"] <= train["peak_rss_bytes"]  # the loop's own peak, loading not included


@pytest.mark.slow
def test_gpu_football_runs_its_steps_on_a_small_config(tmp_path):
    # The FSDP launch is left out here: tests/test_accelerate_launch.py runs fsdp.yaml on CPU.
    cmd = [sys.executable, str(REPO / "bench" / "gpu_football.py"), "--small", "--skip-fsdp"]
    cmd += ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_football_small.json").read_text())
    # The football recipe as shipped: six rows, batch 2, five epochs.
    assert result["football"]["steps"] == 15 and len(result["football"]["losses"]) == 2
    assert result["football"]["record"] == {"quantization": "int8", "dtype": "fp16", "device": "cpu", "quant_type": None, "compute_dtype": None}
    # caption() followed the record; this CPU may lack fp16 kernels, and then says fp32.
    caption = result["caption"]
    assert caption["layer_class"] == "Linear8bitLt" and caption["loaded_as"] in ("int8, fp16, cpu", "int8, fp32, cpu")
    assert len(caption["captions"]) == 6 and caption["captions"][0] == caption["first_caption"]
