"""The web demo as users meet it: the real server in a subprocess, driven over HTTP,
with gradio_client, and in headless Chromium.

One server (module scope) with two adapters serves every test here: ``shapes``
(the captioning adapter of the shared tiny run) and ``shapes-vqa`` (a short VQA
run trained for these tests).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
MAX_FILE_SIZE = 1024 * 1024  # the server below is started with --max-file-size 1mb
DEFAULTS = dict(prompt="", max_new_tokens=30, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload(server, name: str, data: bytes) -> tuple[int, str]:
    """POST one file to the app's upload route, as the page does."""
    boundary = "----multimodal-lora-test"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        server["url"] + "gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def runs_dir(tiny_run, tmp_path_factory):
    """An adapters directory laid out as the trainer writes it: runs/<name>/adapter."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    runs = tmp_path_factory.mktemp("demo") / "runs"
    shutil.copytree(tiny_run.adapter_dir, runs / "shapes" / "adapter")
    overrides = [
        f"output_dir={runs / 'shapes-vqa'}",
        "data.path=shapes-vqa",
        "data.task=vqa",
        "data.max_length=24",
        "train.max_steps=40",
    ]
    train(load_recipe(REPO / "recipes" / "tiny.yaml", overrides))
    return runs


@pytest.fixture(scope="module")
def expected(runs_dir, shapes_dir):
    """What the public API says for the test images: the server must say the same."""
    from multimodal_lora import Captioner

    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(runs_dir / "shapes", name="shapes")
    captioner.load_adapter(runs_dir / "shapes-vqa", name="shapes-vqa")
    images = [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:2]]
    question = "What colour is the shape?"
    from multimodal_lora.evaluate.report import legible

    # The page shows the bare base's untrained output legibly (broken bytes as "·"); the adapters' as it is.
    def shown(a, texts):
        return [legible(t) for t in texts] if a is None else texts

    return {
        "images": images,
        "question": question,
        "caption": {a: shown(a, captioner.caption(images, adapter=a)) for a in ("shapes", "shapes-vqa", None)},
        "answer": {a: shown(a, captioner.ask(images, question, adapter=a)) for a in ("shapes-vqa", None)},
    }


@pytest.fixture(scope="module")
def server(runs_dir, tmp_path_factory):
    """``python demo/app.py`` from the repository root, as a newcomer starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "demo/app.py", "--adapters-dir", str(runs_dir), "--port", str(port), "--max-file-size", "1mb"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if http_get(url)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the demo server did not answer within 240 s:\n{log.read_text()}")
        time.sleep(1)
    yield {"url": url, "proc": proc, "log": log, "runs": runs_dir}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def caption(client, image, adapter, side_by_side=False, **options):
    from gradio_client import handle_file

    o = {**DEFAULTS, **options}
    return client.predict(
        handle_file(image), adapter, side_by_side, o["prompt"], o["max_new_tokens"], o["num_beams"],
        o["do_sample"], o["temperature"], o["top_p"], api_name="/caption",
    )


def ask(client, image, question, adapter):
    from gradio_client import handle_file

    o = DEFAULTS
    return client.predict(
        handle_file(image), question, adapter, 10, o["num_beams"], o["do_sample"], o["temperature"], o["top_p"], api_name="/ask"
    )


def assert_alive(server, client, expected):
    assert server["proc"].poll() is None, server["log"].read_text()
    assert caption(client, expected["images"][0], "shapes")[1] == expected["caption"]["shapes"][0]


# -- gradio_client: every adapter, both tabs ---------------------------------------------------------------


def test_caption_with_each_adapter_and_side_by_side(client, expected):
    for adapter, value in (("shapes", "shapes"), (None, "(base)")):
        for i, image in enumerate(expected["images"]):
            seen, text, base_text = caption(client, image, value)
            assert text == expected["caption"][adapter][i]
            assert base_text == ""
            assert Path(seen).is_file()  # the image the model saw, served back
    seen, text, base_text = caption(client, expected["images"][0], "shapes", side_by_side=True)
    assert (text, base_text) == (expected["caption"]["shapes"][0], expected["caption"][None][0])
    assert text != base_text


