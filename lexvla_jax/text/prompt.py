"""The in-context prompt: a caption filled into the template and tokenised into a fixed-length row.

The text tower reads the lexical prediction at the prompt's last token (DESIGN.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lexvla_jax.text.tokenizer import Tokenizer, load_tokenizer

PLACEHOLDER = "[TEXT]"
DEFAULT_PROMPT = (
    'The focus of "The man is riding a white horse." lies on important words: "man", "riding", "white", "horse". '
    'The focus of "[TEXT]" lies on important words:'
)


class PromptEncoder:
    """Fills `template` with a caption and tokenises it into a fixed-length, right-padded row.

    The ids are those of the whole filled-in string, so SentencePiece's handling of the joins (e.g. `horse."`
    becoming one `."` piece) is exactly Llama's. A caption longer than `max_caption_tokens` keeps its first
    `max_caption_tokens` tokens: it is cut at the start of its first dropped token (trailing spaces removed) and
    the filled string is re-tokenised, so the template's tail is always complete and the last token is the
    template's last token.
    Captions are whitespace-normalised first (`" ".join(caption.split())`).

    `max_length` defaults to the longest prompt: BOS + template tokens + `max_caption_tokens`. Should a rare join
    make a prompt longer than `max_length`, the caption loses further tokens until it fits.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str = DEFAULT_PROMPT,
        max_caption_tokens: int = 32,
        max_length: int | None = None,
        add_bos: bool = True,
    ):
        if template.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"prompt template must contain {PLACEHOLDER!r} exactly once, found {template.count(PLACEHOLDER)} "
                f"in {template!r}"
            )
        if max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens={max_caption_tokens} must be >= 1")
        self.tokenizer = tokenizer
        self.template = template
        self.prefix, self.suffix = template.split(PLACEHOLDER)
        self.max_caption_tokens = max_caption_tokens
        self.add_bos = add_bos
        ids, caption_starts = self._encode_filled("x")
        self.num_template_tokens = int(add_bos) + len(ids) - len(caption_starts)
        shortest = self.num_template_tokens + 1
        self.max_length = self.num_template_tokens + max_caption_tokens if max_length is None else max_length
        if self.max_length < shortest:
            raise ValueError(
                f"max_length={self.max_length} cannot hold the prompt template ({self.num_template_tokens} tokens) "
                f"plus one caption token; use max_length >= {shortest}"
            )

    def fill(self, caption: str) -> str:
        """The filled-in prompt string (whitespace-normalised caption, not truncated)."""
        return self.prefix + " ".join(caption.split()) + self.suffix

    def _encode_filled(self, caption: str) -> tuple[list[int], list[int]]:
        """Ids of `prefix + caption + suffix` (no BOS) and the caption-relative start of each caption token."""
        begin, end = len(self.prefix), len(self.prefix) + len(caption)
        ids, starts, ends = self.tokenizer.encode_with_offsets(self.prefix + caption + self.suffix)
        caption_starts = [
            s - begin
            for s, e in zip(starts, ends, strict=True)
            if (s < end and e > begin) or (s == e and begin <= s < end)
        ]
        return ids, caption_starts

    def encode(self, caption: str) -> list[int]:
        """Prompt ids (BOS first when `add_bos`), unpadded, at most `max_length` long."""
        caption = " ".join(caption.split())
        bos = [self.tokenizer.bos_id] if self.add_bos else []
        while True:
            ids, caption_starts = self._encode_filled(caption)
            count = len(caption_starts)
            if count <= self.max_caption_tokens and len(bos) + len(ids) <= self.max_length:
                return bos + ids
            if not caption:
                raise ValueError(f"prompt template alone is longer than max_length={self.max_length}")
            keep = min(count - 1, self.max_caption_tokens)
            caption = caption[: max(0, caption_starts[keep])].rstrip()

    def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """`(input_ids, attention_mask)`, both int32 `[max_length]`, right-padded with `pad_id`."""
        ids = self.encode(caption)
        input_ids = np.full(self.max_length, self.tokenizer.pad_id, dtype=np.int32)
        input_ids[: len(ids)] = ids
        attention_mask = np.zeros(self.max_length, dtype=np.int32)
        attention_mask[: len(ids)] = 1
        return input_ids, attention_mask

    def batch(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """`input_ids`, `attention_mask` `[B, L]` and `last_index` `[B]` (each row's last real token), int32."""
        rows = [self(caption) for caption in captions]
        input_ids = np.stack([ids for ids, _ in rows]).reshape(len(rows), self.max_length)
        attention_mask = np.stack([mask for _, mask in rows]).reshape(len(rows), self.max_length)
        last_index = (attention_mask.sum(axis=1) - 1).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "last_index": last_index}


def prompt_encoder(config, tokenizer=None):
    """`PromptEncoder` with `config.data`'s template and lengths; the tokenizer defaults to
    `config.data.tokenizer` (None when that is empty too: batches then hold images only)."""
    if tokenizer is None:
        if not config.tokenizer:
            return None
        tokenizer = load_tokenizer(config.tokenizer)
    return PromptEncoder(
        tokenizer,
        template=config.prompt_template,
        max_caption_tokens=config.max_caption_tokens,
        max_length=config.max_length,
    )
