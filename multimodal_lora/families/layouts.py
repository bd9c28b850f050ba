"""Token layouts: where the image, the prompt and the target go, for training and for generation.

A family picks one of these (and fills in its token ids); training
(:class:`~multimodal_lora.data.encoding.ExampleEncoder`), evaluation and
inference (:class:`~multimodal_lora.inference.captioner.Captioner`) all go through the
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

**Chat** (Qwen2.5-VL and other instruct checkpoints): the prompt goes through
the tokenizer's chat template, a user turn holding the image and the prompt;
the target is the assistant's answer, ended by the template's end-of-turn
token (``<|im_end|>``), which is also where generation stops::

    <|im_start|>user  <image>  prompt <|im_end|>  <|im_start|>assistant   target  <|im_end|>
    └──────────────────────────── label -100 ─────────────────────────┘ └──── learned ─────┘

**Image tokens whose count varies** with the image (Qwen2.5-VL): the text is
tokenized with one placeholder per image; once the image is processed (per
batch in training, per call at generation) the placeholder becomes as many
tokens as the family's :class:`~multimodal_lora.families.image_inputs.ImageInputs`
says, labelled -100 (:meth:`TokenLayout.with_image`). ``max_length`` and every
text-length check count text tokens only, as for the fixed-count families.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from multimodal_lora.families.image_inputs import PIXELS, ImageInputs

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
    image_inputs: ImageInputs = PIXELS
    """What the image processor's output becomes (see :mod:`~multimodal_lora.families.image_inputs`)."""

    aligned_keys = ("input_ids",)
    """The per-token lists that run alongside ``input_ids`` (expanded with it)."""
    left_padded = True
    """Whether generation pads prompts on the left (decoder-only: every row ends where generation starts)."""
    chat_template = False
    """Whether prompts go through the tokenizer's chat template (:class:`ChatLayout`)."""

    @property
    def image_positions(self) -> int:
        """Positions one image takes in the language model's sequence (at most, when it varies)."""
        return self.image_inputs.max_tokens or self.num_query_tokens

    def with_image(self, encoded: Mapping[str, list[int]], item: Mapping) -> Mapping[str, list[int]]:
        """An encoded example with its image placeholder expanded to the tokens ``item`` (the processed
        image) takes; unchanged when the count is fixed (already in the text)."""
        count = self.image_inputs.image_tokens(item)
        if count is None:
            return encoded
        return expand_placeholder(encoded, self.image_token_id, count, self.aligned_keys)

    def generation_inputs(self, tokenizer, prompts: list[str], image_tokens: Sequence[int | None] | None = None):
        """The padded prompts ``generate`` continues, each image placeholder expanded to ``image_tokens``."""
        rows = [{"input_ids": row} for row in self.generation_rows(tokenizer, prompts)]
        if image_tokens is not None:
            rows = [
                row if count is None else expand_placeholder(row, self.image_token_id, count, ("input_ids",))
                for row, count in zip(rows, image_tokens)
            ]
        out = _pad_rows([row["input_ids"] for row in rows], self.pad_token_id, left=self.left_padded, key="input_ids", mask="attention_mask")
        out.update(self.qformer_inputs(prompts))
        return out

    def generation_rows(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """Each prompt's ids as ``generate`` reads them, image placeholders included, unpadded."""
        raise NotImplementedError

    def prompt_length(self, tokenizer, prompt: str, item: Mapping | None = None) -> int:
        """Positions the model reads before generating: the prompt as framed, and the image's tokens
        (``item``'s, the processed image; without it, the most an image takes)."""
        count = None if item is None else self.image_inputs.image_tokens(item)
        image = self.image_positions if count is None else count
        return len(self.generation_rows(tokenizer, [prompt])[0]) - self.num_query_tokens + image

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
    aligned_keys = ("input_ids", "labels")
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
        target_ids, truncated = _fit(_ids(tokenizer, target_text), max_length - len(prompt_ids) - 1)
        image = [self.image_token_id] * self.num_query_tokens
        input_ids = image + prompt_ids + target_ids + [self.stop_token_id]
        labels = [IGNORE_INDEX] * (len(image) + len(prompt_ids)) + target_ids + [self.stop_token_id]
        return self._with_instruction({"input_ids": input_ids, "labels": labels}, prompt), truncated

    def text_length(self, encoded: dict[str, list[int]]) -> int:
        """Text tokens of an encoded example (the image placeholders not counted)."""
        return len(encoded["input_ids"]) - self.num_query_tokens

    def generation_rows(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """``<image>×Q BOS prompt``; left-padded, so every row ends where generation starts."""
        return [[self.image_token_id] * self.num_query_tokens + [self.bos_token_id, *_ids(tokenizer, p)] for p in prompts]

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

    left_padded = False

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
        room = max_length - (len(input_ids) - self.num_query_tokens) - 1
        target_ids, truncated = _fit(_ids(tokenizer, target.strip()), room)
        labels = target_ids + [self.stop_token_id]
        return self._with_instruction({"input_ids": input_ids, "labels": labels}, prompt), truncated

    def text_length(self, encoded: dict[str, list[int]]) -> int:
        """Text tokens of an encoded example: the encoder's (without image placeholders) and the decoder's."""
        return len(encoded["input_ids"]) - self.num_query_tokens + len(encoded["labels"])

    def generation_rows(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """The encoder's ``<image>×Q prompt </s>``, right-padded (masked; the decoder starts on its own)."""
        return [self._encoder_ids(tokenizer, p) for p in prompts]

    def for_loss(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
        """The decoder reads only the target: every logit is needed (see :meth:`DecoderOnlyLayout.for_loss`)."""
        return batch, None

    def new_tokens(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``generate`` returns only decoder tokens (starting with the decoder start token, a special one)."""
        return output


@dataclass(frozen=True, eq=False)
class ChatLayout(DecoderOnlyLayout):
    """An instruct checkpoint's chat template: a user turn with the image and the prompt, the target as
    the assistant's answer (Qwen2.5-VL). The template is the tokenizer's own (``chat_template``).

    The text holds ``num_query_tokens`` placeholders per image as the template writes them (one, for a
    family whose :class:`~multimodal_lora.families.image_inputs.ImageInputs` expands it per image).
    """

    chat_template = True

    def user_turn(self, tokenizer, prompt: str) -> list[int]:
        """Everything up to where the assistant's answer starts, as the template renders it."""
        return _ids(tokenizer, self.user_text(tokenizer, prompt))

    def user_text(self, tokenizer, prompt: str) -> str:
        """The user turn and the assistant's header as text, the image as its one placeholder."""
        content = [{"type": "image"}, *([{"type": "text", "text": prompt}] if prompt else [])]
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def frame(self, tokenizer) -> tuple[str, str]:
        """``(before, after)``: the user turn's text around the prompt (for vLLM, which is given text)."""
        marker = "\x00"
        before, after = self.user_text(tokenizer, marker).split(marker)
        return before, after

    def encode(self, tokenizer, prompt: str, target: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
        """One training example; ``max_length`` counts its text tokens (the template's included, the
        image's not); a longer target is cut and still ends on the end-of-turn token."""
        prompt_ids = self.user_turn(tokenizer, prompt)
        room = max_length - (len(prompt_ids) - self.num_query_tokens) - 1
        target_ids, truncated = _fit(_ids(tokenizer, target.strip()), room)
        input_ids = prompt_ids + target_ids + [self.stop_token_id]
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids + [self.stop_token_id]
        return {"input_ids": input_ids, "labels": labels}, truncated

    def generation_rows(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """The user turn and the assistant's header, left-padded."""
        return [self.user_turn(tokenizer, p) for p in prompts]


def expand_placeholder(encoded: Mapping[str, list[int]], image_token_id: int, count: int, keys: Sequence[str]) -> dict:
    """``encoded`` with its one image placeholder repeated ``count`` times in every list of ``keys``
    (the placeholder's label, -100, repeated with it); other keys unchanged.

    Raises:
        ValueError: the text holds no placeholder, or more than one.
    """
    ids = encoded["input_ids"]
    at = ids.index(image_token_id) if image_token_id in ids else -1
    if at < 0 or image_token_id in ids[at + 1 :]:
        raise ValueError(f"expected one image placeholder (token {image_token_id}) in the text, found {ids.count(image_token_id)}")
    out = dict(encoded)
    for key in keys:
        if key in encoded:
            row = encoded[key]
            out[key] = [*row[:at], *[row[at]] * count, *row[at + 1 :]]
    return out


def _fit(target_ids: list[int], room: int) -> tuple[list[int], bool]:
    """A target cut to the ``room`` left for it (never below nothing), and whether it was cut."""
    truncated = len(target_ids) > room
    return (target_ids[: max(room, 0)] if truncated else target_ids), truncated


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
