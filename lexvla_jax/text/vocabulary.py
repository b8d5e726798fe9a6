"""The vocabulary filter: the explicit, named rule (`RULES`, default `lowercase_alpha`) that picks the "word" entries of
the vocabulary, i.e. the lexical dimensions V' shared by both towers; with a report of what each rule keeps and drops
(`lexvla vocab --tokenizer PATH`).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from lexvla_jax.text.tokenizer import WORD_START, Tokenizer

DEFAULT_RULE = "lowercase_alpha"

# Kept pieces of Llama 2's 32,000 under each rule (tests check these on the real tokenizer file).
LLAMA2_KEPT_COUNTS = {"lowercase_alpha": 17182, "lowercase_alpha_single": 17234, "word_start": 16754}
LLAMA2_KEPT_COUNT = LLAMA2_KEPT_COUNTS[DEFAULT_RULE]

DROP_REASONS = (
    "special",
    "byte",
    "whitespace",
    "number",
    "punctuation",
    "symbol",
    "mark",
    "other",
    "capitalised",
    "non_ascii",
    "single_letter",
    "continuation",
)
_ASCII_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")


def _is_ideograph(char: str) -> bool:
    return unicodedata.name(char, "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"))


def _not_letters(body: str) -> str | None:
    """The drop reason shared by every rule: an empty body, or a character that is not a letter (category L*).

    Named by the first such character's category: N* (digits; Llama splits every digit into its own piece), P*
    (",", "▁(", '."'), S* ("▁=", "▁$"), M* (combining accents and vowel signs: fragments of a character or
    syllable), anything else (control characters, no-break space). SentencePiece never merges letters with
    punctuation, so a piece is either all letters or not a word.
    """
    if not body:
        return "whitespace"
    for char in body:
        if not char.isalpha():
            category = unicodedata.category(char)[0]
            return {"N": "number", "P": "punctuation", "S": "symbol", "M": "mark"}.get(category, "other")
    return None


def _lowercase_alpha(piece: str, min_letters: int) -> str | None:
    body = piece.lstrip(WORD_START)
    reason = _not_letters(body)
    if reason:
        return reason
    for char in body:
        if char not in _ASCII_LOWER:
            return "capitalised" if char.isupper() else "non_ascii"
    return "single_letter" if len(body) < min_letters else None


def _word_start(piece: str) -> str | None:
    body = piece.lstrip(WORD_START)
    reason = _not_letters(body)
    if reason:
        return reason
    if piece.startswith(WORD_START) or (len(body) == 1 and _is_ideograph(body)):
        return None
    return "continuation"


RULES = {
    "lowercase_alpha": lambda piece: _lowercase_alpha(piece, min_letters=2),
    "lowercase_alpha_single": lambda piece: _lowercase_alpha(piece, min_letters=1),
    "word_start": _word_start,
}
RULE_DESCRIPTIONS = {
    "lowercase_alpha": "pieces whose text (word-start mark removed) is 2+ lowercase letters a-z",
    "lowercase_alpha_single": "pieces whose text (word-start mark removed) is 1+ lowercase letters a-z",
    "word_start": "word-start pieces of letters in any script and case, plus lone CJK ideographs",
}


def check_rule(rule: str) -> str:
    """`rule` itself when it names a vocabulary rule; otherwise a one-line ValueError listing the rules."""
    if rule not in RULES:
        raise ValueError(f"unknown vocabulary rule {rule!r}; choose one of {sorted(RULES)}")
    return rule


def piece_drop_reason(piece: str, rule: str = DEFAULT_RULE) -> str | None:
    """Why an ordinary (non-special, non-byte) piece is not a word under `rule`, or None when it is kept.

    `body` is the piece without its leading "▁"s. Every rule first drops an empty body ("whitespace": runs of
    spaces) and bodies with a non-letter (number / punctuation / symbol / mark / other, after the first such
    character's Unicode category). Then:
    - `lowercase_alpha` (default): the body must be lowercase ASCII letters a-z ("capitalised" for any uppercase
      letter, "non_ascii" for any other letter: "über", "город", "山") and at least two of them
      ("single_letter": "▁a", "e"). Sub-word pieces are kept with or without the word-start mark ("▁horse",
      "horse", "er", "cou"): the paper's figures show such pieces and no capitalised words.
    - `lowercase_alpha_single`: the same with single letters kept.
    - `word_start`: "▁" followed only by letters, in any alphabetic script and either case ("▁horse", "▁Horse",
      "▁a", "▁über", "▁город"); pieces without "▁" are the inside or end of a longer word ("continuation":
      "ing", "rse"), except a lone CJK ideograph ("山"): Chinese and Japanese put no spaces between words, so their
      pieces never carry "▁", and each ideograph is itself a word or morpheme.
    """
    return RULES[check_rule(rule)](piece)


def drop_reasons(tokenizer: Tokenizer, rule: str = DEFAULT_RULE) -> list[str | None]:
    """Per id: the reason it is dropped (`DROP_REASONS`) or None when it is kept under `rule`.

    Special tokens (unk/bos/eos…) and byte-fallback pieces `<0x..>` are dropped first; every other piece goes
    through `piece_drop_reason`.
    """
    check_rule(rule)
    reasons = []
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_special(i):
            reasons.append("special")
        elif tokenizer.is_byte(i):
            reasons.append("byte")
        else:
            reasons.append(piece_drop_reason(tokenizer.id_to_piece(i), rule))
    return reasons


def filter_vocabulary(tokenizer: Tokenizer, rule: str = DEFAULT_RULE) -> np.ndarray:
    """Sorted int32 ids of the kept "word" pieces under `rule`: the lexical vocabulary V' (`piece_drop_reason`).

    The LexVLA paper keeps 17,149 of Llama 2's 32,000 pieces and does not publish its rule. Its figures show
    sub-word pieces ("er", "en", "cou", "kne", "woj") and no capitalised word, which rules out word-start-only
    rules (only 16,409 pieces start with "▁"; `word_start`, the widest of them, keeps 16,754: 16,054 "▁" +
    letters and 700 CJK ideographs). Counts on Llama 2 (`LLAMA2_KEPT_COUNTS`):
    - `lowercase_alpha` (default): 17,182, +33 (0.19%) from the paper. Single letters go: alone they name no
      word ("▁a" and "▁i" are stopwords, "e" or "t" a fragment).
    - `lowercase_alpha_single`: 17,234, +85 (0.50%).
    - `word_start`: 16,754, -395 (2.3%).
    Capping the length as well (2-13 letters: 17,148) would come closer only by fitting the count; nothing in
    the paper's material points to a cap, so no rule does it.
    """
    return np.array([i for i, reason in enumerate(drop_reasons(tokenizer, rule)) if reason is None], dtype=np.int32)


def _spread(items: list, count: int) -> list:
    """`count` items evenly spread over `items` (deterministic, covers short and long pieces alike)."""
    if len(items) <= count:
        return items
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, count).round().astype(int)]


def rule_report(tokenizer: Tokenizer, rule: str = DEFAULT_RULE, examples: int = 20) -> str:
    """One rule: kept / dropped counts, the count per drop reason, and evenly spread examples of each."""
    reasons = drop_reasons(tokenizer, rule)
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    counts = Counter(reason for reason in reasons if reason is not None)
    total = tokenizer.vocab_size

    def show(ids):
        return ", ".join(repr(tokenizer.id_to_piece(i)) for i in _spread(ids, examples))

    default = " (default)" if rule == DEFAULT_RULE else ""
    lines = [
        f"rule {rule}{default}: {RULE_DESCRIPTIONS[rule]}",
        f"kept: {len(kept)} of {total} ({100 * len(kept) / total:.1f}%)",
        f"  e.g. {show(kept)}",
        f"dropped: {total - len(kept)}",
    ]
    width = max(len(reason) for reason in DROP_REASONS)
    for reason in DROP_REASONS:
        if counts[reason]:
            ids = [i for i, r in enumerate(reasons) if r == reason]
            lines.append(f"  {reason.ljust(width)} {counts[reason]:6d}  e.g. {show(ids)}")
    return "\n".join(lines)


def vocabulary_report(tokenizer: Tokenizer, rules: Sequence[str] = tuple(RULES), examples: int = 20) -> str:
    """The tokenizer, then `rule_report` for each of `rules`."""
    sections = [f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} pieces)"]
    sections += [rule_report(tokenizer, rule, examples) for rule in rules]
    return "\n\n".join(sections)
