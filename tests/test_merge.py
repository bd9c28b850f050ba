"""Merge and export: a standalone model that plain transformers loads and that captions like base + adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from multimodal_lora.commands.merge import main
from multimodal_lora.merge import MergeError, merge_adapter


@pytest.fixture(scope="module")
def images(shapes_dir):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted((shapes_dir / "validation").glob("*.png"))[:6]]


@pytest.fixture(scope="module")
def merged_dir(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    assert main(["--adapter", str(tiny_run.adapter_dir), "--out", str(out)]) == 0
    return out


def greedy_plain(model, processor, images) -> list[str]:
    """Greedy captions the way a transformers user writes them: processor, generate, decode."""
    out = []
    for image in images:
        inputs = processor(images=image, text="", return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=30, do_sample=False, num_beams=1)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def test_merged_directory_is_a_plain_transformers_model(merged_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "processor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names), "weights must be safetensors, not pickle"
    assert "adapter_config.json" not in names  # merged: no PEFT left
    # No temporary directory is left beside it.
    assert [p.name for p in merged_dir.parent.iterdir()] == ["merged"]


def test_peft_captioner_and_merged_give_the_same_greedy_captions(merged_dir, tiny_run, tiny_base, images):
    from peft import PeftModel
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from multimodal_lora import Captioner

    # 1. Plain PEFT on the plain base.
    processor = AutoProcessor.from_pretrained(tiny_base)
    base = Blip2ForConditionalGeneration.from_pretrained(tiny_base, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(tiny_run.adapter_dir)).eval()
    via_peft = greedy_plain(peft_model, processor, images)
    # 2. The Captioner, batched.
    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(tiny_run.adapter_dir, name="shapes")
    via_captioner = captioner.caption(images, adapter="shapes", batch_size=6)
    # 3. The merged model, with nothing but transformers.
    merged = Blip2ForConditionalGeneration.from_pretrained(merged_dir).eval()
    merged_processor = AutoProcessor.from_pretrained(merged_dir)
    via_merged = greedy_plain(merged, merged_processor, images)

    assert via_peft == via_captioner == via_merged
    assert via_merged != captioner.caption(images, adapter=None)  # the adapter is really in there


def test_merged_logits_match_base_plus_adapter(merged_dir, tiny_run, tiny_base, images):
    from peft import PeftModel
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_base)
    inputs = processor(images=images[0], text="", return_tensors="pt")
    base = Blip2ForConditionalGeneration.from_pretrained(tiny_base, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(tiny_run.adapter_dir)).eval()
    merged = Blip2ForConditionalGeneration.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        a = adapted(**inputs).logits
        b = merged(**inputs).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_refuses_a_quantized_base_unless_asked_to_dequantize(tiny_run, tmp_path, images):
    # A run trained on an int8 base: the adapter's record says so.
    run = tmp_path / "int8-run"
    shutil.copytree(tiny_run.adapter_dir, run / "adapter")
    record = json.loads((run / "adapter" / "multimodal_lora.json").read_text())
    record["load"] = {**record["load"], "quantization": "int8", "dtype": "bf16"}
    (run / "adapter" / "multimodal_lora.json").write_text(json.dumps(record))

    with pytest.raises(MergeError, match=r"quantized to int8.*--dequantize.*now bf16"):
        merge_adapter(run / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match="4bit"):
        merge_adapter(tiny_run.adapter_dir, tmp_path / "out", quantization="4bit")

    out = merge_adapter(run / "adapter", tmp_path / "out", dequantize=True)
    assert (out / "model.safetensors").is_file()
    # Merged in the dtype the adapter was trained in, unless told otherwise.
    assert json.loads((out / "merged_from.json").read_text())["dtype"] == "bf16"


def test_an_adapter_without_a_record_is_judged_by_its_runs_recipe(tiny_run, tmp_path):
    run = tmp_path / "old-int8-run"
    shutil.copytree(tiny_run.adapter_dir, run / "adapter")
    record = json.loads((run / "adapter" / "multimodal_lora.json").read_text())
    del record["load"]
    (run / "adapter" / "multimodal_lora.json").write_text(json.dumps(record))
    recipe = yaml.safe_load((tiny_run.adapter_dir.parent / "recipe.yaml").read_text())
    recipe["model"]["quantization"] = "int8"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(MergeError, match=r"quantized to int8.*now fp32"):
        merge_adapter(run / "adapter", tmp_path / "out")


def test_existing_output_is_kept_unless_overwrite(merged_dir, tiny_run):
    before = (merged_dir / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(MergeError, match="exists.*--overwrite"):
        merge_adapter(tiny_run.adapter_dir, merged_dir)
    assert (merged_dir / "model.safetensors").stat().st_mtime_ns == before


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "multimodal_lora.merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: adapter" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
