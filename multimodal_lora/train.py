"""Fine-tune a BLIP-2 family model's language model with LoRA.

    python -m multimodal_lora.train RECIPE [key=value ...]
    python -m multimodal_lora.train RECIPE resume=true          # continue after a crash or a stop
    accelerate launch -m multimodal_lora.train RECIPE [key=value ...]

The run, top to bottom: read and validate the recipe → read the data (before
any weights load, so a bad data set fails in seconds) → load the base and its
processor → add LoRA to the language model's attention → (cache the frozen
image features) → optimizer and schedule → (restore a checkpoint) → loop,
validating and checkpointing at each epoch's end → save the adapter.

The loop runs on ``accelerate``: one CPU, one GPU, or many GPUs, unchanged.
Gradient accumulation is written out (``no_sync`` on all but the last
micro-batch of a step) so that a step is a visible unit: checkpoints, logs and
stop requests all happen between steps. On one process with a fixed seed a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from multimodal_lora.adapter import AdapterMeta, adapter_size_bytes, save_adapter
from multimodal_lora.atomic import WriteError, remove_tree, write_text
from multimodal_lora.callable_module import forward_calls
from multimodal_lora.checkpoint import (
    TrainState,
    check_identity,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from multimodal_lora.cli import run_cli, setup_logging
from multimodal_lora.config import Recipe, load_recipe
from multimodal_lora.data.check import recipe_length_problems
from multimodal_lora.data.encoding import Collator, ExampleEncoder, PairDataset, WorkerCollator, as_tensors
from multimodal_lora.data.screen import describe_bad, screen_examples
from multimodal_lora.data.sources import load_splits
from multimodal_lora.errors import ConfigError, UserError
from multimodal_lora.evaluate import generate, group_references, score, token_loss_sums
from multimodal_lora.feature_cache import CachedPairDataset, PrefixCollator, forward_inputs, open_or_build
from multimodal_lora.loading import LoadSettings
from multimodal_lora.logs import RunLog, peak_memory_mb, reset_peak_memory
from multimodal_lora.model import (
    add_lora,
    base_family,
    count_parameters,
    enable_gradient_checkpointing,
    format_parameter_table,
    load_base,
    load_processor,
    set_train_mode,
    text_layout,
)
from multimodal_lora.sampler import EpochBatchSampler
from multimodal_lora.trackers import resolve_trackers, start_trackers

# Named, not __name__: run as `python -m`, this module is __main__, outside the package logger.
logger = logging.getLogger("multimodal_lora.train")


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the message names the last good checkpoint."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    adapter_dir: Path
    adapter_bytes: int
    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    samples_per_second: float
    cpu_seconds: float = 0.0
    """CPU time of this process in the loop (DataLoader workers' not included); steadier than wall time on a busy machine."""
    metrics: dict = field(default_factory=dict)
    """The last evaluation's validation loss and captioning metrics."""
    epoch_seconds: list[float] = field(default_factory=list)
    """Training time of each epoch completed by this process (validation excluded)."""
    feature_cache_seconds: float | None = None
    """Time spent computing (or opening) the frozen-feature cache; ``None`` without one."""
    stopped_early: bool = False
    """``True`` when SIGTERM or Ctrl-C stopped the run (a checkpoint was written; resume with resume=true)."""
    peak_memory_mb: float | None = None
    """Peak memory while the loop ran (GPU: allocated; CPU: resident), loading not included: what the plan estimates."""
    model: object = field(default=None, repr=False)
    """The trained PEFT model, still in memory (e.g. to compare with the saved adapter reloaded)."""


@dataclass
class Run:
    """Everything the loop touches, built once by :func:`train`."""

    recipe: Recipe
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    sampler: EpochBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    captioner: object
    """Captions validation images with the model being trained (main process only)."""
    val_groups: list
    meta: AdapterMeta
    output_dir: Path
    log: RunLog
    total_steps: int
    state: TrainState
    stop: StopRequest
    trainable: list
    """The LoRA parameters, listed once: walking every module each step costs ~1 ms on the tiny model."""
    parameters: dict
    """``count_parameters()`` of the model: the model card's table."""
    model_class: str
    """The ``transformers`` class of the base (its family's), for the model card's snippet."""
    layout: object
    """The family's token layout (:mod:`multimodal_lora.families.layouts`)."""


def train(recipe: Recipe) -> TrainResult:
    """Run the recipe and return where the adapter is.

    Raises:
        UserError: a bad recipe, data set or checkpoint (the message says what to do),
            a used ``output_dir``, a full disk (:class:`~multimodal_lora.atomic.WriteError`, naming the
            last intact checkpoint), or a non-finite loss (:class:`TrainingError`).
    """
    # A tracker asked for but not installed fails here, before any data or weights are read.
    trackers = resolve_trackers(recipe.train.report_to)
    output_dir = prepare_output_dir(Path(recipe.output_dir))
    try:
        with exclusive(output_dir):
            # Before anything loads: a fresh run never mixes with another run's checkpoints or adapter.
            check_output_dir(recipe, output_dir)
            with _collector_spared():
                return _train(recipe, output_dir, trackers)
    except WriteError as exc:
        if exc.hint:
            raise
        last = _latest_checkpoint_name(output_dir)
        hint = f"the last intact checkpoint is {last}; free space and continue with resume=true" if last else (
            "no checkpoint was written yet; free space and run again"
        )
        raise exc.with_hint(hint) from None


@contextlib.contextmanager
def _collector_spared():
    """Python's full collections leave alone what existed before the run (given back after it).

    What the imports of torch, transformers and accelerate created lives as long as the
    process, yet each full collection walks all of it again; while a run loads (more imports,
    the base, peft) that happens several times, about 0.5 s of the tiny recipe. Frozen
    objects are still freed when nothing refers to them; only a reference cycle among them
    would wait until the run ends, when they return to the collector, so the garbage cycles
    already there (a notebook's previous model, say) are collected first.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train(recipe: Recipe, output_dir: Path, trackers: list[str]) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # The base's family (from its config alone) checks the LoRA targets before any data or weights load.
    family = base_family(recipe.model.base, recipe.model.revision)
    problems = family.target_problems(recipe.lora.target_modules)
    if problems:
        raise ConfigError("\n".join(problems))
    # Accumulation is done by hand in train_step, so accelerate sees one micro-batch per step.
    accelerator = Accelerator(
        cpu=recipe.model.device == "cpu",
        mixed_precision=_mixed_precision(recipe),
        log_with=trackers or None,
        project_dir=output_dir / "tensorboard",  # only TensorBoard writes under accelerate's project directory
    )
    _check_distributed(recipe, accelerator)
    set_seed(recipe.seed)
    if accelerator.is_main_process:
        if recipe.overwrite:
            clear_previous_run(output_dir)
        remove_stale_temporaries(output_dir)
    accelerator.wait_for_everyone()
    resume = resolve_resume(recipe.resume, output_dir)
    if accelerator.is_main_process:
        # The resolved recipe, overrides applied: what this run really was.
        write_text(output_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False), "the run's recipe")

    # Data before weights: a missing file should not cost a model load.
    processor = load_processor(recipe.model.base, recipe.model.revision)
    lengths = recipe_length_problems(recipe, processor.tokenizer)
    if lengths:
        raise ConfigError(f"{recipe.source or 'recipe'}: lengths the base cannot hold:\n" + "\n".join(f"  - {p}" for p in lengths))
    splits = load_splits(recipe.data)
    # Every image decoded once now, so a bad file stops the run here (or is skipped), never mid-training.
    splits = screen_examples(splits, recipe.data)
    if accelerator.is_main_process:
        logger.info("data: %s — %d train / %d validation pairs", splits.description, len(splits.train), len(splits.validation))
        if splits.bad:
            logger.warning("%s", describe_bad(splits.bad))

    model, base = load_base(recipe.model)
    # Recorded with the adapter, so that caption() & co. load the base the same way.
    load_settings = LoadSettings.of(recipe.model, next(model.parameters()).device)
    layout = text_layout(model, processor)
    model = add_lora(model, recipe.lora)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    parameters = count_parameters(model)
    if accelerator.is_main_process:
        logger.info("trainable parameters:\n%s", format_parameter_table(parameters))

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
    use_cache = cache_features(recipe, model, total_steps / steps_per_epoch)
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

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe.train.lr, recipe.train.weight_decay, accelerator.device)
    _set_deepspeed_micro_batch(recipe, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = _scheduler(recipe, optimizer, total_steps)

    identity = run_identity(recipe, base, splits, accelerator.num_processes, total_steps)
    state = TrainState(identity=identity, run_id=_new_run_id(accelerator))
    if resume is not None:
        path, record = resume
        check_identity(path, record.get("identity", {}), identity)
        fresh_id = state.run_id
        state = load_checkpoint(
            path, record, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler
        )
        state.run_id = state.run_id or fresh_id  # a checkpoint from before run ids: adopt it
        logger.info("resumed from %s: step %d of %d, %d epochs done", path, state.step, total_steps, state.epoch)

    meta = AdapterMeta(
        base=base, task=recipe.data.task, prompt=recipe.data.prompt, prompt_template=recipe.data.prompt_template, load=load_settings
    )
    captioner, val_groups = None, []
    if recipe.train.eval_captions and splits.validation and accelerator.is_main_process:
        from multimodal_lora.inference import Captioner

        captioner = Captioner.from_model(accelerator.unwrap_model(model), processor, base, {"default": meta})
        val_groups = group_references(splits.validation)[: recipe.train.eval_max_images]
    resume_step = state.step if resume else None
    start_trackers(accelerator, trackers, output_dir, recipe.to_dict(), resume_step)
    log = RunLog(
        output_dir,
        enabled=accelerator.is_main_process,
        resume_step=resume_step,
        accelerator=accelerator,
        plot_every_seconds=recipe.train.plot_every_seconds,
    )
    run = Run(
        recipe, accelerator, model, optimizer, scheduler, sampler, train_loader, val_loader, captioner, val_groups,
        meta, output_dir, log, total_steps, state, StopRequest(), trainable, parameters, family.model_class, layout,
    )  # fmt: skip

    with run.stop.installed():
        try:
            result = fit(run)
        finally:
            _release_workers(train_loader)

    adapter_dir = output_dir / "adapter"
    if result["stopped_early"]:
        # Not finished: the adapter so far is the checkpoint's; OUTPUT_DIR/adapter is for finished runs.
        adapter_dir = Path(_latest_checkpoint_name(output_dir)) / "adapter"
    else:
        state = full_state_dict(accelerator, model)  # every process takes part in gathering a sharded model
        if accelerator.is_main_process:
            save_adapter(
                accelerator.unwrap_model(model), adapter_dir, meta, state_dict=state, card=model_card(run, adapter_dir)
            )
    if accelerator.is_main_process:
        log.plot()
        log.close()
        _summary(run, result, adapter_dir)
        if splits.bad:
            # Said at the start too; repeated so it is the last thing a user reads.
            logger.warning("%s", describe_bad(splits.bad))
    accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=adapter_dir, adapter_bytes=adapter_size_bytes(adapter_dir), feature_cache_seconds=cache_seconds,
        model=accelerator.unwrap_model(model), **result,
    )  # fmt: skip


def fit(run: Run) -> dict:
    """The optimisation loop: one optimizer step per ``grad_accum`` micro-batches, until ``total_steps``.

    Validates and checkpoints at the end of each epoch, checkpoints every
    ``checkpoint_every`` steps, and on SIGTERM/Ctrl-C checkpoints and returns
    at the next step boundary.
    """
    from tqdm.auto import tqdm

    cfg, state, accelerator = run.recipe.train, run.state, run.accelerator
    start, window_start, window_samples, window_losses = time.perf_counter(), time.perf_counter(), 0, []
    cpu_start = time.process_time()
    start_samples, loss_value, last_eval, epoch_seconds = state.samples, float("nan"), {}, []
    # Redrawn at most once a second: in a log file every redraw is another line.
    progress = tqdm(
        total=run.total_steps, initial=state.step, desc="training", unit="step", mininterval=1.0,
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    set_train_mode(run.model)
    # What the loop holds, not what loading the base briefly did (the plan's figure).
    reset_peak_memory(accelerator.device)
    while state.step < run.total_steps and not run.stop.requested:
        # This epoch's order is fixed by seed and epoch; skip what a checkpoint had already consumed.
        run.sampler.set_epoch(state.epoch, skip=state.batches_done)
        epoch_start = time.perf_counter()
        for group in _groups(run.train_loader, cfg.grad_accum):
            loss_value = train_step(run, group)
            state.step += 1
            state.batches_done += len(group)
            step_samples = sum(b["input_ids"].shape[0] for b in group) * accelerator.num_processes
            state.samples += step_samples
            window_samples += step_samples
            window_losses.append(loss_value)
            progress.update(1)
            rate = (state.samples - start_samples) / max(time.perf_counter() - start, 1e-9)
            # refresh=False: the bar is redrawn on its own schedule (mininterval), not on every step.
            progress.set_postfix(
                loss=f"{loss_value:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.1f}", refresh=False
            )

            if state.step % cfg.log_every == 0 or state.step == run.total_steps:
                now = time.perf_counter()
                run.log.log({
                    "split": "train", "step": state.step, "epoch": state.epoch + state.batches_done / run.sampler.batches_per_epoch,
                    "loss": sum(window_losses) / len(window_losses), "lr": run.scheduler.get_last_lr()[0],
                    "samples_per_second": window_samples / max(now - window_start, 1e-9),
                    "peak_memory_mb": peak_memory_mb(accelerator.device),
                })  # fmt: skip
                window_start, window_samples, window_losses = now, 0, []

            epoch_done = state.batches_done >= run.sampler.batches_per_epoch
            finished = state.step >= run.total_steps
            if epoch_done:
                epoch_seconds.append(time.perf_counter() - epoch_start)
                state.epoch += 1
                state.batches_done = 0
            due_eval = cfg.eval_every is not None and state.step % cfg.eval_every == 0
            if epoch_done or finished or due_eval:
                last_eval = validate(run) or last_eval
                set_train_mode(run.model)
            due = cfg.checkpoint_every is not None and state.step % cfg.checkpoint_every == 0
            stop = run.stop.check(accelerator)  # every step, on every process: they must stop together
            if epoch_done or finished or due or stop:
                checkpoint(run)
            if finished or stop:
                break
    progress.close()
    if run.stop.requested:
        logger.warning(
            "stopped by %s at step %d; checkpoint written. Continue with: %s",
            run.stop.signal_name, state.step, resume_command(run.recipe),
        )  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "steps": state.step,
        "final_loss": loss_value,
        "val_loss": last_eval.get("val_loss"),
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "samples_per_second": (state.samples - start_samples) / seconds if seconds > 0 else 0.0,
        "metrics": last_eval,
        "stopped_early": run.stop.requested,
        "epoch_seconds": epoch_seconds,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
    }


def train_step(run: Run, group: list[dict]) -> float:
    """Forward and backward over the step's micro-batches, then clip, step the optimizer and the schedule.

    Returns:
        The step's mean loss (averaged over processes).

    Raises:
        TrainingError: the loss is NaN or infinite; the parameters are left as they were.
    """
    accelerator, model, cfg = run.accelerator, run.model, run.recipe.train
    losses = []
    for index, batch in enumerate(group):
        # Only the step's last micro-batch synchronises gradients across processes.
        sync = index == len(group) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            batch, keep = run.layout.for_loss(batch)  # the output head only where the loss reads it
            with accelerator.autocast():
                # No KV cache in training: nothing reads it, and filling it costs ~1% of a step.
                inputs = forward_inputs(batch, accelerator.device)
                loss = model(**inputs, use_cache=False, **({"logits_to_keep": keep} if keep else {})).loss
            accelerator.backward(loss / len(group))
        losses.append(loss.detach().float())
    step_loss = torch.stack(losses).mean()
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss, reduction="mean")
    value = step_loss.item()
    if not math.isfinite(value):
        last = run.state.step and _latest_checkpoint_name(run.output_dir)
        raise TrainingError(
            f"the loss became {value} at step {run.state.step + 1}; stopped before the update. "
            f"The last good checkpoint is {last or 'none (no checkpoint was written yet)'}. "
            f"Lower train.lr (now {cfg.lr}), use dtype=bf16 instead of fp16, or check the data."
        )
    if cfg.max_grad_norm is not None:
        accelerator.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return value


def validate(run: Run) -> dict:
    """Validation loss (all processes), then captioning metrics on the validation images (main process)."""
    if run.val_loader is None:
        return {}
    accelerator, model = run.accelerator, run.model
    model.eval()
    sums = accelerator.reduce(token_loss_sums(model, run.val_loader, accelerator.device, run.layout), reduction="sum")
    result = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}
    if run.captioner is not None:
        captions = generate(run.captioner, "default", run.val_groups, run.recipe.data.task, run.recipe.train.eval_max_new_tokens)
        # METEOR starts a Java VM per call (seconds); it is left to `python -m multimodal_lora.evaluate`.
        result.update({k: v for k, v in score(captions, run.val_groups, meteor=False).items() if v is not None})
    accelerator.wait_for_everyone()
    state = run.state
    record = {"split": "validation", "step": state.step, "epoch": state.epoch, **result}
    state.history.append(record)
    run.log.log(record)
    run.log.plot(force=False)  # throttled: redrawing costs ~0.2 s; it is always drawn at the end
    logger.info("epoch %d, step %d: %s", state.epoch, state.step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def checkpoint(run: Run) -> None:
    """Write a checkpoint (main process only) and wait for it, so no process runs ahead of a save."""
    accelerator = run.accelerator
    state = full_state_dict(accelerator, run.model)
    if accelerator.is_main_process:
        path = save_checkpoint(
            run.output_dir,
            run.state,
            model=accelerator.unwrap_model(run.model),
            model_state=state,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            scaler=accelerator.scaler,
            meta=run.meta,
            keep=run.recipe.train.keep_checkpoints,
            card=model_card(run, run.output_dir / "checkpoints" / f"checkpoint-{run.state.step:08d}" / "adapter"),
        )
        logger.debug("checkpoint %s", path)
    accelerator.wait_for_everyone()


def model_card(run: Run, adapter_dir: Path) -> str:
    """The adapter's ``README.md``: the recipe as run, the last evaluation, the parameter table."""
    from multimodal_lora.card import CardFacts, render_card
    from multimodal_lora.data.sources import detect_source

    last = run.state.history[-1] if run.state.history else {}
    facts = CardFacts(
        recipe=run.recipe.to_dict(),
        metrics={k: v for k, v in last.items() if k not in ("split", "step", "epoch")},
        metrics_step=last.get("step"),
        eval_images=len(run.val_groups) or None,
        parameters=run.parameters,
        datasets=(run.recipe.data.path,) if detect_source(run.recipe.data) == "hub" else (),
        adapter_ref=str(adapter_dir),
        model_class=run.model_class,
    )
    return str(render_card(run.meta, facts))


# --- set-up helpers ------------------------------------------------------------------------------


def cache_features(recipe: Recipe, model, epochs: float) -> bool:
    """Whether this run trains from cached image features (``train.cache_image_features``, ``auto`` resolved).

    ``auto`` caches when the images are seen more than once: building the cache runs the
    frozen image path once per image, about what one epoch costs, and from then on each
    epoch skips it. It cannot cache when any part of the image path is being trained.
    """
    from multimodal_lora.model import image_path_trainable

    setting = recipe.train.cache_image_features
    trained = image_path_trainable(model)
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
        f"{', '.join(trained)} of the image path are trained"
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


def build_optimizer(params: list, lr: float, weight_decay: float, device: torch.device):
    """AdamW updating all LoRA tensors in a few fused kernels instead of a loop over them.

    ``fused`` on CUDA; ``foreach`` (multi-tensor) elsewhere. All compute what the
    single-tensor loop does. (torch's fused CPU kernel saves 0.4 ms a step on the
    tiny recipe, but with it the recipe's held-out exact match was 169/200 with
    the shipped seed against 180/200 with ``foreach``, and 175 against 176 with
    seed 1: not worth the risk.)
    """
    fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, foreach=None if fused else True)