def test_vqa_with_each_adapter(client, expected):
    for adapter, value in (("shapes-vqa", "shapes-vqa"), (None, "(base)")):
        for i, image in enumerate(expected["images"]):
            _, answer = ask(client, image, expected["question"], value)
            assert answer == expected["answer"][adapter][i]


def test_dropdown_lists_base_and_every_adapter(server):
    status, _, body = http_get(server["url"] + "config")
    assert status == 200
    config = json.loads(body)
    dropdowns = [c["props"] for c in config["components"] if c.get("type") == "dropdown"]
    assert len(dropdowns) == 2  # one per tab, each offering its own task's adapters
    assert [choice[1] for choice in dropdowns[0]["choices"]] == ["(base)", "shapes"]
    assert [choice[1] for choice in dropdowns[1]["choices"]] == ["(base)", "shapes-vqa"]
    assert dropdowns[0]["value"] == "shapes" and dropdowns[1]["value"] == "shapes-vqa"


def test_tabs_refuse_the_other_tasks_adapters(server, client, expected):
    from gradio_client.exceptions import AppError

    # Our own check, in one log line: "'shapes-vqa' is a vqa adapter, not a caption one; use it in the VQA tab."
    with pytest.raises(AppError, match="'shapes-vqa' is a vqa adapter, not a caption one; use it in the VQA tab"):
        caption(client, expected["images"][0], "shapes-vqa")
    with pytest.raises(AppError, match="'shapes' is a caption adapter, not a vqa one; use it in the Caption tab"):
        ask(client, expected["images"][0], expected["question"], "shapes")
    assert_alive(server, client, expected)


# -- bad input gets a message, and the server keeps serving --------------------------------------------------


