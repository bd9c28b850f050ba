"""Batch captioning at scale: inputs streamed from lists and manifests, several processes, kill -9 and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multimodal_lora.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 500
# Each launch: tiny base, 4 new tokens, batches of 8, one DataLoader worker per process.
OPTIONS = ["--batch-size", "8", "--max-new-tokens", "4", "--num-workers", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """500 distinct 24×24 PNGs (one colour each)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("many") / "images"
    root.mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (24, 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(root / f"{i:05d}.png")
    return root


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _launch(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "multimodal_lora.caption", *args]
    # --multi_gpu starts torchrun; on a machine without CUDA the processes join over gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    return [*launcher, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "multimodal_lora.caption", *args]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(images, quick_adapter, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one") / "captions.jsonl"
    proc = subprocess.run(
        _launch(1, [str(images), "--adapter", str(quick_adapter), "--out", str(out), *OPTIONS]),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [Path(r["image"]).name for r in rows] == [f"{i:05d}.png" for i in range(N_IMAGES)]
    assert all(set(r) == {"image", "caption"} for r in rows)  # no image failed
    assert len({r["caption"] for r in rows}) > 1  # the images differ, and so do their captions
    assert f"{N_IMAGES}/{N_IMAGES}" in proc.stderr and "image/s" in proc.stderr  # the progress bar, with a rate
    return rows


@pytest.mark.slow
def test_two_processes_give_the_one_process_file(images, quick_adapter, one_process, tmp_path):
    out = tmp_path / "captions.jsonl"
    proc = subprocess.run(
        _launch(2, [str(images), "--adapter", str(quick_adapter), "--out", str(out), *OPTIONS]),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(out) == one_process  # every image once, in input order, the same captions
    assert proc.stderr.count("wrote 500 captions") == 1 and "on 2 processes" in proc.stderr


@pytest.mark.slow
def test_sigkill_halfway_then_resume_ends_with_the_same_rows(images, quick_adapter, one_process, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = [str(images), "--adapter", str(quick_adapter), "--out", str(out), *OPTIONS]
    job = subprocess.Popen(_launch(2, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= N_IMAGES // 2:
                break
            time.sleep(0.02)
        assert job.poll() is None, "the job finished before it could be killed"
    finally:
        _kill_tree(job)
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    done = whole.count(b"\n")
    assert N_IMAGES // 2 <= done < N_IMAGES, "killed halfway"
    assert [json.loads(line) for line in whole.splitlines()] == one_process[:done]  # whole rows, in order
    # A kill inside the write leaves a torn row; make sure there is one, as the worst case.
    with out.open("wb") as f:
        f.write(whole + json.dumps(one_process[done])[:25].encode())

    proc = subprocess.run(_launch(2, [*args, "--resume"]), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped a torn last row" in proc.stderr
    assert f"resuming {out}: {done} rows already written" in proc.stderr
    rows = _rows(out)
    assert rows == one_process  # all 500, none twice, in input order
    assert len({r["image"] for r in rows}) == N_IMAGES


def _kill_tree(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once (torchrun puts its workers in their own session)."""
    import psutil

    try:
        tree = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    job.wait()


# --- inputs and the output file, without a model -----------------------------------------------


def test_lists_and_manifests_are_streamed_in_order(tmp_path):
    from multimodal_lora.inference.captioning.inputs import count_inputs, iter_inputs

    (tmp_path / "sub").mkdir()
    (tmp_path / "list.txt").write_text("# photos\nsub/a.png\n\n/abs/b.jpg\n")
    (tmp_path / "sub" / "m.jsonl").write_text('{"file_name": "c.png", "text": "x"}\n\n{"file_name": "d.png"}\n')
    (tmp_path / "m.csv").write_text("path,caption\ne.png,x\nsub/f.png,y\n")
    items = [str(tmp_path / "list.txt"), str(tmp_path / "sub" / "m.jsonl"), str(tmp_path / "m.csv"), "missing.png"]
    listing = iter_inputs(items)
    assert not isinstance(listing, list) and next(listing) == str(tmp_path / "sub/a.png")  # a generator
    assert list(listing) == [
        "/abs/b.jpg", str(tmp_path / "sub" / "c.png"), str(tmp_path / "sub" / "d.png"),
        str(tmp_path / "e.png"), str(tmp_path / "sub/f.png"), "missing.png",
    ]  # fmt: skip
    assert count_inputs(items) == 7


def test_bad_lists_and_manifests_name_the_file_and_row(tmp_path):
    from multimodal_lora.inference.captioning.inputs import check_inputs

    (tmp_path / "nocol.csv").write_text("caption\nx\n")
    (tmp_path / "empty.jsonl").write_text('{"image": "a.png"}\n{"image": ""}\n')
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png"}\n{"image": \n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"nocol\.csv: no image column; name it one of image, file_name, path"):
        check_inputs([str(tmp_path / "nocol.csv")])
    from multimodal_lora.inference.captioning.inputs import iter_inputs

    with pytest.raises(UserError, match=r"empty\.jsonl, row 2: 'image' is empty"):
        list(iter_inputs([str(tmp_path / "empty.jsonl")]))
    with pytest.raises(UserError, match=r"broken\.jsonl, line 2: not valid JSON"):
        list(iter_inputs([str(tmp_path / "broken.jsonl")]))
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8"):
        check_inputs([str(tmp_path / "latin1.txt")])
    with pytest.raises(UserError, match="directory has no images"):
        check_inputs([str(_empty_dir(tmp_path))])


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "no-images"
    path.mkdir(exist_ok=True)
    (path / "notes.txt").write_text("x")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_output_file_resume_cuts_a_torn_row_and_refuses_to_clobber(tmp_path, fmt):
    from multimodal_lora.inference.captioning.output import open_rows, row_fields

    out = tmp_path / f"captions.{fmt}"
    fields = row_fields(question=False)
    rows = [{"image": f"{i}.png", "caption": f'a, "quoted"\ncaption {i}'} for i in range(3)]
    writer, existing = open_rows(out, fmt, fields, resume=False, overwrite=False)
    assert existing.rows == 0
    writer.write(rows)
    writer.close()
    whole = out.read_bytes()
    with out.open("ab") as f:
        f.write(whole.splitlines(keepends=True)[-1][:9])  # a torn fourth row

    with pytest.raises(UserError, match="exists; pass --resume to continue it, or --overwrite"):
        open_rows(out, fmt, fields, resume=False, overwrite=False)
    writer, existing = open_rows(out, fmt, fields, resume=True, overwrite=False)
    assert (existing.rows, existing.last_image, existing.torn_bytes) == (3, "2.png", 9)
    assert out.read_bytes() == whole  # cut back to the last whole row
    writer.write([{"image": "3.png", "caption": "d"}])
    writer.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 4 + (fmt == "csv") and lines[-1].startswith(('{"image": "3.png"', "3.png,"))

    writer, existing = open_rows(out, fmt, fields, resume=False, overwrite=True)
    writer.close()
    assert out.read_text() == ("image,caption,error\n" if fmt == "csv" else "")


def test_resume_of_another_jobs_file_is_refused_before_the_model_loads(tmp_path, images):
    from multimodal_lora.commands.caption import main

    out = tmp_path / "captions.jsonl"
    out.write_text(json.dumps({"image": "elsewhere/0.png", "caption": "x"}) + "\n")
    with pytest.raises(UserError, match=r"exists; pass --resume"):
        main([str(images), "--out", str(out)])
    with pytest.raises(UserError, match=r"--resume: .* the last is 'elsewhere/0.png', but input 1 is .*00000\.png"):
        main([str(images), "--out", str(out), "--resume"])
    assert out.read_text() == json.dumps({"image": "elsewhere/0.png", "caption": "x"}) + "\n"  # untouched
