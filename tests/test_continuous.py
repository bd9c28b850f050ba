"""Continuous batching (``multimodal_lora.serve.continuous``) on the real tiny models: requests join and
leave a running batch between tokens, and each gets exactly what ``caption()`` / ``ask()`` give it alone."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

QUESTIONS = ["What colour is the shape?", "What shape is it?", "Is the shape in the picture big or small, and where?"]


class Sink:
    def __init__(self, on_delta=None):
        self.text = ""
        self.reason = None
        self.tokens = None
        self.error = None
        self.done = threading.Event()
        self.on_delta = on_delta

    def delta(self, text):
        self.text += text
        if self.on_delta is not None:
            self.on_delta()

    def finish(self, reason, tokens):
        self.reason, self.tokens = reason, tokens
        self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()


def job(captioner, adapter, image, prompt, max_tokens=30, sampling=None, stop=(), sink=None):
    from multimodal_lora.serve.engine import Job
    from multimodal_lora.serve.protocol import Sampling

    pixels = image if isinstance(image, dict) else captioner.pixels(image)
    return Job(adapter, pixels, prompt, captioner.prompt_tokens(prompt), max_tokens, sampling or Sampling(),
               list(stop), sink or Sink())  # fmt: skip


def join_a_running_row(captioner, image, joiners, max_batch_size=8):
    """A bare-base row of 60 tokens (the random base writes no stop token in 60), and ``joiners``
    sent once it is decoding (its text may be only whitespace, held back: the tiny PaliGemma's):
    they can only be answered by joining it. Returns the long job and the counters."""
    from multimodal_lora.serve.continuous import ContinuousBatcher

    long = job(captioner, None, image, captioner.caption_prompt(None), max_tokens=60)
    batcher = ContinuousBatcher(captioner, max_batch_size=max_batch_size, max_wait_ms=5)
    try:
        batcher.submit(long)
        deadline = time.monotonic() + 60
        while batcher.counters()["decode_steps"] == 0:
            assert time.monotonic() < deadline and not long.sink.done.is_set()
            time.sleep(0.001)
        for j in joiners:
            batcher.submit(j)
        wait([long, *joiners])
        return long, batcher.counters()
    finally:
        batcher.close()


def submit_staggered(batcher, jobs, gap=0.003):
    """One by one, a few milliseconds apart: most arrive while a batch is decoding."""
    for j in jobs:
        batcher.submit(j)
        time.sleep(gap)


def wait(jobs, timeout=120):
    assert all(j.sink.done.wait(timeout) for j in jobs)


def run_staggered(captioner, jobs, max_batch_size):
    """``jobs`` through a continuous batcher, a few ms apart; returns its counters."""
    from multimodal_lora.serve.continuous import ContinuousBatcher

    batcher = ContinuousBatcher(captioner, max_batch_size=max_batch_size, max_wait_ms=5)
    try:
        submit_staggered(batcher, jobs)
        wait(jobs)
        return batcher.counters()
    finally:
        batcher.close()


@pytest.fixture(scope="module")
def captioner(shapes_adapters):
    from multimodal_lora.inference.captioner import Captioner

    captioner = Captioner.for_adapter(shapes_adapters["shapes"], name="shapes", device="cpu")
    captioner.load_adapter(shapes_adapters["shapes-vqa"], name="shapes-vqa")
    return captioner


@pytest.fixture(scope="module")
def images(shapes_dir):
    from multimodal_lora.data.images import load_image

    return [load_image(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:12]]


def test_requests_that_join_a_running_batch_get_what_caption_and_ask_give_alone(captioner, images):
    """Captions, VQA answers to questions of three lengths (so rows join with histories of other
    lengths) and the bare base, arriving a few ms apart: every text equals the one-request answer."""

    want, jobs = [], []
    for image in images:
        want.append(captioner.caption(image, "shapes"))
        jobs.append(job(captioner, "shapes", image, captioner.caption_prompt("shapes")))
    for i, image in enumerate(images):
        question = QUESTIONS[i % 3]
        want.append(captioner.ask(image, question, "shapes-vqa"))
        jobs.append(job(captioner, "shapes-vqa", image, captioner.vqa_prompt("shapes-vqa", question), max_tokens=10))
    for image in images[:6]:
        want.append(captioner.caption(image, None, max_new_tokens=12))
        jobs.append(job(captioner, None, image, captioner.caption_prompt(None), max_tokens=12))
    # The adapters and the base answer differently, so a row decoded with the wrong one would show.
    assert set(want[:12]).isdisjoint(want[12:24]) and set(want[:24]).isdisjoint(want[24:])

    counters = run_staggered(captioner, jobs, max_batch_size=8)
    assert [j.sink.text for j in jobs] == want
    assert all(j.sink.error is None and j.sink.reason in ("stop", "length") for j in jobs)
    assert counters["batching"] == "continuous" and counters["batched_requests"] == len(jobs)
    assert counters["decoded_rows"] > counters["decode_steps"], counters  # rows decoded together

    # Joining for certain: requests sent while a 60-token row decodes, of histories of other lengths.
    prompts = [captioner.caption_prompt(None), captioner.vqa_prompt(None, QUESTIONS[2]), "a photo of"]
    joiners = [job(captioner, None, image, prompts[i % 3], max_tokens=12) for i, image in enumerate(images[1:7])]
    want_joiners = [
        captioner.caption(image, None, prompt=prompts[i % 3] or None, max_new_tokens=12)
        for i, image in enumerate(images[1:7])
    ]
    long, counters = join_a_running_row(captioner, images[0], joiners)
    assert long.sink.tokens == 60 and long.sink.text == captioner.caption(images[0], None, max_new_tokens=60)
    assert [j.sink.text for j in joiners] == want_joiners
    assert counters["joined_running"] == len(joiners), counters


def test_instructblip_llama_decodes_continuously_with_its_instruction(images):
    """InstructBLIP's LLaMA (rotary positions) with the prompt also read by the Q-Former: rows with
    prompts of different lengths join mid-way and still equal one-request captions and answers."""
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.serve.continuous import continuous_problem

    captioner = Captioner("tiny-instructblip", device="cpu")
    assert continuous_problem(captioner) is None
    prompts = ["", "a photo of", *[captioner.vqa_prompt(None, q) for q in QUESTIONS]]
    want, jobs = [], []
    for i, image in enumerate(images[:10]):
        prompt = prompts[i % len(prompts)]
        want.append(captioner.caption(image, None, prompt=prompt or None, max_new_tokens=8))
        jobs.append(job(captioner, None, image, captioner.caption_prompt(None, prompt or None), max_tokens=8))
    run_staggered(captioner, jobs, max_batch_size=4)
    assert [j.sink.text for j in jobs] == want
    joiners = [job(captioner, None, image, captioner.caption_prompt(None, p or None), max_tokens=8)
               for image, p in zip(images[1:6], prompts)]  # fmt: skip
    long, counters = join_a_running_row(captioner, images[0], joiners, max_batch_size=8)
    assert long.sink.tokens == 60 and long.sink.text == captioner.caption(images[0], None, max_new_tokens=60)
    assert [j.sink.text for j in joiners] == [
        captioner.caption(image, None, prompt=p or None, max_new_tokens=8) for image, p in zip(images[1:6], prompts)
    ]
    assert counters["joined_running"] == len(joiners), counters


def test_a_row_whose_client_left_stops_and_its_mates_go_on(captioner, images):
    from multimodal_lora.serve.continuous import ContinuousBatcher

    want = [captioner.caption(image, None, max_new_tokens=12) for image in images[:4]]
    batcher = ContinuousBatcher(captioner, max_batch_size=8, max_wait_ms=50)
    long = job(captioner, None, images[5], captioner.caption_prompt(None), max_tokens=90)
    long.sink.on_delta = long.cancelled.set  # the client goes away once text arrives
    mates = [job(captioner, None, image, captioner.caption_prompt(None), max_tokens=12) for image in images[:4]]
    try:
        before = batcher.counters()
        for j in [long, *mates]:
            batcher.submit(j)
        wait(mates)
        time.sleep(0.2)
        after = batcher.counters()
    finally:
        batcher.close()
    assert [j.sink.text for j in mates] == want
    assert long.cancelled.is_set() and not long.sink.done.is_set()  # no answer for a client that left
    # The long row left within a token or two of its first text, not after its 90 tokens.
    assert after["decode_steps"] - before["decode_steps"] < 20, after


def test_a_failing_prefill_fails_only_its_own_request(captioner, images, caplog):
    from multimodal_lora.serve.continuous import ContinuousBatcher

    want = [captioner.caption(image, "shapes") for image in images[:5]]
    good = [job(captioner, "shapes", image, captioner.caption_prompt("shapes")) for image in images[:5]]
    broken = job(captioner, "shapes", {"pixel_values": torch.zeros(1, 32, 32)}, captioner.caption_prompt("shapes"))  # one channel, not 3
    batcher = ContinuousBatcher(captioner, max_batch_size=8, max_wait_ms=200)
    try:
        with caplog.at_level(logging.WARNING, logger="multimodal_lora.serve.continuous"):
            for j in [*good[:2], broken, *good[2:]]:
                batcher.submit(j)
            wait([*good, broken])
    finally:
        batcher.close()
    assert [j.sink.text for j in good] == want
    assert broken.sink.error is not None and broken.sink.reason is None
    assert "admitting its requests one by one" in caplog.text


def test_sampling_stop_strings_and_max_tokens(captioner, images):
    """Sampling with top_p near 0 keeps only the likeliest token: greedy's text. Stop strings cut
    the text before them; max_tokens ends a row with 'length'."""
    from multimodal_lora.serve.continuous import ContinuousBatcher
    from multimodal_lora.serve.protocol import Sampling

    greedy = [captioner.caption(image, "shapes") for image in images[:4]]
    narrow = Sampling(do_sample=True, temperature=0.7, top_p=1e-6)
    sampled = [job(captioner, "shapes", im, captioner.caption_prompt("shapes"), sampling=narrow) for im in images[:4]]
    word = greedy[0].split()[1]
    stopped = job(captioner, "shapes", images[0], captioner.caption_prompt("shapes"), stop=[" " + word])
    short = job(captioner, "shapes", images[1], captioner.caption_prompt("shapes"), max_tokens=1)
    batcher = ContinuousBatcher(captioner, max_batch_size=8, max_wait_ms=5)
    try:
        submit_staggered(batcher, [*sampled, stopped, short])
        wait([*sampled, stopped, short])
    finally:
        batcher.close()
    assert [j.sink.text for j in sampled] == greedy
    assert stopped.sink.text == greedy[0].split(" " + word)[0] and stopped.sink.reason == "stop"
    assert short.sink.reason == "length" and short.sink.tokens == 1
    assert short.sink.text == captioner.caption(images[1], "shapes", max_new_tokens=1)


def test_an_encoder_decoder_base_is_batched_per_request_and_the_log_says_why(caplog):
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.serve.continuous import ContinuousBatcher, continuous_problem
    from multimodal_lora.serve.engine_process import EngineSpec, make_batcher

    captioner = Captioner("tiny-t5", device="cpu")
    assert "encoder–decoder" in continuous_problem(captioner)
    with pytest.raises(ValueError, match="cannot decode in a continuous batch"):
        ContinuousBatcher(captioner)
    with caplog.at_level(logging.INFO, logger="multimodal_lora.serve.engine_process"):
        batcher = make_batcher(captioner, EngineSpec(batching="continuous"))
    try:
        assert batcher.counters()["batching"] == "request"
        assert "continuous batching is not available for this base" in caplog.text
    finally:
        batcher.close()


@pytest.mark.parametrize("quantization", ["int8", "4bit"])
def test_a_quantized_base_decodes_continuously(shapes_adapters, images, quantization):
    """The server's default loads the base as the adapter was trained: int8 for the football
    recipe. Real bitsandbytes layers (on the CPU) decode in a continuous batch as caption() does."""
    from multimodal_lora.inference.captioner import Captioner

    captioner = Captioner.for_adapter(shapes_adapters["shapes"], name="shapes", device="cpu", quantization=quantization)
    layer = captioner.model.get_base_model().language_model.model.decoder.layers[0].fc1
    assert type(layer).__name__ == {"int8": "Linear8bitLt", "4bit": "Linear4bit"}[quantization]
    want = [captioner.caption(image, "shapes") for image in images[:8]]
    jobs = [job(captioner, "shapes", image, captioner.caption_prompt("shapes")) for image in images[:8]]
    counters = run_staggered(captioner, jobs, max_batch_size=4)
    assert [j.sink.text for j in jobs] == want
    assert counters["decoded_rows"] > counters["decode_steps"], counters  # rows decoded together
