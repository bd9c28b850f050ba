"""The tasks an adapter learns: captioning, and visual question answering.

A task knows what it is called (in words, on the hub, and the function that runs it)
and what its prompt is: a caption continues an
optional prefix; an answer follows the question set in a template (by default
:data:`DEFAULT_VQA_TEMPLATE`). Code that only needs a task's prompt or its name
asks its :class:`Task`; what genuinely differs (a question to read, to check, to
send) asks :attr:`Task.asks`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

TaskName = Literal["caption", "vqa"]
"""The names a recipe's ``data.task`` and an adapter's record take."""

DEFAULT_VQA_TEMPLATE = "Question: {question} Answer:"
"""The VQA prompt template: a recipe's default, and how the bare base is asked."""


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    """What it is, in words: ``captioning``, ``visual question answering``."""
    title: str
    """Its short title (the demo's tab): ``Caption``, ``VQA``."""
    asks: bool
    """Its prompt holds a question (VQA)."""
    function: str
    """The public function that runs it (``caption``, ``ask``): a model card's usage snippet calls it."""
    purpose: str
    """What an adapter for it is trained to do, in words (a model card's): ``caption images``."""
    hub_tag: str
    """The hub's tag for it, in a model card's front matter: ``image-captioning``."""

    def prompt(self, *, question: str | None = None, prefix: str | None = None, template: str = DEFAULT_VQA_TEMPLATE) -> str:
        """The text before the output: ``question`` in ``template`` (VQA), or the caption ``prefix`` (else nothing)."""
        if self.asks:
            return template.format(question=question)
        return prefix or ""


CAPTION = Task(
    "caption", "captioning", "Caption", asks=False, function="caption", purpose="caption images", hub_tag="image-captioning"
)
VQA = Task(
    "vqa", "visual question answering", "VQA", asks=True, function="ask",
    purpose="answer questions about images", hub_tag="visual-question-answering",
)  # fmt: skip
TASKS: dict[str, Task] = {t.name: t for t in (CAPTION, VQA)}
assert tuple(TASKS) == typing.get_args(TaskName)
