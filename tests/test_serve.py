"""The OpenAI-compatible server as applications meet it: ``python -m multimodal_lora.serve`` in a
subprocess on a free loopback port, driven by the official ``openai`` client.

Two short training runs give the adapters (``shapes``, a captioner, and ``shapes-vqa``); what
``caption()`` and ``ask()`` say for the test images is what the server must say.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def message(url: str, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 200-byte PNG that claims ``width`` × ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def start_server(args: list[str], log: Path, torch_threads: int | None = 1) -> tuple[subprocess.Popen, str]:
    """The server on a free port, once its /health answers (``torch_threads=None``: no --torch-threads, for vLLM)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("MULTIMODAL_LORA_API_KEY", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "multimodal_lora.serve", "--port", str(port),
             *(["--torch-threads", str(torch_threads)] if torch_threads else []), *args],  # fmt: skip
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as under a supervisor
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not answer within 240 s:\n{log.read_text()}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def health(url: str) -> dict:
    import json

    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def adapters(shapes_adapters):
    return shapes_adapters


@pytest.fixture(scope="module")
def expected(adapters, shapes_dir):
    """What the public Python API answers; the server must answer the same."""
    from multimodal_lora.inference.captioner import ask, caption, clear_cache

    images = [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:3]]
    try:
        result = {
            "images": images,
            "bytes": [Path(p).read_bytes() for p in images],
            "caption": {"shapes": [caption(p, adapter=adapters["shapes"]) for p in images]},
            "base": [caption(p, base_model="tiny") for p in images],
            "answer": [ask(p, QUESTION, adapter=adapters["shapes-vqa"]) for p in images],
            "short": [caption(p, adapter=adapters["shapes"], max_new_tokens=1) for p in images],
        }
    finally:
        clear_cache()
    # The adapters and the base must disagree, or a mix-up would go unnoticed.
    assert len({*result["caption"]["shapes"], *result["answer"]} & set(result["base"])) == 0
    assert set(result["caption"]["shapes"]).isdisjoint(result["answer"])
    return result


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--adapters-dir", str(tmp_path_factory.mktemp("empty-runs"))]
    for name, directory in adapters.items():
        args += ["--adapter", f"{name}={directory}"]
    proc, url = start_server([*args, "--max-body-bytes", "1000000", "--max-wait-ms", "20"], log)
    yield {"proc": proc, "url": url, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model, image: bytes, text=None, **options):
    return client.chat.completions.create(model=model, messages=message(data_url(image), text), **options)


