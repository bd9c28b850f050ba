"""Is the adapter better than the base? :func:`~.run.evaluate` and its report (:mod:`.report`).

    python -m multimodal_lora.evaluate RECIPE --adapter DIR [key=value ...]
"""

from multimodal_lora.evaluate.run import evaluate

__all__ = ["evaluate"]
