"""Regenerate demo/screenshot.png: the demo captioning a validation image that the tiny adapter gets right.

    python demo/make_screenshot.py

Trains recipes/tiny.yaml into runs/tiny unless runs/tiny/adapter exists, starts
``python -m multimodal_lora.demo --adapters-dir runs`` (a relative directory, so the
page names no temporary path), picks the first validation image whose caption
equals its reference in metadata.jsonl, uploads it in headless Chromium
(/usr/bin/chromium) and captures the page.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def main() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if not (REPO / "runs" / "tiny" / "adapter").is_dir():
        subprocess.run([sys.executable, "-m", "multimodal_lora.train", "recipes/tiny.yaml"], cwd=REPO, env=env, check=True)

    sys.path.insert(0, str(REPO))
    from multimodal_lora import caption
    from multimodal_lora.data.shapes import ensure_builtin

    validation = ensure_builtin("shapes") / "validation"
    rows = [json.loads(line) for line in (validation / "metadata.jsonl").read_text().splitlines()[:32]]
    captions = caption([str(validation / r["file_name"]) for r in rows], adapter=str(REPO / "runs" / "tiny" / "adapter"))
    image, reference = next((validation / r["file_name"], r["text"]) for r, c in zip(rows, captions) if c == r["text"])
    print(f"{image.name}: {reference}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "multimodal_lora.demo", "--adapters-dir", "runs", "--port", str(port)], cwd=REPO, env=env
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle")
            page.locator("#upload input[type=file]").set_input_files(str(image))
            expect(page.locator("#preview img")).to_be_visible(timeout=60_000)
            page.locator("#caption-button").click()
            expect(page.locator("#caption-output textarea")).to_have_value(reference, timeout=120_000)
            page.screenshot(path=str(REPO / "demo" / "screenshot.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("wrote demo/screenshot.png")


if __name__ == "__main__":
    main()
