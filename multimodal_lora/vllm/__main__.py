"""``python -m multimodal_lora.vllm``: runs :mod:`multimodal_lora.commands.vllm`."""

if __name__ == "__main__":
    from multimodal_lora.commands.vllm import cli

    cli()
