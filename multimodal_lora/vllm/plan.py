"""From our adapters to vLLM's terms: the base, the model names, the prompt layouts, the ``vllm serve`` line.

Everything here comes from the places that already know it: the adapters as opened once and
the base they need (:mod:`multimodal_lora.adapter`: ``open_adapter``, ``base_for``), the families
(:mod:`multimodal_lora.families`: vLLM's architecture, the prompt's frame, the stop token), the
prompts of :class:`~multimodal_lora.inference.captioner.Captioner` (``prompt_text`` and the default VQA template), and the serve naming (the base under its
name, each adapter under its own). vLLM is told in its own flags and in a chat template
this module writes, which reproduces our prompt for the model asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from multimodal_lora.core.runtime import full_dtype_name
from multimodal_lora.vllm.support import check_family, check_parts, quantization_note

if TYPE_CHECKING:
    from multimodal_lora.adapter import Adapter

logger = logging.getLogger(__name__)

RUNTIME = Path(__file__).resolve().parent / "runtime"
"""The code that runs in vLLM's interpreter (on its ``PYTHONPATH``)."""
MIDDLEWARE = "mmlora_vllm_middleware.Middleware"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``--max-lora-rank`` values vLLM accepts."""
CPU_KVCACHE_GIB = "1"
"""``VLLM_CPU_KVCACHE_SPACE`` when unset: 1 GiB holds hundreds of BLIP-2 OPT tiny sequences and a few
dozen 2.7B ones; set it higher for big batches at full size."""


@dataclass(frozen=True)
class Layout:
    """How one served model frames the user's text (what ``caption_prompt`` / ``vqa_prompt`` do)."""

    task: str
    """``caption`` or ``vqa``."""
    prompt: str = ""
    """Caption: the text continued when the user sends none (the adapter's training prompt)."""
    before: str = ""
    after: str = ""
    """VQA: the template around the question (``Question: `` and `` Answer:`` by default)."""


@dataclass(frozen=True)
class Plan:
    """What vLLM is given to serve or caption as our engine does."""

    base_name: str
    """The base's model name (as our server names it: ``tiny``, a hub id, a merged model's path)."""
    model: str
    """What vLLM loads: a directory or a hub id."""
    revision: str | None
    family: str
    architecture: str
    """vLLM's architecture for the family (its :class:`~multimodal_lora.families.base.VllmRoute`)."""
    needs: tuple[str, ...]
    """Modules vLLM's interpreter must have for it (``VllmRoute.needs``)."""
    dtype: str
    """vLLM's ``--dtype``."""
    prompt_before: str
    prompt_after: str
    """The family's frame around the prompt text (BLIP-2 OPT: the start token ``</s>`` before, nothing after)."""
    stop_token_id: int
    adapters: dict[str, Path] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)
    """Model name → layout, the base's included."""
    max_lora_rank: int = 16
    notes: tuple[str, ...] = ()
    """What the user should know (an int8/4-bit adapter served unquantized, an adapter left out)."""

    def hf_overrides(self) -> dict:
        """vLLM's ``hf_overrides``: the family's architecture, whatever the checkpoint's ``config.json`` names
        (SmolVLM2's names ``SmolVLMForConditionalGeneration``; its family routes to vLLM's Idefics3 class)."""
        return {"architectures": [self.architecture]}

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        """The token ids vLLM is given for ``text`` (a caption prompt or a framed question): the family's frame
        around it, tokenized as vLLM tokenizes a rendered chat prompt (no special tokens added)."""
        return list(tokenizer(self.prompt_before + text + self.prompt_after, add_special_tokens=False).input_ids)


