"""An OpenAI-compatible server for a base and its adapters, batching concurrent requests.

    python -m multimodal_lora.serve --adapters-dir runs          # http://127.0.0.1:8000/v1

One module per job: :mod:`~multimodal_lora.serve.protocol` (requests, responses,
errors), :mod:`~multimodal_lora.serve.images` (data URLs, limits, the remote-URL
policy), :mod:`~multimodal_lora.serve.engine` (one batched ``generate`` call,
followed row by row), :mod:`~multimodal_lora.serve.batcher` (gathering requests
into batches), :mod:`~multimodal_lora.serve.engine_process` (the model in a
process of its own), :mod:`~multimodal_lora.serve.app` (the FastAPI routes); the command is
:mod:`multimodal_lora.commands.serve`.
"""

__all__ = ["Batcher", "ServerSettings", "create_app"]


def __getattr__(name: str):
    # Imported on first use: `python -m multimodal_lora.serve` imports this package first, and it
    # starts the model's process before it imports the web stack (torch, transformers, FastAPI).
    if name == "Batcher":
        from multimodal_lora.serve.batcher import Batcher

        return Batcher
    if name in ("ServerSettings", "create_app"):
        from multimodal_lora.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
