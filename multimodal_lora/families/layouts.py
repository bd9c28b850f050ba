"""Token layouts: where the image, the prompt and the target go, for training and for generation.

A family picks one of these (and fills in its token ids); training
(:class:`~multimodal_lora.data.encoding.ExampleEncoder`), evaluation and
inference (:class:`~multimodal_lora.inference.Captioner`) all go through the
same object, so the sequence a model is trained on is the one it is asked to
continue.

**Decoder-only** (BLIP-2 OPT, InstructBLIP Vicuna)::

    <image> × num_query_tokens   BOS   prompt tokens   target tokens   stop
    └──────── label -100 ──────┘ └──────── -100 ───────┘ └──── learned ─────┘

Generation starts from ``<image> × Q  BOS  prompt``, left-padded so every row
of a batch ends where generation starts; the new tokens follow the input.

**Encoder–decoder** (BLIP-2 Flan-T5, InstructBLIP Flan-T5): the encoder reads
``<image> × Q  prompt tokens  </s>`` (as the T5 tokenizer frames a text), the
decoder's labels are ``target tokens  </s>``; the model shifts the labels
right (decoder start = pad) to make the decoder's inputs, so every label is
learned. Generation feeds the encoder and returns only decoder tokens.

**Instruction to the Q-Former** (InstructBLIP): the prompt is also tokenized
by the Q-Former's own (BERT) tokenizer into ``qformer_input_ids``, so the
visual prefix depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Padding:
    """How the collator pads one list-valued key: with what, and which mask (if any) marks the real tokens."""

    key: str
    value: int
    mask: str | None = None


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """The common part: token ids read from the base, and the optional Q-Former instruction."""

    image_token_id: int
    num_query_tokens: int
    pad_token_id: int
    stop_token_id: int
    qformer_tokenizer: object | None = field(default=None, repr=False)
    """InstructBLIP: the Q-Former's tokenizer; ``None`` when the Q-Former reads no text."""

    @property
    def reads_instruction(self) -> bool:
        """Whether the visual prefix depends on the prompt (the frozen-feature cache must key on it)."""
        return self.qformer_tokenizer is not None

    def padding(self) -> tuple[Padding, ...]:
        """How :class:`~multimodal_lora.data.encoding.Collator` pads each key this layout produces."""
        pads = [Padding("input_ids", self.pad_token_id, "attention_mask"), Padding("labels", IGNORE_INDEX)]
        if self.qformer_tokenizer is not None:
            pads.append(Padding("qformer_input_ids", self._qformer_pad(), "qformer_attention_mask"))
        return tuple(pads)

    def qformer_ids(self, prompt: str) -> list[int]:
        """The instruction as the Q-Former reads it (``[CLS] prompt [SEP]`` for a BERT tokenizer)."""
        return list(self.qformer_tokenizer(prompt).input_ids)

    def qformer_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded ``qformer_input_ids`` and mask for a batch; empty without a Q-Former tokenizer."""
        if self.qformer_tokenizer is None:
            return {}
        return _pad_rows(
            [self.qformer_ids(p) for p in prompts],
            self._qformer_pad(),
            left=False,
            key="qformer_input_ids",
            mask="qformer_attention_mask",
        )

    def _qformer_pad(self) -> int:
        pad = self.qformer_tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def _with_instruction(self, out: dict[str, list[int]], prompt: str) -> dict[str, list[int]]:
        if self.qformer_tokenizer is not None:
            out["qformer_input_ids"] = self.qformer_ids(prompt)
        return out


@dataclass(frozen=True, eq=False)
class DecoderOnlyLayout(TokenLayout):
    """Image placeholders, BOS, prompt, target and stop token in one sequence (OPT, LLaMA)."""

    bos_token_id: int = 0
    target_prefix: str = ""
    """Put before the target when a prompt precedes it: a byte-level BPE (OPT) marks a new word
    by its leading space; a SentencePiece tokenizer (LLaMA) already starts a text with one."""

    def encode(self, tokenizer, prompt: str, target: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
        """One training example: ``({"input_ids", "labels", ...}, truncated)``.

        ``max_length`` counts the text tokens (BOS, prompt, target, stop); a longer
        target is cut, and still ends on the stop token.
        """
        prompt_ids = [self.bos_token_id, *_ids(tokenizer, prompt)]
        target_text = target.strip()
        if len(prompt_ids) > 1:
            target_text = self.target_prefix + target_text
        target_ids = _ids(tokenizer, target_text)
        room = max_length - len(prompt_ids) - 1
        truncated = len(target_ids) > room
        if truncated:
            target_ids = target_ids[: max(room, 0)]
        image = [self.image_token_id] * self.num_query_tokens
        input_ids = image + prompt_ids + target_ids + [self.stop_token_id]
        labels = [IGNORE_INDEX] * (len(image) + len(prompt_ids)) + target_ids + [self.stop_token_id]
        return self._with_instruction({"input_ids": input_ids, "labels": labels}, prompt), truncated

    def text_length(self, encoded: dict[str, list[int]]) -> int:
        """Text tokens of an encoded example (the image placeholders not counted)."""
        return len(encoded["input_ids"]) - self.num_query_tokens

    def generation_inputs(self, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded ``<image>×Q BOS prompt``, so every row ends where generation starts."""
        rows = [
            [self.image_token_id] * self.num_query_tokens + [self.bos_token_id, *_ids(tokenizer, p)] for p in prompts
        ]
        out = _pad_rows(rows, self.pad_token_id, left=True, key="input_ids", mask="attention_mask")
        out.update(self.qformer_inputs(prompts))
        return out

    def new_tokens(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``generate`` returns the input followed by the new tokens: keep the new ones."""
        return output[:, inputs["input_ids"].shape[1] :]

    def for_loss(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
        """A training batch with the output head computed only where the loss reads it.

        The model computes logits over the whole vocabulary at every position,
        though the loss reads only those that predict a learned label: the image
        queries and the prompt (32 + 2 of the tiny recipe's ~40 positions) need
        none. ``logits_to_keep=K`` keeps the last K positions, from the one before
        the batch's earliest learned label; the labels are cut to the same K, as the
        model aligns the two from the end. The loss is the same mean over the same
        labels; on the tiny recipe the step is about a fifth cheaper.

        Returns:
            ``(batch, K)``; ``K`` is ``None`` when nothing would be saved.
        """
        labels = batch["labels"]
        learned = labels != IGNORE_INDEX
        rows = learned.any(dim=1)
        if not bool(rows.any()):
            return batch, None
        first = int(learned.int().argmax(dim=1)[rows].min())
        keep = labels.shape[1] - first + 1
        if keep >= labels.shape[1]:
            return batch, None
        return {**batch, "labels": labels[:, -keep:]}, keep


@dataclass(frozen=True, eq=False)
class EncoderDecoderLayout(TokenLayout):
    """Image placeholders and prompt to the encoder, the target to the decoder (T5)."""

    def padding(self) -> tuple[Padding, ...]:
        # The decoder's labels have their own length; the mask tells the decoder where they end.
        pads = list(super().padding())
        pads[1] = Padding("labels", IGNORE_INDEX, "decoder_attention_mask")
        return tuple(pads)

    def _encoder_ids(self, tokenizer, prompt: str) -> list[int]:
        return [self.image_token_id] * self.num_query_tokens + _ids(tokenizer, prompt) + [self.stop_token_id]

    def encode(self, tokenizer, prompt: str, target: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
        """One training example: encoder ``input_ids`` and decoder ``labels`` (every label is learned).

        ``max_length`` counts the text tokens of both sides (prompt, ``</s>``, target, ``</s>``).
        """
        input_ids = self._encoder_ids(tokenizer, prompt)
        target_ids = _ids(tokenizer, target.strip())
        room = max_length - (len(input_ids) - self.num_query_tokens) - 1
        truncated = len(target_ids) > room
        if truncated:
            target_ids = target_ids[: max(room, 0)]
        labels = target_ids + [self.stop_token_id]
        return self._with_instruction({"input_ids": input_ids, "labels": labels}, prompt), truncated

    def text_length(self, encoded: dict[str, list[int]]) -> int:
        """Text tokens of an encoded example: the encoder's (without image placeholders) and the decoder's."""
        return len(encoded["input_ids"]) - self.num_query_tokens + len(encoded["labels"])

    def generation_inputs(self, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The encoder's ``<image>×Q prompt </s>``, right-padded (masked; the decoder starts on its own)."""
        rows = [self._encoder_ids(tokenizer, p) for p in prompts]
        out = _pad_rows(rows, self.pad_token_id, left=False, key="input_ids", mask="attention_mask")
        out.update(self.qformer_inputs(prompts))
        return out

    def for_loss(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
        """The decoder reads only the target: every logit is needed (see :meth:`DecoderOnlyLayout.for_loss`)."""
        return batch, None

    def new_tokens(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``generate`` returns only decoder tokens (starting with the decoder start token, a special one)."""
        return output


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def _pad_rows(rows: list[list[int]], pad: int, *, left: bool, key: str, mask: str) -> dict[str, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention[i, span] = 1
    return {key: ids, mask: attention}
