"""The Captioner: one base, many adapters, batched generation that equals one-by-one."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from multimodal_lora.core.errors import AdapterError, ConfigError, ImageError


@pytest.fixture(scope="module")
def images(shapes_dir):
    """Twelve validation images of the bundled shapes."""
    return [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:12]]


@pytest.fixture(scope="module")
def captioner(tiny_run):
    from multimodal_lora import Captioner

    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(tiny_run.adapter_dir, name="shapes")
    # The same weights under a second name: a second adapter to switch to.
    captioner.load_adapter(tiny_run.adapter_dir, name="shapes-copy")
    return captioner


def test_batched_captions_equal_one_by_one(captioner, images):
    # batch_size 5 over 12 images: full batches and a short last one.
    batched = captioner.caption(images, adapter="shapes", batch_size=5)
    single = [captioner.caption(image, adapter="shapes") for image in images]
    assert batched == single
    assert all(isinstance(text, str) and text for text in batched)
    # The trained adapter says what the shapes are: most captions are the reference ones.
    assert sum(text.startswith(("a ", "an ")) for text in batched) >= 10


def test_batched_questions_of_different_lengths_equal_one_by_one(captioner, images):
    # Different questions give different prompt lengths, so the batch is left-padded:
    # padding must not change any answer.
    questions = ["What colour is the shape?", "What shape is it?", "Is it big?", "What is in the middle of this picture?"] * 2
    batched = captioner.ask(images[:8], questions, adapter="shapes", batch_size=8)
    single = [captioner.ask(image, q, adapter="shapes") for image, q in zip(images[:8], questions)]
    assert batched == single


def test_base_and_adapter_on_one_object(captioner, tiny_base, images):
    from multimodal_lora import Captioner

    bare = Captioner("tiny", device="cpu")
    base_captions = bare.caption(images[:4])
    adapted = captioner.caption(images[:4], adapter="shapes")
    # adapter=None on the object with adapters loaded is exactly the bare base ...
    assert captioner.caption(images[:4], adapter=None) == base_captions
    # ... the adapter changes the captions ...
    assert adapted != base_captions
    # ... and using the base did not switch the adapter off for later calls.
    assert captioner.caption(images[:4], adapter="shapes") == adapted
    assert captioner.caption(images[:4], adapter="shapes-copy") == adapted


def test_switching_adapters_100_times_keeps_memory_flat(captioner, images):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    weight = captioner.model.get_base_model().language_model.model.decoder.layers[0].self_attn.q_proj.base_layer.weight
    pointer = weight.data_ptr()
    order = ["shapes", None, "shapes-copy"]
    for i in range(15):  # warm-up: let the allocator settle
        captioner.caption(images[0], adapter=order[i % 3], max_new_tokens=8)
    gc.collect()
    before = process.memory_info().rss
    for i in range(100):
        captioner.caption(images[i % len(images)], adapter=order[i % 3], max_new_tokens=8)
    gc.collect()
    growth = process.memory_info().rss - before
    # The base was not reloaded: the same weight tensor, in the same memory.
    assert weight.data_ptr() == pointer
    assert captioner.model.get_base_model().language_model.model.decoder.layers[0].self_attn.q_proj.base_layer.weight is weight
    # A reload of even the tiny base per switch would add ~1.6 MB × 100; allow allocator noise only.
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 adapter switches"


def test_concurrent_calls_with_different_adapters(captioner, images):
    # A web server calls one Captioner from several threads; each call must get its own adapter.
    expected = {None: captioner.caption(images[:3]), "shapes": captioner.caption(images[:3], adapter="shapes")}
    results: list[tuple[str | None, list[str]]] = []
    errors: list[BaseException] = []

    def work(adapter):
        try:
            results.append((adapter, captioner.caption(images[:3], adapter=adapter)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=([None, "shapes"][i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 8
    for adapter, captions in results:
        assert captions == expected[adapter]


def test_generation_options(captioner, images):
    greedy = captioner.caption(images[:2], adapter="shapes")
    beams = captioner.caption(images[:2], adapter="shapes", num_beams=3, max_new_tokens=12)
    assert len(beams) == 2 and all(beams)
    torch.manual_seed(0)
    first = captioner.caption(images[:2], adapter="shapes", do_sample=True, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    assert captioner.caption(images[:2], adapter="shapes", do_sample=True, temperature=0.7, top_p=0.9) == first
    assert captioner.caption(images[:2], adapter="shapes", max_new_tokens=1) != greedy  # cut to one token
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1"):
        captioner.caption(images[0], max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature must be positive"):
        captioner.caption(images[0], do_sample=True, temperature=0)
    with pytest.raises(ConfigError, match="top_p"):
        captioner.caption(images[0], do_sample=True, top_p=1.5)


def test_clear_errors(captioner, tiny_run, tmp_path):
    import shutil

    with pytest.raises(AdapterError, match="no adapter named 'nope' is loaded.*shapes"):
        captioner.caption(str(tmp_path / "x.png"), adapter="nope")
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"):
        captioner.caption(str(bad), adapter="shapes")
    with pytest.raises(AdapterError, match="does not exist"):
        captioner.load_adapter(tmp_path / "missing")
    with pytest.raises(AdapterError, match="already loaded"):
        captioner.load_adapter(shutil.copytree(tiny_run.adapter_dir, tmp_path / "other"), name="shapes")


def test_the_view_without_the_model_pickles_and_prepares_requests_as_the_captioner_does(captioner, images):
    """A server's HTTP process gets this view from the model's process: same names, prompts, lengths, pixels."""
    import pickle

    from multimodal_lora.data.images import load_image

    with pytest.raises(TypeError, match="without_model"):
        pickle.dumps(captioner)  # the model never crosses a process boundary by accident
    view = pickle.loads(pickle.dumps(captioner.without_model()))
    assert not hasattr(view, "model") and captioner.model is not None
    assert view.adapter_names == captioner.adapter_names and view.base.name == captioner.base.name
    for adapter in [None, *captioner.adapter_names]:
        assert view.task(adapter) == captioner.task(adapter)
        prompt = captioner.caption_prompt(adapter, "a photo of")
        assert view.caption_prompt(adapter, "a photo of") == prompt
        assert view.prompt_tokens(prompt) == captioner.prompt_tokens(prompt)
    assert view.context_length == captioner.context_length
    image = load_image(images[0])
    ours, theirs = view.pixels(image), captioner.pixels(image)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
