"""How much GPU memory a recipe needs, worked out before any weights load.

    python -m multimodal_lora.train RECIPE --plan
    python bench/memory_plan.py RECIPE

The plan builds the recipe's base on the ``meta`` device (shapes without
memory), adds the recipe's LoRA there, and adds up:

* **weights** — each parameter at the bytes it will really have: bitsandbytes
  int8 layers hold 1 byte per weight plus one fp32 scale per output row; 4-bit
  NF4 layers hold half a byte plus an 8-bit scale per block of 64 (double
  quantization) and one fp32 per 256 blocks. Which layers are quantized and
  which stay in fp32 comes from :func:`multimodal_lora.model.base.quantized_linears`.
  A quantized base being trained has its other weights cast to fp32 by PEFT's
  ``prepare_model_for_kbit_training``, so they count 4 bytes here, except the
  image path its family keeps unquantized (Qwen2.5-VL's vision tower and merger,
  PaliGemma's tower and projector), which the loader casts back to the recipe's
  dtype (:func:`multimodal_lora.model.base.keep_unquantized_in_dtype`); SmolVLM's
  stay fp32 (``Family.unquantized_in_dtype``).
* **LoRA** — adapter weights, their gradients and AdamW's two moments, all fp32
  (PEFT keeps adapters in fp32 even on a bf16 base): 16 bytes per parameter.
* **activations** — what autograd keeps for the backward pass through the
  language model (the vision encoder and Q-Former are frozen and take no
  gradient, so they keep nothing), in the autocast dtype (2 bytes for bf16 or
  fp16, 4 for fp32), per token per language-model layer (an encoder–decoder
  counts both stacks, every token through all of them: an upper bound) about
  ``4 × hidden + 2 × q + 2 × kv + 2 × ffn`` values (layer-norm inputs and
  outputs; the queries and the attention output, ``q`` wide; the keys and values,
  ``kv`` wide, narrower under grouped-query attention: 256 against 2,048 on
  Qwen2.5-VL-3B; the MLP's two wide tensors), plus the logits over the
  vocabulary in fp32 for the loss. ``8 × hidden + 2 × ffn`` for full attention. With gradient checkpointing each layer keeps
  only its input, and one layer's activations exist at a time while it is
  recomputed. An **int8** base keeps its activations in fp32 (4 bytes), and
  under checkpointing still keeps each layer's quantized-projection inputs,
  which bitsandbytes holds outside autograd's saved tensors (checked against
  ``bench/gpu_full_size.py`` on an H100: see the README's Performance section).
  ``lora.parts`` adds to this: LoRA on the MLP keeps each adapted linear's
  dropped-out input (the wide ``ffn`` one for the down projection), and a
  connector that trains keeps its own activations per image
  (:func:`multimodal_lora.families.base.qformer_activation_values`, counted from
  what autograd saves: within 1% of ``bench/connector_activations.py``'s
  measurement on the CPU; not yet checked against a GPU peak).

What it leaves out: the CUDA context (about 0.5 GB per process, outside
``torch.cuda.max_memory_allocated``), the allocator's fragmentation, and the
frozen-feature cache, which lives in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multimodal_lora.config import LoraSettings, Recipe
from multimodal_lora.core.quantization import NAMES, SCHEMES
from multimodal_lora.core.runtime import DTYPE_BYTES
from multimodal_lora.families import family_for_config, tiny_family
from multimodal_lora.model.base import (
    add_lora,
    base_config,
    count_lora_parts,
    count_parameters,
    format_parameter_table,
    image_positions,
    load_processor,
    lora_targets,
    meta_model,
    quantized_linears,
)

__all__ = ["MemoryPlan", "plan_memory", "plan_recipe", "quantized_weight_bytes"]

# LoRA weight, its gradient, AdamW's exp_avg and exp_avg_sq: four fp32 tensors.
LORA_BYTES_PER_PARAM = 4 + 4 + 8
# NF4 with double quantization: absmax per block of 64 weights, itself 8-bit with
# one fp32 scale per 256 blocks.


@dataclass(frozen=True)
class MemoryPlan:
    """A recipe's estimated training memory, in bytes, by part."""

    parameter_table: str
    """The trainable-parameter table (the same one the trainer prints)."""
    quantization: str
    batch_size: int
    sequence_length: int
    """Tokens per example the plan assumes: query tokens + ``data.max_length``."""
    weights: int
    """The frozen base, as loaded for training."""
    lora_parameters: int
    lora_weights: int
    lora_gradients: int
    optimizer_state: int
    activations: int
    """Kept for the backward pass, without gradient checkpointing."""
    activations_checkpointed: int
    """The same with gradient checkpointing."""

    def total(self, gradient_checkpointing: bool = False) -> int:
        """Peak training memory (bytes), with or without gradient checkpointing."""
        acts = self.activations_checkpointed if gradient_checkpointing else self.activations
        return self.weights + self.lora_weights + self.lora_gradients + self.optimizer_state + acts

    def as_dict(self) -> dict:
        """Plain numbers, for JSON."""
        out = {k: v for k, v in self.__dict__.items() if k != "parameter_table"}
        out["total"] = self.total(False)
        out["total_checkpointed"] = self.total(True)
        return out

    def format(self) -> str:
        """The parameter table, then the memory table."""
        rows = [
            ("base weights", self.weights, f"quantization {self.quantization}"),
            ("LoRA weights", self.lora_weights, f"{self.lora_parameters:,} params, fp32"),
            ("LoRA gradients", self.lora_gradients, "fp32"),
            ("optimizer state", self.optimizer_state, "AdamW: 2 × fp32"),
            ("activations", self.activations, f"batch {self.batch_size} × {self.sequence_length} tokens"),
            ("total", self.total(False), "without gradient checkpointing"),
            ("activations (GC)", self.activations_checkpointed, "with gradient checkpointing"),
            ("total (GC)", self.total(True), "with gradient checkpointing"),
        ]
        lines = [self.parameter_table, "", f"{'memory':<18}{'GiB':>10}  note"]
        lines += [f"{name:<18}{n / 2**30:>10.3f}  {note}" for name, n, note in rows]
        lines.append("(plus the CUDA context, about 0.5 GiB, and allocator slack)")
        return "\n".join(lines)


