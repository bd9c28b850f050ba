"""The frozen-feature cache: same loss and gradients as the pixels, and a key that changes with its inputs."""

from __future__ import annotations

import shutil

import pytest
import torch

from multimodal_lora.config import LoraSettings, ModelConfig
from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset
from multimodal_lora.data.feature_cache import (
    CachedPairDataset,
    PrefixCollator,
    forward_inputs,
    image_key,
    open_or_build,
)
from multimodal_lora.data.sources import Example
from multimodal_lora.families.blip2_opt import NUM_QUERY_TOKENS
from multimodal_lora.model.base import add_lora, load_base, load_processor, set_train_mode, text_layout


@pytest.fixture(scope="module")
def setup(small_shapes_dir, tmp_path_factory):
    torch.manual_seed(0)
    processor = load_processor("tiny")
    model, _ = load_base(ModelConfig(base="tiny", device="cpu"))
    layout = text_layout(model, processor)
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    # Make the adapter non-zero so that its gradients flow through a real update.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    from multimodal_lora.config import DataConfig
    from multimodal_lora.data.sources import read_imagefolder

    examples = read_imagefolder(small_shapes_dir / "train", DataConfig())[:8]
    encoder = ExampleEncoder(processor.tokenizer, layout, task="caption", prompt=None, prompt_template="{question}", max_length=16)
    encoded = encoder.encode_all(examples)
    root = tmp_path_factory.mktemp("features")
    return model, processor, layout, examples, encoded, root


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    set_train_mode(model)
    loss = model(**forward_inputs(batch, torch.device("cpu"))).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_cached_prefix_gives_the_same_loss_and_gradients(setup):
    model, processor, layout, examples, encoded, root = setup
    collate = Collator(layout.pad_token_id, layout.padding())
    pixels = collate([PairDataset(examples, encoded, processor.image_processor)[i] for i in range(len(examples))])
    model.eval()
    cache, keys = open_or_build(examples, model, processor.image_processor, root, progress=False)
    cached_set = CachedPairDataset(encoded, cache, keys)
    cached = PrefixCollator(collate)([cached_set[i] for i in range(len(examples))])
    assert "pixel_values" not in cached and cached["prefix"].shape == (8, NUM_QUERY_TOKENS, 128)

    loss_pixels, grads_pixels = loss_and_grads(model, pixels)
    loss_cached, grads_cached = loss_and_grads(model, cached)
    assert torch.allclose(loss_pixels, loss_cached, rtol=1e-5, atol=1e-6), (loss_pixels, loss_cached)
    assert grads_pixels.keys() == grads_cached.keys() and len(grads_pixels) > 0
    for name in grads_pixels:
        assert torch.allclose(grads_pixels[name], grads_cached[name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in grads_cached.values())


def test_the_cache_is_reused_and_invalidated_by_what_it_depends_on(setup, tmp_path):
    model, processor, _, examples, _, root = setup
    model.eval()
    first, _ = open_or_build(examples, model, processor.image_processor, root, progress=False)
    again, _ = open_or_build(examples, model, processor.image_processor, root, progress=False)
    assert again.directory == first.directory  # reused, not rebuilt

    # Other processor settings (a different normalisation) → another cache.
    other = type(processor.image_processor).from_dict({**processor.image_processor.to_dict(), "image_mean": [0.5, 0.5, 0.5]})
    assert open_or_build(examples, model, other, root, progress=False)[0].directory != first.directory

    # The same file name with other pixels → another key and another cache.
    changed = tmp_path / "changed.png"
    shutil.copy(examples[1].image, changed)
    assert image_key(str(changed)) == image_key(examples[1].image)
    shutil.copy(examples[0].image, changed)
    edited = [*examples[:-1], Example(str(changed), "x", "changed.png", "test")]
    assert open_or_build(edited, model, processor.image_processor, root, progress=False)[0].directory != first.directory

    # Other frozen weights (the Q-Former changed) → another cache.
    qformer = model.get_base_model().qformer
    param = next(qformer.parameters())
    with torch.no_grad():
        param.add_(1.0)
    try:
        assert open_or_build(examples, model, processor.image_processor, root, progress=False)[0].directory != first.directory
    finally:
        with torch.no_grad():
            param.sub_(1.0)


def test_an_arrow_stored_image_is_keyed_by_its_bytes(tmp_path):
    """Hub and save_to_disk rows (StoredImage) get the same key as the same bytes from a file: the
    football recipe's data, with the cache on by default."""
    import io

    import datasets
    from PIL import Image

    from multimodal_lora.data.feature_cache import image_key
    from multimodal_lora.data.images import StoredImage

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    png = buffer.getvalue()
    (tmp_path / "red.png").write_bytes(png)
    table = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}], "text": ["a red square"]})
    table = table.cast_column("image", datasets.Image(decode=False))
    stored = StoredImage(table, "image", 0)
    assert image_key(stored) == image_key(png) == image_key(str(tmp_path / "red.png"))
    assert image_key(stored, "What colour?") != image_key(stored)