def make_plan(
    adapters: Mapping[str, Path | Adapter],
    base: str | None,
    dtype: str | None = None,
    quantization: str | None = None,
    *,
    purpose: str | None = "vLLM's server",
) -> Plan:
    """The plan for serving ``base`` and ``adapters`` (name → directory or opened adapter) on vLLM.

    The base is the one :func:`~multimodal_lora.adapter.base_for` decides, as for the built-in
    engine: for a set of adapters served together (``purpose`` names who), ``base`` if given, else
    the first recorded adapter's; for one adapter (``purpose=None``: batch captioning), its own.
    Adapters of another base are left out, with a note (one vLLM server holds one base).

    Args:
        adapters: what :func:`~multimodal_lora.adapter.collect_adapters` found (``Found.opened``), or directories.
        base: the base; a merged model's directory.
        dtype: our ``--dtype`` (default: as the deciding adapter was trained, fitted to this machine, else fp32).
        quantization: our ``--quantization``; vLLM serves unquantized (see :mod:`~multimodal_lora.vllm.support`).

    Raises:
        UserError: the family is not one vLLM serves (before anything loads).
    """
    from multimodal_lora.adapter import adapter_parts, base_for, base_name_for, base_of, open_adapter
    from multimodal_lora.core.errors import AdapterError
    from multimodal_lora.model.base import base_family, resolve_base

    opened = {name: open_adapter(adapter) for name, adapter in adapters.items()}
    chosen, revision = base_name_for(list(opened.values()), base, purpose=purpose)
    notes = []
    for name, adapter in list(opened.items()):
        try:
            own = base_of(adapter.directory, adapter.meta, None, adapter.config)[0]
        except AdapterError:
            continue  # nothing says which base: served on this one, as the built-in server does
        if own != chosen:
            notes.append(f"left out: {name}: it belongs to the base {own!r}, not {chosen!r}")
            del opened[name]
    revision = revision or next((base_of(a.directory, a.meta, chosen, a.config)[1] for a in opened.values()), None)
    family = base_family(chosen, revision)
    route = check_family(family.name, f"{chosen!r}").vllm  # refused here, in one line, before anything else is said
    for name, adapter in opened.items():
        check_parts(name, adapter_parts(adapter, family))  # from its tensors: a plain PEFT adapter too
    ours = base_for(list(opened.values()), chosen, dtype=dtype, purpose=purpose).settings.dtype
    for name, adapter in opened.items():
        recorded = adapter.meta.load if adapter.meta is not None else None
        note = quantization_note(name, quantization or (recorded.quantization if recorded is not None else "none"), ours)
        if note:
            notes.append(note)
    if quantization not in (None, "none") and not opened:
        notes.append(quantization_note(chosen, quantization, ours))
    model = resolve_base(chosen)
    layout, tokenizer = _family_layout(family, model, revision)
    before, after = route.prompt_frame(tokenizer, layout)
    layouts = {chosen: Layout("caption")}
    layouts.update((name, _layout(adapter.meta)) for name, adapter in opened.items())
    ranks = [adapter_rank(adapter.config) for adapter in opened.values()]
    return Plan(
        base_name=chosen,
        model=model,
        revision=revision,
        family=family.name,
        architecture=route.architecture,
        needs=route.needs,
        dtype=full_dtype_name(ours),
        prompt_before=before,
        prompt_after=after,
        stop_token_id=layout.stop_token_id,
        adapters={name: adapter.directory for name, adapter in opened.items()},
        layouts=layouts,
        max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= max(ranks, default=1)),
        notes=tuple(notes),
    )


def _family_layout(family, model: str, revision: str | None):
    """The family's token layout for the base, from its config, generation config and processor (no weights)."""
    from transformers import GenerationConfig

    from multimodal_lora.model.base import base_config, load_processor

    config = base_config(model, revision)
    try:
        generation = GenerationConfig.from_pretrained(model, revision=revision)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    processor = load_processor(model, revision, family=family)
    return family.make_layout(config, generation, processor), processor.tokenizer


def _layout(meta) -> Layout:
    """The prompt an adapter was trained with, as ``Captioner.caption_prompt`` / ``vqa_prompt`` build it."""
    from multimodal_lora.data.encoding import prompt_text
    from multimodal_lora.inference.captioner import DEFAULT_PROMPT_TEMPLATE

    task = meta.task if meta is not None else "caption"
    if task == "vqa":
        template = meta.prompt_template if meta is not None else DEFAULT_PROMPT_TEMPLATE
        before, after = prompt_text("vqa", "\0", None, template).split("\0", 1)
        return Layout("vqa", before=before, after=after)
    return Layout("caption", prompt=prompt_text("caption", None, meta.prompt if meta is not None else None, DEFAULT_PROMPT_TEMPLATE))


