"""Training: the recipe (:mod:`.recipe`, ``train()`` calling its set-up phases in order, then the loop)
and what it is built from: the output directory's rules (:mod:`.run_dir`), what changes across
processes (:mod:`.distributed`), the data loaders (:mod:`.loaders`), the optimizer (:mod:`.optim`).

The command is :mod:`multimodal_lora.commands.train` (``python -m multimodal_lora.train RECIPE``).
"""

from multimodal_lora.training.recipe import Run, TrainingError, TrainResult, train

__all__ = ["Run", "TrainResult", "TrainingError", "train"]