def decompression_bomb(path: Path) -> Path:
    """A 200-byte PNG that claims 30,000 × 30,000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_bad_uploads_get_readable_messages(server, client, expected, tmp_path):
    from gradio_client.exceptions import AppError

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "letter.png"
    text.write_text("Dear reader, I am not a picture.\n")
    bomb = decompression_bomb(tmp_path / "bomb.png")
    cases = [(empty, "empty.png: empty file"), (text, "letter.png: not an image"), (bomb, "bomb.png: refused as a decompression bomb")]
    for path, message in cases:
        with pytest.raises(AppError, match=message) as info:
            caption(client, str(path), "shapes")
        assert "Traceback" not in str(info.value)
        with pytest.raises(AppError, match=message):
            ask(client, str(path), "What shape is it?", "shapes-vqa")
        assert_alive(server, client, expected)
    with pytest.raises(AppError, match="Type a question"):
        ask(client, expected["images"][0], "   ", "shapes-vqa")
    with pytest.raises(AppError, match="No adapter named 'no-such-adapter' is loaded"):
        caption(client, expected["images"][0], "no-such-adapter")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image either")
    with pytest.raises(AppError, match="Invalid file type"):
        caption(client, str(notes), "shapes")
    assert_alive(server, client, expected)
    # Each refusal is one line in the server's log, not a traceback.
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
    for line in ("refused: empty.png: empty file", "refused: letter.png: not an image", "refused: Invalid file type"):
        assert line in log, log[-3000:]


def test_oversized_upload_is_refused_with_a_message(server, client, expected, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(MAX_FILE_SIZE + 1024))
    status, body = upload(server, "big.png", big.read_bytes())
    assert status == 413
    assert "exceeded maximum allowed size" in body
    # gradio_client reads the limit from the server and refuses before sending.
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        caption(client, str(big), "shapes")
    assert_alive(server, client, expected)


# -- what the server must not give away ---------------------------------------------------------------------


def test_files_outside_the_app_are_refused(server, client, expected):
    weights = server["runs"] / "shapes" / "adapter" / "adapter_model.safetensors"
    refused = [
        "gradio_api/file=/etc/passwd",
        "gradio_api/file=../recipes/tiny.yaml",
        "gradio_api/file=..%2F..%2Fetc%2Fpasswd",
        "gradio_api/file=recipes/tiny.yaml",  # inside the server's working directory
        f"gradio_api/file={REPO / 'recipes' / 'tiny.yaml'}",
        f"gradio_api/file={weights}",
        "gradio_api/file=multimodal_lora/demo.py",
    ]
    for path in refused:
        status, _, body = http_get(server["url"] + path)
        assert status in (403, 404), f"{path}: {status}"
        assert b"root:" not in body and b"lora:" not in body and b"__metadata__" not in body and b"gradio" not in body[:20]
    # Control: a file uploaded to the app is served back, so the refusals above mean something.
    image = Path(expected["images"][0]).read_bytes()
    status, body = upload(server, "shape.png", image)
    assert status == 200
    served = json.loads(body)[0]
    assert Path(served).name == "shape.png" and "multimodal-lora-demo-" in served  # the app's own temp dir
    status, _, body = http_get(f"{server['url']}gradio_api/file={served}")
    assert status == 200 and body == image


def test_no_cors_echo_for_another_origin(server):
    status, headers, _ = http_get(server["url"] + "config", {"Origin": "http://evil.example"})
    assert status == 200
    lower = {k.lower(): v for k, v in headers.items()}
    assert "evil.example" not in lower.get("access-control-allow-origin", "")
    # Control: the server's own origin is echoed, so the header is not simply missing everywhere.
    _, headers, _ = http_get(server["url"] + "config", {"Origin": server["url"].rstrip("/")})
    assert {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin") == server["url"].rstrip("/")


def test_bound_to_localhost_only(server):
    port = int(server["url"].rsplit(":", 1)[1].strip("/"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this picks the outward interface
            address = s.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((address, port)) != 0, f"the demo answers on {address}; it must bind 127.0.0.1 only"


# -- load ----------------------------------------------------------------------------------------------------


def test_twenty_concurrent_requests_all_succeed(server, client, expected):
    from gradio_client import Client

    clients = [client, Client(server["url"], verbose=False)]
    adapters = ["shapes", "(base)"]
    keys = {"shapes": "shapes", "(base)": None}

    def one(i):
        adapter = adapters[i % 2]
        image = expected["images"][i % 2]
        return adapter, i % 2, caption(clients[i % 2], image, adapter)[1]

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    elapsed = time.monotonic() - start
    assert len(results) == 20
    for adapter, index, text in results:
        assert text == expected["caption"][keys[adapter]][index]
    print(f"20 concurrent caption requests answered in {elapsed:.1f} s")
    assert_alive(server, client, expected)


# -- a real browser ------------------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
def test_browser_caption_vqa_and_a_bad_upload(server, expected, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    args = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server["url"], wait_until="networkidle")
            expect(page.locator("#status")).to_contain_text("shapes")

            expect(page.locator("#base-note")).to_contain_text("coloured shapes")  # what this base knows

            # One upload for both tabs, previewed at once, before any button is pressed.
            page.locator("#upload input[type=file]").set_input_files(expected["images"][0])
            # The uploaded file, found by its accessible name (the file name), not by how a gradio
            # release lays the label out (6.31 renders the stem and the extension as two spans).
            uploaded = page.locator("#upload").get_by_role("cell", name=Path(expected["images"][0]).name, exact=True)
            expect(uploaded).to_be_visible(timeout=60_000)
            expect(page.locator("#preview img")).to_be_visible(timeout=60_000)
            page.locator("#caption-button").click()
            output = page.locator("#caption-output textarea")
            expect(output).to_have_value(expected["caption"]["shapes"][0], timeout=120_000)
            page.screenshot(path=str(tmp_path / "demo-caption.png"), full_page=True)

            # The VQA tab answers about the same image, without a second upload.
            page.get_by_role("tab", name="VQA").click()
            page.locator("#vqa-button").click()
            expect(page.locator("#vqa-output textarea")).to_have_value(expected["answer"]["shapes-vqa"][0], timeout=120_000)
            page.screenshot(path=str(tmp_path / "demo-vqa.png"), full_page=True)

            # A bad upload: the message shows in the page as soon as it is uploaded.
            bad = tmp_path / "letter.png"
            bad.write_text("not a picture")
            page.locator("#upload button[aria-label*='Clear'], #upload button[aria-label*='clear']").first.click()
            page.locator("#upload input[type=file]").set_input_files(str(bad))
            expect(page.get_by_text("not an image Pillow can read").first).to_be_visible(timeout=60_000)
            page.locator("#vqa-button").click()
            page.screenshot(path=str(tmp_path / "demo-bad-upload.png"), full_page=True)
        finally:
            browser.close()
    assert server["proc"].poll() is None
