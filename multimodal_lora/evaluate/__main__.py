"""``python -m multimodal_lora.evaluate``: runs :mod:`multimodal_lora.commands.evaluate`."""

if __name__ == "__main__":
    from multimodal_lora.commands.evaluate import cli

    cli()