def stream(client, model, image: bytes, text=None, **options) -> tuple[str, list]:
    chunks = list(
        client.chat.completions.create(model=model, messages=message(data_url(image), text), stream=True, **options)
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# --- answers ---------------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "shapes", "shapes-vqa"]


def test_captions_equal_the_python_api_plain_and_streaming(client, expected):
    for i, image in enumerate(expected["bytes"]):
        for model, want in (("shapes", expected["caption"]["shapes"][i]), ("tiny", expected["base"][i])):
            response = chat(client, model, image)
            assert response.choices[0].message.content == want
            assert response.choices[0].finish_reason in ("stop", "length")
            assert response.model == model and response.object == "chat.completion"
            # 32 image placeholders + </s>; the tiny base stops at "\n", which is counted as generated.
            assert response.usage.prompt_tokens == 33
            assert response.usage.completion_tokens >= 1
            assert response.usage.total_tokens == 33 + response.usage.completion_tokens
            text, chunks = stream(client, model, image, stream_options={"include_usage": True})
            assert text == want
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_vqa_answers_equal_ask_plain_and_streaming(client, expected):
    for i, image in enumerate(expected["bytes"]):
        response = chat(client, "shapes-vqa", image, QUESTION)
        assert response.choices[0].message.content == expected["answer"][i]
        # "Question: What colour is the shape? Answer:" after the image and </s>.
        assert response.usage.prompt_tokens > 33
        assert stream(client, "shapes-vqa", image, QUESTION)[0] == expected["answer"][i]


def test_max_tokens_stop_and_sampling(client, expected):
    image = expected["bytes"][0]
    full = expected["caption"]["shapes"][0]
    short = chat(client, "shapes", image, max_tokens=1)
    assert short.choices[0].message.content == expected["short"][0]
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    assert stream(client, "shapes", image, max_tokens=1)[0] == expected["short"][0]

    words = full.split()
    assert len(words) >= 2, full
    stopped = chat(client, "shapes", image, stop=[words[1]])
    assert stopped.choices[0].message.content == full[: full.index(words[1])].strip()
    assert stopped.choices[0].finish_reason == "stop"
    assert stream(client, "shapes", image, stop=[words[1]])[0] == stopped.choices[0].message.content

    assert chat(client, "shapes", image, temperature=0).choices[0].message.content == full
    sampled = [chat(client, "shapes", image, temperature=1.5, top_p=0.95, max_tokens=8) for _ in range(3)]
    assert all(s.choices[0].finish_reason in ("stop", "length") and s.usage.completion_tokens <= 8 for s in sampled)


# --- bad requests: an OpenAI-shaped 4xx naming the problem -------------------------------------------------


def test_bad_requests_get_openai_errors(client, expected, server):
    import httpx

    image = expected["bytes"][0]
    png = data_url(image)
    not_image = data_url(b"Dear reader, I am not a picture.\n")
    cases = [
        (dict(model="no-such-adapter", messages=message(png)), 404, "model 'no-such-adapter' does not exist"),
        (dict(model="shapes", messages=[{"role": "user", "content": "a caption please"}]), 400, "no image"),
        (
            dict(
                model="shapes",
                messages=[{"role": "user", "content": [*message(png)[0]["content"], *message(png)[0]["content"]]}],
            ),
            400,
            "2 images",
        ),
        (dict(model="shapes", messages=message("data:image/png;base64,@@not base64@@")), 400, "base64 does not decode"),
        (dict(model="shapes", messages=message(not_image)), 400, "not an image"),
        # Refused by Pillow at open (over twice its limit), and by the server's --max-pixels (40 M) before decoding.
        (dict(model="shapes", messages=message(data_url(bomb_png()))), 400, "too many pixels"),
        (
            dict(model="shapes", messages=message(data_url(bomb_png(10000, 5000)))),
            400,
            "10000×5000 = 50,000,000 is more than",
        ),
        (dict(model="shapes", messages=message("data:text/plain;base64,aGVsbG8=")), 400, "send an image"),
        (dict(model="shapes", messages=message("file:///etc/passwd")), 400, "unsupported URL scheme 'file'"),
        (
            dict(model="shapes", messages=message(data_url(os.urandom(800_000)))),
            413,
            "request body is over 1,000,000 bytes",
        ),
        (dict(model="shapes-vqa", messages=message(png, "why " * 200)), 400, "context is 128 tokens"),
        (dict(model="shapes-vqa", messages=message(png)), 400, "add a text part with the question"),
        (dict(model="shapes", messages=message(png), max_tokens=0), 400, "max_tokens must be at least 1"),
        (dict(model="shapes", messages=message(png), temperature=-1), 400, "temperature must be between 0 and 2"),
        (dict(model="shapes", messages=message(png), n=2), 400, "n=2"),
    ]
    for kwargs, status, words in cases:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kwargs)
        error = info.value
        assert error.status_code == status, (words, error.status_code, error.body)
        assert words in error.body["message"], (words, error.body)
        assert set(error.body) == {"message", "type", "param", "code"}
    # Not JSON at all, and a route that does not exist: still OpenAI-shaped.
    response = httpx.post(
        server["url"] + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.get(server["url"] + "/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()
    assert chat(client, "shapes", image).choices[0].message.content == expected["caption"]["shapes"][0]


def test_remote_image_urls_are_refused_by_default(client):
    with pytest.raises(openai.PermissionDeniedError, match="--allow-remote-images"):
        client.chat.completions.create(model="shapes", messages=message("https://example.com/cat.png"))


# --- load: 64 clients, two adapters, the base and bad images ---------------------------------------------


def test_64_concurrent_clients_get_their_own_answers(client, expected, server):
    import psutil

    process = psutil.Process(server["proc"].pid)
    models = ["shapes", "shapes-vqa", "tiny"]
    bad = data_url(b"\x89PNG\r\n\x1a\n truncated")

    def one(i):
        image = i % len(expected["bytes"])
        if i % 16 == 15:
            try:
                client.chat.completions.create(model=models[i % 3], messages=message(bad))
            except openai.BadRequestError as exc:
                return i, "bad", exc.status_code
            return i, "bad", 200
        model = models[i % 3]
        if model == "shapes-vqa":  # a VQA adapter answers questions
            return (
                i,
                ("answer", image),
                chat(client, model, expected["bytes"][image], QUESTION).choices[0].message.content,
            )
        return i, (model, image), chat(client, model, expected["bytes"][image]).choices[0].message.content

    def want(key):
        kind, image = key
        if kind == "answer":
            return expected["answer"][image]
        return expected["base"][image] if kind == "tiny" else expected["caption"][kind][image]

    def round_of_64():
        with ThreadPoolExecutor(max_workers=64) as pool:
            return list(pool.map(one, range(64)))

    def rss() -> int:  # the HTTP process and the model's process
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])

    round_of_64()  # warm-up: the allocator's pools and the server's caches reach their working size
    before = rss()
    batches_before = health(server["url"])
    for _ in range(2):
        results = round_of_64()
        for i, key, value in results:
            if key == "bad":
                assert value == 400, i
            else:
                assert value == want(key), (i, key, value)
    after = health(server["url"])
    # Batching happened: fewer generate calls than requests.
    answered = after["batched_requests"] - batches_before["batched_requests"]
    calls = after["batches"] - batches_before["batches"]
    assert answered == 2 * 60 and calls < answered, after
    time.sleep(1)
    after_rss = rss()
    assert after_rss <= before * 1.05, f"memory grew from {before / 2**20:.0f} MiB to {after_rss / 2**20:.0f} MiB"
    assert server["proc"].poll() is None
    assert chat(client, "shapes", expected["bytes"][0]).choices[0].message.content == expected["caption"]["shapes"][0]


