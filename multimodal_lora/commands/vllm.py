"""The vllm command (``python -m multimodal_lora.vllm``): build vLLM's environment, or say which one is used.

    python -m multimodal_lora.vllm install [--venv PATH] [--gpu | --cpu]
    python -m multimodal_lora.vllm where [--vllm-python PATH]
"""

from __future__ import annotations

import argparse

from multimodal_lora.commands import run_cli
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.vllm import env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.vllm", description="vLLM's own environment.")
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="build (or update) a virtual environment with vLLM")
    install.add_argument("--venv", help=f"where (default {env.default_venv()})")
    kind = install.add_mutually_exclusive_group()
    kind.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="GPU vLLM (default when nvidia-smi exists)")
    kind.add_argument("--cpu", dest="gpu", action="store_false", help=f"CPU vLLM: {' '.join(env.CPU_PACKAGES)}")
    install.set_defaults(gpu=None)
    where = commands.add_parser("where", help="print the interpreter that runs vLLM, and its vLLM version")
    where.add_argument("--vllm-python", help=f"this interpreter (else ${env.PYTHON_ENV}, the default venv, this one)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "install":
        print(env.install(args.venv, gpu=args.gpu))
    else:
        python = env.find_python(args.vllm_python)
        print(f"{python}\tvllm {env.check(python)}")
    return 0


def cli() -> None:
    """Entry point of ``python -m multimodal_lora.vllm``."""
    run_cli(main)
