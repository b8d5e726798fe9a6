"""Bag-of-words text rows for Q(BoW): a caption → the kept-vocabulary columns of its content words.

Q(BoW) (Table 1) replaces the language model by the caption's own words: the text lexical vector is the
L2-normalised indicator of the caption's content words over the kept vocabulary, with no model at all.
Content words are `content_words`: the caption's lowercase letter runs less NLTK's English stopword list
(153 words: pronouns, articles, prepositions, conjunctions, auxiliaries), which leaves its nouns, adjectives and
verbs (and the few adverbs the list lacks). No part-of-speech tagger: the list is what decides.

Each content word is tokenised on its own, which gives the pieces it has inside the caption (SentencePiece
splits at spaces and marks each word's start), and every piece of it that the vocabulary filter kept counts:
"circle" is the one piece `▁circle`; a word that splits, say "potted" → `▁pot` `ted`, contributes each of its
kept pieces, and dropped pieces (single letters, bytes) are skipped. Every column counts once, however many
words share it, so a caption with n kept columns has the vector `1/√n` on them. Rows keep the first
`max_words` columns (in caption order).

A caption with no kept content word (only stopwords, say "what is it") gives an empty row and the zero
vector: it scores 0 against every image. Training counts such texts per batch (`losses.lexvla_loss`'s
`empty_txt`) and retrieval per set (`num_empty_texts`).

Rows have the prompt rows' fixed length and keys, so the data pipeline, the train step and
`inference.LexicalEncoder` carry them unchanged: `input_ids` holds kept-vocabulary columns (not tokenizer ids)
and `attention_mask` marks the used slots; the model makes the vector (`models/lexvla.bag_of_words`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lexvla_jax.text.content_words import content_words
from lexvla_jax.text.tokenizer import Tokenizer


class BowEncoder:
    """Captions → fixed-length rows of kept-vocabulary columns (see the module docstring); picklable."""

    def __init__(self, tokenizer: Tokenizer, kept_ids: Sequence[int], max_words: int):
        if max_words < 1:
            raise ValueError(f"max_words={max_words} must be >= 1")
        self.tokenizer = tokenizer
        self.max_length = max_words
        self.column_of = {int(token): column for column, token in enumerate(kept_ids)}

    def columns(self, caption: str) -> list[int]:
        """The kept columns of the caption's content words, in order of first appearance, each once."""
        found = [
            column
            for word in content_words(caption)
            for token in self.tokenizer.encode(word)
            if (column := self.column_of.get(token)) is not None
        ]
        return list(dict.fromkeys(found))[: self.max_length]

    def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """`(input_ids, attention_mask)`, both int32 `[max_length]`: the columns, then zeros."""
        columns = self.columns(caption)
        input_ids = np.zeros(self.max_length, np.int32)
        input_ids[: len(columns)] = columns
        attention_mask = np.zeros(self.max_length, np.int32)
        attention_mask[: len(columns)] = 1
        return input_ids, attention_mask

    def batch(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """`input_ids` and `attention_mask` `[B, max_length]`, int32."""
        rows = [self(caption) for caption in captions]
        shape = (len(rows), self.max_length)
        return {
            "input_ids": np.stack([ids for ids, _ in rows]).reshape(shape),
            "attention_mask": np.stack([mask for _, mask in rows]).reshape(shape),
        }