def test_a_dead_model_process_fails_what_waits_on_it_and_stops_the_server(adapters, expected, tmp_path):
    """The model runs in a process of its own. If that process dies, the requests waiting on it
    get a 503 that says so (none hangs), and the server exits with status 1 for a supervisor."""
    import psutil

    log = tmp_path / "server.log"
    proc, url = start_server(["--adapters-dir", str(tmp_path / "none"), "--adapter", f"shapes={adapters['shapes']}"], log)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        image = expected["bytes"][0]
        assert chat(client, "shapes", image).choices[0].message.content == expected["caption"]["shapes"][0]
        [engine] = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        first_answer = threading.Event()

        def one(i):
            try:
                chat(client, "shapes", image)
                first_answer.set()
                return "answered"
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {"message": exc.body}
                return (exc.status_code, body.get("code"), body.get("message"))
            except openai.APIConnectionError:
                return "refused"  # sent after the server began to stop

        with ThreadPoolExecutor(max_workers=64) as pool:
            futures = [pool.submit(one, i) for i in range(512)]
            assert first_answer.wait(60)
            engine.kill()
            results = [f.result(timeout=120) for f in futures]  # none hangs
        failed = [r for r in results if isinstance(r, tuple)]
        assert failed, results
        assert {(status, code) for status, code, _ in failed} == {(503, "engine_stopped")}, set(failed)
        assert all("the model's process stopped" in text for _, _, text in failed), set(failed)
        assert proc.wait(timeout=60) == 1
        assert "the server stopped because the model's process ended" in log.read_text()
    finally:
        stop_server(proc)