def build_datasets(recipe: Recipe, accelerator, model, processor, encoder, splits, layout, use_cache: bool):
    """Train and validation datasets: pixels decoded per access, or cached visual prefixes."""
    train_encoded = encoder.encode_all(splits.train)
    val_encoded = encoder.encode_all(splits.validation)
    collate = Collator(layout.pad_token_id, layout.padding())
    if not use_cache:
        return (
            PairDataset(splits.train, train_encoded, processor.image_processor),
            PairDataset(splits.validation, val_encoded, processor.image_processor),
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
    return (
        CachedPairDataset(train_encoded, cache, keys[:n]),
        CachedPairDataset(val_encoded, cache, keys[n:]),
        PrefixCollator(collate),
    )


def run_identity(recipe: Recipe, base, splits, processes: int, total_steps: int) -> dict:
    """Everything that changes the trained weights: a checkpoint is resumed only when all of it matches.

    A difference is listed key by key; to change one of these, start a new run (another
    ``output_dir``, or ``overwrite=true``). What does not change the weights (logging,
    checkpoint frequency, evaluation settings, the feature cache, gradient checkpointing,
    ``num_workers``, the device) may change on resume.
    """
    data = hashlib.sha256()
    for e in splits.train:
        data.update(json.dumps([e.image_id, e.target, e.question]).encode())
    return {
        "model.base": recipe.model.base,
        "model.revision": recipe.model.revision,
        "model.quantization": recipe.model.quantization,
        "model.dtype": recipe.model.dtype,
        "base config fingerprint": base.fingerprint,
        "lora.r": recipe.lora.r,
        "lora.alpha": recipe.lora.alpha,
        "lora.dropout": recipe.lora.dropout,
        "lora.target_modules": sorted(recipe.lora.target_modules or ["(the family's default)"]),
        "data.path": recipe.data.path,
        "data.task": recipe.data.task,
        "data.prompt": recipe.data.prompt,
        "data.prompt_template": recipe.data.prompt_template if recipe.data.task == "vqa" else None,
        "data.max_length": recipe.data.max_length,
        "training data (hash of rows)": data.hexdigest()[:16],
        "seed": recipe.seed,
        "train.batch_size": recipe.train.batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.lr": recipe.train.lr,
        "train.weight_decay": recipe.train.weight_decay,
        "train.scheduler": recipe.train.scheduler,
        "train.warmup_ratio": recipe.train.warmup_ratio,
        "train.max_grad_norm": recipe.train.max_grad_norm,
        "total steps (train.epochs / train.max_steps)": total_steps,
        "processes": processes,
    }


# What a run leaves in its output_dir; `overwrite=true` deletes exactly these.
RUN_ARTEFACTS = ("checkpoints", "adapter", "metrics.jsonl", "loss.png", "tensorboard", "eval", "recipe.yaml")


def check_output_dir(recipe: Recipe, output_dir: Path) -> None:
    """Refuse a fresh run into a directory holding another run's work; say the two ways on.

    Raises:
        ConfigError: ``output_dir`` has checkpoints, an adapter or metrics, and neither
            ``resume`` nor ``overwrite`` is set; or ``resume`` names a checkpoint of
            another directory while this one holds a run.
    """
    from multimodal_lora.checkpoint import find_checkpoints

    checkpoints = find_checkpoints(output_dir)
    found = []
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}")
    if (output_dir / "adapter").exists():
        found.append("a finished adapter in adapter/")
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    if not found or recipe.overwrite:
        return
    rerun = resume_command(recipe, resume=None)
    if recipe.resume is True:
        return
    if recipe.resume is not False:
        inside = Path(recipe.resume).resolve().is_relative_to(output_dir.resolve())
        if inside:
            return
        raise ConfigError(
            f"resume={recipe.resume}: that checkpoint is not in output_dir {output_dir}, which already holds another "
            f"run ({', '.join(found)}); resume it into an empty output_dir=..."
        )
    raise ConfigError(
        f"output_dir {output_dir} already holds a run ({', '.join(found)}); a fresh run there would mix with it. "
        f"Continue that run with: {rerun} resume=true — or start afresh with overwrite=true (deletes it) "
        "or another output_dir=..."
    )


