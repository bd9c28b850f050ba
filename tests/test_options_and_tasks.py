"""Generation options as one checked value, and the tasks' prompts: no model needed."""

from __future__ import annotations

import pytest

from multimodal_lora.core.errors import ConfigError
from multimodal_lora.core.generation import GenerationOptions
from multimodal_lora.core.tasks import CAPTION, DEFAULT_VQA_TEMPLATE, TASKS, VQA


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        GenerationOptions(max_new_tokens=0, num_beams=0, do_sample=True, temperature=0, top_p=1.5, batch_size=0)
    assert str(caught.value) == (
        "max_new_tokens must be at least 1 (got 0); num_beams must be at least 1 (got 0); "
        "batch_size must be at least 1 (got 0); temperature must be positive when sampling (got 0); "
        "use do_sample=False for greedy; top_p must be in (0, 1] (got 1.5)"
    )


def test_sampling_settings_reach_generate_only_when_sampling():
    # Greedy ignores them, as generate would warn about them.
    assert GenerationOptions(temperature=0.0, top_p=0.0).generate_kwargs() == {"max_new_tokens": 30, "num_beams": 1, "do_sample": False}
    sampled = GenerationOptions(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9)
    assert sampled.generate_kwargs() == {"max_new_tokens": 5, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert sampled.keywords() == {"max_new_tokens": 5, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "batch_size": None}


def test_each_task_knows_its_prompt():
    from multimodal_lora.adapter import AdapterMeta
    from multimodal_lora.config import DataConfig
    from multimodal_lora.data.encoding import prompt_text

    assert CAPTION.prompt() == "" and CAPTION.prompt(prefix="a photo of") == "a photo of"
    assert VQA.prompt(question="What colour?") == "Question: What colour? Answer:"
    assert VQA.prompt(question="q", template="Q: {question} A:") == "Q: q A:"
    assert prompt_text("vqa", "q", "ignored", DEFAULT_VQA_TEMPLATE) == "Question: q Answer:"
    assert prompt_text("caption", "ignored", "a photo of", DEFAULT_VQA_TEMPLATE) == "a photo of"
    # One default template: the recipe's, the adapter record's and the bare base's.
    assert DataConfig().prompt_template == AdapterMeta.__dataclass_fields__["prompt_template"].default == DEFAULT_VQA_TEMPLATE
    assert [(t.name, t.asks) for t in TASKS.values()] == [("caption", False), ("vqa", True)]
