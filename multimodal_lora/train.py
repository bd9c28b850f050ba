"""``python -m multimodal_lora.train``: runs :mod:`multimodal_lora.commands.train`.

Only an entry point. Never import this module: importing ``multimodal_lora.train`` would bind
the package's ``train`` (the public function, :func:`multimodal_lora.training.train`) to this
module. ``python -m`` runs it without importing it as ``multimodal_lora.train``, so it is safe.
"""

if __name__ == "__main__":
    from multimodal_lora.commands.train import cli

    cli()
