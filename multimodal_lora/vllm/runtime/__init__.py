"""Code that runs in vLLM's interpreter: stdlib, vLLM and PIL only, never ``multimodal_lora``
(whose ``transformers`` differs). This directory goes on that interpreter's ``PYTHONPATH``."""
