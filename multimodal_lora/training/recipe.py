"""The training recipe, top to bottom: ``train()`` calls the set-up phases in the order they depend on each other, then loops.

    recipe → base family (checks the LoRA targets) → accelerator and seed → run directory
    → data (before any weights load, so a bad data set fails in seconds) → model (base, LoRA)
    → loaders (with the frozen-feature cache when it pays) → optimisation → resume
    → evaluation → logs → fit → save the adapter

Each phase is a function returning its part; :class:`Run` gathers the parts by keyword.
The loop runs on ``accelerate``: one CPU, one GPU, or many GPUs, unchanged.
Gradient accumulation is written out (``no_sync`` on all but the last
micro-batch of a step) so that a step is a visible unit: checkpoints, logs and
stop requests all happen between steps. On one process with a fixed seed a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multimodal_lora.adapter import AdapterMeta, adapter_size_bytes, save_adapter
from multimodal_lora.config import Recipe
from multimodal_lora.core.errors import ConfigError, UserError
from multimodal_lora.data.check import recipe_length_problems
from multimodal_lora.data.feature_cache import forward_inputs
from multimodal_lora.data.screen import describe_bad, screen_examples
from multimodal_lora.data.sources import load_splits
from multimodal_lora.evaluate.run import generate, group_references, score, token_loss_sums
from multimodal_lora.model.base import (
    LoadedBase,
    Positions,
    add_lora,
    base_family,
    count_lora_parts,
    count_parameters,
    enable_gradient_checkpointing,
    format_parameter_table,
    load_processor,
    set_train_mode,
)
from multimodal_lora.training import run_dir
from multimodal_lora.training.checkpoint import (
    TrainState,
    check_identity,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from multimodal_lora.training.distributed import (
    StopRequest,
    check_distributed,
    full_state_dict,
    mixed_precision,
    new_run_id,
    set_deepspeed_micro_batch,
)
from multimodal_lora.training.loaders import Loaders, build_loaders, micro_batch_groups, release_workers
from multimodal_lora.training.logs import RunLog, peak_memory_mb, reset_peak_memory
from multimodal_lora.training.optim import build_optimizer, build_scheduler
from multimodal_lora.training.run_dir import latest_checkpoint_name, resume_command
from multimodal_lora.training.sampler import EpochBatchSampler
from multimodal_lora.training.trackers import resolve_trackers, start_trackers

logger = logging.getLogger(__name__)


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
    base: LoadedBase
    """The base as loaded: its family (the card's model class), token layout and processor."""


def train(recipe: Recipe) -> TrainResult:
    """Run the recipe and return where the adapter is.

    Raises:
        UserError: a bad recipe, data set or checkpoint (the message says what to do),
            a used ``output_dir``, a full disk (:class:`~multimodal_lora.core.atomic.WriteError`, naming the
            last intact checkpoint), or a non-finite loss (:class:`TrainingError`).
    """
    # A tracker asked for but not installed fails here, before any data or weights are read.
    trackers = resolve_trackers(recipe.train.report_to)
    output_dir = run_dir.prepare_output_dir(Path(recipe.output_dir))
    with run_dir.claimed(recipe, output_dir), _collector_spared():
        family = check_family(recipe)  # from the base's config alone, before any data or weights load; the run's only derivation
        accelerator = setup_accelerator(recipe, output_dir, trackers)
        resume = run_dir.start(recipe, accelerator, output_dir)
        processor, splits = setup_data(recipe, accelerator, family)  # data before weights: a bad file should not cost a model load
        base, model, parameters = setup_model(recipe, accelerator, family, processor)
        loaders = build_loaders(recipe, accelerator, model, base, splits)  # needs the model for the feature cache
        model, optimizer, scheduler, trainable = setup_optimisation(recipe, accelerator, model, loaders.total_steps)
        identity = run_identity(recipe, base.info, splits, accelerator.num_processes, loaders.total_steps)
        state = setup_resume(resume, identity, accelerator, model, optimizer, scheduler, loaders.total_steps)
        meta = AdapterMeta(
            base=base.info, task=recipe.data.task, prompt=recipe.data.prompt, prompt_template=recipe.data.prompt_template,
            load=base.settings, parts=tuple(recipe.lora.parts),
        )  # fmt: skip
        captioner, val_groups = setup_evaluation(recipe, accelerator, model, base, splits, meta)
        log = setup_log(recipe, accelerator, output_dir, trackers, resume_step=state.step if resume else None)
        run = Run(
            recipe=recipe, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
            sampler=loaders.sampler, train_loader=loaders.train, val_loader=loaders.validation, captioner=captioner,
            val_groups=val_groups, meta=meta, output_dir=output_dir, log=log, total_steps=loaders.total_steps, state=state,
            stop=StopRequest(), trainable=trainable, parameters=parameters, base=base,
        )  # fmt: skip
        with run.stop.installed():
            try:
                result = fit(run)
            finally:
                release_workers(loaders.train)
        return finish(run, result, splits, loaders)


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



# --- the set-up phases, in the order train() calls them --------------------------------------------


def check_family(recipe: Recipe):
    """The base's family (from its config alone), which checks the recipe's LoRA targets, parts and feature cache."""
    family = base_family(recipe.model.base, recipe.model.revision)
    problems = family.target_problems(recipe.lora.target_modules) + family.part_problems(recipe.lora.parts)
    if recipe.train.cache_image_features is True and family.no_feature_cache is not None:
        problems.append(f"train.cache_image_features: true, but {family.no_feature_cache}; set it to false or auto")
    if problems:
        raise ConfigError("\n".join(problems))
    return family


def setup_accelerator(recipe: Recipe, output_dir: Path, trackers: list[str]):
    """The accelerator (one process or many), checked against the recipe, and the seed set."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Accumulation is done by hand in train_step, so accelerate sees one micro-batch per step.
    accelerator = Accelerator(
        cpu=recipe.model.device == "cpu",
        mixed_precision=mixed_precision(recipe),
        log_with=trackers or None,
        project_dir=output_dir / "tensorboard",  # only TensorBoard writes under accelerate's project directory
    )
    check_distributed(recipe, accelerator)
    set_seed(recipe.seed)
    return accelerator


def setup_data(recipe: Recipe, accelerator, family):
    """The processor (its tokenizer checks the lengths) and the screened splits."""
    processor = load_processor(recipe.model.base, recipe.model.revision, family=family)
    positions = Positions.of_base(recipe.model.base, recipe.model.revision, family, getattr(processor, "image_processor", None))
    lengths = recipe_length_problems(recipe, processor.tokenizer, positions)
    if lengths:
        raise ConfigError(f"{recipe.source or 'recipe'}: lengths the base cannot hold:\n" + "\n".join(f"  - {p}" for p in lengths))
    splits = load_splits(recipe.data)
    # Every image decoded once now, so a bad file stops the run here (or is skipped), never mid-training.
    splits = screen_examples(splits, recipe.data)
    if accelerator.is_main_process:
        logger.info("data: %s — %d train / %d validation pairs", splits.description, len(splits.train), len(splits.validation))
        if splits.bad:
            logger.warning("%s", describe_bad(splits.bad))
    return processor, splits


def setup_model(recipe: Recipe, accelerator, family, processor):
    """The loaded base and it with fresh LoRA on its language model: ``(base, model, parameter counts)``.

    The base's load settings are recorded with the adapter, so that caption() & co. load it the same way.
    """
    base = LoadedBase.load(recipe.model, family=family, processor=processor)
    model = add_lora(base.model, recipe.lora, base.family)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, base.family)
    parameters = count_parameters(model, base.family)
    if accelerator.is_main_process:
        logger.info("trainable parameters:\n%s", format_parameter_table(parameters, count_lora_parts(model, base.family)))
    return base, model, parameters


def setup_optimisation(recipe: Recipe, accelerator, model, total_steps: int):
    """The optimizer over the LoRA parameters and its schedule, the model prepared for the processes."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe.train.lr, recipe.train.weight_decay, accelerator.device)
    set_deepspeed_micro_batch(recipe, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    return model, optimizer, scheduler, trainable


def setup_resume(resume, identity: dict, accelerator, model, optimizer, scheduler, total_steps: int) -> TrainState:
    """A fresh state, or the checkpoint's (after checking it is of this same run) restored into the model and optimizer."""
    state = TrainState(identity=identity, run_id=new_run_id(accelerator))
    if resume is None:
        return state
    path, record = resume
    check_identity(path, record.get("identity", {}), identity)
    fresh_id = state.run_id
    state = load_checkpoint(
        path, record, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler
    )
    state.run_id = state.run_id or fresh_id  # a checkpoint from before run ids: adopt it
    logger.info("resumed from %s: step %d of %d, %d epochs done", path, state.step, total_steps, state.epoch)
    return state


def setup_evaluation(recipe: Recipe, accelerator, model, base: LoadedBase, splits, meta: AdapterMeta):
    """What captions the validation images while training (main process only): ``(captioner, reference groups)``."""
    if not (recipe.train.eval_captions and splits.validation and accelerator.is_main_process):
        return None, []
    from multimodal_lora.inference.captioner import Captioner

    captioner = Captioner.from_loaded(base, accelerator.unwrap_model(model), {"default": meta})
    return captioner, group_references(splits.validation)[: recipe.train.eval_max_images]


def setup_log(recipe: Recipe, accelerator, output_dir: Path, trackers: list[str], resume_step: int | None) -> RunLog:
    """The trackers started and ``metrics.jsonl`` opened (continued on resume)."""
    start_trackers(accelerator, trackers, output_dir, recipe.to_dict(), resume_step)
    return RunLog(
        output_dir,
        enabled=accelerator.is_main_process,
        resume_step=resume_step,
        accelerator=accelerator,
        plot_every_seconds=recipe.train.plot_every_seconds,
    )


def finish(run: Run, result: dict, splits, loaders: Loaders) -> TrainResult:
    """Save the adapter (a finished run's; a stopped one's is its last checkpoint's), close the log, summarise."""
    accelerator, output_dir, model = run.accelerator, run.output_dir, run.model
    adapter_dir = output_dir / "adapter"
    if result["stopped_early"]:
        # Not finished: the adapter so far is the checkpoint's; OUTPUT_DIR/adapter is for finished runs.
        adapter_dir = Path(latest_checkpoint_name(output_dir)) / "adapter"
    else:
        state = full_state_dict(accelerator, model)  # every process takes part in gathering a sharded model
        if accelerator.is_main_process:
            save_adapter(
                accelerator.unwrap_model(model), adapter_dir, run.meta, state_dict=state, card=model_card(run, adapter_dir)
            )
    if accelerator.is_main_process:
        run.log.plot()
        run.log.close()
        _summary(run, result, adapter_dir)
        if splits.bad:
            # Said at the start too; repeated so it is the last thing a user reads.
            logger.warning("%s", describe_bad(splits.bad))
    accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=adapter_dir, adapter_bytes=adapter_size_bytes(adapter_dir), feature_cache_seconds=loaders.cache_seconds,
        model=accelerator.unwrap_model(model), **result,
    )  # fmt: skip


# --- the loop -----------------------------------------------------------------------------------------


def fit(run: Run) -> dict:
    """The optimisation loop: one optimizer step per ``grad_accum`` micro-batches, until ``total_steps``.

    Validates and checkpoints at the end of each epoch, checkpoints every
    ``checkpoint_every`` steps, and on SIGTERM/Ctrl-C checkpoints and returns
    at the next step boundary.
    """
    from tqdm.auto import tqdm

    cfg, state, accelerator = run.recipe.train, run.state, run.accelerator
    start, window = time.perf_counter(), _Window()
    cpu_start = time.process_time()
    start_samples, loss_value, last_eval, epoch_seconds = state.samples, float("nan"), {}, []
    # Redrawn at most once a second: in a log file every redraw is another line.
    progress = tqdm(
        total=run.total_steps, initial=state.step, desc="training", unit="step", mininterval=1.0,
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    set_train_mode(run.model, run.base.family)
    # What the loop holds, not what loading the base briefly did (the plan's figure).
    reset_peak_memory(accelerator.device)
    while state.step < run.total_steps and not run.stop.requested:
        # This epoch's order is fixed by seed and epoch; skip what a checkpoint had already consumed.
        run.sampler.set_epoch(state.epoch, skip=state.batches_done)
        epoch_start = time.perf_counter()
        for group in micro_batch_groups(run.train_loader, cfg.grad_accum):
            loss_value = train_step(run, group)
            state.step += 1
            state.batches_done += len(group)
            step_samples = sum(b["input_ids"].shape[0] for b in group) * accelerator.num_processes
            state.samples += step_samples
            window.add(step_samples, loss_value)
            progress.update(1)
            rate = (state.samples - start_samples) / max(time.perf_counter() - start, 1e-9)
            # refresh=False: the bar is redrawn on its own schedule (mininterval), not on every step.
            progress.set_postfix(
                loss=f"{loss_value:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.1f}", refresh=False
            )

            if state.step % cfg.log_every == 0 or state.step == run.total_steps:
                window = window.log(run)

            epoch_done = state.batches_done >= run.sampler.batches_per_epoch
            finished = state.step >= run.total_steps
            if epoch_done:
                epoch_seconds.append(time.perf_counter() - epoch_start)
                state.epoch += 1
                state.batches_done = 0
            due_eval = cfg.eval_every is not None and state.step % cfg.eval_every == 0
            if epoch_done or finished or due_eval:
                last_eval = validate(run) or last_eval
                set_train_mode(run.model, run.base.family)
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


class _Window:
    """The steps since the last training log line: their mean loss and samples per second."""

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.samples = 0
        self.losses: list[float] = []

    def add(self, samples: int, loss: float) -> None:
        self.samples += samples
        self.losses.append(loss)

    def log(self, run: Run) -> _Window:
        """Write the window's line to the run's log; returns the next window, starting now."""
        now, state = time.perf_counter(), run.state
        run.log.log({
            "split": "train", "step": state.step, "epoch": state.epoch + state.batches_done / run.sampler.batches_per_epoch,
            "loss": sum(self.losses) / len(self.losses), "lr": run.scheduler.get_last_lr()[0],
            "samples_per_second": self.samples / max(now - self.start, 1e-9),
            "peak_memory_mb": peak_memory_mb(run.accelerator.device),
        })  # fmt: skip
        return _Window(now)


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
            batch, keep = run.base.layout.for_loss(batch)  # the output head only where the loss reads it
            with accelerator.autocast():
                # No KV cache in training: nothing reads it, and filling it costs ~1% of a step.
                inputs = forward_inputs(batch, accelerator.device, run.base.layout.image_inputs)
                loss = model(**inputs, use_cache=False, **({"logits_to_keep": keep} if keep else {})).loss
            accelerator.backward(loss / len(group))
        losses.append(loss.detach().float())
    step_loss = torch.stack(losses).mean()
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss, reduction="mean")
    value = step_loss.item()
    if not math.isfinite(value):
        last = run.state.step and latest_checkpoint_name(run.output_dir)
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
    sums = accelerator.reduce(token_loss_sums(model, run.val_loader, accelerator.device, run.base.layout), reduction="sum")
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
    from multimodal_lora.adapter.card import CardFacts, render_card
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
        model_class=run.base.family.model_class,
        chat_template=run.base.layout.chat_template,
    )
    return str(render_card(run.meta, facts))


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

