"""The base model: loading it (:mod:`.base`, :mod:`.loading`), its LoRA, the memory plan
(:mod:`.plan`) and the offline tiny twins (:mod:`.tiny`).
"""
