"""Fast defaults that must not change results: the auto feature cache, batched data, merged captioning,
a feature cache in the compute dtype that says its size and refuses a full disk, and the cache CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from multimodal_lora.config import DataConfig, LoraSettings, ModelConfig, load_recipe
from multimodal_lora.data.encoding import IGNORE_INDEX, Collator, ExampleEncoder, PairDataset
from multimodal_lora.data.sources import read_imagefolder
from multimodal_lora.families.blip2_opt import NUM_QUERY_TOKENS
from multimodal_lora.model.base import add_lora, load_base, load_processor, set_train_mode, text_layout

from .conftest import RECIPES


def test_collator_pads_on_the_right_with_masks_and_ignored_labels():
    items = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
        {"input_ids": [9, 10], "labels": [IGNORE_INDEX, 10]},
    ]
    batch = Collator(pad_token_id=1)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_a_batch_of_images_is_processed_as_each_image_alone(small_shapes_dir):
    processor = load_processor("tiny")
    examples = read_imagefolder(small_shapes_dir / "train", DataConfig())[:5]
    dataset = PairDataset(examples, [{"input_ids": [1, 2], "labels": [IGNORE_INDEX, 2]}] * 5, processor.image_processor)
    batched = dataset.__getitems__([4, 0, 2])
    for index, item in zip([4, 0, 2], batched):
        assert torch.equal(item["pixel_values"], dataset[index]["pixel_values"])
        assert item["input_ids"] == [1, 2]
    # Through a DataLoader with a worker, as training without the cache runs it.
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=Collator(1), num_workers=1)
    (batch,) = list(loader)
    assert torch.equal(batch["pixel_values"], torch.stack([dataset[i]["pixel_values"] for i in range(5)]))


def test_recipe_defaults_are_the_fast_ones_and_new_keys_are_checked(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml")
    assert recipe.train.cache_image_features == "auto" and recipe.data.num_workers == "auto"
    assert recipe.train.eval_every is None
    for name in ("tiny.yaml", "tiny-vqa.yaml", "football.yaml"):
        assert load_recipe(RECIPES / name).train.cache_image_features == "auto", name
    from multimodal_lora.core.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_recipe(
            RECIPES / "tiny.yaml", ["train.eval_every=0", "train.cache_image_features=sometimes", "data.num_workers=-1"]
        )
    message = str(raised.value)
    assert "train.eval_every: must be at least 1" in message
    assert "train.cache_image_features: expected true or false or one of auto" in message
    assert "data.num_workers: must be 0 or more" in message


def test_auto_cache_and_workers_follow_the_run(caplog):
    from multimodal_lora.training.loaders import cache_features, loader_workers

    model, _ = load_base(ModelConfig(base="tiny", device="cpu"))
    model = add_lora(model, LoraSettings(r=2, alpha=4))
    recipe = load_recipe(RECIPES / "tiny.yaml")
    with caplog.at_level(logging.INFO, logger="multimodal_lora.training.loaders"):
        assert cache_features(recipe, model, epochs=8) is True
        assert cache_features(recipe, model, epochs=1) is False
    assert "image feature cache: on (cache_image_features=auto: the run sees each image 8 times)" in caplog.text
    assert "image feature cache: off (cache_image_features=auto: the run sees each image once)" in caplog.text
    # A trained image path cannot be cached: auto says no, and true is refused with the reason.
    model.get_base_model().language_projection.weight.requires_grad_(True)
    assert cache_features(recipe, model, epochs=8) is False
    from multimodal_lora.core.errors import ConfigError

    with pytest.raises(ConfigError, match="language_projection of the image path are trained"):
        cache_features(load_recipe(RECIPES / "tiny.yaml", ["train.cache_image_features=true"]), model, epochs=8)
    assert loader_workers("auto", use_cache=True) == 0
    assert loader_workers(3, use_cache=True) == 3
    assert 0 <= loader_workers("auto", use_cache=False) <= 4


def test_eval_every_validates_between_epochs_and_the_plot_is_drawn_at_the_end(small_shapes_dir, tmp_path):
    from multimodal_lora.training import train
    from multimodal_lora.training.logs import read_metrics

    recipe = load_recipe(
        RECIPES / "tiny.yaml",
        [
            f"output_dir={tmp_path}", f"data.path={small_shapes_dir}", "train.batch_size=4", "train.epochs=2",
            "train.eval_every=4", "train.eval_captions=false", "train.plot_every_seconds=3600",
        ],
    )  # fmt: skip
    result = train(recipe)
    assert result.steps == 12  # 24 images / 4 = 6 steps an epoch
    validated = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "validation"]
    assert validated == [4, 6, 8, 12]  # every 4 steps, and each epoch's end
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_plot_is_throttled_unless_forced(tmp_path):
    from multimodal_lora.training.logs import RunLog

    log = RunLog(tmp_path, plot_every_seconds=3600)
    log.log({"split": "train", "step": 1, "loss": 1.0})
    assert log.plot(force=False) is not None  # the first one is drawn
    assert log.plot(force=False) is None  # then not within the hour
    assert log.plot() == tmp_path / "loss.png"
    log.close()


@pytest.fixture(scope="module")
def bf16_setup(small_shapes_dir):
    torch.manual_seed(0)
    processor = load_processor("tiny")
    model, _ = load_base(ModelConfig(base="tiny", device="cpu", dtype="bf16"))
    layout = text_layout(model, processor)
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    examples = read_imagefolder(small_shapes_dir / "train", DataConfig())[:6]
    encoder = ExampleEncoder(
        processor.tokenizer, layout, task="caption", prompt=None, prompt_template="{question}", max_length=16
    )
    return model, processor, layout, examples, encoder.encode_all(examples)


def test_feature_cache_is_stored_in_bf16_at_two_bytes_a_value(bf16_setup, tmp_path, caplog):
    from multimodal_lora.data.feature_cache import (
        FEATURES_FILE,
        CachedPairDataset,
        PrefixCollator,
        forward_inputs,
        open_or_build,
    )

    model, processor, layout, examples, encoded = bf16_setup
    model.eval()
    with caplog.at_level(logging.INFO, logger="multimodal_lora.data.feature_cache"):
        cache, keys = open_or_build(examples, model, processor.image_processor, tmp_path, progress=False)
    values = NUM_QUERY_TOKENS * 128
    assert cache.bytes_per_image == values * 2 and cache.dtype == torch.bfloat16
    data_bytes = (cache.directory / FEATURES_FILE).stat().st_size
    assert len(examples) * values * 2 <= data_bytes < len(examples) * values * 2 + 4096  # the rest is the .npy header
    assert f"6 images × {NUM_QUERY_TOKENS} × 128 values × 2 bytes (bfloat16) = 8.0 KB an image" in caplog.text
    assert str(tmp_path) in caplog.text

    # The cached bf16 prefix gives the loss of the pixels through the same bf16 model, exactly.
    collate = Collator(layout.pad_token_id, layout.padding())
    pixels = collate(PairDataset(examples, encoded, processor.image_processor).__getitems__(list(range(6))))
    pixels["pixel_values"] = pixels["pixel_values"].to(torch.bfloat16)
    cached = PrefixCollator(collate)([CachedPairDataset(encoded, cache, keys)[i] for i in range(6)])
    assert cached["prefix"].dtype == torch.bfloat16
    set_train_mode(model)
    with torch.no_grad():
        from_pixels = model(**forward_inputs(pixels, torch.device("cpu")), use_cache=False).loss
        from_cache = model(**forward_inputs(cached, torch.device("cpu")), use_cache=False).loss
    assert torch.equal(from_pixels, from_cache)


def test_feature_cache_refuses_before_building_when_the_disk_is_full(bf16_setup, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from multimodal_lora.core.atomic import WriteError
    from multimodal_lora.data.feature_cache import open_or_build

    model, processor, _, examples, _ = bf16_setup
    usage = namedtuple("usage", "total used free")
    # The file system reports 10,000 bytes free: less than 6 images × 8 KB.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10_000, 10_000))
    with pytest.raises(WriteError) as raised:
        open_or_build(examples, model.eval(), processor.image_processor, tmp_path / "features", progress=False)
    message = str(raised.value)
    assert "6 images × 32 × 128 values × 2 bytes (bfloat16) = 8.0 KB an image" in message
    assert "it needs about 52.0 KB" in message and "9.8 KB free there" in message and "MULTIMODAL_LORA_CACHE" in message
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())  # nothing half-written


def test_cache_cli_lists_and_clears_feature_caches(bf16_setup, tmp_path, monkeypatch, capsys):
    from multimodal_lora.commands import cache as cache_cli
    from multimodal_lora.core.errors import UserError
    from multimodal_lora.data.feature_cache import open_or_build

    model, processor, _, examples, _ = bf16_setup
    monkeypatch.setenv("MULTIMODAL_LORA_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kept.txt").write_text("x")
    built, _ = open_or_build(examples, model.eval(), processor.image_processor, tmp_path / "features", progress=False)
    assert cache_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"features/{built.directory.name}" in out and "6 images, bfloat16" in out and "data" in out
    with pytest.raises(UserError, match="no feature cache named nothing-here"):
        cache_cli.main(["clear", "nothing-here"])
    assert cache_cli.main(["clear", "--older-than", "1"]) == 0  # just used: kept
    assert built.directory.is_dir()
    assert cache_cli.main(["clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not built.directory.exists() and (tmp_path / "data" / "kept.txt").is_file()


@pytest.fixture(scope="module")
def small_adapter(small_shapes_dir, tmp_path_factory):
    """An adapter trained for a few steps: not a good one, but a non-zero update to merge."""
    from multimodal_lora.training import train

    out = tmp_path_factory.mktemp("small-run")
    overrides = [
        f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=8", "train.max_steps=6",
        "train.eval_captions=false",
    ]  # fmt: skip
    return train(load_recipe(RECIPES / "tiny.yaml", overrides)).adapter_dir


@pytest.mark.slow
def test_merged_captions_equal_unmerged_and_the_base_comes_back(small_adapter, shapes_dir):
    from multimodal_lora import Captioner

    images = [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:8]]
    captioner = Captioner("tiny", device="cpu")
    assert captioner.batch_size == 32  # on a CPU
    captioner.load_adapter(small_adapter, name="shapes")
    bare = captioner.caption(images)
    unmerged = captioner.caption(images, adapter="shapes")
    assert unmerged != bare  # the adapter changes the captions
    assert captioner.merge("shapes") is True
    assert captioner.caption(images, adapter="shapes") == unmerged
    assert captioner.caption(images) == bare  # asking for the base unmerges first
    assert captioner.caption(images, adapter="shapes") == unmerged


def test_an_int8_base_is_never_merged(small_adapter, caplog):
    from multimodal_lora import Captioner

    captioner = Captioner("tiny", device="cpu", quantization="int8", dtype="bf16")
    captioner.load_adapter(small_adapter, name="shapes")
    with caplog.at_level(logging.INFO, logger="multimodal_lora.inference.captioner"):
        assert captioner.merge("shapes") is False
    assert "not merging adapter 'shapes': the base is quantized (int8/4-bit)" in caplog.text
    assert captioner._merged is None


def test_cache_index_records_format_and_dtype(bf16_setup, tmp_path):
    from multimodal_lora.data.feature_cache import FORMAT, INDEX_FILE, open_or_build

    model, processor, _, examples, _ = bf16_setup
    cache, keys = open_or_build(examples, model.eval(), processor.image_processor, tmp_path, progress=False)
    index = json.loads((cache.directory / INDEX_FILE).read_text())
    assert index["format"] == FORMAT and index["dtype"] == "bfloat16" and set(index["rows"]) == set(keys)


def test_dataloader_workers_change_no_result(small_shapes_dir, tmp_path):
    from multimodal_lora.training import train

    adapters = []
    for workers in (0, 1):
        out = tmp_path / f"workers-{workers}"
        recipe = load_recipe(
            RECIPES / "tiny.yaml",
            [
                f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=4", "train.max_steps=5",
                "train.cache_image_features=false", f"data.num_workers={workers}", "lora.dropout=0.1",
                "train.eval_captions=false",
            ],
        )  # fmt: skip
        train(recipe)
        adapters.append((out / "adapter" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]


def test_the_loss_plot_leaves_a_notebooks_matplotlib_alone(tmp_path):
    """Drawing loss.png must not switch the caller's backend or leave figures open in pyplot."""
    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
from pathlib import Path
from multimodal_lora.training.logs import plot_losses
records = [{{"split": "train", "step": s, "loss": 2.0 / s}} for s in range(1, 20)]
records.append({{"split": "validation", "step": 19, "val_loss": 0.2}})
path = plot_losses(records, Path({str(tmp_path / "loss.png")!r}))
print(matplotlib.get_backend(), len(plt.get_fignums()), path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "0", "True"]
