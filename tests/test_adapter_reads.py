"""An adapter is read once: the first ``caption(img, adapter=DIR)`` reads its weights once, a second opens no file of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Counts every `open` audit event (builtins.open, io.open, os.open) under the adapter directory.
SCRIPT = r"""
import json, os, sys
adapter, image = os.path.realpath(sys.argv[1]), sys.argv[2]
opened = []
sys.addaudithook(lambda event, args: event == "open" and isinstance(args[0], (str, bytes, os.PathLike))
                 and os.path.realpath(os.fsdecode(args[0])).startswith(adapter + os.sep) and opened.append(os.fsdecode(args[0])))
from multimodal_lora import caption
first_caption = caption(image, adapter=sys.argv[1], device="cpu")
first, opened[:] = list(opened), []
second_caption = caption(image, adapter=sys.argv[1], device="cpu")
print(json.dumps({"first": first, "second": list(opened), "same": first_caption == second_caption}))
"""


def test_a_second_caption_opens_no_adapter_file(quick_adapter, shapes_dir):
    image = str(next((shapes_dir / "validation").glob("*.png")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(quick_adapter), image], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = [p for p in counts["first"] if p.endswith("adapter_model.safetensors")]
    assert len(weights) == 1, counts["first"]
    assert counts["second"] == [], counts["second"]
    assert counts["same"]


def test_attach_gives_the_logits_peft_from_pretrained_gives(quick_adapter):
    """The tensors read once, handed to PEFT, make the model PEFT's own loader makes."""
    from peft import PeftModel

    from multimodal_lora.adapter import attach, check_fits, open_adapter
    from multimodal_lora.config import ModelConfig
    from multimodal_lora.model.base import load_base

    cfg = ModelConfig(base="tiny", device="cpu")
    ours, _ = load_base(cfg, for_training=False)
    adapter = open_adapter(quick_adapter)
    check_fits(adapter, ours)
    ours = attach(ours, adapter, "x")
    theirs, _ = load_base(cfg, for_training=False)
    theirs = PeftModel.from_pretrained(theirs, str(quick_adapter), adapter_name="x", is_trainable=False)
    assert not any(p.requires_grad for p in ours.parameters())
    torch.manual_seed(0)
    ids = torch.tensor([[2, 100, 200, 300]])
    size = ours.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        a = ours(pixel_values=pixels, input_ids=ids).logits
        b = theirs(pixel_values=pixels, input_ids=ids).logits
    assert torch.equal(a, b)
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    peft = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert mine.keys() == peft.keys() and all(torch.equal(mine[k], peft[k]) for k in mine)
