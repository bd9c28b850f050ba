"""Loading a base reaches for no network: not for fp32 or bf16, not for int8 or 4-bit.

Each load runs in a fresh interpreter with the hub switched *on* (no ``HF_HUB_OFFLINE``),
so any library that wanted to fetch something would try; where ``unshare`` can make a
network namespace the process also has no network at all. An audit hook counts every
attempt to resolve a name or open a connection (``socket.getaddrinfo``,
``socket.connect``): the count, not log text, is what is asserted. bitsandbytes 0.50
used to ask the hub for a CPU kernel on import, even for an fp32 base, and printed
"Failed to load CPU gemm_4bit_forward from kernels-community" when that failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

DRIVER = textwrap.dedent(
    """
    import json, sys
    attempts = []

    def audit(event, args):
        if event in ("socket.getaddrinfo", "socket.connect", "socket.gethostbyname", "urllib.Request"):
            attempts.append(f"{event} {args[:2]!r}")

    sys.addaudithook(audit)
    quantization, dtype, image = sys.argv[1:4]

    from multimodal_lora import Captioner
    from multimodal_lora.model.loading import LoadSettings

    captioner = Captioner.with_settings("tiny", None, LoadSettings(quantization, dtype, "cpu"))
    text = captioner.caption(image, max_new_tokens=5)
    layers = sorted({type(m).__name__ for m in captioner.model.modules() if "Linear" in type(m).__name__})
    print(json.dumps({"attempts": attempts, "caption": text, "layers": layers}))
    """
)


def _isolated() -> list[str]:
    """``unshare -rn`` (no network but a down loopback) where this machine allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


@pytest.mark.parametrize(
    ("quantization", "dtype", "layer"),
    [("none", "fp32", "Linear"), ("none", "bf16", "Linear"), ("int8", "fp32", "Linear8bitLt"), ("4bit", "fp32", "Linear4bit")],
)
def test_a_load_makes_no_network_attempt_and_prints_no_kernel_warning(tiny_base, shapes_dir, tmp_path, quantization, dtype, layer):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO)
    image = str(shapes_dir / "validation" / "00000.png")
    script = tmp_path / "load.py"
    script.write_text(DRIVER)
    proc = subprocess.run(
        [*_isolated(), sys.executable, str(script), quantization, dtype, image],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["attempts"] == [], result["attempts"]
    assert layer in result["layers"]  # the kind of base asked for really loaded (real bitsandbytes layers)
    assert isinstance(result["caption"], str)
    for word in ("kernels-community", "gemm_4bit_forward", "Hugging Face Hub", "offline mode"):
        assert word not in proc.stderr, proc.stderr[-3000:]
