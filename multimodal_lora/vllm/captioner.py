"""``caption --engine vllm``: a captioner whose generation runs in vLLM's interpreter.

:class:`VllmCaptioner` has the part of :class:`~multimodal_lora.inference.captioner.Captioner`
that the caption command calls (``caption``, ``ask``, ``batch_size``, ``processor``),
so the command's own code (:mod:`~multimodal_lora.inference.captioning.run`,
:mod:`~multimodal_lora.inference.captioning.output`) keeps the input order, whole rows,
``--resume`` and job ownership exactly as with the built-in engine. Each batch's
decoded, resized images and their prompt token ids (our family's layout: start
token, then the prompt) go to ``runtime/mmlora_vllm_caption_worker.py`` over a pipe;
the texts come back in order and are stripped as ``caption()`` strips them.

Data parallel (``--data-parallel-size N``) is N workers, each with its own vLLM engine
and its own ``tensor × pipeline`` GPUs; a batch is split between them and put back in order.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from multimodal_lora.core.errors import UserError
from multimodal_lora.vllm import env
from multimodal_lora.vllm.plan import RUNTIME, Plan, make_plan, runtime_env

logger = logging.getLogger(__name__)

WORKER = RUNTIME / "mmlora_vllm_caption_worker.py"
DEFAULT_BATCH_SIZE = 256
"""Images per round: vLLM schedules them itself; large rounds keep it busy between pipe round trips."""


@dataclass(frozen=True)
class Parallel:
    """vLLM's parallelism for batch captioning."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    gpu_memory_utilization: float | None = None


