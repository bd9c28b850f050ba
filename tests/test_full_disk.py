"""A full disk, for real: a tiny tmpfs mounted in a private mount namespace (``unshare``), then filled.

Every write goes through ``multimodal_lora.core.atomic``; on a full disk the user gets one
line (what, where, how much was written, what is intact), exit status 2, and no
partial file or staging directory is left behind.
"""

from __future__ import annotations

import json
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
FILL = (
    "import os\n"
    "def fill(mount):\n"
    "    with open(os.path.join(mount, 'filler'), 'wb', buffering=0) as f:\n"
    "        for chunk in (65536, 4096, 512, 1):  # down to the last byte\n"
    "            try:\n"
    "                while True:\n"
    "                    f.write(b'x' * chunk)\n"
    "            except OSError:\n"
    "                pass\n"
)


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
        from multimodal_lora.commands import run_cli
        from multimodal_lora.commands.train import main
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
            from multimodal_lora.training.checkpoint import find_checkpoints, verify_checkpoint
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
        from multimodal_lora.commands import run_cli
        from multimodal_lora.commands.train import main
        os.makedirs({str(mount / 'run')!r})
        fill({str(mount)!r})
        try:
            run_cli(main, [{str(TINY)!r}, "output_dir={mount / 'run'}", "data.path={small_shapes_dir}"])
        finally:
            print("left:", sorted(os.listdir({str(mount / 'run')!r})))
    """, size="256k")
    line = one_error_line(proc)
    assert f"could not write the run's recipe to {mount / 'run' / 'recipe.yaml'}: no space left on device" in line
    assert "o checkpoint was written yet; free space and run again" in line
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
        print("left:", sorted(n for n in os.listdir({str(mount)!r}) if n not in ("filler", "captions.jsonl")))
        # Caption files are appended row by row so that --resume continues them: only whole rows may be there.
        text = open({str(mount / 'captions.jsonl')!r}).read() if os.path.exists({str(mount / 'captions.jsonl')!r}) else ""
        print("torn rows:", sum(not line.endswith("}}") for line in text.splitlines()) + (text != "" and not text.endswith(chr(10))))
    """, size="512k")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("status 2") == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert f"could not write the captions to {mount / 'captions.jsonl'}: no space left on device" in errors[0]
    assert f"could not write the merged model to {mount / 'merged'}: no space left on device" in errors[1]
    assert "it needs about 3." in errors[1] and "MB" in errors[1]  # the merged weights: 0.8 M fp32 parameters
    assert "left: []" in proc.stdout and "torn rows: 0" in proc.stdout


# Each point of a training run where the disk can fill: the audit hook fills it the moment the
# run opens that file for writing (a staging copy, or the log it appends to), so the failing
# write is that one, every time. The hook only fills the disk; the code under test is untouched.
POINTS = {
    # name: (path pattern opened for writing, how many such opens to let through first, what the line names,
    #        overrides of the run)
    "metrics": (r"/metrics\.jsonl$", 0, "the metrics log",
                ["train.checkpoint_every=null", "train.eval_every=null", "train.plot_every_seconds=3600"]),
    "loss plot": (r"/\.loss\.png-\d+-", 0, "the loss curve", []),
    # The finished adapter's card (checkpoints carry one too; this is the last write of a run).
    "adapter card": (r"/run/\.adapter-\d+-\w+/README\.md$", 0, "the adapter", []),
    "feature cache": (r"/features/.*\.(safetensors|json)$|/\.[^/]*features[^/]*-\d+-", 0, "feature cache", []),
}
# An append that fits in the slack of the file's last page needs no new page (tmpfs). So the metrics
# point trains on three times the images (36 steps an epoch) with no checkpoint, validation or plot
# inside an epoch: the disk fills at the second epoch's first line, and its 36 lines of 150-200 bytes
# (over 4 KiB) need a new page before the run's next other write, the last validation.


def tripled(data: Path, root: Path) -> Path:
    """``data`` with each training image three times (under new names)."""
    shutil.copytree(data, root)
    rows = [json.loads(line) for line in (root / "train" / "metadata.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        for copy in range(3):
            name = f"{copy}-{row['file_name']}"
            shutil.copy(root / "train" / row["file_name"], root / "train" / name)
            out.append({**row, "file_name": name})
    for row in rows:
        (root / "train" / row["file_name"]).unlink()
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_disk_that_fills_at_any_write_ends_in_one_line_and_the_run_resumes(point, small_shapes_dir, tmp_path):
    pattern, let_through, names, overrides = POINTS[point]
    data = small_shapes_dir if point != "metrics" else tripled(small_shapes_dir, tmp_path / "tripled")
    mount = tmp_path / "disk"
    proc = run_on_full_disk(tmp_path, mount, f"""
        import os, re, subprocess, sys
        from pathlib import Path
        mount = {str(mount)!r}
        os.environ["MULTIMODAL_LORA_CACHE"] = os.path.join(mount, "cache")  # the feature cache is on the small disk too
        out = Path(mount) / "run"
        seen, filled = [0], [False]

        def audit(event, args):
            if filled[0] or event != "open" or not isinstance(args[0], str) or not args[0].startswith(mount):
                return
            writing = (isinstance(args[1], str) and any(c in args[1] for c in "wax+")) or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))
            if writing and re.search({pattern!r}, args[0]):
                if {point!r} == "metrics" and not list(out.glob("checkpoints/checkpoint-*/state.json")):
                    return
                seen[0] += 1
                if seen[0] > {let_through}:
                    filled[0] = True
                    fill(mount)

        args = [{str(TINY)!r}, f"output_dir={{out}}", "data.path={data}", "train.batch_size=2",
                "train.epochs=2", "train.checkpoint_every=1", "train.log_every=1", "train.eval_every=2",
                "train.plot_every_seconds=0", "train.eval_max_images=4", "train.cache_image_features=true", "lora.r=2", *{overrides!r}]
        from multimodal_lora.commands import run_cli
        from multimodal_lora.commands.train import main
        sys.addaudithook(audit)
        try:
            run_cli(main, args)
        except SystemExit as exc:
            code = exc.code
            print("exit", exc.code, "filled", filled[0])
        os.remove(os.path.join(mount, "filler"))
        from multimodal_lora.core.atomic import is_staging
        print("staging left:", sorted(str(p) for p in Path(mount).rglob("*") if is_staging(p.relative_to(mount))))
        # A checkpoint on disk: continue it. None yet (the feature cache fills before the first): run again.
        again = ["resume=true"] if list((out / "checkpoints").glob("checkpoint-*")) else []
        print("again", again)
        resumed = subprocess.run([sys.executable, "-m", "multimodal_lora.train", *args, *again],
                                 capture_output=True, text=True)
        print("resume exit", resumed.returncode, resumed.stderr[-2000:].replace(chr(10), " | "))
        print("adapter", (out / "adapter" / "adapter_model.safetensors").is_file())
        sys.exit(code)
    """, size="8m")
    assert "exit 2 filled True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    line = one_error_line(proc)
    assert names in line and "no space left on device" in line, line
    assert "needs about" in line or "needed more than" in line, line  # the space it takes
    assert "nothing partial was left" in line, line
    assert "staging left: []" in proc.stdout, proc.stdout
    assert "resume exit 0" in proc.stdout and "adapter True" in proc.stdout, proc.stdout
    if point == "feature cache":  # before the first checkpoint: the message says to run again
        assert "again []" in proc.stdout and "run again" in line, line
    else:  # the message names the checkpoint the run then continues from
        assert "again ['resume=true']" in proc.stdout and "resume=true" in line, line
