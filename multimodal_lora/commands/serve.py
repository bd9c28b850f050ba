"""The serve command (``python -m multimodal_lora.serve``): load the base and adapters, start uvicorn.

    python -m multimodal_lora.serve                                   # adapters under runs/, http://127.0.0.1:8000/v1
    python -m multimodal_lora.serve --adapter shapes=runs/tiny/adapter --port 8001
    MULTIMODAL_LORA_API_KEY=... python -m multimodal_lora.serve --host 0.0.0.0

Safe by default: it binds 127.0.0.1, and binding anything else needs an API
key; remote image URLs are not fetched unless ``--allow-remote-images`` names
the hosts; bodies, pixels and the queue are limited.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
from pathlib import Path

from multimodal_lora.commands import add_load_arguments, run_cli
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.data.images import MAX_PIXELS

logger = logging.getLogger(__name__)

API_KEY_ENV = "MULTIMODAL_LORA_API_KEY"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_adapter_args(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` pairs into a dict, refusing malformed or repeated names."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter {value!r}: expected NAME=DIR, e.g. --adapter shapes=runs/tiny/adapter")
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = Path(directory)
    return adapters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.serve",
        description="An OpenAI-compatible chat-completions server for a base and its adapters, with request batching.",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--adapters-dir", default="runs", help="directory searched for adapters, as the demo's (default: runs)"
    )
    model.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve this adapter under NAME (repeatable)",
    )
    model.add_argument("--base", help="base model (default: the base the adapters record, else tiny)")
    add_load_arguments(model, what="the base")
    model.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's choice)")
    _add_network_arguments(parser.add_argument_group("network and safety"))
    _add_engine_arguments(parser)
    _add_batching_arguments(parser.add_argument_group("batching"))
    return parser


def _add_network_arguments(net) -> None:
    net.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else needs --api-key)"
    )
    net.add_argument("--port", type=int, default=DEFAULT_PORT)
    net.add_argument(
        "--api-key", default=None, help=f"clients must send 'Authorization: Bearer KEY' (or set {API_KEY_ENV})"
    )
    net.add_argument(
        "--max-body-bytes", type=int, default=25 * 1024 * 1024, help="largest request body (default 25 MiB)"
    )
    net.add_argument(
        "--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest encoded image (default 20 MiB)"
    )
    net.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest image, width × height (default 40 M)")
    net.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs from --allowed-hosts (public addresses only)",
    )
    net.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated host names remote images may come from ('*': any public host)",
    )


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group(
        "engine", "--engine vllm: vLLM's server (BLIP-2 OPT; see docs/serving.md); flags this command does not know "
        "go to vLLM (--tensor-parallel-size 4 ...)"
    )
    engine.add_argument(
        "--engine", choices=["builtin", "vllm"], default="builtin",
        help="builtin: this package's server, every family, int8/4-bit (default); vllm: vLLM's OpenAI server",
    )  # fmt: skip
    engine.add_argument("--vllm-python", help="the interpreter with vLLM (default: see python -m multimodal_lora.vllm where)")
    engine.add_argument("--print-command", action="store_true", help="--engine vllm: print the vllm serve line, start nothing")
    engine.add_argument("--vllm-log", help="--engine vllm: vLLM's log file (default: under the cache)")
    engine.add_argument(
        "--vllm-start-timeout", type=float, default=600.0, help="--engine vllm: seconds to wait for /health (default 600)"
    )


def _add_batching_arguments(batch) -> None:
    batch.add_argument(
        "--batching",
        choices=["continuous", "request", "off"],
        default="continuous",
        help="continuous: requests join and leave a running batch between tokens (decoder-only bases: BLIP-2 OPT, "
        "InstructBLIP Vicuna; others fall back to request); request: concurrent requests share one generate call; "
        "off: one request at a time (default continuous)",
    )
    batch.add_argument(
        "--max-batch-size", type=int, default=16, help="requests decoded together (default 16)"
    )
    batch.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="the longest a request waits for batch-mates (default 5 ms; it goes sooner once as many as in the last batch are there)"
    )
    batch.add_argument(
        "--no-batching", action="store_true", help="one request at a time (same as --batching off)"
    )
    batch.add_argument(
        "--max-queue", type=int, default=256, help="requests that may wait; more get a 503 (default 256)"
    )
    batch.add_argument(
        "--default-max-tokens", type=int, default=30, help="max_tokens when a request gives none (default 30)"
    )


def given_options(argv: list[str] | None) -> set[str]:
    """The options given on the command line (their ``dest``), whatever their value: the parser again,
    with every default suppressed."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.engine != "vllm":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_args(args, api_key)
    explicit = parse_adapter_args(args.adapter)
    if args.engine == "vllm":
        from multimodal_lora.adapter.search import collect_adapters
        from multimodal_lora.vllm import serve as vllm_serve

        found = collect_adapters(args.adapters_dir, explicit)
        if args.print_command:
            print(vllm_serve.command_line(args, found, extra, api_key, given_options(argv)))
            return 0
        return vllm_serve.main(args, found, extra, api_key, given_options(argv))
    return serve_builtin(args, explicit, api_key)


