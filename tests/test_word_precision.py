"""Content words and the word-precision metric on constructed vectors."""

import numpy as np
import pytest

from lexvla_jax.evaluate import word_precision
from lexvla_jax.text.content_words import STOPWORDS, content_words

WORDS = ["red", "blue", "circle", "square", "ora", "above", "large", "gray", "picture", "star"]


def _vector(*strong: str) -> np.ndarray:
    """A lexical vector whose strongest words are `strong`, in that order; the rest small and distinct."""
    v = np.linspace(0.01, 0.001, len(WORDS))
    for rank, word in enumerate(strong):
        v[WORDS.index(word)] = 10.0 - rank
    return v


def test_content_words():
    assert content_words("a small red circle above a large blue square") == [
        "small",
        "red",
        "circle",
        "large",
        "blue",
        "square",
    ]
    # Lowercased, punctuation split off, repeats once, stopwords and single letters dropped.
    assert content_words("There is a Red star; the star's left of THE cross!") == ["red", "star", "left", "cross"]
    assert content_words("The man is riding a white horse.") == ["man", "riding", "white", "horse"]
    assert content_words("a of the") == []
    assert len(STOPWORDS) == 153 and {"a", "the", "above", "of", "is"} <= STOPWORDS


def test_top_k_precision_counts_relevant_words_among_the_top_k():
    scores = np.stack([_vector("red", "ora", "circle", "above", "blue"), _vector("star", "gray", "red", "ora", "blue")])
    relevant = [{"red", "circle", "blue"}, {"star"}]
    assert word_precision.top_k_precision(scores, relevant, WORDS, k=5) == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert word_precision.top_k_precision(scores, relevant, WORDS, k=1) == pytest.approx(1.0)
    assert word_precision.top_k_precision(scores, relevant, WORDS, k=2) == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_random_precision_matches_sampling():
    relevant = [{"red", "circle", "blue"}, {"star", "nothere"}]
    expected = (3 / 10 + 1 / 10) / 2
    assert word_precision.random_precision(relevant, WORDS) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    sampled = np.mean(
        [word_precision.top_k_precision(rng.random((2, len(WORDS))), relevant, WORDS, k=5) for _ in range(4000)]
    )
    assert sampled == pytest.approx(expected, abs=0.01)


def test_word_precision_images_use_all_their_captions():
    captions = [
        "a large red circle above a blue square",
        "a gray picture with a blue square below a large red circle",
        "a star",
    ]
    image_of_text = np.array([0, 0, 1])
    images = np.stack(
        [_vector("gray", "picture", "red", "ora", "above"), _vector("star", "red", "blue", "ora", "gray")]
    )
    texts = np.stack(
        [
            _vector("red", "circle", "blue", "square", "large"),
            _vector("gray", "ora", "blue", "above", "circle"),
            _vector("star", "red", "blue", "ora", "gray"),
        ]
    )
    result = word_precision.word_precision(images, texts, image_of_text, captions, WORDS)
    # Image 0's captions name gray and picture (second caption) and red: 3 of 5; image 1 names only "star".
    assert result["image"] == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert result["text"] == pytest.approx((5 / 5 + 3 / 5 + 1 / 5) / 3)
    image_relevant = [{"large", "red", "circle", "blue", "square", "gray", "picture"}, {"star"}]
    assert result["image_random"] == pytest.approx(np.mean([len(r & set(WORDS)) / len(WORDS) for r in image_relevant]))
    assert result["text_random"] == pytest.approx((5 / 10 + 7 / 10 + 1 / 10) / 3)


def test_word_precision_errors_are_one_line():
    scores = np.zeros((2, len(WORDS)))
    for call, match in [
        (lambda: word_precision.top_k_precision(scores, [set()], WORDS), r"expected \[rows, words\] = \[1, 10\]"),
        (lambda: word_precision.top_k_precision(scores, [set(), set()], WORDS, k=11), r"k=11 must be in \[1, 10\]"),
        (
            lambda: word_precision.word_precision(scores, scores, np.array([0]), ["a", "b"], WORDS),
            "must count the same captions",
        ),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
