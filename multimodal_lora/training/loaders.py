"""The run's data as the loop reads it: datasets (decoded pixels or cached image features), loaders, micro-batch groups."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from multimodal_lora.config import Recipe
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset, WorkerCollator, as_tensors
from multimodal_lora.data.feature_cache import open_or_build
from multimodal_lora.training.sampler import EpochBatchSampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaders:
    """What :func:`build_loaders` returns: the resumable order, the two loaders and the run's length."""

    sampler: EpochBatchSampler
    train: torch.utils.data.DataLoader
    validation: torch.utils.data.DataLoader | None
    total_steps: int
    cache_seconds: float | None
    """Time spent computing (or opening) the frozen-feature cache; ``None`` without one."""


def build_loaders(recipe: Recipe, accelerator, model, base, splits) -> Loaders:
    """The encoder, the resumable sampler, the datasets (with the feature cache when it pays) and their loaders.

    ``model`` is the model being trained; ``base`` (:class:`~multimodal_lora.model.base.LoadedBase`) gives its
    processor, token layout and family.
    """
    processor, layout = base.processor, base.layout
    # The datasets need the tokenizer (text) and, with the feature cache, the model's frozen image path.
    encoder = ExampleEncoder(
        processor.tokenizer,
        layout,
        task=recipe.data.task,
        prompt=recipe.data.prompt,
        prompt_template=recipe.data.prompt_template,
        max_length=recipe.data.max_length,
    )
    sampler = EpochBatchSampler(
        len(splits.train), recipe.train.batch_size, recipe.seed, accelerator.process_index, accelerator.num_processes
    )
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / recipe.train.grad_accum)
    total_steps = recipe.train.max_steps or steps_per_epoch * recipe.train.epochs
    use_cache = cache_features(recipe, model, total_steps / steps_per_epoch, base.family)
    workers = loader_workers(recipe.data.num_workers, use_cache)
    started = time.perf_counter()
    train_set, val_set, collate = build_datasets(recipe, accelerator, model, processor, encoder, splits, layout, use_cache)
    cache_seconds = time.perf_counter() - started if use_cache else None
    # A loader draws a worker seed from its generator each epoch; without its own it would draw from
    # the global RNG, which a resumed run starting mid-epoch would then be one draw behind on.
    # The workers only decode and resize images (no randomness), so they change no result; they
    # persist across epochs, since starting them again costs more than an epoch of the tiny recipe.
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=WorkerCollator(collate) if workers else collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    val_loader = None
    if len(val_set):
        # Each process scores its own share of the validation set; the sums are reduced.
        shard = torch.utils.data.Subset(val_set, range(accelerator.process_index, len(val_set), accelerator.num_processes))
        val_loader = torch.utils.data.DataLoader(
            shard, batch_size=recipe.train.batch_size, collate_fn=collate, generator=torch.Generator().manual_seed(recipe.seed)
        )
    return Loaders(sampler, train_loader, val_loader, total_steps, cache_seconds)


def cache_features(recipe: Recipe, model, epochs: float, family=None) -> bool:
    """Whether this run trains from cached image features (``train.cache_image_features``, ``auto`` resolved).

    ``auto`` caches when the images are seen more than once: building the cache runs the
    frozen image path once per image, about what one epoch costs, and from then on each
    epoch skips it. It cannot cache when any part of the image path is being trained. ``family``: the
    model's, read from its config when not given.
    """
    from multimodal_lora.model.base import family_of, image_path_trainable

    setting = recipe.train.cache_image_features
    family = family or family_of(model)
    refused = family.no_feature_cache
    if refused is not None:
        if setting is True:  # train() refuses this before the weights load; kept for other callers
            raise ConfigError(f"train.cache_image_features: true, but {refused}; set it to false or auto")
        logger.info("image feature cache: off (%s)", refused)
        return False
    trained = image_path_trainable(model, family)
    if setting is True and trained:
        raise ConfigError(
            f"train.cache_image_features: true, but {', '.join(trained)} of the image path are trained, "
            "so their features change every step; set it to false or auto"
        )
    if setting != "auto":
        logger.info("image feature cache: %s (cache_image_features=%s)", "on" if setting else "off", str(setting).lower())
        return setting
    use = epochs > 1 and not trained
    why = (
        f"lora.parts=[{', '.join(recipe.lora.parts)}] trains {', '.join(trained)} of the image path"
        if trained
        else f"the run sees each image {epochs:.3g} times" if epochs > 1 else "the run sees each image once"
    )
    logger.info("image feature cache: %s (cache_image_features=auto: %s)", "on" if use else "off", why)
    return use


def loader_workers(setting: int | str, use_cache: bool) -> int:
    """DataLoader worker processes (``data.num_workers``, ``auto`` resolved).

    With the cache nothing is decoded, and a worker would only add inter-process copies.
    Without it, workers decode and resize images on the cores the training step leaves idle.
    """
    if setting != "auto":
        return setting
    if use_cache:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def build_datasets(recipe: Recipe, accelerator, model, processor, encoder, splits, layout, use_cache: bool):
    """Train and validation datasets: pixels decoded per access, or cached image features (a fixed prefix
    per image, or a family's variable-length features with what they keep)."""
    train_encoded = encoder.encode_all(splits.train)
    val_encoded = encoder.encode_all(splits.validation)
    collate = Collator.of(layout)
    if not use_cache:
        return (
            PairDataset(splits.train, train_encoded, processor.image_processor, layout),
            PairDataset(splits.validation, val_encoded, processor.image_processor, layout),
            collate,
        )
    from multimodal_lora.cache import cache_dir

    examples = splits.train + splits.validation
    model.eval()
    # The main process computes the features; the others wait and open the same files.
    with accelerator.main_process_first():
        cache, keys = open_or_build(
            examples,
            model,
            processor.image_processor,
            cache_dir() / "features",
            build=accelerator.is_main_process,
            batch_size=recipe.train.batch_size,
            progress=accelerator.is_local_main_process,
            # The Q-Former of InstructBLIP reads the prompt: the prefix is per (image, instruction).
            instructions=[encoder.prompt_of(e) for e in examples] if layout.reads_instruction else None,
            layout=layout,
        )
    n = len(splits.train)
    return cache.dataset(train_encoded, keys[:n], layout), cache.dataset(val_encoded, keys[n:], layout), cache.collator(collate)


def micro_batch_groups(loader, size: int):
    """Micro-batches in groups of ``size`` (the last group of an epoch may be shorter)."""
    group = []
    for batch in loader:
        group.append(as_tensors(batch))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def release_workers(loader) -> None:
    """End a loader's persistent worker processes now that the run is done.

    Left to the garbage collector (the iterator sits in a reference cycle), their
    shutdown waited out torch's 5 s join timeout, in whatever collection came
    next; ended here, while they are idle, it takes milliseconds. ``DataLoader``
    has no public way to do it.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
