"""Visual question answering: only answer tokens are learned, and the tiny recipe learns to answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from multimodal_lora.config import load_recipe
from multimodal_lora.data.encoding import IGNORE_INDEX, ExampleEncoder
from multimodal_lora.data.sources import Example, load_splits

REPO = Path(__file__).resolve().parents[1]
VQA = REPO / "recipes" / "tiny-vqa.yaml"


@pytest.fixture(scope="module")
def tokenizer_and_layout(tiny_base):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from multimodal_lora.model.base import text_layout

    processor = AutoProcessor.from_pretrained(tiny_base)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_base)
    return processor.tokenizer, text_layout(model, processor.tokenizer)


def test_vqa_labels_count_only_the_answer_and_the_stop_token(tokenizer_and_layout):
    tokenizer, layout = tokenizer_and_layout
    recipe = load_recipe(VQA)
    encoder = ExampleEncoder(
        tokenizer, layout, task="vqa", prompt=None, prompt_template=recipe.data.prompt_template, max_length=recipe.data.max_length
    )
    encoded = encoder.encode(Example("x.png", "orange", "x", "row 1", question="What colour is the shape?"))
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    learned = [(i, label) for i, label in enumerate(labels) if label != IGNORE_INDEX]
    # Everything before the answer (image placeholders, </s>, the question in its template) is -100 ...
    first = learned[0][0]
    assert all(label == IGNORE_INDEX for label in labels[:first])
    prompt = tokenizer.decode(input_ids[layout.num_query_tokens + 1 : first])
    assert prompt == "Question: What colour is the shape? Answer:"
    # ... and what is learned is the answer, then the stop token.
    assert tokenizer.decode([label for _, label in learned[:-1]]) == " orange"
    assert learned[-1][1] == layout.stop_token_id
    assert [input_ids[i] for i, _ in learned] == [label for _, label in learned]


def test_caption_prompt_prefix_is_not_learned(tokenizer_and_layout):
    tokenizer, layout = tokenizer_and_layout
    encoder = ExampleEncoder(tokenizer, layout, task="caption", prompt="a photo of", prompt_template="", max_length=32)
    encoded = encoder.encode(Example("x.png", "an orange triangle", "x", "row 1"))
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]) == " an orange triangle"
    text = input_ids[layout.num_query_tokens + 1 :]
    assert tokenizer.decode(text[: len(text) - len(learned)]) == "a photo of"


def test_vqa_recipe_reads_questions_and_answers():
    recipe = load_recipe(VQA)
    splits = load_splits(recipe.data)
    assert len(splits.train) == 2000 and len(splits.validation) == 200
    assert {e.question for e in splits.train} == {"What colour is the shape?", "What shape is it?"}
    assert not {e.image_id for e in splits.train} & {e.image_id for e in splits.validation}


@pytest.mark.slow
def test_tiny_vqa_recipe_answers_held_out_questions(tmp_path, tiny_base):
    """Trains recipes/tiny-vqa.yaml as shipped; ask() must answer >= 60% of held-out questions (base: ~0%)."""
    from multimodal_lora.inference.captioner import ask, clear_cache
    from multimodal_lora.training import train

    recipe = load_recipe(VQA, [f"output_dir={tmp_path / 'run'}"])
    result = train(recipe)
    held_out = load_splits(recipe.data).validation
    images = [e.image for e in held_out]
    questions = [e.question for e in held_out]
    try:
        answers = ask(images, questions, adapter=result.adapter_dir)
        base_answers = ask(images, questions, base_model="tiny")
    finally:
        clear_cache()
    accuracy = sum(a == e.target for a, e in zip(answers, held_out)) / len(held_out)
    base_accuracy = sum(a == e.target for a, e in zip(base_answers, held_out)) / len(held_out)
    print(f"tiny-vqa held-out accuracy: {accuracy:.3f} (base {base_accuracy:.3f}) on {len(held_out)} questions")
    assert accuracy >= 0.6
    assert base_accuracy <= 0.05
    # One question alone, as a user would ask it.
    single = ask(held_out[0].image, held_out[0].question, adapter=result.adapter_dir)
    assert single == answers[0]
    clear_cache()