class VllmCaptioner:
    """Captions and answers through vLLM, with the adapter at ``adapter`` (``None``: the bare base).

    Args:
        adapter: the adapter directory (its record gives the base, dtype and prompts).
        base, dtype, quantization: as the caption command's options.
        python: the interpreter with vLLM (``--vllm-python``; found as :func:`~multimodal_lora.vllm.env.find_python`
            says, after the family is checked).
        parallel: tensor, pipeline and data parallel sizes.
        cpu: vLLM runs on the CPU.

    Raises:
        UserError: the family is not one vLLM serves (before vLLM starts), or the worker failed.
    """

    def __init__(self, adapter, base, dtype, quantization, *, python: str | None, parallel: Parallel, cpu: bool, log_dir: Path):
        from multimodal_lora.adapter import open_adapter
        from multimodal_lora.families import family_named
        from multimodal_lora.model.base import load_processor

        # "adapter" is vLLM's name for it; nothing outside this process sees it.
        adapters = {"adapter": open_adapter(adapter)} if adapter is not None else {}
        self.plan: Plan = make_plan(adapters, base, dtype, quantization, purpose=None)
        for note in self.plan.notes:
            logger.warning("%s", note)
        self.name = next(iter(self.plan.adapters), None)
        self.processor = load_processor(self.plan.model, self.plan.revision, family=family_named(self.plan.family))
        self.batch_size = DEFAULT_BATCH_SIZE
        self.parallel = parallel
        python = env.find_python(python)
        env.check_modules(python, self.plan.needs, f"{self.plan.base_name!r} ({self.plan.architecture} in vLLM)")
        self._workers = [
            _Worker(python, self._setup(cpu), _devices(i, parallel), cpu, log_dir / f"caption-{os.getpid()}-{i}.log")
            for i in range(parallel.data)
        ]
        for worker in self._workers:
            worker.wait_ready()

    def _setup(self, cpu: bool) -> dict:
        llm = {
            "model": self.plan.model, "revision": self.plan.revision, "dtype": self.plan.dtype,
            "tensor_parallel_size": self.parallel.tensor, "pipeline_parallel_size": self.parallel.pipeline,
            # The default pre-compiles and captures graphs for many batch shapes: minutes on a CPU, for nothing here.
            "enforce_eager": cpu,
            "hf_overrides": self.plan.hf_overrides(),
        }  # fmt: skip
        if self.parallel.gpu_memory_utilization is not None:
            llm["gpu_memory_utilization"] = self.parallel.gpu_memory_utilization
        if self.plan.adapters:
            llm.update(enable_lora=True, max_lora_rank=self.plan.max_lora_rank, max_loras=1)
        lora = [self.name, str(self.plan.adapters[self.name])] if self.name else None
        return {"llm": llm, "lora": lora}

    # -- what the caption command calls (Captioner's signatures) --------------------------------

    def caption(self, images, adapter=None, prompt=None, max_new_tokens=30, num_beams=1, do_sample=False,
                temperature=1.0, top_p=1.0, batch_size=None) -> list[str]:  # fmt: skip
        """Captions for decoded images: the adapter's training prompt (or ``prompt``) continued."""
        layout = self.plan.layouts[adapter or self.plan.base_name]
        text = prompt if prompt is not None else layout.prompt
        return self._generate(images, [text] * len(images), max_new_tokens, num_beams, do_sample, temperature, top_p)

    def ask(self, images, questions, adapter=None, max_new_tokens=10, num_beams=1, do_sample=False,
            temperature=1.0, top_p=1.0, batch_size=None) -> list[str]:  # fmt: skip
        """Answers, each question in the adapter's template (``Question: ... Answer:`` by default)."""
        layout = self.plan.layouts[adapter or self.plan.base_name]
        if isinstance(questions, str):
            questions = [questions] * len(images)
        if layout.task != "vqa":  # the bare base or a caption adapter: the default template, as ask() does
            from multimodal_lora.data.encoding import prompt_text
            from multimodal_lora.inference.captioner import DEFAULT_PROMPT_TEMPLATE

            prompts = [prompt_text("vqa", q, None, DEFAULT_PROMPT_TEMPLATE) for q in questions]
        else:
            prompts = [layout.before + q + layout.after for q in questions]
        return self._generate(images, prompts, max_new_tokens, num_beams, do_sample, temperature, top_p)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()

    def __enter__(self) -> VllmCaptioner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one batch --------------------------------------------------------------------------------

    def _generate(self, images, prompts, max_new_tokens, num_beams, do_sample, temperature, top_p) -> list[str]:
        if num_beams != 1:
            raise UserError("--engine vllm decodes greedily or samples; beam search (--num-beams) is the built-in engine's")
        sampling = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0}
        # Stop where caption() stops: on the family's stop token alone, not also on the tokenizer's EOS.
        sampling.update(ignore_eos=True, stop_token_ids=[self.plan.stop_token_id])
        if do_sample:
            sampling["top_p"] = top_p
        ids = [self.plan.prompt_ids(self.processor.tokenizer, p) for p in prompts]
        encoded = [_encode(image) for image in images]
        share = -(-len(images) // len(self._workers))
        jobs = [
            (worker, {"images": encoded[i * share : (i + 1) * share], "prompts": ids[i * share : (i + 1) * share], "sampling": sampling})
            for i, worker in enumerate(self._workers)
            if encoded[i * share : (i + 1) * share]
        ]
        if len(jobs) == 1:
            texts = jobs[0][0].generate(jobs[0][1])
        else:
            with ThreadPoolExecutor(len(jobs)) as pool:
                texts = [t for part in pool.map(lambda job: job[0].generate(job[1]), jobs) for t in part]
        return [t.strip() for t in texts]  # as caption() strips what it decodes


def add_arguments(group) -> None:
    """The caption command's vLLM options (vLLM's own names)."""
    group.add_argument("--vllm-python", help="the interpreter with vLLM (default: see python -m multimodal_lora.vllm where)")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: GPUs one model is split across")
    group.add_argument("--pipeline-parallel-size", type=int, default=1, help="--engine vllm: pipeline stages (GPUs or nodes)")
    group.add_argument("--data-parallel-size", type=int, default=1, help="--engine vllm: model copies sharing the images")
    group.add_argument("--gpu-memory-utilization", type=float, help="--engine vllm: share of each GPU's memory vLLM takes")


def from_args(args) -> VllmCaptioner:
    """The captioner the caption command's ``args`` ask for (``--engine vllm``)."""
    from multimodal_lora.cache import cache_dir
    from multimodal_lora.vllm.serve import on_cpu

    if min(args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size) < 1:
        raise UserError("--tensor-parallel-size, --pipeline-parallel-size and --data-parallel-size must be at least 1")
    parallel = Parallel(args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size, args.gpu_memory_utilization)
    return VllmCaptioner(
        args.adapter, args.base, args.dtype, args.quantization, python=args.vllm_python,
        parallel=parallel, cpu=on_cpu(args.device), log_dir=cache_dir() / "vllm" / "logs",
    )  # fmt: skip


def _encode(image) -> list:
    image = image.convert("RGB")
    return ["RGB", image.width, image.height, base64.b64encode(image.tobytes()).decode()]


def _devices(index: int, parallel: Parallel) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for data-parallel worker ``index`` (``None``: one worker, leave it as set)."""
    if parallel.data == 1:
        return None
    per = parallel.tensor * parallel.pipeline
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        gpus = [str(i) for i in range(parallel.data * per)]
    mine = gpus[index * per : (index + 1) * per]
    if len(mine) < per:
        raise UserError(
            f"--data-parallel-size {parallel.data} × --tensor-parallel-size {parallel.tensor} × --pipeline-parallel-size "
            f"{parallel.pipeline} needs {parallel.data * per} GPUs; {len(gpus)} are visible"
        )
    return ",".join(mine)


class _Worker:
    """One vLLM engine in its own interpreter, driven over its standard input and output."""

    def __init__(self, python: Path, setup: dict, devices: str | None, cpu: bool, log: Path):
        extra = runtime_env(cpu)
        if devices is not None and not cpu:
            extra["CUDA_VISIBLE_DEVICES"] = devices
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [str(python), str(WORKER)], env=env.clean_env(extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, text=True, encoding="utf-8", start_new_session=True,
            )  # fmt: skip
        self._send(setup)

    def wait_ready(self) -> None:
        self._receive("starting")

    def generate(self, job: dict) -> list[str]:
        self._send(job)
        return self._receive("captioning")["texts"]

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail("captioning")

    def _receive(self, doing: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._fail(doing)
        reply = json.loads(line)
        if "error" in reply:
            self._fail(doing, reply["error"])
        return reply

    def _fail(self, doing: str, error: str | None = None):
        from multimodal_lora.vllm.serve import tail

        self.proc.wait()
        what = f": {error}" if error else f" (status {self.proc.returncode})"
        raise UserError(f"vLLM stopped while {doing}{what}; the end of its log ({self.log}):\n{tail(self.log)}")

    def close(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.stdin.close()  # the worker's loop ends, and vLLM shuts its engine down
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine processes left behind
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