def check_args(args, api_key: str | None) -> None:
    """Every problem with the network, safety and batching options, in one :class:`ConfigError`."""
    problems = []
    if not is_loopback(args.host) and api_key is None:
        problems.append(
            f"--host {args.host} is reachable from other machines: set --api-key (or {API_KEY_ENV}) so that not everyone can use it"
        )
    if args.allow_remote_images and not args.allowed_hosts.strip():
        problems.append(
            "--allow-remote-images needs --allowed-hosts (comma-separated host names, or '*' for any public host)"
        )
    if args.max_batch_size < 1 or args.max_queue < 1 or args.max_wait_ms < 0 or args.default_max_tokens < 1:
        problems.append(
            "--max-batch-size, --max-queue and --default-max-tokens must be at least 1, --max-wait-ms at least 0"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def engine_spec(args, explicit: dict[str, Path]):
    """What the model's process loads and how it batches, from the command's options."""
    from multimodal_lora.serve.engine_process import EngineSpec

    if args.no_batching:
        args.batching = "off"
    if args.batching == "off":
        args.max_batch_size, args.max_wait_ms = 1, 0.0
    return EngineSpec(
        adapters_dir=args.adapters_dir,
        explicit=explicit,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        torch_threads=args.torch_threads,
        batching=args.batching,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )


def server_settings(args, api_key: str | None):
    """The HTTP side's settings: the key, body and image limits, the remote-image policy."""
    from multimodal_lora.serve.app import ServerSettings
    from multimodal_lora.serve.images import ImageLimits, RemotePolicy

    hosts = frozenset(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    return ServerSettings(
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.default_max_tokens,
        images=ImageLimits(max_pixels=args.max_pixels, max_bytes=args.max_image_bytes),
        remote=RemotePolicy(allow=args.allow_remote_images, hosts=hosts),
    )


def serve_builtin(args, explicit: dict[str, Path], api_key: str | None) -> int:
    """The built-in engine: the model's process, then the routes on uvicorn until stopped; the exit status."""
    from multimodal_lora.serve.engine_process import EngineProcess

    # The model loads and generates in a process of its own (see engine_process: under load, one
    # shared interpreter made each batch wait for the threads reading requests). It starts first,
    # and loads while this process imports the web stack.
    engine = EngineProcess(engine_spec(args, explicit))
    try:
        import torch
        import transformers.image_processing_utils  # noqa: F401 - what the model's view unpickles into:
        import transformers.processing_utils  # noqa: F401 - 3 s of imports, done while the model loads
        import uvicorn

        from multimodal_lora.serve.app import create_app

        captioner = engine.wait_ready()
        for problem in engine.problems:
            logger.warning("%s", problem)
        missing = sorted(set(explicit) - set(captioner.adapter_names))
        if missing:
            raise ConfigError(f"--adapter {', '.join(missing)} could not be loaded: " + "; ".join(engine.problems))
        # This process prepares pixels: one torch thread, leaving the other cores to the model's.
        torch.set_num_threads(1)
        app = create_app(captioner, engine, server_settings(args, api_key))
        names = [captioner.base.name, *captioner.adapter_names]
        logger.info(
            "serving %s on http://%s:%d/v1 (batching: %s)",
            ", ".join(names),
            args.host,
            args.port,
            "one request at a time" if args.batching == "off" else
            f"{engine.counters()['batching']}, up to {args.max_batch_size} requests, {args.max_wait_ms:g} ms wait",
        )  # fmt: skip
        # What imports made lives as long as the server: spare the collector from walking it under load.
        gc.collect()
        gc.freeze()
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", access_log=False, server_header=False
        )
        server = uvicorn.Server(config)
        # If the model's process dies, this one stops too (as on Ctrl-C, answering what it can):
        # exit status 1 tells a supervisor to restart the server.
        engine.on_death = lambda: setattr(server, "should_exit", True)
        server.run()
    finally:
        engine.close()
    if engine.died:
        logger.error("the server stopped because the model's process ended")
        return 1
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)
