"""The commands: one module per ``python -m multimodal_lora.X`` command and console script.

Each holds its argument parser, ``main(argv) -> exit status`` and ``cli()`` (the console-script
entry point). This is the only layer that writes to stdout: the library below logs and raises.
What every command shares is here: clean errors (:func:`run_cli`) and the base-loading flags
(:func:`add_load_arguments`); logging set-up is :func:`multimodal_lora.core.log_setup.setup_logging`.

``multimodal_lora/train.py`` and ``caption.py`` are only ``python -m`` entry points: nothing imports
them as modules, so the package's ``train`` and ``caption`` stay the public functions.
"""

from __future__ import annotations

import atexit
import gc
import sys
from collections.abc import Callable

from multimodal_lora.core.errors import UserError
from multimodal_lora.core.runtime import DTYPE_NAMES


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main``; a :class:`UserError` becomes one line on stderr and exit status 2."""
    # At exit the interpreter collects the millions of objects that torch, transformers and
    # peft created, one module at a time: about 2 s, after the work is done. The process is
    # ending and the system takes its memory back whole, so the collector is told to skip them
    # (atexit handlers run before that teardown). Registered once however often this runs.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        code = main(argv)
    except UserError as exc:
        _close_progress_bars()  # so the message starts a line of its own, not the end of a bar's
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_load_arguments(parser, *, what: str = "the adapter's base") -> None:
    """``--quantization/--dtype/--device``: load the base otherwise than the adapter records."""
    default = "default: as the adapter was trained, or the nearest setting this machine supports"
    from multimodal_lora.core.quantization import NAMES

    parser.add_argument("--quantization", choices=list(NAMES), help=f"load {what} this way ({default})")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), help=f"dtype of {what} ({default})")
    parser.add_argument("--device", help=f"auto | cpu | cuda | cuda:N ({default})")


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
