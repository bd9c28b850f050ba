"""How a base is loaded: the settings an adapter was trained with, fitted to the machine at hand.

The trainer records in ``multimodal_lora.json`` how it loaded the base
(:class:`LoadSettings`: quantization with its 4-bit quant type and compute
dtype, dtype, device kind). ``caption()``, ``ask()``, the caption CLI,
``evaluate``, ``merge`` and the demo load the base that way by default:
an adapter trained on an int8 base is used on an int8 base, not on a 15 GB
fp32 one. :func:`resolve` decides, in this order:

1. an explicit override (``quantization=``, ``dtype=``, ``device=``; the
   ``--quantization/--dtype/--device`` flags) is used as given;
2. otherwise the recorded setting, unless this machine cannot do it, in which
   case the nearest one that works (a CUDA adapter on a CPU-only box loads on
   the CPU; int8 without bitsandbytes loads unquantized; bf16 on a CPU without
   bf16 kernels loads in fp32) — said in the one log line :func:`resolve` writes;
3. an adapter written before settings were recorded keeps the old default
   (unquantized fp32, device ``auto``), with a note saying so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from multimodal_lora.config import ModelConfig
from multimodal_lora.core import runtime
from multimodal_lora.core.quantization import SCHEMES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSettings:
    """How a base's weights are loaded; recorded per adapter, and the cache key of a loaded base."""

    quantization: str = "none"
    """``none``, ``int8`` or ``4bit`` (bitsandbytes)."""
    dtype: str = "fp32"
    """Dtype of the unquantized weights: ``fp32``, ``bf16`` or ``fp16``."""
    device: str = "auto"
    """Recorded: the device *kind* trained on (``cpu``, ``cuda``); given: any ``model.device`` value."""
    quant_type: str | None = None
    """4-bit only: ``nf4`` or ``fp4``."""
    compute_dtype: str | None = None
    """4-bit only: the dtype the 4-bit layers compute in (follows ``dtype``; fp32 for fp32)."""

    @classmethod
    def of(cls, cfg: ModelConfig, device: torch.device) -> LoadSettings:
        """What a training run with ``cfg`` on ``device`` records."""
        four_bit = _four_bit(cfg.quantization)
        return cls(
            quantization=cfg.quantization,
            dtype=cfg.dtype,
            device=device.type,
            quant_type=cfg.quant_type if four_bit else None,
            compute_dtype=cfg.dtype if four_bit else None,
        )

    def model_config(self, base: str, revision: str | None) -> ModelConfig:
        """The ``model`` section that loads ``base`` this way."""
        return ModelConfig(
            base=base,
            revision=revision,
            quantization=self.quantization,
            dtype=self.dtype,
            device=self.device,
            quant_type=self.quant_type or "nf4",
        )

    def describe(self) -> str:
        """``int8, fp16, cuda`` / ``4bit nf4 (compute bf16), bf16, cuda``."""
        quant = self.quantization
        if _four_bit(quant):
            quant = f"4bit {self.quant_type or 'nf4'} (compute {self.compute_dtype or self.dtype})"
        return f"{quant}, {self.dtype}, {self.device}"


LEGACY = LoadSettings()
"""What every adapter was used with before settings were recorded: unquantized fp32 on ``auto``."""


def settings_from_record(raw: dict | None) -> LoadSettings | None:
    """The ``load`` entry of ``multimodal_lora.json`` (``None`` for an adapter without one)."""
    if raw is None:
        return None
    return LoadSettings(**raw)


def resolve(
    recorded: LoadSettings | None,
    *,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    subject: str = "the base",
    bare: bool = False,
) -> LoadSettings:
    """The settings to load a base with: explicit overrides, else the recorded ones fitted to this machine.

    Writes one log line saying what is loaded and why (as trained, overridden,
    fallen back, or not recorded).

    Args:
        recorded: what the adapter records, or ``None`` for an adapter without a record.
        quantization, dtype, device: explicit overrides; ``None`` keeps the recorded value.
        subject: what is being loaded, for the log line (e.g. ``base X for adapter Y``).
        bare: a base loaded with no adapter (the defaults, nothing recorded to follow).

    Example:
        >>> resolve(LoadSettings("int8", "fp16", "cuda"))   # on a CPU-only machine with bitsandbytes
        LoadSettings(quantization='int8', dtype='fp32', device='cpu', ...)
    """
    start = recorded or LEGACY
    settings = start
    if quantization is not None and quantization != start.quantization:
        four_bit = _four_bit(quantization)
        settings = replace(settings, quantization=quantization, quant_type="nf4" if four_bit else None)
    if dtype is not None:
        settings = replace(settings, dtype=dtype)
    if device is not None:
        settings = replace(settings, device=device)
    settings = replace(settings, compute_dtype=settings.dtype if _four_bit(settings.quantization) else None)

    # Only what was recorded (not what the caller asked for) is changed to fit the machine:
    # an explicit request that cannot work fails where it is loaded, with its own message.
    reasons = []
    if device is None and settings.device not in ("auto", "cpu") and not runtime.device_available(settings.device):
        reasons.append(f"no {settings.device} device here")
        settings = replace(settings, device="cpu")
    if quantization is None and _quantized(settings.quantization) and not runtime.bitsandbytes_available():
        reasons.append(f"{settings.quantization} needs bitsandbytes, which is not installed")
        settings = replace(settings, quantization="none", quant_type=None, compute_dtype=None)
    kind = runtime.device_kind(settings.device)
    if dtype is None and not runtime.dtype_supported(settings.dtype, kind):
        fallback = runtime.fallback_dtype(kind)
        reasons.append(f"this {kind.upper() if kind == 'cpu' else 'GPU'} has no {settings.dtype} support")
        settings = replace(
            settings, dtype=fallback, compute_dtype=fallback if _four_bit(settings.quantization) else None
        )

    asked = [
        f"{k}={v}" for k, v in (("quantization", quantization), ("dtype", dtype), ("device", device)) if v is not None
    ]
    if bare:
        how = "with the defaults"
    elif recorded is None:
        how = "no load settings recorded (an adapter from before they were), so as before"
    elif reasons:
        how = f"trained as {recorded.describe()}; falling back ({'; '.join(reasons)})"
    else:
        how = "as trained"
    if asked:
        how += f", with {', '.join(asked)} as asked"
    logger.info("loading %s %s: %s", subject, how, settings.describe())
    return settings


def _four_bit(quantization: str) -> bool:
    return quantization in SCHEMES and SCHEMES[quantization].four_bit


def _quantized(quantization: str) -> bool:
    return quantization in SCHEMES and SCHEMES[quantization].quantized