@contextlib.contextmanager
def exclusive(output_dir: Path):
    """Lock ``output_dir`` for the run: a second run started into the same directory stops at once.

    The lock is on the directory itself (``flock``), so nothing is written for it and it goes
    with the process, however that ends. Only the first process of a launch takes it.
    """
    import fcntl

    if os.environ.get("RANK", "0") not in ("", "0"):
        yield
        return
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"output_dir {output_dir} is in use by another training run right now; wait for it to finish, "
                "or choose another output_dir"
            ) from None
        yield
    finally:
        # Unlocked explicitly: forked DataLoader workers share the descriptor, and a worker that
        # outlived the run (_release_workers ends them, but a failed shutdown leaves them) would keep it locked.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def clear_previous_run(output_dir: Path) -> None:
    """``overwrite=true``: delete the previous run's artefacts (and nothing else in the directory)."""
    removed = []
    for name in RUN_ARTEFACTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)  # a kill meanwhile leaves no half-deleted checkpoint or adapter
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning("overwrite=true: deleted the previous run's %s in %s", ", ".join(removed), output_dir)


def resume_command(recipe: Recipe, resume: bool | None = True) -> str:
    """The command that started this run, with its overrides, ending in ``resume=true``."""
    import shlex

    keep = [o for o in recipe.overrides if o.partition("=")[0].strip() not in ("resume", "overwrite")]
    words = ["python", "-m", "multimodal_lora.train", recipe.source or "RECIPE", *keep]
    if resume:
        words.append("resume=true")
    return shlex.join(words)


