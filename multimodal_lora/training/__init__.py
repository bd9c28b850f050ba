"""Training: the recipe (:mod:`.recipe`, ``train()`` calling its set-up phases in order, then the loop)
and what it is built from: the output directory's rules (:mod:`.run_dir`), what changes across
processes (:mod:`.distributed`), the data loaders (:mod:`.loaders`), the optimizer (:mod:`.optim`),
and what a run keeps: checkpoints and exact resume (:mod:`.checkpoint`), the resumable data order
(:mod:`.sampler`), ``metrics.jsonl`` and ``loss.png`` (:mod:`.logs`), experiment trackers (:mod:`.trackers`).

The command is :mod:`multimodal_lora.commands.train` (``python -m multimodal_lora.train RECIPE``).
"""

from multimodal_lora.training.recipe import Run, TrainingError, TrainResult, train

__all__ = ["Run", "TrainResult", "TrainingError", "train"]
