"""Quantization schemes as a table: each one's bitsandbytes config, its bytes per weight, whether it merges.

``model.quantization`` names a row of :data:`SCHEMES`; everything that depends on the
scheme (loading, the memory plan, merging, the command-line choices, how a load is
described) asks its row instead of comparing names, so a new scheme is one more row.
bitsandbytes and transformers are imported only when a config is built.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

QuantizationName = Literal["none", "int8", "4bit"]
"""The names a recipe's ``model.quantization`` may take (the keys of :data:`SCHEMES`)."""

NF4_BLOCK = 64
"""Weights per 4-bit block: each block has an 8-bit scale (double quantization)."""
NF4_NESTED_BLOCK = 256
"""Block scales per fp32 scale of the nested (double) quantization."""


@dataclass(frozen=True)
class Scheme:
    """One way to hold a base's linear weights."""

    name: str
    quantized: bool
    """Held by bitsandbytes (int8, 4-bit): needs it installed, and the weights are rounded."""
    mergeable: bool
    """A LoRA update can be folded into these weights exactly (rounded weights would be rounded again)."""
    four_bit: bool = False
    """Has a 4-bit data type (``nf4``/``fp4``) and a compute dtype."""

    def bnb_config(self, torch_dtype, quant_type: str = "nf4", skip: tuple[str, ...] = ()):
        """The ``BitsAndBytesConfig`` that loads a base this way (``None`` unquantized).

        ``torch_dtype`` is the dtype 4-bit layers compute in. ``skip``: module-name prefixes
        to leave unquantized (``llm_int8_skip_modules``, which bitsandbytes honours for 4-bit too);
        the output head is added to them, as transformers leaves it unquantized only when
        given no list of its own.
        """
        if not self.quantized:
            return None
        from transformers import BitsAndBytesConfig

        skip_modules = [*skip, "lm_head"] if skip else None
        if not self.four_bit:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=skip_modules,
        )

    def weight_bytes(self, shape: tuple[int, int]) -> int:
        """Bytes of one bitsandbytes weight matrix of ``shape`` (out, in), scales included."""
        if not self.quantized:
            raise ValueError(f"quantization {self.name!r} is not a bitsandbytes format")
        out_features, in_features = shape
        n = out_features * in_features
        if not self.four_bit:
            return n + 4 * out_features  # int8 weights + one fp32 scale (SCB) per row
        blocks = math.ceil(n / NF4_BLOCK)
        nested = math.ceil(blocks / NF4_NESTED_BLOCK)
        # + the two code books: 16 NF4 levels and 256 8-bit levels, in fp32.
        return math.ceil(n / 2) + blocks + 4 * nested + 4 * (16 + 256)


SCHEMES: dict[str, Scheme] = {
    "none": Scheme("none", quantized=False, mergeable=True),
    "int8": Scheme("int8", quantized=True, mergeable=False),
    "4bit": Scheme("4bit", quantized=True, mergeable=False, four_bit=True),
}
NAMES: tuple[str, ...] = tuple(SCHEMES)
assert NAMES == typing.get_args(QuantizationName), "SCHEMES and QuantizationName name the same schemes"


def scheme(name: str, what: str = "quantization") -> Scheme:
    """The row for ``name``.

    Raises:
        ValueError: not a scheme; the message lists the ones there are.
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"{what}: {name!r}; choose from {', '.join(NAMES)}") from None
