"""vLLM's side of ``caption --engine vllm``: one ``vllm.LLM``, batches in, texts out, as JSON lines.

Runs in vLLM's interpreter (stdlib, vLLM and PIL only); the caption command in our
environment starts it, decides the prompts (token ids made by our family layout) and
keeps the order, the output file and ``--resume``.

Protocol (one JSON object per line):

* in, first: ``{"llm": {...keyword arguments of vllm.LLM...}, "lora": [name, path] | null}``;
  out: ``{"ready": true}`` once the model is loaded;
* in: ``{"images": [[mode, width, height, base64 pixels], ...], "prompts": [[ids], ...],
  "sampling": {...SamplingParams...}}``; out: ``{"texts": [...]}`` in the same order;
* out on failure: ``{"error": "..."}``, then the worker ends.

vLLM logs to standard output, and so do the processes it starts; the protocol has a
descriptor of its own (the original standard output), and standard output is pointed
at standard error before vLLM is imported.
"""

import base64
import json
import os
import sys
import traceback

import mmlora_vllm_compat


def _protocol_out():
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed to stdout (vLLM's logs, its workers') goes to stderr
    sys.stdout = sys.stderr
    return out


def main():
    out = _protocol_out()
    mmlora_vllm_compat.patch()
    try:
        setup = json.loads(sys.stdin.readline())
        from PIL import Image
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(**setup["llm"])
        lora = LoRARequest(setup["lora"][0], 1, setup["lora"][1]) if setup.get("lora") else None
        out.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            job = json.loads(line)
            images = [Image.frombytes(m, (w, h), base64.b64decode(data)) for m, w, h, data in job["images"]]
            requests = [
                {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
                for ids, image in zip(job["prompts"], images)
            ]
            results = llm.generate(requests, SamplingParams(**job["sampling"]), lora_request=lora, use_tqdm=False)
            out.write(json.dumps({"texts": [r.outputs[0].text for r in results]}, ensure_ascii=False) + "\n")
    except Exception as exc:  # the parent shows this and the log's end; the traceback is in the log
        traceback.print_exc()
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
