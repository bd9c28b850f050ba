from multimodal_lora.serve.cli import cli

if __name__ == "__main__":  # not when a spawned engine process imports this module as __mp_main__
    cli()
