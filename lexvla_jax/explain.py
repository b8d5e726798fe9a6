"""Reading lexical vectors as words: top words of an image or caption."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lexvla_jax import vocab


def word_of(tokenizer: vocab.Tokenizer, token_id: int) -> str:
    """The readable word of a vocabulary piece (SentencePiece's word-start mark removed)."""
    return tokenizer.id_to_piece(int(token_id)).replace(vocab.WORD_START, "")


def top_words(
    s: np.ndarray, kept_ids: Sequence[int], tokenizer: vocab.Tokenizer, k: int = 8
) -> list[tuple[str, float]]:
    """The `k` strongest words of one lexical vector `[V']`, as (word, weight), strongest first."""
    s = np.asarray(s, np.float32)
    order = np.argsort(-s, kind="stable")[:k]
    return [(word_of(tokenizer, kept_ids[j]), float(s[j])) for j in order]


def format_top_words(words: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{w} {v:.2f}" for w, v in words)
