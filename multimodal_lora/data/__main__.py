"""``python -m multimodal_lora.data``: runs :mod:`multimodal_lora.commands.data`."""

if __name__ == "__main__":
    from multimodal_lora.commands.data import cli

    cli()
