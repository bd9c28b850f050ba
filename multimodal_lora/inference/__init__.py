"""Captions and answers: the :class:`~.captioner.Captioner`, ``caption()`` and ``ask()``,
what a captioner knows without its model (:mod:`.view`), and batch captioning (:mod:`.captioning`).

``from multimodal_lora.inference.captioner import Captioner, caption, ask`` keeps working: the names are
re-exported here.
"""

from multimodal_lora.inference.captioner import CAPTIONERS, Captioner, ask, caption, clear_cache

__all__ = ["CAPTIONERS", "Captioner", "ask", "caption", "clear_cache"]
