"""A full disk, for real: a tiny tmpfs mounted in a private mount namespace (``unshare``), then filled.

Every write goes through ``multimodal_lora.atomic``; on a full disk the user gets one
line (what, where, how much was written, what is intact), exit status 2, and no
partial file or staging directory is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"

# Fills the mount: everything after this finds no space.
FILL = "import os\ndef fill(mount):\n    with open(os.path.join(mount, 'filler'), 'wb') as f:\n        try:\n            while True:\n                f.write(b'x' * 65536); f.flush()\n        except OSError:\n            pass\n"


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"], capture_output=True
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs unshare and tmpfs mounts in a user namespace")


def run_on_full_disk(tmp_path: Path, mount: Path, code: str, size: str = "4m") -> subprocess.CompletedProcess:
    """Run ``code`` (Python, with ``fill(mount)`` defined) with a fresh ``size`` tmpfs at ``mount``."""
    mount.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "driver.py"
    script.write_text(FILL + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = f"mount -t tmpfs -o size={size} tmpfs '{mount}' && exec '{sys.executable}' '{script}'"
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=env, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_training_on_a_disk_that_fills_names_the_intact_checkpoint(small_shapes_dir, tmp_path):
    mount = tmp_path / "disk"
    proc = run_on_full_disk(tmp_path, mount, f"""
        import sys, threading, time
        from pathlib import Path
        from multimodal_lora.cli import run_cli
        from multimodal_lora.train import main
        out = Path({str(mount)!r}) / "run"

        def watch():  # the disk fills up as soon as the first checkpoint is on it
            while not (out / "checkpoints" / "checkpoint-00000001").is_dir():
                time.sleep(0.005)
            fill({str(mount)!r})

        threading.Thread(target=watch, daemon=True).start()
        try:
            run_cli(main, [{str(TINY)!r}, f"output_dir={{out}}", "data.path={small_shapes_dir}", "train.batch_size=8",
                           "train.max_steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                           "train.eval_captions=false", "lora.r=2"])
        finally:  # what is left on the full disk, checked before the namespace (and the mount) goes
            from multimodal_lora.checkpoint import find_checkpoints, verify_checkpoint
            print("hidden:", sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")))
            for path in find_checkpoints(out):
                verify_checkpoint(path)
                print("verified", path)
    """)
    line = one_error_line(proc)
    assert "no space left on device" in line and "nothing partial was left" in line
    assert "could not write checkpoint checkpoint-0000000" in line or "could not write the metrics log" in line
    if "previous checkpoint " in line:  # the checkpoint write failed
        intact = line.split("previous checkpoint ")[-1].split(" is intact")[0]
    else:  # another write (the metrics log) failed between checkpoints
        intact = line.split("last intact checkpoint is ")[-1].split(";")[0]
    assert "resume=true" in line
    assert intact.startswith(str(mount / "run" / "checkpoints" / "checkpoint-0000000")), line
    # What the message names is complete (every file matches its hash), and no staging copy is left.
    assert f"verified {intact}" in proc.stdout, proc.stdout
    assert "hidden: []" in proc.stdout, proc.stdout


def test_recipe_on_a_full_disk_is_one_line_and_no_empty_file(small_shapes_dir, tmp_path):
    mount = tmp_path / "disk"
    proc = run_on_full_disk(tmp_path, mount, f"""
        import os
        from multimodal_lora.cli import run_cli
        from multimodal_lora.train import main
        os.makedirs({str(mount / 'run')!r})
        fill({str(mount)!r})
        try:
            run_cli(main, [{str(TINY)!r}, "output_dir={mount / 'run'}", "data.path={small_shapes_dir}"])
        finally:
            print("left:", sorted(os.listdir({str(mount / 'run')!r})))
    """, size="256k")
    line = one_error_line(proc)
    assert f"could not write the run's recipe to {mount / 'run' / 'recipe.yaml'}: no space left on device" in line
    assert "no checkpoint was written yet; free space and run again" in line
    assert "left: []" in proc.stdout  # no 0-byte recipe.yaml, no staging file


def test_caption_output_and_merged_model_on_a_full_disk(quick_adapter, shapes_dir, tmp_path):
    image = sorted((shapes_dir / "validation").glob("*.png"))[0]
    mount = tmp_path / "disk"
    proc = run_on_full_disk(tmp_path, mount, f"""
        import os, subprocess, sys
        fill({str(mount)!r})
        for args in (["-m", "multimodal_lora.caption", {str(image)!r}, "--adapter", {str(quick_adapter)!r},
                      "--out", {str(mount / 'captions.jsonl')!r}],
                     ["-m", "multimodal_lora.merge", "--adapter", {str(quick_adapter)!r}, "--out", {str(mount / 'merged')!r}]):
            proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
            print("status", proc.returncode)
            print(proc.stderr)
        print("left:", sorted(n for n in os.listdir({str(mount)!r}) if n != "filler"))
    """, size="512k")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("status 2") == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert f"could not write the captions to {mount / 'captions.jsonl'}: no space left on device" in errors[0]
    assert f"could not write the merged model to {mount / 'merged'}: no space left on device" in errors[1]
    assert "it needs about 3." in errors[1] and "MB" in errors[1]  # the merged weights: 0.8 M fp32 parameters
    assert "left: []" in proc.stdout
