"""``python -m multimodal_lora.caption``: runs :mod:`multimodal_lora.commands.caption`.

Only an entry point (``accelerate launch -m multimodal_lora.caption`` too). Never import this
module: importing ``multimodal_lora.caption`` would bind the package's ``caption`` (the public
function, :func:`multimodal_lora.inference.captioner.caption`) to this module. ``python -m`` runs it
without importing it as ``multimodal_lora.caption``, so it is safe.
"""

if __name__ == "__main__":
    from multimodal_lora.commands.caption import cli

    cli()