def test_stopping_the_whole_service_answers_what_was_accepted(adapters, expected, tmp_path):
    """A supervisor (systemd, a terminal's Ctrl-C) signals every process of the service at once. The
    model's process leaves shutdown to the HTTP process, which answers what it accepted, then exits."""
    import signal

    import psutil

    log = tmp_path / "server.log"
    proc, url = start_server(["--adapters-dir", str(tmp_path / "none"), "--adapter", f"shapes={adapters['shapes']}"], log)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        image, want = expected["bytes"][0], expected["caption"]["shapes"][0]
        assert chat(client, "shapes", image).choices[0].message.content == want
        [engine] = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        first_answer = threading.Event()

        def one(i):
            try:
                text = chat(client, "shapes", image).choices[0].message.content
                first_answer.set()
                return "answered" if text == want else text
            except openai.APIStatusError as exc:
                return exc.status_code
            except openai.APIConnectionError:
                return "refused"  # sent after the server stopped taking requests

        with ThreadPoolExecutor(max_workers=64) as pool:
            futures = [pool.submit(one, i) for i in range(512)]
            assert first_answer.wait(60)
            os.killpg(proc.pid, signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        assert set(results) <= {"answered", "refused"}, {r for r in results if r not in ("answered", "refused")}
        proc.wait(timeout=60)
        engine.wait(timeout=30)  # the model's process ended too, none left behind
        assert "model's process stopped" not in log.read_text()
    finally:
        stop_server(proc)


def test_clients_that_go_away_do_not_fill_the_queue(adapters, expected, tmp_path):
    """A streaming client that disconnects mid-answer stops its row, and its place in the server is
    freed: more disconnects than the queue holds, and the next request is still answered."""
    import http.client

    log = tmp_path / "server.log"
    proc, url = start_server(["--adapters-dir", str(tmp_path / "none"), "--adapter", f"shapes={adapters['shapes']}", "--max-queue", "4"], log)
    try:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({
            "model": "tiny", "stream": True, "max_tokens": 80,
            "messages": message(data_url(expected["bytes"][0])),
        })  # fmt: skip
        for _ in range(12):  # the bare base writes noise up to max_tokens: each is cut off mid-answer
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            assert response.read1().startswith(b"data: ")  # the role chunk: the request is in
            connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
        time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for image, want in zip(expected["bytes"][:3], expected["caption"]["shapes"][:3]):
            assert chat(client, "shapes", image).choices[0].message.content == want
        assert health(url)["waiting"] == 0
    finally:
        stop_server(proc)


# --- keys and remote images ---------------------------------------------------------------------------


def test_api_key_and_remote_image_policy(adapters, expected, tmp_path):
    log = tmp_path / "server.log"
    args = [
        "--adapters-dir",
        str(tmp_path / "none"),
        "--adapter",
        f"shapes={adapters['shapes']}",
        "--api-key",
        "s3cret-key",
    ]
    args += ["--allow-remote-images", "--allowed-hosts", "localhost,127.0.0.1,10.1.2.3,internal.example"]
    proc, url = start_server(args, log)
    try:
        image = expected["bytes"][0]
        for key in ("wrong-key", "s3cret-ke", "s3cret-key-and-more"):
            with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
                chat(openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0), "shapes", image)
        import httpx

        assert httpx.get(url + "/v1/models").status_code == 401  # no key at all
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        assert chat(good, "shapes", image).choices[0].message.content == expected["caption"]["shapes"][0]

        refused = {
            f"{url}/health": "127.0.0.1 is a private, loopback",
            f"http://localhost:{url.rsplit(':', 1)[1]}/health": "is a private, loopback",
            "http://10.1.2.3/cat.png": "10.1.2.3 is a private",
            "http://example.com/cat.png": "'example.com' is not in this server's --allowed-hosts",
            "http://[::1]/cat.png": "not in this server's --allowed-hosts",
        }
        for remote, words in refused.items():
            with pytest.raises(openai.PermissionDeniedError) as info:
                good.chat.completions.create(model="shapes", messages=message(remote))
            assert words in info.value.body["message"], (remote, info.value.body)
        assert proc.poll() is None
    finally:
        stop_server(proc)


def test_binding_beyond_loopback_needs_a_key():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MULTIMODAL_LORA_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "multimodal_lora.serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--host 0.0.0.0 is reachable from other machines: set --api-key" in result.stderr


# --- the parts, in-process ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped private
        ("::ffff:8.8.8.8", True),
        ("224.0.0.1", False),
    ],
)
def test_only_public_addresses_may_be_fetched(address, public):
    from multimodal_lora.serve.images import check_address
    from multimodal_lora.serve.protocol import APIError

    if public:
        check_address(address)
    else:
        with pytest.raises(APIError, match="private, loopback, link-local or reserved"):
            check_address(address)