def _new_run_id(accelerator) -> str:
    """A fresh id drawn by the main process and shared with the others (a resumed run keeps its own)."""
    import uuid

    run_id = uuid.uuid4().hex[:12]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([run_id])[0]
    return run_id


def prepare_output_dir(path: Path) -> Path:
    """Create the output directory, refusing a path that is a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {str(path)!r} is a file; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot create {str(path)!r} ({exc.strerror})") from None
    return path


def full_state_dict(accelerator, model) -> dict | None:
    """Under FSDP, the whole model's state gathered to the main process (a collective: call it on every
    process); ``None`` otherwise, where each process holds whole tensors already."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.get_state_dict(model)


def _set_deepspeed_micro_batch(recipe: Recipe, accelerator) -> None:
    """Tell DeepSpeed the micro-batch, which accelerate can otherwise only read from a prepared DataLoader.

    Ours is not prepared: :class:`EpochBatchSampler` shards and orders the data
    itself, which is what makes resume exact.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
    if config.get("train_batch_size") == "auto":
        accum = config.get("gradient_accumulation_steps", 1)
        config["train_batch_size"] = recipe.train.batch_size * (1 if accum == "auto" else accum) * accelerator.num_processes


def _check_distributed(recipe: Recipe, accelerator) -> None:
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate only shards on accelerators (GPUs); CPU processes join over gloo as DDP.
        logger.warning(
            "the launch config asks for FSDP, but accelerate runs FSDP only on GPUs; these %d %s processes train "
            "data-parallel (%s) instead", accelerator.num_processes, accelerator.device.type, accelerator.distributed_type.value,
        )  # fmt: skip

    if accelerator.distributed_type == DistributedType.DEEPSPEED and recipe.train.grad_accum != 1:
        raise ConfigError(
            "train.grad_accum: DeepSpeed accumulates gradients itself; set train.grad_accum=1 and "
            "gradient_accumulation_steps in the accelerate config instead"
        )


def _release_workers(loader) -> None:
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


def _groups(loader, size: int):
    """Micro-batches in groups of ``size`` (the last group of an epoch may be shorter)."""
    group = []
    for batch in loader:
        group.append(as_tensors(batch))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _scheduler(recipe: Recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.train.scheduler]
    warmup = int(recipe.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _mixed_precision(recipe: Recipe) -> str:
    # Autocast only on a GPU; on CPU fp32 is both faster and exact.
    if recipe.model.device == "cpu" or not torch.cuda.is_available():
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.model.dtype]


def _latest_checkpoint_name(output_dir: Path) -> str | None:
    from multimodal_lora.checkpoint import find_checkpoints

    found = find_checkpoints(output_dir)
    return str(found[-1]) if found else None


def _summary(run: Run, result: dict, adapter_dir: Path) -> None:
    best = {}
    for record in run.state.history:
        for key, value in record.items():
            if key in ("split", "step", "epoch") or value is None:
                continue
            better = min if key == "val_loss" else max
            best[key] = better(best.get(key, value), value)
    lines = [
        f"{'stopped' if result['stopped_early'] else 'finished'}: {result['steps']} steps in {result['seconds']:.1f} s "
        f"({result['samples_per_second']:.1f} samples/s), final training loss {result['final_loss']:.4f}, "
        f"peak memory {result['peak_memory_mb']:,.0f} MB",
        "best validation: " + (", ".join(f"{k} {v:.4f}" for k, v in best.items()) or "none (no validation split)"),
        f"adapter {'so far' if result['stopped_early'] else 'saved to'} {adapter_dir} ({adapter_size_bytes(adapter_dir) / 1024:.1f} KB)",
        f"checkpoints: {run.output_dir / 'checkpoints'}",
        f"metrics: {run.log.path}; loss curve: {run.log.plot_path}"
        + "".join(f"; {t.name}" for t in run.accelerator.trackers),
    ]
    logger.info("\n".join(lines))


class StopRequest:
    """SIGTERM or Ctrl-C asks the loop to checkpoint and stop at the next step boundary.

    A second Ctrl-C interrupts at once (the previous checkpoint stays usable).
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then writing a checkpoint and stopping", self.signal_name)

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled on the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(self.requested)], device=accelerator.device)
            self.requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return self.requested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.train",
        description="Fine-tune a BLIP-2 family model's language model with LoRA, as a recipe says.",
        epilog="Example: python -m multimodal_lora.train recipes/tiny.yaml output_dir=runs/mine train.epochs=2",
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value, e.g. lora.r=8, resume=true")
    parser.add_argument(
        "--plan", action="store_true", help="print the estimated GPU memory and parameter table, and load nothing"
    )
    args = parser.parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    if args.plan:
        from multimodal_lora.plan import plan_recipe

        print(plan_recipe(recipe).format())
        return 0
    train(recipe)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


# `from multimodal_lora import train` is the train() function whether or not this module was imported first.
forward_calls(__name__, "multimodal_lora.train", "train")

if __name__ == "__main__":
    cli()
