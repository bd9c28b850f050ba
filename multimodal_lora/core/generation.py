"""How to generate: the options of a ``caption``/``ask`` call as one value, checked when it is made.

``Captioner.caption``/``ask``, ``Captioner.generate_batch`` (the server's engine), the caption
command and the demo all build a :class:`GenerationOptions`, so a bad value gets the same
message whichever way it came in, and ``generate`` is given the same arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from multimodal_lora.core.errors import ConfigError


@dataclass(frozen=True)
class GenerationOptions:
    """Generation settings; every problem is reported at once, as a :class:`ConfigError`.

    Example:
        >>> GenerationOptions(num_beams=3).generate_kwargs()
        {'max_new_tokens': 30, 'num_beams': 3, 'do_sample': False}
    """

    max_new_tokens: int = 30
    """The longest output, in tokens."""
    num_beams: int = 1
    """Beam search width (1: greedy)."""
    do_sample: bool = False
    """Sample instead of searching; ``temperature`` and ``top_p`` apply only then."""
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int | None = None
    """Images per ``generate`` call; ``None``: the captioner's, chosen for its device."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1 (got {self.num_beams})")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.do_sample and self.temperature <= 0:
            problems.append(
                f"temperature must be positive when sampling (got {self.temperature}); use do_sample=False for greedy"
            )
        if self.do_sample and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        return problems

    def generate_kwargs(self) -> dict:
        """What ``model.generate`` is given (temperature and top-p only when sampling)."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def keywords(self) -> dict:
        """The same settings as ``caption``/``ask`` keywords: ``captioner.caption(image, **options.keywords())``."""
        return dataclasses.asdict(self)
