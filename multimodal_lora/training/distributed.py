"""What changes when a run spans processes: launcher checks, mixed precision, sharded state, run ids, stop requests.

On one process each of these is a no-op or a constant; they are here so that the recipe
reads the same for one CPU, one GPU and many GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import torch

from multimodal_lora.config import Recipe
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.core.runtime import accelerate_precision

logger = logging.getLogger(__name__)


def check_distributed(recipe: Recipe, accelerator) -> None:
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


def mixed_precision(recipe: Recipe) -> str:
    # Autocast only on a GPU; on CPU fp32 is both faster and exact.
    if recipe.model.device == "cpu" or not torch.cuda.is_available():
        return "no"
    return accelerate_precision(recipe.model.dtype)


def set_deepspeed_micro_batch(recipe: Recipe, accelerator) -> None:
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


def full_state_dict(accelerator, model) -> dict | None:
    """Under FSDP, the whole model's state gathered to the main process (a collective: call it on every
    process); ``None`` otherwise, where each process holds whole tensors already."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.get_state_dict(model)


def new_run_id(accelerator) -> str:
    """A fresh id drawn by the main process and shared with the others (a resumed run keeps its own)."""
    import uuid

    run_id = uuid.uuid4().hex[:12]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([run_id])[0]
    return run_id


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
