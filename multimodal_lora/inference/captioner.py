"""Captions and answers from a base and its adapters.

:class:`Captioner` loads a base once and any number of named adapters, and
switches between them per call without reloading the base. :func:`caption` and
:func:`ask` are the one-line versions; they keep one ``Captioner`` per base in
:data:`CAPTIONERS` (a visible, documented cache: call :func:`clear_cache` to
free it), keyed by the base *and* how it is loaded.

An adapter is used the way it was trained: its base is loaded with the
quantization, dtype and device kind recorded in its ``multimodal_lora.json``,
unless the caller overrides them (see :mod:`multimodal_lora.model.loading`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from multimodal_lora.adapter import (
    OPENED,
    Adapter,
    AdapterMeta,
    BaseChoice,
    Found,
    attach,
    base_for,
    check_base_matches,
    check_fits,
    open_adapter,
)
from multimodal_lora.config import ModelConfig
from multimodal_lora.core.errors import AdapterError, ConfigError
from multimodal_lora.core.generation import GenerationOptions
from multimodal_lora.core.runtime import inference_batch_size
from multimodal_lora.core.tasks import DEFAULT_VQA_TEMPLATE
from multimodal_lora.data.images import ImageSource, load_image
from multimodal_lora.inference.view import CaptionerView
from multimodal_lora.model.base import LoadedBase
from multimodal_lora.model.loading import LoadSettings

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = DEFAULT_VQA_TEMPLATE  # the bare base is asked this way


class Captioner:
    """A base (any family: BLIP-2 OPT or Flan-T5, InstructBLIP) with named LoRA adapters,
    for captioning and visual question answering.

    The active adapter is state of the one shared model, so each ``generate``
    call holds a lock while it picks its adapter: several threads (a web
    server's workers) may share one ``Captioner``.

    Args:
        base: ``tiny``, a hub id, or a model directory.
        device, dtype, quantization, quant_type: as in a recipe's ``model`` section.
            :meth:`for_adapter` takes them from what an adapter records instead.

    Example:
        >>> captioner = Captioner("tiny")
        >>> captioner.load_adapter("runs/tiny/adapter", name="shapes")
        >>> captioner.caption(["a.png", "b.png"], adapter="shapes")
        ['a red circle', 'a blue square']
    """

    def __init__(
        self,
        base: str = "tiny",
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "fp32",
        quantization: str = "none",
        quant_type: str = "nf4",
    ):
        cfg = ModelConfig(base=base, revision=revision, device=device, dtype=dtype, quantization=quantization, quant_type=quant_type)
        problems = cfg.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        self._start(LoadedBase.load(cfg, for_training=False))
        self.model.eval()

    def _start(self, loaded: LoadedBase, model=None, adapters: dict[str, AdapterMeta | None] | None = None) -> None:
        """Take the base, and what follows from it, from ``loaded``; ``model`` is its PEFT wrapper when it has one."""
        self.loaded = loaded
        """The base as loaded: family, token layout, positions, load settings."""
        self.model = loaded.model if model is None else model
        self.processor, self.base, self.layout = loaded.processor, loaded.info, loaded.layout
        self.settings = loaded.settings
        """How the base was loaded (``device`` is the kind it landed on); ``None`` for a model handed over in memory."""
        self.max_positions = loaded.positions.limit
        self.adapters: dict[str, AdapterMeta | None] = dict(adapters or {})
        self.view = CaptionerView(self.base, self.processor, self.layout, self.max_positions, self.adapters)
        """What this captioner knows without its model (it shares :attr:`adapters`)."""
        self._paths: dict[str, Path] = {}
        # The model's own adapters are already PEFT adapters under these names.
        self._peft_names: dict[str, str] = {name: name for name in self.adapters}
        self._lock = threading.Lock()
        self._merged: str | None = None

    @classmethod
    def from_loaded(
        cls, loaded: LoadedBase, model=None, adapters: dict[str, AdapterMeta | None] | None = None
    ) -> Captioner:
        """Wrap a base already loaded (e.g. the one being trained, ``model`` its PEFT wrapper) without loading anything.

        ``adapters`` names the PEFT adapters the model already has (the trainer's is ``"default"``).
        """
        self = cls.__new__(cls)
        self._start(loaded, model, adapters)
        return self

    @classmethod
    def from_model(cls, model, processor, base, adapters: dict[str, AdapterMeta | None] | None = None) -> Captioner:
        """Wrap a model already in memory (a merged one, say) without loading anything; its family is read
        from its config (:meth:`LoadedBase.of_model`). With a :class:`LoadedBase` at hand, use :meth:`from_loaded`.

        ``adapters`` names the PEFT adapters the model already has (the trainer's is ``"default"``).
        """
        return cls.from_loaded(LoadedBase.of_model(model, processor, base), model, adapters)

    @classmethod
    def for_adapter(
        cls,
        adapter: str | Path | Adapter,
        *,
        name: str | None = None,
        base: str | None = None,
        quantization: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
    ) -> Captioner:
        """Load an adapter's base the way the adapter was trained, then the adapter.

        The quantization, dtype and device come from the adapter's
        ``multimodal_lora.json``, fitted to this machine; each given argument
        overrides its recorded value (see :func:`multimodal_lora.model.loading.resolve`).

        Example:
            >>> captioner = Captioner.for_adapter("runs/football/adapter")          # int8 if trained in int8
            >>> captioner = Captioner.for_adapter("runs/football/adapter", quantization="none", dtype="bf16")
        """
        opened = open_adapter(adapter)
        choice = base_for([opened], base, quantization=quantization, dtype=dtype, device=device)
        self = cls.with_settings(choice.name, choice.revision, choice.settings)
        self.load_adapter(opened, name=name)
        return self

    @classmethod
    def for_adapters(
        cls,
        found: Found,
        base: str | None = None,
        *,
        quantization: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        purpose: str = "the demo",
    ) -> Captioner:
        """A captioner with the base and every adapter in ``found`` that fits it (the others go to ``found.problems``).

        The base is the one :func:`~multimodal_lora.adapter.base_for` decides for the set (the first
        recorded adapter's, loaded the way it was trained, unless ``base``, ``quantization``, ``dtype``
        or ``device`` say otherwise). ``purpose`` names the caller in the log line that says how.
        """
        adapters = list(found.opened.values())
        choice = base_for(adapters, base, quantization=quantization, dtype=dtype, device=device, purpose=purpose)
        self = cls.with_settings(choice.name, choice.revision, choice.settings)
        for name, opened in list(found.opened.items()):
            try:
                self.load_adapter(opened, name=name)
            except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the demo; it is listed
                if not isinstance(exc, (AdapterError, OSError)):
                    logger.exception("loading adapter %s failed", opened.directory)
                found.problems.append(f"unusable: {name}: {exc}")
                found.drop(name)
        return self

    @classmethod
    def with_settings(cls, base: str, revision: str | None, settings: LoadSettings) -> Captioner:
        """A captioner whose base is loaded with ``settings``."""
        return cls(
            base,
            revision=revision,
            device=settings.device,
            dtype=settings.dtype,
            quantization=settings.quantization,
            quant_type=settings.quant_type or "nf4",
        )

    @property
    def family(self):
        """The base's :class:`~multimodal_lora.families.Family` (decided when it loaded)."""
        return self.loaded.family

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def without_model(self) -> CaptionerView:
        """What this captioner knows without its model: names, tasks, prompts, lengths, image preparation
        (a :class:`~multimodal_lora.inference.view.CaptionerView` of the adapters loaded now).

        A server's HTTP process checks and prepares requests with it while the model runs
        in another process (:mod:`multimodal_lora.serve.engine_process`). It pickles, which a
        captioner with its model refuses to do, and it cannot generate.
        """
        return dataclasses.replace(self.view, adapters=dict(self.adapters))

    def __getstate__(self) -> dict:
        raise TypeError("a Captioner holding its model does not pickle; pickle captioner.without_model()")

    def load_adapter(self, path: str | Path | Adapter, name: str | None = None) -> str:
        """Load an adapter directory under ``name`` (default: the directory's name).

        ``name`` is only ours: any string works (a path with dots, spaces or any
        letters). PEFT gets a derived name that is always a valid module name
        (see :func:`peft_adapter_name`). Loading the same directory twice under
        the same name is a no-op that opens no file. ``path`` may be an adapter
        already opened (:func:`~multimodal_lora.adapter.open_adapter`).

        Raises:
            AdapterError: the directory is not a complete adapter, or it was
                trained on a different base.
        """
        adapter = path if isinstance(path, Adapter) else open_adapter(path)
        directory, meta = adapter.directory, adapter.meta
        name = name or _default_name(directory)
        if name in self.adapters:
            if self._paths.get(name) == directory.resolve():
                return name
            where = self._paths.get(name, "the model in memory")
            raise AdapterError(f"an adapter named {name!r} is already loaded (from {where}); choose another name")
        check_base_matches(directory, meta, self.base)
        self._note_other_settings(directory, meta)
        peft_name = peft_adapter_name(name)
        with self._lock:
            self._merge(None)  # adapters are added to unmerged weights
            # Checked against the model before PEFT changes it: a refused adapter leaves it as it was.
            check_fits(adapter, self.model, self.family)
            # The first adapter wraps the base in a PeftModel; later ones are added to
            # the same wrapper, so the base's weights are loaded exactly once.
            self.model = attach(self.model, adapter, peft_name)
        self.adapters[name] = meta
        self._paths[name] = directory.resolve()
        self._peft_names[name] = peft_name
        return name

    def caption(
        self,
        images: ImageSource | Sequence[ImageSource],
        adapter: str | None = None,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int | None = None,
    ) -> str | list[str]:
        """Caption one image (returns a string) or several (returns a list).

        Images are captioned ``batch_size`` at a time, each batch in one
        ``generate`` call; with greedy decoding a batch gives exactly the
        captions the images get one by one.

        Args:
            images: a path, the file's bytes, a ``PIL.Image``, or a list of them.
            adapter: the name of a loaded adapter, or ``None`` for the bare base.
            prompt: text the caption continues; defaults to the adapter's training prompt.
            max_new_tokens: the longest caption, in tokens.
            num_beams: beam search width (1: greedy).
            do_sample, temperature, top_p: sample instead of searching; the
                other two only apply with ``do_sample=True``.
            batch_size: images per ``generate`` call; ``None``: :attr:`batch_size`, chosen for the device.

        Raises:
            AdapterError: ``adapter`` is not loaded.
            ImageError: an image cannot be read (named in the message).
            ConfigError: a generation option is out of range.

        Example:
            >>> captioner.caption(["a.png", "b.png"], adapter="shapes", num_beams=3)
            ['a red circle', 'a blue square']
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        prompts = [self.caption_prompt(adapter, prompt)] * len(items)
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature,
            top_p=top_p, batch_size=batch_size,
        )  # fmt: skip
        out = self._generate(items, prompts, adapter, options)
        return out[0] if single else out

    def ask(
        self,
        images: ImageSource | Sequence[ImageSource],
        question: str | Sequence[str],
        adapter: str | None = None,
        *,
        max_new_tokens: int = 10,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int | None = None,
    ) -> str | list[str]:
        """Answer a question about an image, in the prompt template the adapter was trained with.

        Args:
            images: an image (path, bytes or ``PIL.Image``) or a list of them.
            question: one question for every image, or one per image.
            adapter: the name of a loaded adapter, or ``None`` for the bare base
                (which is asked in the default template, ``Question: ... Answer:``).
            max_new_tokens, num_beams, do_sample, temperature, top_p, batch_size: as in :meth:`caption`.

        Returns:
            The answer, or a list of answers for a list of images.

        Example:
            >>> captioner.ask("shape.png", "What colour is the shape?", adapter="shapes-vqa")
            'red'
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        questions = [question] * len(items) if isinstance(question, str) else list(question)
        if len(questions) != len(items):
            raise ConfigError(f"{len(items)} images but {len(questions)} questions; give one question, or one per image")
        prompts = [self.vqa_prompt(adapter, q) for q in questions]
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature,
            top_p=top_p, batch_size=batch_size,
        )  # fmt: skip
        out = self._generate(items, prompts, adapter, options)
        return out[0] if single else out

    # -- prompts and single batches (what a server needs) ----------------------------------------

    # What needs no model is the view's (:class:`~multimodal_lora.inference.view.CaptionerView`).

    def task(self, adapter: str | None) -> str:
        """``caption`` or ``vqa``: what ``adapter`` was trained for (the bare base captions)."""
        return self.view.task(adapter)

    def caption_prompt(self, adapter: str | None, prefix: str | None = None) -> str:
        """The text a caption continues: ``prefix``, else the adapter's training prompt, else nothing."""
        return self.view.caption_prompt(adapter, prefix)

    def vqa_prompt(self, adapter: str | None, question: str) -> str:
        """``question`` in the template the adapter was trained with (the base: ``Question: ... Answer:``)."""
        return self.view.vqa_prompt(adapter, question)

    def prompt_tokens(self, prompt: str, image: dict | None = None) -> int:
        """Tokens the model reads before generating: see :meth:`CaptionerView.prompt_tokens`."""
        return self.view.prompt_tokens(prompt, image)

    @property
    def context_length(self) -> int | None:
        """The most positions (prompt + generated) the language model has, or ``None`` (relative positions, T5)."""
        return self.view.context_length

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a prompt of ``prompt_tokens`` and ``max_new_tokens`` new ones fit the base's positions."""
        return self.view.fits(prompt_tokens, max_new_tokens)

    @property
    def stop_token_ids(self) -> set[int]:
        """The tokens that end a generation: the one training taught (BLIP-2 OPT: "\\n")."""
        return {self.layout.stop_token_id}

    @torch.no_grad()
    def generate_batch(
        self,
        images: Sequence,
        prompts: Sequence[str],
        adapter: str | None = None,
        *,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **generate_kwargs,
    ) -> torch.Tensor:
        """One ``generate`` call on decoded images, one prompt each; returns the new tokens, a row per image.

        The building block of :meth:`caption` and :meth:`ask`, for callers that
        need the tokens (a server counting them, or streaming them through a
        ``streamer`` in ``generate_kwargs``). Rows that stop early are padded.

        Args:
            images: ``PIL.Image`` objects (see :func:`~multimodal_lora.data.images.load_image`),
                or what :meth:`pixels` made of them.
            prompts: one prompt per image, as :meth:`caption_prompt` or :meth:`vqa_prompt` make them.
            adapter, max_new_tokens, num_beams, do_sample, temperature, top_p: as in :meth:`caption`.
            generate_kwargs: passed to ``generate`` (``streamer``, ``stopping_criteria``).
        """
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        self._meta(adapter)  # an unknown name fails before any work
        # Stop on the token training taught (the layout's), whatever the base's generation config says.
        kwargs = dict(**options.generate_kwargs(), eos_token_id=self.layout.stop_token_id, **generate_kwargs)
        batch = self.generation_inputs(list(images), list(prompts))
        with self.running(adapter):
            output = self.model.generate(**batch, **kwargs)
        return self.layout.new_tokens(output, batch)

    @contextmanager
    def running(self, adapter: str | None):
        """Hold the model with ``adapter`` active (``None``: the bare base) for one call of it.

        Choosing the adapter and running the model must not interleave with another
        thread's choice; a caller driving the model itself, one forward at a time (the
        server's decode loop), takes this around each forward.
        """
        with self._lock, self.using(adapter):
            yield

    # -- internals -------------------------------------------------------------------------

    def _meta(self, adapter: str | None) -> AdapterMeta | None:
        return self.view.meta(adapter)

    def _note_other_settings(self, directory: Path, meta: AdapterMeta | None) -> None:
        """Say so when an adapter joins a base loaded otherwise than the one it was trained on."""
        if meta is None or meta.load is None or self.settings is None:
            return
        trained, here = meta.load, self.settings
        if (trained.quantization, trained.dtype, trained.quant_type) != (here.quantization, here.dtype, here.quant_type):
            logger.info(
                "adapter %s was trained on a base loaded as %s; this base is loaded as %s",
                directory, trained.describe(), here.describe(),
            )  # fmt: skip

    @property
    def adapter_names(self) -> list[str]:
        """The names of the loaded adapters, in the order they were loaded."""
        return self.view.adapter_names

    @property
    def batch_size(self) -> int:
        """Images per ``generate`` call when a call does not say: 32 on a CPU, 64 on a GPU
        (:func:`~multimodal_lora.core.runtime.inference_batch_size`)."""
        return inference_batch_size(self.device)

    def merge(self, adapter: str) -> bool:
        """Fold ``adapter`` into the base's weights while it is the only one in use (the weights change in place).

        A merged adapter costs nothing per token: no extra LoRA matmuls. Asking for
        another adapter, or for the bare base, unmerges it first, so results stay those
        of the adapter asked for (up to float rounding). Quantized (int8, 4-bit) bases are
        never merged: their weights would be rounded again, changing the model.

        Returns:
            ``True`` when merged, ``False`` when the base is quantized (logged) and the adapter stays unmerged.
        """
        from multimodal_lora.model.base import is_quantized

        self._meta(adapter)
        if is_quantized(self.model):
            logger.info("not merging adapter %r: the base is quantized (int8/4-bit); it runs unmerged", adapter)
            return False
        with self._lock:
            self._merge(adapter)
        return True

    def _merge(self, adapter: str | None) -> None:
        """Make ``adapter`` the merged one (``None``: none merged). Called with the lock held."""
        if self._merged == adapter:
            return
        if self._merged is not None:
            self.model.unmerge_adapter()
            self._merged = None
        if adapter is not None:
            self.model.set_adapter(self._peft_names[adapter])
            self.model.merge_adapter([self._peft_names[adapter]])
            self._merged = adapter

    @torch.no_grad()
    def _generate(self, images, prompts, adapter, options: GenerationOptions) -> list[str]:
        batch_size = options.batch_size or self.batch_size
        self._meta(adapter)  # an unknown name fails before any image is read
        self.view.check_length(prompts, options.max_new_tokens)
        per_batch = {k: v for k, v in options.keywords().items() if k != "batch_size"}
        results: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = [load_image(i) for i in images[start : start + batch_size]]
            new_tokens = self.generate_batch(chunk, prompts[start : start + batch_size], adapter, **per_batch)
            texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            results.extend(t.strip() for t in texts)
        return results

    def pixels(self, image) -> dict[str, torch.Tensor]:
        """One decoded image as the model's inputs for it: see :meth:`CaptionerView.pixels`."""
        return self.view.pixels(image)

    def generation_inputs(self, images, prompts) -> dict[str, torch.Tensor]:
        """The layout's generation inputs for these prompts, and the images' pixels (or what
        :meth:`pixels` made of them), on the model's device: what ``generate`` is given."""
        inputs = self.layout.image_inputs
        if all(isinstance(image, dict) for image in images):  # already prepared by pixels()
            items = list(images)
        else:
            items = inputs.split(self.processor.image_processor(images, return_tensors="pt"))
        tokens = [inputs.image_tokens(item) for item in items]
        batch = self.layout.generation_inputs(self.processor.tokenizer, prompts, tokens)
        batch.update(inputs.token_inputs(batch["input_ids"]))
        dtype = self.model.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        out = {k: v.to(self.device) for k, v in batch.items()}
        for key, value in inputs.collate(items).items():
            out[key] = value.to(self.device, dtype=dtype) if value.is_floating_point() else value.to(self.device)
        return out

    def using(self, adapter: str | None):
        """A context in which ``adapter`` (or the bare base, for ``None``) is active.

        For callers that run the model themselves (a validation loss); ``caption``
        and ``ask`` use it under the lock.

        Raises:
            AdapterError: ``adapter`` is not loaded.
        """
        from peft import PeftModel

        self._meta(adapter)  # raises for an unknown name
        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if self._merged is not None:
            if adapter == self._merged:
                return nullcontext()
            self._merge(None)  # another adapter, or the bare base: the merged weights must go first
        if adapter is None:
            return self.model.disable_adapter()
        name = self._peft_names[adapter]
        if self.model.active_adapter != name:  # set_adapter walks every module: 5% of a lone request's time
            self.model.set_adapter(name)
        return nullcontext()


# -- the one-line API ----------------------------------------------------------------------------

CAPTIONERS: dict[tuple[str, str | None, LoadSettings], Captioner] = {}
"""The cache behind :func:`caption` and :func:`ask`: one :class:`Captioner` per (base, revision,
load settings). Adapters that share a base and the way it is loaded share one loaded base."""


def clear_cache() -> None:
    """Drop every cached :class:`Captioner` (and the memory of its base), and every adapter opened."""
    CAPTIONERS.clear()
    OPENED.clear()


def captioner_for(
    adapter: str | Path | None,
    base_model: str | None = None,
    *,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> tuple[Captioner, str | None]:
    """The cached captioner for an adapter, and the adapter's name in it.

    The base and how it is loaded come from the adapter's record (see
    :func:`multimodal_lora.model.loading.resolve`); ``base_model``, ``quantization``,
    ``dtype`` and ``device`` override them. Without an adapter: the bare
    ``base_model`` (default ``tiny``), loaded as today's defaults unless overridden.
    """
    opened = [open_adapter(adapter)] if adapter is not None else []
    choice: BaseChoice = base_for(opened, base_model, quantization=quantization, dtype=dtype, device=device)
    if choice.key not in CAPTIONERS:
        CAPTIONERS[choice.key] = Captioner.with_settings(choice.name, choice.revision, choice.settings)
    captioner = CAPTIONERS[choice.key]
    name = captioner.load_adapter(opened[0], name=str(opened[0].directory.resolve())) if opened else None
    return captioner, name


def caption(
    image: ImageSource | Sequence[ImageSource],
    adapter: str | Path | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 30,
    base_model: str | None = None,
    *,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> str | list[str]:
    """Caption an image (or a list of images) with a trained adapter.

    The base is loaded the way the adapter was trained (quantization, dtype,
    device kind, as its ``multimodal_lora.json`` records), falling back to the
    nearest setting this machine supports; one log line says which.

    Args:
        image: a path, a ``PIL.Image``, or a list of them.
        adapter: a directory written by the trainer; ``None`` captions with the base.
        prompt: text the caption continues (defaults to the adapter's training prompt).
        max_new_tokens: the longest caption, in tokens.
        base_model: the base to load; defaults to the one the adapter records, else ``tiny``.
        quantization, dtype, device: load the base this way instead (``"none"``,
            ``"int8"``, ``"4bit"``; ``"fp32"``, ``"bf16"``, ``"fp16"``; ``"cpu"``, ``"cuda"``...).

    Returns:
        A caption, or a list of captions for a list of images.

    Raises:
        ImageError: an image is missing or unreadable (named in the message).
        AdapterError: the adapter directory is incomplete or for another base.

    Example:
        >>> from multimodal_lora import caption
        >>> caption("photo.jpg", adapter="runs/tiny/adapter")
        'a red circle'
    """
    captioner, name = captioner_for(adapter, base_model, quantization=quantization, dtype=dtype, device=device)
    return captioner.caption(image, adapter=name, prompt=prompt, max_new_tokens=max_new_tokens)


def ask(
    image: ImageSource | Sequence[ImageSource],
    question: str,
    adapter: str | Path | None = None,
    max_new_tokens: int = 10,
    base_model: str | None = None,
    *,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> str | list[str]:
    """Answer a question about an image with a VQA adapter (same template as training).

    The base is loaded as in :func:`caption`: the way the adapter was trained,
    unless ``quantization``, ``dtype`` or ``device`` say otherwise.

    Example:
        >>> ask("shape.png", "What colour is the shape?", adapter="runs/tiny-vqa/adapter")
        'red'
    """
    captioner, name = captioner_for(adapter, base_model, quantization=quantization, dtype=dtype, device=device)
    return captioner.ask(image, question, adapter=name, max_new_tokens=max_new_tokens)


def _default_name(directory: Path) -> str:
    directory = directory.absolute()
    return (directory.parent.name if directory.name == "adapter" else directory.name) or str(directory)


def peft_adapter_name(name: str) -> str:
    """The name PEFT knows an adapter by: always a valid module name, one per ``name``.

    PEFT stores adapters as module attributes, so its names cannot contain "."
    (and should be identifiers); ours are paths or anything a user types. The
    readable tail is for debugging, the hash keeps two names that clean up the
    same way apart.
    """
    slug = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")[-32:]
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"adapter_{slug}_{digest}" if slug else f"adapter_{digest}"
