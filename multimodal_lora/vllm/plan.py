"""From our adapters to vLLM's terms: the base, the model names, the prompt layouts, the ``vllm serve`` line.

Everything here comes from the places that already know it: the adapters' records
(:mod:`multimodal_lora.adapter`), the families (:mod:`multimodal_lora.families`:
start token, stop token), the prompts of :class:`~multimodal_lora.inference.Captioner`
(``prompt_text`` and the default VQA template), and the serve naming (the base under its
name, each adapter under its own). vLLM is told in its own flags and in a chat template
this module writes, which reproduces our prompt for the model asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from multimodal_lora.vllm.support import VLLM_DTYPES, check_family, quantization_note

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
    dtype: str
    """vLLM's ``--dtype``."""
    bos: str
    """The start token's text, which the chat template writes before the prompt."""
    bos_token_id: int
    stop_token_id: int
    adapters: dict[str, Path] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)
    """Model name → layout, the base's included."""
    max_lora_rank: int = 16
    notes: tuple[str, ...] = ()
    """What the user should know (an int8/4-bit adapter served unquantized)."""


def make_plan(adapters: dict[str, Path], base: str | None, dtype: str | None = None, quantization: str | None = None) -> Plan:
    """The plan for serving ``base`` and ``adapters`` (name → directory) on vLLM.

    Args:
        adapters: what :func:`~multimodal_lora.adapter.search.collect_adapters` found.
        base: the base (default: the one the adapters record, else ``tiny``); a merged model's directory.
        dtype: our ``--dtype`` (default: as the first adapter was trained, else fp32).
        quantization: our ``--quantization``; vLLM serves unquantized (see :mod:`~multimodal_lora.vllm.support`).

    Raises:
        UserError: the family is not one vLLM serves (before anything loads).
    """
    from multimodal_lora.adapter import base_of, read_adapter
    from multimodal_lora.model import base_family, resolve_base

    metas = {name: read_adapter(directory) for name, directory in adapters.items()}
    if base is None:
        base = next((base_of(d, m)[0] for d, m in metas.values()), "tiny")
    notes = []
    # One vLLM server holds one base: adapters of another are left out and named (as our server does).
    for name, (directory, meta) in list(metas.items()):
        if base_of(directory, meta)[0] != base and (meta is None or meta.base.name != base):
            notes.append(f"left out: {name}: it belongs to the base {base_of(directory, meta)[0]!r}, not {base!r}")
            del metas[name]
    revision = next((base_of(d, m, base)[1] for d, m in metas.values()), None)
    family = base_family(base, revision)
    check_family(family.name, f"{base!r}")
    first = next((m.load for _, m in metas.values() if m is not None and m.load is not None), None)
    ours = dtype or (first.dtype if first is not None else "fp32")
    for name, (_, meta) in metas.items():
        trained = quantization or (meta.load.quantization if meta is not None and meta.load is not None else "none")
        note = quantization_note(name, trained, ours)
        if note:
            notes.append(note)
    if quantization not in (None, "none") and not metas:
        notes.append(quantization_note(base, quantization, ours))
    model = resolve_base(base)
    layout, tokenizer = _family_layout(family, model, revision)
    layouts = {base: Layout("caption")}
    for name, (_, meta) in metas.items():
        layouts[name] = _layout(meta)
    ranks = [adapter_rank(d) for d, _ in metas.values()]
    return Plan(
        base_name=base,
        model=model,
        revision=revision,
        family=family.name,
        dtype=VLLM_DTYPES[ours],
        bos=tokenizer.convert_ids_to_tokens(layout.bos_token_id),
        bos_token_id=layout.bos_token_id,
        stop_token_id=layout.stop_token_id,
        adapters={name: directory for name, (directory, _) in metas.items()},
        layouts=layouts,
        max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= max(ranks, default=1)),
        notes=tuple(notes),
    )


def _family_layout(family, model: str, revision: str | None):
    """The family's token layout for the base, from its config, generation config and processor (no weights)."""
    from transformers import GenerationConfig

    from multimodal_lora.model import base_config, load_processor

    config = base_config(model, revision)
    try:
        generation = GenerationConfig.from_pretrained(model, revision=revision)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    processor = load_processor(model, revision)
    return family.make_layout(config, generation, processor), processor.tokenizer


def _layout(meta) -> Layout:
    """The prompt an adapter was trained with, as ``Captioner.caption_prompt`` / ``vqa_prompt`` build it."""
    from multimodal_lora.data.encoding import prompt_text
    from multimodal_lora.inference import DEFAULT_PROMPT_TEMPLATE

    task = meta.task if meta is not None else "caption"
    if task == "vqa":
        template = meta.prompt_template if meta is not None else DEFAULT_PROMPT_TEMPLATE
        before, after = prompt_text("vqa", "\0", None, template).split("\0", 1)
        return Layout("vqa", before=before, after=after)
    return Layout("caption", prompt=prompt_text("caption", None, meta.prompt if meta is not None else None, DEFAULT_PROMPT_TEMPLATE))


def adapter_rank(directory: Path) -> int:
    """The largest LoRA rank in an adapter (``r``, or a larger one in ``rank_pattern``)."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
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
  {{- %(bos)s ~ layout.before ~ text ~ layout.after -}}
{%%- else -%%}
  {{- %(bos)s ~ (text if text else layout.prompt) -}}
{%%- endif -%%}
"""


def chat_template(plan: Plan) -> str:
    """The Jinja chat template that gives vLLM our prompt for each served model."""
    layouts = {name: {"task": lo.task, "prompt": lo.prompt, "before": lo.before, "after": lo.after} for name, lo in plan.layouts.items()}
    return _TEMPLATE % {
        "base": plan.base_name.replace("#", ""),
        "layouts": json.dumps(layouts, ensure_ascii=False),
        "base_literal": json.dumps(plan.base_name),
        "bos": json.dumps(plan.bos),
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
    plan: Plan, *, host: str, port: int, api_key: str | None, default_max_tokens: int, cpu: bool, extra: list[str]
) -> Command:
    """The ``vllm serve`` line for ``plan``.

    Args:
        api_key: the key clients must send (``None``: none).
        default_max_tokens: ``max_tokens`` when a request gives none (our server's default).
        cpu: add what vLLM's CPU backend needs (``VLLM_CPU_KVCACHE_SPACE``).
        extra: vLLM's own flags, passed through last (so they win): ``--tensor-parallel-size 4`` ...
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
    ]  # fmt: skip
    if plan.adapters:
        args += ["--enable-lora", "--max-lora-rank", str(plan.max_lora_rank), "--max-loras", str(len(plan.adapters))]
        args += ["--lora-modules", *(f"{name}={directory}" for name, directory in plan.adapters.items())]
    args += extra
    # The middleware makes vLLM stop where caption() stops: on the family's stop token alone.
    return Command(args, {**runtime_env(cpu), "MMLORA_VLLM_STOP_TOKEN_IDS": str(plan.stop_token_id)}, api_key)


def runtime_env(cpu: bool) -> dict[str, str]:
    """The environment vLLM's interpreter runs our runtime code in (CPU: what vLLM's CPU backend needs)."""
    env = {"PYTHONPATH": str(RUNTIME)}
    if cpu:
        # vllm-cpu 0.32.0 cannot infer its platform (it looks for a distribution named vllm): name it.
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    return env
