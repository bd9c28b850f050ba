"""Batch captioning: :mod:`.inputs` (the streamed input listing: files, directories, globs, lists,
manifests), :mod:`.run` (rounds of images shared across processes, decoded by DataLoader workers) and
:mod:`.output` (the ordered, resumable output file). The command is :mod:`multimodal_lora.commands.caption`.
"""
