"""The OpenAI-compatible server under load: requests/s and latency, by how it batches.

    python bench/serve.py                                   # tiny base, CPU (a few minutes)
    python bench/serve.py --full-size --device cuda         # BLIP-2 OPT-2.7B, random weights, on a GPU

Three servers (``python -m multimodal_lora.serve``, each its own processes)
serve the same base and adapter, one per ``--batching`` mode: ``off`` (one
request at a time), ``request`` (concurrent requests share a ``generate``
call, up to ``--max-batch-size``, gathered for up to ``--max-wait-ms``) and
``continuous`` (requests join and leave a running batch between tokens). For
each number of concurrent clients (1, 4, 16, 64), each client sends
chat-completion requests back to back (a closed loop, keep-alive connections, a
validation image as a ``data:`` URL) for ``--seconds``; the servers are
measured in turn, level by level, each going first at some level, so a change
in the machine's load hits all alike. Reported: requests/s (completed requests
over the time from the first send to the last answer), p50 and p95 latency,
how many were answered together (requests per ``generate`` call; for
continuous batching, running rows per decoding step), and the CPU time the
server and the clients spent per request. Last, with the servers gone, the
model alone in a fresh process (:func:`quiet_model`): one answer and a full
batch, which bound from below what any server's clients can wait here.

Targets (issue 13): at 16 clients, batching gives at least 3× the requests/s
of one at a time, with p95 latency no more than twice the latency of one
request alone (1 client, batching off); the 1-client p50 of every mode is
printed too, since that one figure divides every ratio.

The tiny base gets an adapter from a short run of ``recipes/tiny.yaml``
(``--recipe tiny-qwen2vl`` and the like: another family's tiny twin and recipe,
written to ``serve_tiny-qwen2vl.json``). With
``--full-size`` the published ``Salesforce/blip2-opt-2.7b`` architecture is
built with random weights (no download) and saved as a bf16 checkpoint with a
processor (the tiny base's tokenizer, the real image size), plus a random LoRA
adapter (r=16 on q_proj, v_proj, as ``recipes/football.yaml``); every request
then generates ``--max-tokens`` tokens (random weights rarely stop early).
Writes ``bench/results/serve.json`` (``serve_full_size.json`` with ``--full-size``).

``--modes continuous,vllm`` puts vLLM's server (``serve --engine vllm``: the same base,
adapter, requests and clients) beside ours, and prints vLLM's requests/s and p95 over
continuous batching's at each level; it writes ``serve_vllm.json`` (``serve_vllm_full_size.json``).
vLLM runs as its defaults have it (its own batching, its CPU threads); the
"together" and CPU-per-request columns are ours only.
"""

from __future__ import annotations

import argparse
import base64
import gc
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from harness import quiet, table, write_result

REPO = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16, 64)


def repo_on_path() -> str:
    """PYTHONPATH for a subprocess: this checkout first, then whatever the caller had (the wheels a GPU
    machine is given live on it)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_setup(workdir: Path, steps: int, adapter: str | None, recipe_name: str = "tiny") -> tuple[list[str], Path, dict]:
    """An adapter (``adapter``, or one from a short run of ``recipes/<recipe_name>.yaml``); returns the
    server's model arguments, the images, and the same model as :meth:`Captioner.for_adapter` arguments."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.shapes import ensure_builtin
    from multimodal_lora.training import train

    recipe = load_recipe(
        REPO / "recipes" / f"{recipe_name}.yaml",
        [f"output_dir={workdir / 'run'}", f"train.max_steps={steps}", "data.val_split=null", "data.val_fraction=0"],
    )
    if adapter is None:
        adapter = train(recipe).adapter_dir
    args = ["--base", recipe.model.base, "--device", "cpu", "--adapter", f"shapes={adapter}"]
    return args, ensure_builtin("shapes") / "validation", {"adapter": adapter, "name": "shapes", "device": "cpu"}