def plan_recipe(recipe: Recipe) -> MemoryPlan:
    """Plan a recipe's training memory from its base's config (no weights are loaded)."""
    config = base_config(recipe.model.base, recipe.model.revision)
    return plan_memory(
        config,
        quantization=recipe.model.quantization,
        dtype=recipe.model.dtype,
        lora=recipe.lora,
        batch_size=recipe.train.batch_size,
        max_length=recipe.data.max_length,
        image_processor=_local_image_processor(recipe),
    )


def _local_image_processor(recipe: Recipe):
    """The base's image processor when it is on this machine (a tiny twin, a directory); ``None`` for a hub
    id, whose family then plans with its published processor's settings (nothing is downloaded)."""
    base = recipe.model.base
    if tiny_family(base) is None and not Path(base).is_dir():
        return None
    return getattr(load_processor(base, recipe.model.revision), "image_processor", None)


def plan_memory(
    config, *, quantization: str, dtype: str, lora: LoraSettings, batch_size: int, max_length: int, image_processor=None
) -> MemoryPlan:
    """Plan training memory for a BLIP-2 family config, a LoRA and a batch shape.

    Args:
        config: a ``Blip2Config`` or ``InstructBlipConfig``.
        quantization: ``none``, ``int8`` or ``4bit``.
        dtype: ``fp32``, ``bf16`` or ``fp16``: the unquantized weights' dtype.
        lora: the adapters to add.
        batch_size: examples per micro-batch.
        max_length: text tokens per example (the image adds its family's ``image_tokens``).
        image_processor: the base's, for a family whose image tokens vary with the image
            (``None``: its published processor's settings).

    Returns:
        A :class:`MemoryPlan`.

    Example:
        >>> from multimodal_lora.model.base import published_config
        >>> plan = plan_memory(published_config("Salesforce/blip2-opt-2.7b"), quantization="int8", dtype="fp16",
        ...                    lora=LoraSettings(r=16),
        ...                    batch_size=2, max_length=64)
        >>> print(plan.format())
    """
    if quantization not in SCHEMES:
        raise ValueError(f"quantization {quantization!r}; choose from {', '.join(NAMES)}")
    model = meta_model(config)
    weights = base_weight_bytes(model, quantization, dtype)
    peft_model = add_lora(model, lora)
    table = format_parameter_table(count_parameters(peft_model), count_lora_parts(peft_model))
    lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    family = family_for_config(config)
    dims = family.plan_dims(config.text_config)
    seq = image_positions(config, image_processor) + max_length
    tokens = batch_size * seq
    # On a GPU the trainer runs under autocast in the recipe's dtype (accelerate's
    # mixed precision), so the saved matmul outputs are 2 bytes unless dtype is fp32.
    # An int8 base is the exception: prepare_model_for_kbit_training keeps its layer
    # norms in fp32, and bitsandbytes' int8 matmul returns its input's dtype, so the
    # whole residual stream and every projection's output stay fp32 (measured on an
    # H100: int8 activations are 1.7-2x bf16's at the same batch).
    act = 4 if quantization == "int8" else DTYPE_BYTES[dtype]
    hidden, ffn, layers = dims.hidden, dims.ffn, dims.layers
    per_layer = 4 * hidden + 2 * dims.attention_width + 2 * dims.kv_width + 2 * ffn
    if lora.dropout > 0:
        # Each adapted projection keeps its dropped-out input for lora_A's gradient.
        per_layer += hidden * len(lora_targets(lora, family))
    # Logits in the compute dtype, their fp32 copy for the loss, the saved
    # log-softmax, and (at the start of the backward pass) their fp32 gradient.
    logits = tokens * dims.vocab * (act + 4 + 4 + 4)
    # lora.parts beyond attention (nothing for the default [attention]).
    mlp = mlp_dropout_inputs(peft_model, family) if lora.dropout > 0 and "mlp" in lora.parts else 0
    connector = 0
    if "connector" in lora.parts and family.connector is not None:
        connector = batch_size * family.connector.activation_values(config, lora.r) * act
    full = tokens * (per_layer * layers + mlp) * act + logits + connector
    checkpointed = tokens * (hidden * layers + per_layer + mlp // layers) * act + logits + connector
    if quantization == "int8":
        # bitsandbytes' MatMul8bitLt keeps its input for the backward pass on ``ctx``
        # rather than in autograd's saved tensors, so gradient checkpointing cannot drop
        # it: every layer keeps the inputs of its quantized projections (the attention
        # input, shared by q/k/v; the attention output; the MLP's input and inner width).
        checkpointed += tokens * (3 * hidden + ffn) * layers * act
    return MemoryPlan(
        parameter_table=table,
        quantization=quantization,
        batch_size=batch_size,
        sequence_length=seq,
        weights=weights,
        lora_parameters=lora_params,
        lora_weights=4 * lora_params,
        lora_gradients=4 * lora_params,
        optimizer_state=8 * lora_params,
        activations=full,
        activations_checkpointed=checkpointed,
    )


def mlp_dropout_inputs(peft_model, family) -> int:
    """Values per token the MLP's LoRA keeps: each adapted MLP linear's dropped-out input (its ``in_features``)."""
    total = 0
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and family.part_of(name) == "mlp":
            total += module.in_features
    return total


def base_weight_bytes(model, quantization: str, dtype: str, *, for_training: bool = True) -> int:
    """Bytes of a (``meta``) base's weights once loaded with ``quantization`` and ``dtype``."""
    # transformers upcasts these modules to fp32 when the base loads in fp16 (and
    # the "strict" ones in bf16 too), to avoid fp16 overflow in them.
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == "fp16":
        keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    row = SCHEMES[quantization]
    family = family_for_config(model.config)
    quantized = quantized_linears(model, family) if row.quantized else set()
    other = 4 if (row.quantized and for_training) else DTYPE_BYTES[dtype]
    in_dtype = family.keep_unquantized() if row.quantized and (family.unquantized_in_dtype or not for_training) else ()
    total = 0
    for name, param in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            total += row.weight_bytes(tuple(param.shape))
        elif any(part in keep_fp32 for part in name.split(".")):
            total += 4 * param.numel()
        elif any(name.startswith(prefix + ".") for prefix in in_dtype):
            total += DTYPE_BYTES[dtype] * param.numel()
        else:
            total += other * param.numel()
    return total


def quantized_weight_bytes(shape: tuple[int, int], quantization: str) -> int:
    """Bytes of one bitsandbytes weight matrix of ``shape`` (out, in), scales included (the scheme's row says)."""
    row = SCHEMES.get(quantization)
    if row is None:
        raise ValueError(f"quantization {quantization!r} is not a bitsandbytes format")
    return row.weight_bytes(shape)


def measured_weight_bytes(model) -> int:
    """Bytes a loaded model's parameters and buffers really take (to check the plan against)."""
    seen, total = set(), 0
    for tensor in list(model.state_dict(keep_vars=True).values()):
        if not isinstance(tensor, torch.Tensor) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
