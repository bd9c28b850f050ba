"""One loaded base: loading gives the model with its family, token layout, load settings and positions,
and what runs on it takes them from that value instead of deriving the family from the model again."""

from __future__ import annotations

import ast
import dataclasses
from types import SimpleNamespace

import pytest

from multimodal_lora.config import ModelConfig, load_recipe
from multimodal_lora.families import DecoderOnlyLayout
from multimodal_lora.model.base import LoadedBase, Positions
from multimodal_lora.model.loading import LoadSettings

from .conftest import RECIPES
from .test_layout import modules

# The calls of family_of that are not a fallback for a caller passing no family (`family or family_of(model)`),
# with why: each holds a model and nothing else.
RAW_MODEL_SITES = {
    ("multimodal_lora.model.base", "of_model"),  # a model loaded elsewhere (merged, a test's) becomes a LoadedBase
    ("multimodal_lora.model.base", "image_path_fingerprint"),  # the feature cache's key, from the model alone
}
# Modules that hold a LoadedBase (or a Captioner) once the weights are loaded: none derives the family itself.
HOLDERS = ["training.recipe", "inference.captioner", "merge", "evaluate.run", "serve.continuous", "inference.view"]


@pytest.fixture
def derivations(monkeypatch):
    """Every derivation of a family from a model config (what family_of does) while the test runs."""
    import multimodal_lora.model.base as model_module

    calls = []
    real = model_module.family_for_config
    monkeypatch.setattr(model_module, "family_for_config", lambda config: calls.append(type(config).__name__) or real(config))
    return calls


def test_the_loaded_tiny_base_carries_its_family_layout_settings_and_positions(tiny_base, quick_adapter, shapes_dir, derivations):
    from multimodal_lora.inference.captioner import Captioner

    loaded = LoadedBase.load(ModelConfig(base="tiny", device="cpu"), for_training=False)
    config = loaded.model.config
    assert loaded.family.name == loaded.info.family == "blip2-opt" and loaded.info.name == "tiny"
    assert isinstance(loaded.layout, DecoderOnlyLayout)
    assert loaded.processor.tokenizer.decode([loaded.layout.stop_token_id]) == "\n"
    assert loaded.positions == Positions(limit=config.text_config.max_position_embeddings, image=config.num_query_tokens)
    assert (loaded.positions.limit, loaded.positions.image, loaded.positions.text) == (128, 32, 96)
    assert Positions.of_base("tiny") == loaded.positions  # the figures the length checks use before weights load
    assert loaded.settings == LoadSettings(quantization="none", dtype="fp32", device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.family = None

    # A Captioner takes all of it from its LoadedBase: loading an adapter and captioning derive nothing again.
    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(quick_adapter, name="quick")
    captioner.caption(str(next((shapes_dir / "validation").glob("*.png"))), adapter="quick", max_new_tokens=3)
    assert captioner.family is captioner.loaded.family is loaded.family
    assert captioner.layout is captioner.loaded.layout and captioner.max_positions == 128
    assert captioner.settings == loaded.settings

    # Training's model phase: the base loads with the family train() derived once, LoRA and the counts use it.
    from multimodal_lora.training.recipe import check_family, setup_model

    recipe = load_recipe(RECIPES / "tiny.yaml", ["model.device=cpu"])
    family = check_family(recipe)
    base, model, parameters = setup_model(recipe, SimpleNamespace(is_main_process=False), family, loaded.processor)
    assert base.family is family and base.processor is loaded.processor
    assert parameters["total"][0] > 0 and base.settings == loaded.settings
    assert derivations == []  # the tiny base's family comes from its name; no call read it from a model


def test_only_models_without_a_loaded_base_derive_their_family():
    found = {"raw": set(), "holders": []}
    for name, tree in modules().items():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            called = getattr(node, "func", None)
            called = getattr(called, "id", getattr(called, "attr", None))
            if not isinstance(node, ast.Call) or called not in ("family_of", "family_for_config", "text_layout"):
                continue
            if name.removeprefix("multimodal_lora.") in HOLDERS:
                found["holders"].append(f"{name}:{node.lineno} {called}")
            if called != "family_of":
                continue
            parent = parents[node]
            if isinstance(parent, ast.BoolOp) and isinstance(parent.values[0], ast.Name) and parent.values[0].id == "family":
                continue  # `family or family_of(model)`: only when the caller passed none
            function = parent
            while not isinstance(function, ast.FunctionDef):
                function = parents[function]
            found["raw"].add((name, function.name))
    assert found["holders"] == []
    assert found["raw"] == RAW_MODEL_SITES