def full_size_setup(
    workdir: Path, device: str, dtype: str, quantization: str, small: bool = False
) -> tuple[list[str], Path, dict]:
    """Random-weight BLIP-2 OPT-2.7B (``small``: a small config of the same structure) + processor
    + a random LoRA adapter, saved under ``workdir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from multimodal_lora.data.shapes import ensure_builtin
    from multimodal_lora.model.base import published_config
    from multimodal_lora.model.tiny import ensure_tiny_base

    if small:
        from gpu_full_size import small_config

        config = small_config()
    else:
        config = published_config()
    checkpoint = workdir / "blip2-opt-2.7b-random"
    torch.manual_seed(0)
    with torch.device(device if device != "auto" else "cuda"):
        model = Blip2ForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(ensure_tiny_base())
    size = config.vision_config.image_size
    processor.image_processor.size = {"height": size, "width": size}
    processor.num_query_tokens = config.num_query_tokens
    processor.save_pretrained(checkpoint)
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    adapter = workdir / "adapter"
    get_peft_model(model, lora).save_pretrained(adapter, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    args = [
        "--base",
        str(checkpoint),
        "--device",
        device,
        "--dtype",
        dtype,
        "--quantization",
        quantization,
        "--adapter",
        f"random-lora={adapter}",
    ]
    load = {"adapter": adapter, "name": "random-lora", "base": str(checkpoint), "device": device, "dtype": dtype,
            "quantization": quantization}  # fmt: skip
    return args, ensure_builtin("shapes") / "validation", load


class Server:
    """``python -m multimodal_lora.serve`` in a subprocess on a free loopback port."""

    def __init__(self, model_args: list[str], extra: list[str], log: Path, threads: int):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": repo_on_path(), "PYTHONUNBUFFERED": "1"}
        self.log = log
        # Our engine's threads and queue; vLLM sizes its own (it refuses our flags for them).
        ours = [] if "vllm" in extra else ["--torch-threads", str(threads), "--max-queue", "1024"]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "multimodal_lora.serve", "--port", str(self.port), "--adapters-dir", str(log.parent / "none"),
                 *ours, *model_args, *extra],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.health()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{self.log.read_text()}") from None
                time.sleep(0.5)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as response:
            return json.loads(response.read() or b"{}")  # vLLM's /health has an empty body

    def cpu_seconds(self) -> float | None:
        """CPU time the server has used (user + system, its HTTP process and the model's), or ``None`` without psutil."""
        try:
            import psutil
        except ImportError:
            return None
        process = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [process, *process.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def mean_batch(before: dict, after: dict) -> float:
    """Between two ``/health`` readings: requests per ``generate`` call, or for continuous batching
    the mean running rows per decoding step."""
    if after["batching"] == "continuous":
        steps = after["decode_steps"] - before["decode_steps"]
        return (after["decoded_rows"] - before["decoded_rows"]) / max(steps, 1)
    return (after["batched_requests"] - before["batched_requests"]) / max(after["batches"] - before["batches"], 1)


def request_bodies(images: Path, model: str, max_tokens: int | None, count: int = 8) -> list[bytes]:
    bodies = []
    for path in sorted(images.glob("*.png"))[:count]:
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        body = {
            "model": model,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        }
        if max_tokens:
            body["max_tokens"] = max_tokens
        bodies.append(json.dumps(body).encode())
    return bodies


def load(port: int, clients: int, seconds: float, bodies: list[bytes], requests: int | None = None) -> dict:
    """``clients`` threads sending requests back to back for ``seconds``, or until ``requests`` have been
    sent, whichever comes first; latencies and throughput."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    state = {"deadline": 0.0, "last": 0.0, "sent": 0}

    def take() -> bool:
        """Whether this client may send one more request."""
        with lock:
            if time.perf_counter() >= state["deadline"] or (requests is not None and state["sent"] >= requests):
                return False
            state["sent"] += 1
            return True

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start_gate.wait()
        n = index
        while take():
            body = bodies[n % len(bodies)]
            n += clients
            sent = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            done = time.perf_counter()
            with lock:
                if response.status == 200:
                    latencies.append(done - sent)
                    state["last"] = max(state["last"], done)
                else:
                    errors.append(f"{response.status}: {payload[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    cpu_before = time.process_time()  # this process is the clients while they run
    begin = time.perf_counter()
    state["deadline"] = begin + seconds
    start_gate.wait()
    for thread in threads:
        thread.join()
    client_cpu = time.process_time() - cpu_before
    latencies.sort()
    elapsed = state["last"] - begin

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))]

    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[:5],
        "error_count": len(errors),
        "seconds": elapsed,
        "requests_per_second": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": pct(50) * 1000,
        "p95_ms": pct(95) * 1000,
        "client_cpu_ms_per_request": client_cpu / max(len(latencies), 1) * 1000,
    }


def quiet_model(load: dict, images: Path, max_tokens: int, batch: int, repeats: int = 15) -> dict:
    """The model alone, in this process once the servers are gone: one request and a full batch,
    through the servers' own engine code (pixels prepared beforehand, as the servers do), both
    ways: one ``generate`` call (``run_batch``, per-request batching) and the continuous decode
    loop (``RunningBatch``: a prefill, then a step per token), alternating.

    By Little's law, ``clients`` closed-loop clients wait ``clients / throughput`` on average. A
    server whose model runs on one core answers at most ``batch`` requests per batch,
    so at ``batch`` clients no server can average less than one batch's time here.
    """
    from multimodal_lora.data.images import load_image
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.serve.continuous import RunningBatch
    from multimodal_lora.serve.engine import Job, run_batch
    from multimodal_lora.serve.protocol import Sampling

    class Sink:
        def delta(self, text: str) -> None:
            pass

        def finish(self, reason: str, tokens: int) -> None:
            self.tokens = tokens

        def fail(self, error: BaseException) -> None:
            raise error

    load = dict(load)
    captioner = Captioner.for_adapter(load.pop("adapter"), **load)
    adapter = captioner.adapter_names[0]
    prompt = captioner.caption_prompt(adapter)
    paths = sorted(images.glob("*.png"))
    pixels = [captioner.pixels(load_image(str(paths[i % len(paths)]))) for i in range(batch)]

    def continuous(jobs: list) -> None:
        running = RunningBatch(captioner, jobs[0].key)
        running.admit(jobs)
        while running.rows:
            running.step()

    engines = {"generate": lambda jobs: run_batch(captioner, jobs), "continuous": continuous}

    def once(engine: str, size: int) -> tuple[float, list[int]]:
        jobs = [
            Job(adapter, pixels[i], prompt, 0, max_tokens, Sampling(), [], Sink(), stream=False) for i in range(size)
        ]
        start = time.perf_counter()
        engines[engine](jobs)
        if captioner.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - start, [job.sink.tokens for job in jobs]

    for engine in engines:  # warm-up
        once(engine, 1), once(engine, batch)
    # As the server's model process does once loaded: what imports made is not walked by every collection.
    gc.collect()
    gc.freeze()
    times = {(engine, size): [] for engine in engines for size in (1, batch)}
    tokens = {}
    for _ in range(repeats):  # alternating, so a drift in the machine's speed hits all alike
        for engine, size in times:
            seconds, tokens[engine, size] = once(engine, size)
            times[engine, size].append(seconds)
    median = {key: statistics.median(value) * 1000 for key, value in times.items()}
    return {
        "one_ms": median["generate", 1],
        "batch_ms": median["generate", batch],
        "continuous_one_ms": median["continuous", 1],
        "continuous_batch_ms": median["continuous", batch],
        "batch": batch,
        "tokens_per_answer": statistics.median(tokens["generate", batch]),
        "repeats": repeats,
    }


def quiet_model_alone(load: dict, images: Path, max_tokens: int, batch: int, threads: int) -> dict:
    """:func:`quiet_model` in a fresh process, as the server's model process is: this one has
    trained an adapter and run the clients, and its allocator and threads show it."""
    spec = {"load": {k: str(v) if isinstance(v, Path) else v for k, v in load.items()}, "images": str(images),
            "max_tokens": max_tokens, "batch": batch}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": repo_on_path()}
    command = [sys.executable, __file__, "--threads", str(threads), "--quiet-model", json.dumps(spec)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--levels", default=",".join(map(str, LEVELS)), help="concurrent clients to try (default 1,4,16,64)"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="load time per level and server (default 6)")
    parser.add_argument(
        "--requests", type=int, default=None, help="at most this many requests per level and server (default: no cap)"
    )
    parser.add_argument(
        "--modes", default="off,request,continuous", help="the servers' --batching modes to compare (default all three)"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="tokens per answer (default: the server's 30, and 20 with --full-size)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per server (default 1: the machine is shared)"
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps of the tiny adapter")
    parser.add_argument("--adapter", default=None, help="a tiny-base adapter to serve instead of training one")
    parser.add_argument(
        "--recipe", default="tiny", help="the tiny recipe whose base and adapter are served (default tiny: BLIP-2 OPT)"
    )
    parser.add_argument("--full-size", action="store_true", help="BLIP-2 OPT-2.7B with random weights (needs a GPU)")
    parser.add_argument(
        "--small", action="store_true", help="with --full-size: a small config, same code (runs on a CPU; for tests)"
    )
    parser.add_argument("--device", default="cpu", help="the servers' --device (cuda with --full-size)")
    parser.add_argument("--dtype", default=None, help="the servers' --dtype (default fp32; bf16 with --full-size)")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "4bit"])
    parser.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    parser.add_argument("--quiet-model", default=None, help=argparse.SUPPRESS)  # internal: see quiet_model_alone
    args = parser.parse_args(argv)
    quiet()
    if args.quiet_model:
        import torch

        torch.set_num_threads(args.threads)
        spec = json.loads(args.quiet_model)
        print(json.dumps(quiet_model(spec["load"], Path(spec["images"]), spec["max_tokens"], spec["batch"])))
        return 0
    levels = [int(x) for x in args.levels.split(",")]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    dtype = args.dtype or ("bf16" if args.full_size else "fp32")
    max_tokens = args.max_tokens or (20 if args.full_size else None)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    servers = {}
    try:
        if args.full_size:
            model_args, images, model_load = full_size_setup(workdir, args.device, dtype, args.quantization, args.small)
            model = "random-lora"
        else:
            import torch

            torch.set_num_threads(args.threads)
            model_args, images, model_load = tiny_setup(workdir, args.steps, args.adapter, args.recipe)
            model = "shapes"
        bodies = request_bodies(images, model, max_tokens)
        limits = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
        for name in modes:
            (workdir / name).mkdir()
            extra = ["--batching", name, *(limits if name != "off" else [])]
            if name == "vllm":
                extra = ["--engine", "vllm", "--vllm-log", str(workdir / name / "vllm.log")]
            servers[name] = Server(model_args, extra, workdir / name / "server.log", args.threads)
        for server in servers.values():
            server.wait()
        # Warm-up at every level: first calls pay for lazy initialisation, and each new batch shape
        # for its kernels (bf16 on a CPU most of all), which would otherwise land in the first level's p95.
        for server in servers.values():
            for clients in sorted(set(levels)):
                load(server.port, clients, 0.5, bodies)
        rows = []
        for i, clients in enumerate(levels):
            order = modes[i % len(modes) :] + modes[: i % len(modes)]  # each mode goes first at some level
            for name in order:
                before, cpu_before, load_before = servers[name].health(), servers[name].cpu_seconds(), os.getloadavg()[0]
                result = load(servers[name].port, clients, args.seconds, bodies, args.requests)
                after, cpu_after = servers[name].health(), servers[name].cpu_seconds()
                result["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute, before and after
                if name == "vllm":
                    after = {"batching": "vllm", "batches": 0, "batched_requests": 0}
                    before = dict(after)
                result.update(
                    batching=after["batching"], mean_batch=float("nan") if name == "vllm" else mean_batch(before, after),
                    prefills=after["batches"] - before["batches"],
                    prefill_ms=after.get("prefill_ms"), step_ms=after.get("step_ms"),
                    server_cpu_ms_per_request=None if cpu_before is None else
                    (cpu_after - cpu_before) / max(result["requests"], 1) * 1000,
                )  # fmt: skip
                rows.append(result)
                print(f"{clients:>3} clients, batching {name:>10}: {result['requests_per_second']:.1f} req/s, "
                      f"p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms, {result['mean_batch']:.1f} together", flush=True)  # fmt: skip
        for server in servers.values():
            server.stop()
        # The floor under any server's latency on this machine: the model alone, quiet (see quiet_model);
        # it divides by one request alone with batching off, so only with that mode.
        if "off" in modes:
            alone = quiet_model_alone(model_load, images, max_tokens or 30, args.max_batch_size, args.threads)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    by = {(r["clients"], r["batching"]): r for r in rows}
    single = by.get((1, "off"))
    printable = []
    for clients in levels:
        off = by.get((clients, "off"))
        for name in modes:
            r = by[(clients, name)]
            speedup = r["requests_per_second"] / off["requests_per_second"] if off and off["requests_per_second"] else float("nan")
            printable.append([clients, name, r["requests_per_second"], r["p50_ms"], r["p95_ms"], r["mean_batch"],
                              speedup, r["p95_ms"] / single["p50_ms"] if single else float("nan"),
                              r["server_cpu_ms_per_request"], r["client_cpu_ms_per_request"]])  # fmt: skip
    title = (
        f"{('small BLIP-2 config' if args.small else 'BLIP-2 OPT-2.7B') + ' (random weights)' if args.full_size else f'tiny base ({model_args[1]})'}, {dtype}, quantization {args.quantization}, "
        f"device {args.device}, torch threads {args.threads}; request and continuous batching: up to {args.max_batch_size} together, {args.max_wait_ms:g} ms wait; "
        "together = requests per generate call (request), running rows per decoding step (continuous)"
    )
    print(
        table(
            [
                "clients",
                "batching",
                "req/s",
                "p50 ms",
                "p95 ms",
                "together",
                "× off",
                "p95 / 1 alone",
                "server CPU ms/req",
                "client CPU ms/req",
            ],  # fmt: skip
            printable,
            title=title,
        )
    )
    summary = {"targets": {"speedup_at_16": ">= 3", "p95_at_16_over_one_alone": "<= 2"}}
    if (16, "off") in by and single:
        off16 = by[(16, "off")]
        for name in (m for m in modes if m != "off"):
            at16 = by[(16, name)]
            summary[name] = {
                "speedup_at_16": at16["requests_per_second"] / off16["requests_per_second"],
                "p95_at_16_over_one_alone": at16["p95_ms"] / single["p50_ms"],
            }
            print(f"at 16 clients, {name} batching: {summary[name]['speedup_at_16']:.2f}× the requests/s of one at a time (target ≥ 3); "
                  f"p95 {at16['p95_ms']:.0f} ms = {summary[name]['p95_at_16_over_one_alone']:.2f}× one request alone ({single['p50_ms']:.0f} ms; target ≤ 2)")  # fmt: skip
        alone_p50 = {name: by[(1, name)]["p50_ms"] for name in modes if (1, name) in by}
        summary["one_client_p50_ms"] = alone_p50
        print("one client alone, p50: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in alone_p50.items()))
    if single:
        # Little's law: closed-loop clients wait clients / throughput on average, and p95 is at least the mean.
        floor = {"model_alone": alone, "model_batch_over_one_alone": alone["batch_ms"] / single["p50_ms"]}
        print(f"the model alone, in a quiet process: one answer {alone['one_ms']:.1f} ms, {alone['batch']} at once "
              f"{alone['batch_ms']:.1f} ms ({alone['tokens_per_answer']:g} tokens each). With its model on one core, no server's "
              f"{alone['batch']} clients can wait under {alone['batch_ms']:.0f} ms on average: "
              f"{floor['model_batch_over_one_alone']:.2f}× one request alone")  # fmt: skip
        print(f"the same through the continuous decode loop: one answer {alone['continuous_one_ms']:.1f} ms, "
              f"{alone['batch']} at once {alone['continuous_batch_ms']:.1f} ms")  # fmt: skip
        on = by.get((alone["batch"], modes[-1]))
        if on and on["server_cpu_ms_per_request"] is not None:
            cores = os.cpu_count() or 1
            cpu = on["server_cpu_ms_per_request"] + on["client_cpu_ms_per_request"]
            floor.update(
                cpu_ms_per_request=cpu,
                cores=cores,
                cpu_floor_over_one_alone=alone["batch"] * cpu / cores / single["p50_ms"],
            )
            print(f"this server and its clients spent {cpu:.1f} ms of CPU a request at {alone['batch']} clients "
                  f"({on['server_cpu_ms_per_request']:.1f} server, {on['client_cpu_ms_per_request']:.1f} clients): on {cores} cores "
                  f"they cannot average under {alone['batch'] * cpu / cores:.0f} ms, "
                  f"{floor['cpu_floor_over_one_alone']:.2f}× one request alone")  # fmt: skip
        summary["floor"] = floor
    if "vllm" in modes and "continuous" in modes:
        ratios = {}
        for clients in levels:
            ours, theirs = by[(clients, "continuous")], by[(clients, "vllm")]
            ratios[clients] = {"rps": theirs["requests_per_second"] / max(ours["requests_per_second"], 1e-9),
                               "p95": theirs["p95_ms"] / max(ours["p95_ms"], 1e-9)}  # fmt: skip
            print(f"{clients:>3} clients: vLLM {ratios[clients]['rps']:.2f}× the requests/s of continuous batching, "
                  f"p95 {ratios[clients]['p95']:.2f}×")  # fmt: skip
        summary["vllm_over_continuous"] = ratios
    name = ("serve_full_size_small" if args.small else "serve_full_size") if args.full_size else "serve"
    if not args.full_size and args.recipe != "tiny":
        name = f"serve_{args.recipe}"
    if "vllm" in modes:
        name = name.replace("serve", "serve_vllm", 1)
    path = write_result(name, {
        "base": "Salesforce/blip2-opt-2.7b (published config, random weights)" if args.full_size else model_args[1],
        "dtype": dtype, "quantization": args.quantization, "device": args.device, "seconds_per_level": args.seconds,
        "requests_per_level": args.requests,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "max_tokens": max_tokens,
        "rows": rows, "summary": summary,
    }, args.out)  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
