"""An adapter is used the way it was trained: the load settings in multimodal_lora.json."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from multimodal_lora.model.loading import LoadSettings, resolve

RECORD_LOGGER = "multimodal_lora.model.loading"


def _train(out, data, *overrides):
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    recipe = load_recipe(
        "recipes/tiny.yaml",
        [
            f"output_dir={out}",
            f"data.path={data}",
            "max_steps=2",
            "batch_size=8",
            "eval_captions=false",
            "device=cpu",
            *overrides,
        ],
    )
    return train(recipe).adapter_dir


@pytest.fixture(scope="module")
def int8_adapter(tmp_path_factory, small_shapes_dir):
    """A tiny adapter trained on an int8 base (bitsandbytes on the CPU)."""
    return _train(tmp_path_factory.mktemp("int8-run"), small_shapes_dir, "model.quantization=int8")


@pytest.fixture(scope="module")
def fp32_adapter(tmp_path_factory, small_shapes_dir):
    """The same, on the plain fp32 base."""
    return _train(tmp_path_factory.mktemp("fp32-run"), small_shapes_dir)


@pytest.fixture(scope="module")
def image(small_shapes_dir):
    return str(sorted((small_shapes_dir / "validation").glob("*.png"))[0])


@pytest.fixture(autouse=True)
def fresh_cache():
    from multimodal_lora.inference.captioner import clear_cache

    clear_cache()
    yield
    clear_cache()


def _linear_kinds(model) -> set[str]:
    """Class names of the language model's attention projections (under any PEFT wrapper)."""
    kinds = set()
    for name, module in model.named_modules():
        if name.endswith(("self_attn.k_proj", "self_attn.out_proj")):  # not LoRA-wrapped: the base's own layer
            kinds.add(type(module).__name__)
    return kinds


def test_the_trainer_records_how_the_base_was_loaded(int8_adapter):
    record = json.loads((int8_adapter / "multimodal_lora.json").read_text())
    assert record["load"] == {
        "quantization": "int8",
        "dtype": "fp32",
        "device": "cpu",
        "quant_type": None,
        "compute_dtype": None,
    }


def test_caption_loads_an_int8_adapters_base_in_int8(int8_adapter, image, caplog):
    from multimodal_lora import caption
    from multimodal_lora.inference.captioner import CAPTIONERS

    with caplog.at_level(logging.INFO, logger=RECORD_LOGGER):
        text = caption(image, adapter=int8_adapter)
    assert isinstance(text, str)
    (captioner,) = CAPTIONERS.values()
    assert _linear_kinds(captioner.model) == {"Linear8bitLt"}
    assert captioner.settings.quantization == "int8"
    line = next(r.getMessage() for r in caplog.records if r.name == RECORD_LOGGER)
    assert "as trained: int8, fp32, cpu" in line and str(int8_adapter) in line

    # Overridden: the same adapter on plain Linear layers, a second cached base beside the first.
    with caplog.at_level(logging.INFO, logger=RECORD_LOGGER):
        caption(image, adapter=int8_adapter, quantization="none")
    loads = [r.getMessage() for r in caplog.records if r.name == RECORD_LOGGER]
    assert "with quantization=none as asked" in loads[-1]
    assert len(CAPTIONERS) == 2
    plain = next(c for c in CAPTIONERS.values() if c.settings.quantization == "none")
    assert _linear_kinds(plain.model) == {"Linear"}
    # The same settings again: the cached base, no third load.
    caption(image, adapter=int8_adapter)
    assert len(CAPTIONERS) == 2


def test_adapters_with_different_settings_get_different_bases(int8_adapter, fp32_adapter, image):
    from multimodal_lora import caption
    from multimodal_lora.inference.captioner import CAPTIONERS

    caption(image, adapter=int8_adapter)
    caption(image, adapter=fp32_adapter)
    assert sorted(key[2].quantization for key in CAPTIONERS) == ["int8", "none"]
    assert len({id(c.model) for c in CAPTIONERS.values()}) == 2


def test_an_adapter_without_a_record_loads_as_before_with_a_note(int8_adapter, image, tmp_path, caplog):
    from multimodal_lora import caption
    from multimodal_lora.inference.captioner import CAPTIONERS

    old = tmp_path / "old" / "adapter"
    shutil.copytree(int8_adapter, old)
    record = json.loads((old / "multimodal_lora.json").read_text())
    del record["load"]
    (old / "multimodal_lora.json").write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger=RECORD_LOGGER):
        caption(image, adapter=old)
    (captioner,) = CAPTIONERS.values()
    assert _linear_kinds(captioner.model) == {"Linear"}
    assert next(iter(captioner.model.parameters())).dtype == torch.float32
    assert "no load settings recorded" in [r.getMessage() for r in caplog.records if r.name == RECORD_LOGGER][-1]


def test_the_caption_cli_takes_the_record_and_the_flags(int8_adapter, image, capsys, caplog):
    from multimodal_lora.commands.caption import main
    from multimodal_lora.inference.captioner import CAPTIONERS

    assert main([image, "--adapter", str(int8_adapter)]) == 0
    assert [key[2].quantization for key in CAPTIONERS] == ["int8"]
    assert (
        main([image, "--adapter", str(int8_adapter), "--quantization", "none", "--dtype", "fp32", "--device", "cpu"])
        == 0
    )
    assert sorted(key[2].quantization for key in CAPTIONERS) == ["int8", "none"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(image + "\t") for line in lines)


def test_resolve_falls_back_to_what_this_machine_can_do(monkeypatch, caplog):
    import multimodal_lora.model.loading as loading
    from multimodal_lora.core import runtime

    trained = LoadSettings("int8", "bf16", "cuda")
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "bitsandbytes_available", lambda: False)
    monkeypatch.setattr(runtime, "dtype_supported", lambda dtype, kind: dtype == "fp32")
    with caplog.at_level(logging.INFO, logger=RECORD_LOGGER):
        settings = resolve(trained, subject="base X")
    assert settings == LoadSettings("none", "fp32", "cpu")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "loading base X trained as int8, bf16, cuda; falling back (no cuda device here; int8 needs bitsandbytes, "
        "which is not installed; this CPU has no bf16 support): none, fp32, cpu"
    )
    # What the caller asks for explicitly is not second-guessed.
    assert resolve(trained, quantization="int8", dtype="bf16", device="cpu") == LoadSettings("int8", "bf16", "cpu")


def test_four_bit_records_its_quant_type_and_compute_dtype():
    from multimodal_lora.config import ModelConfig

    settings = LoadSettings.of(ModelConfig(quantization="4bit", dtype="bf16"), torch.device("cpu"))
    assert settings == LoadSettings("4bit", "bf16", "cpu", quant_type="nf4", compute_dtype="bf16")
    assert settings.describe() == "4bit nf4 (compute bf16), bf16, cpu"
    cfg = settings.model_config("tiny", None)
    assert (cfg.quantization, cfg.quant_type, cfg.dtype) == ("4bit", "nf4", "bf16")
    # Overriding to 4-bit from an int8 record picks NF4 and computes in the dtype.
    assert resolve(LoadSettings("int8", "fp32", "cpu"), quantization="4bit") == LoadSettings(
        "4bit", "fp32", "cpu", quant_type="nf4", compute_dtype="fp32"
    )