def adapter_rank(config: dict) -> int:
    """The largest LoRA rank in an adapter's ``adapter_config.json`` (``r``, or a larger one in ``rank_pattern``)."""
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


# --- the chat template ------------------------------------------------------------------------------

# The built-in server's rule (serve/protocol.py, serve/app.py): the last user message's text parts,
# each stripped, the blank ones dropped, joined by a space. A caption model continues that text, or
# its training prompt when there is none; a VQA model puts it in its template, and needs one.
_TEMPLATE = """\
{#- Written by multimodal_lora (vllm/plan.py) for %(base)s: our prompts, per model. -#}
{%%- set layouts = %(layouts)s -%%}
{%%- set layout = layouts.get(mmlora_model, layouts[%(base_literal)s]) if mmlora_model is defined else layouts[%(base_literal)s] -%%}
{%%- set ns = namespace(texts=[]) -%%}
{%%- for message in messages if message.role == 'user' -%%}
  {%%- if loop.last -%%}
    {%%- if message.content is string -%%}
      {%%- if message.content.strip() -%%}{%%- set ns.texts = [message.content.strip()] -%%}{%%- endif -%%}
    {%%- else -%%}
      {%%- for part in message.content if part.type == 'text' and part.text and part.text.strip() -%%}
        {%%- set ns.texts = ns.texts + [part.text.strip()] -%%}
      {%%- endfor -%%}
    {%%- endif -%%}
  {%%- endif -%%}
{%%- endfor -%%}
{%%- set text = ns.texts | join(' ') -%%}
{%%- if layout.task == 'vqa' -%%}
  {%%- if not text -%%}{{- raise_exception('this model answers questions; add a text part with the question') -}}{%%- endif -%%}
  {{- %(before)s ~ layout.before ~ text ~ layout.after ~ %(after)s -}}
{%%- else -%%}
  {{- %(before)s ~ (text if text else layout.prompt) ~ %(after)s -}}
{%%- endif -%%}
"""


def chat_template(plan: Plan) -> str:
    """The Jinja chat template that gives vLLM our prompt for each served model."""
    layouts = {name: {"task": lo.task, "prompt": lo.prompt, "before": lo.before, "after": lo.after} for name, lo in plan.layouts.items()}
    return _TEMPLATE % {
        "base": plan.base_name.replace("#", ""),
        "layouts": json.dumps(layouts, ensure_ascii=False),
        "base_literal": json.dumps(plan.base_name),
        "before": json.dumps(plan.prompt_before),
        "after": json.dumps(plan.prompt_after),
    }


def write_chat_template(plan: Plan) -> Path:
    """The chat template in the cache, named by its content (so a printed command keeps working)."""
    from multimodal_lora.cache import cache_dir

    text = chat_template(plan)
    path = cache_dir() / "vllm" / f"chat-template-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jinja"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


