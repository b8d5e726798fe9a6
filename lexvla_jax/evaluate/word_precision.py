"""Word precision: do the strongest words of a lexical vector name what the image or caption shows?

For each eval image, the fraction of its top-k words (k = 5) that are content words (`content_words`) of
any of its captions; for each caption, the same against that caption's own content words; each averaged over
rows. A word is one kept vocabulary entry read as text (word-start mark removed, `Tokenizer.word`), so a
sub-word piece such as "ora" counts as a miss. The baseline is the expected precision of k distinct kept words
drawn at random: per row, the share of the vocabulary that is a relevant word.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lexvla_jax.text.content_words import content_words


def top_k_precision(scores: np.ndarray, relevant: Sequence[set[str]], words: Sequence[str], k: int = 5) -> float:
    """Mean over rows of `scores` `[N, V']` of the fraction of the row's `k` highest words in `relevant[row]`."""
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 2 or scores.shape != (len(relevant), len(words)):
        raise ValueError(f"scores have shape {scores.shape}; expected [rows, words] = [{len(relevant)}, {len(words)}]")
    if not 0 < k <= len(words):
        raise ValueError(f"k={k} must be in [1, {len(words)}] (the number of words)")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = [sum(words[j] in rel for j in row) for row, rel in zip(top, relevant, strict=True)]
    return float(np.mean(hits)) / k


def random_precision(relevant: Sequence[set[str]], words: Sequence[str]) -> float:
    """Expected `top_k_precision` of k distinct words drawn uniformly (any k): the mean relevant share of `words`."""
    return float(np.mean([sum(w in rel for w in words) / len(words) for rel in relevant]))


def word_precision(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    image_of_text: np.ndarray,
    captions: Sequence[str],
    words: Sequence[str],
    k: int = 5,
) -> dict[str, float]:
    """`image`, `text` precision@k and their random-word baselines `image_random`, `text_random`.

    image_vectors `[N, V']`, text_vectors `[M, V']`, image_of_text `[M]` (the image of each caption), captions
    (M strings), words (V' strings: the kept vocabulary read as text).
    """
    image_of_text = np.asarray(image_of_text)
    if len(captions) != len(text_vectors) or image_of_text.shape != (len(captions),):
        raise ValueError(
            f"{len(text_vectors)} text vectors, {len(captions)} captions and image_of_text of shape "
            f"{image_of_text.shape}: all three must count the same captions"
        )
    caption_words = [set(content_words(c)) for c in captions]
    image_words = [set() for _ in range(len(image_vectors))]
    for caption, image in enumerate(image_of_text):
        image_words[image] |= caption_words[caption]
    return {
        "image": top_k_precision(image_vectors, image_words, words, k),
        "text": top_k_precision(text_vectors, caption_words, words, k),
        "image_random": random_precision(image_words, words),
        "text_random": random_precision(caption_words, words),
    }
