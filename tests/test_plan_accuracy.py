"""The memory plan against the peaks measured on a GPU (bench/gpu_full_size.py on an H100, in bench/results)."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
QUANTIZATION = {"int8": "int8", "nf4": "4bit", "bf16": "none"}


@pytest.mark.parametrize("name", ["gpu_full_size.json", "gpu_full_size_batch32.json"])
def test_plan_is_within_25_percent_of_every_measured_full_size_peak(name):
    from multimodal_lora.config import LoraSettings
    from multimodal_lora.model.base import published_config
    from multimodal_lora.model.plan import plan_memory

    result = json.loads((RESULTS / name).read_text())
    assert "H100" in result["machine"]["gpu"]
    config = published_config("Salesforce/blip2-opt-2.7b")
    lora = LoraSettings(**{k: result["lora"][k] for k in ("r", "alpha", "dropout", "target_modules")})
    rows = [r for r in result["rows"] if not r["cache"]]  # the cached features live in host memory
    assert rows
    for row in rows:
        plan = plan_memory(
            config, quantization=QUANTIZATION[row["base"]], dtype="bf16", lora=lora,
            batch_size=result["batch_size"], max_length=result["max_length"],
        )
        planned = plan.total(row["gradient_checkpointing"])
        error = abs(planned - row["peak_bytes"]) / row["peak_bytes"]
        assert error <= 0.25, (row["base"], row["gradient_checkpointing"], planned, row["peak_bytes"])
