from multimodal_lora.serve.cli import cli

cli()
