"""``python -m multimodal_lora.serve``: runs :mod:`multimodal_lora.commands.serve`."""

if __name__ == "__main__":  # not when a spawned engine process imports this module as __mp_main__
    from multimodal_lora.commands.serve import cli

    cli()