def test_streamed_text_never_runs_ahead_of_the_final_text():
    from multimodal_lora.serve.engine import _safe_prefix

    assert _safe_prefix("a red ", []) == "a red"
    assert _safe_prefix("a red ci", ["circle"]) == "a red"  # may yet become the stop string
    assert _safe_prefix("a red \ufffd", []) == "a red"  # half of a multi-byte character
    assert _safe_prefix("a red circle", ["square"]) == "a red circle"


def test_batcher_groups_by_adapter_and_isolates_a_failing_request():
    import threading

    from multimodal_lora.serve.batcher import Batcher
    from multimodal_lora.serve.engine import Job
    from multimodal_lora.serve.protocol import Sampling

    class Sink:
        def __init__(self):
            self.result = None
            self.done = threading.Event()

        def delta(self, text):
            pass

        def finish(self, reason, tokens):
            self.result = reason
            self.done.set()

        def fail(self, error):
            self.result = error
            self.done.set()

    calls = []

    def run(jobs):
        calls.append([(job.adapter, job.prompt) for job in jobs])
        if any(job.prompt == "poison" for job in jobs):
            raise RuntimeError("this request breaks generate")
        for job in jobs:
            job.done = True
            job.sink.finish("stop", 1)

    batcher = Batcher(run, max_batch_size=4, max_wait_ms=50, max_queue=100)
    jobs = []
    for i in range(10):
        adapter = "a" if i % 2 else "b"
        prompt = "poison" if i == 3 else f"p{i}"
        jobs.append(Job(adapter, None, prompt, 1, 5, Sampling(), [], Sink()))
    jobs.append(Job("a", None, "sampled", 1, 5, Sampling(do_sample=True, temperature=0.7), [], Sink()))
    for job in jobs:
        batcher.submit(job)
    assert all(job.sink.done.wait(10) for job in jobs)
    batcher.close()
    for call in calls:
        assert len({adapter for adapter, _ in call}) == 1, call  # never two adapters in one call
        assert not ("sampled" in [p for _, p in call] and len(call) > 1)  # other sampling settings, another call
        assert len(call) <= 4
    assert max(len(call) for call in calls) > 1  # they were batched
    assert isinstance(jobs[3].sink.result, RuntimeError)
    assert all(job.sink.result == "stop" for i, job in enumerate(jobs) if i != 3)
    # The poisoned batch was retried one by one: its mates succeeded on their own.
    assert [("a", "poison")] in calls

    full = Batcher(lambda jobs: time.sleep(0.2), max_batch_size=1, max_wait_ms=0, max_queue=1)
    from multimodal_lora.serve.protocol import APIError

    with pytest.raises(APIError, match="the server is busy"):
        for i in range(5):
            full.submit(Job("a", None, str(i), 1, 5, Sampling(), [], Sink()))
    full.close()


def test_batcher_waits_only_for_the_mates_it_expects():
    import threading

    from multimodal_lora.serve.batcher import Batcher
    from multimodal_lora.serve.engine import Job
    from multimodal_lora.serve.protocol import Sampling

    class Sink:
        def __init__(self):
            self.done = threading.Event()

        def delta(self, text):
            pass

        def finish(self, reason, tokens):
            self.done.set()

        def fail(self, error):
            self.done.set()

    sizes = []

    def run(jobs):
        sizes.append(len(jobs))
        for job in jobs:
            job.done = True
            job.sink.finish("stop", 1)

    def answer(count: int) -> float:
        jobs = [Job("a", None, "p", 1, 5, Sampling(), [], Sink()) for _ in range(count)]
        start = time.monotonic()
        for job in jobs:
            batcher.submit(job)
        assert all(job.sink.done.wait(10) for job in jobs)
        return time.monotonic() - start

    batcher = Batcher(run, max_batch_size=8, max_wait_ms=400, max_queue=100)
    try:
        # No history yet: the first request waits the whole max_wait for mates that never come.
        assert answer(1) >= 0.35
        # The last batch was one request, so a lone client's next request goes at once.
        assert answer(1) < 0.2
        assert answer(1) < 0.2
        assert sizes == [1, 1, 1]
    finally:
        batcher.close()
