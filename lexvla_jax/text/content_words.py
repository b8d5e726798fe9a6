"""Content words of a caption: its lowercase words minus English stopwords.

A caption's content words are what its lexical vector should name: the LM pretraining target of the embedded
job (`lm_pretrain`), the text vector of the bag-of-words variant, and the reference of the word-precision
metric. Plain Python, no JAX.

Words are the runs of ASCII letters of the lowercased caption ("man's" → "man", "s"); a word is dropped when it
is a stopword or a single letter. The stopwords are NLTK's English list (179 entries: pronouns, articles,
prepositions, conjunctions, auxiliary verbs and a few adverbs) less its 26 entries with an apostrophe ("don't"),
whose parts ("don", "t") are listed anyway: 153 words. So in "a small red circle above a large blue
square", "above" (a preposition) goes and "small red circle large blue square" stay.
"""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
    it its itself they them their theirs themselves what which who whom this that these those am is are was were be
    been being have has had having do does did doing a an the and but if or because as until while of at by for
    with about against between into through during before after above below to from up down in out on off over
    under again further then once here there when where why how all any both each few more most other some such no
    nor not only own same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn
    doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn
    """.split()
)
_WORD = re.compile(r"[a-z]+")


def content_words(caption: str) -> list[str]:
    """The caption's content words in order of first appearance, each once."""
    found = [w for w in _WORD.findall(caption.lower()) if len(w) > 1 and w not in STOPWORDS]
    return list(dict.fromkeys(found))