# --- the command ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """The built-in server's request limits (``serve --max-body-bytes`` ...), as vLLM is made to apply them."""

    max_body_bytes: int
    max_image_bytes: int
    max_pixels: int
    remote_hosts: tuple[str, ...] | None = None
    """Hosts remote image URLs may come from (``--allowed-hosts``); ``None``: none is fetched."""

    def env(self) -> dict[str, str]:
        """Our middleware's limits, and vLLM's own for pixels and downloads."""
        env = {
            "MMLORA_VLLM_MAX_BODY_BYTES": str(self.max_body_bytes),
            "MMLORA_VLLM_MAX_IMAGE_BYTES": str(self.max_image_bytes),
            "VLLM_MAX_IMAGE_PIXELS": str(self.max_pixels),
            # vLLM counts whole MiB; rounded up, so no image our limit allows is refused.
            "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": str(-(-self.max_image_bytes // 2**20)),
        }
        if self.remote_hosts is None:
            env["MMLORA_VLLM_REFUSE_REMOTE_IMAGES"] = "1"
        return env

    def args(self) -> list[str]:
        return ["--allowed-media-domains", *self.remote_hosts] if self.remote_hosts else []


@dataclass(frozen=True)
class Command:
    """``vllm serve`` as arguments and the environment it needs."""

    args: list[str]
    """After ``vllm serve``."""
    env: dict[str, str]
    api_key: str | None = field(default=None, repr=False)
    """Given to vLLM as ``VLLM_API_KEY`` (not on its command line, which every user of the machine can read)."""

    def run_env(self) -> dict[str, str]:
        """What the server process gets on top of ours."""
        return {**self.env, **({"VLLM_API_KEY": self.api_key} if self.api_key else {})}

    def shell(self, program: str = "vllm serve") -> str:
        """The line a user runs (containers, Kubernetes, Ray Serve): ``ENV=... vllm serve ...``.

        The API key stays a reference to ``$MULTIMODAL_LORA_API_KEY``, never the secret itself."""
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        if self.api_key:
            env.append('VLLM_API_KEY="$MULTIMODAL_LORA_API_KEY"')
        return " ".join([*env, program, *map(shlex.quote, self.args)])


def serve_command(
    plan: Plan,
    *,
    host: str,
    port: int,
    api_key: str | None,
    default_max_tokens: int,
    cpu: bool,
    extra: list[str],
    limits: RequestLimits,
) -> Command:
    """The ``vllm serve`` line for ``plan``.

    Args:
        api_key: the key clients must send (``None``: none).
        default_max_tokens: ``max_tokens`` when a request gives none (our server's default).
        cpu: add what vLLM's CPU backend needs (``VLLM_CPU_KVCACHE_SPACE``).
        extra: vLLM's own flags, passed through last (so they win): ``--tensor-parallel-size 4`` ...
        limits: the built-in server's request limits, applied by our middleware and vLLM's own settings.
    """
    template = write_chat_template(plan)
    # Greedy unless a request asks otherwise (as our server and caption()), and our default length.
    generation = {"temperature": 0.0, "max_new_tokens": default_max_tokens}
    args = [plan.model]
    if plan.revision:
        args += ["--revision", plan.revision]
    args += [
        "--served-model-name", plan.base_name,
        "--dtype", plan.dtype,
        "--host", host,
        "--port", str(port),
        "--chat-template", str(template),
        "--chat-template-content-format", "openai",
        "--middleware", MIDDLEWARE,
        "--override-generation-config", json.dumps(generation),
        "--hf-overrides", json.dumps(plan.hf_overrides()),
    ]  # fmt: skip
    if plan.adapters:
        # One slot more than adapters, never filled: vllm-cpu 0.32's LoRA ops index the stacked adapter weights
        # with -1 for a row of the bare base, which reads the last slot. Full, that slot held an adapter, and a
        # base request batched with adapter requests was answered with that adapter (27 and 28 of 96 mixed
        # requests, 0 of 96 with the spare slot; docs/serving.md). Empty, it is zeros: no LoRA, as asked.
        args += ["--enable-lora", "--max-lora-rank", str(plan.max_lora_rank), "--max-loras", str(len(plan.adapters) + 1)]
        args += ["--lora-modules", *(f"{name}={directory}" for name, directory in plan.adapters.items())]
    args += [*limits.args(), *extra]
    # The middleware makes vLLM stop where caption() stops: on the family's stop token alone.
    env = {**runtime_env(cpu), "MMLORA_VLLM_STOP_TOKEN_IDS": str(plan.stop_token_id), **limits.env()}
    return Command(args, env, api_key)


def runtime_env(cpu: bool) -> dict[str, str]:
    """The environment vLLM's interpreter runs our runtime code in (CPU: what vLLM's CPU backend needs)."""
    env = {"PYTHONPATH": str(RUNTIME)}
    if cpu:
        # vllm-cpu 0.32.0 cannot infer its platform (it looks for a distribution named vllm): name it.
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    return env
