"""Tokenizer, in-context prompt and vocabulary filter for the text tower.

Three pieces, all plain Python + NumPy (no JAX: this module runs inside grain data workers):

- `Tokenizer` / `load_tokenizer`: Llama 2's tokenizer from a local `tokenizer.model` (SentencePiece, preferred:
  it is the tokenizer Llama 2 was trained with) or `tokenizer.json` (HF `tokenizers`). `train_tokenizer` trains a
  small Llama-style SentencePiece BPE model for tests and synthetic data.
- `PromptEncoder`: fills the in-context prompt (`DEFAULT_PROMPT`) with a caption; the model reads the lexical
  prediction at the prompt's last token.
- `filter_vocabulary`: the explicit, named rule (`RULES`, default `lowercase_alpha`) that picks the "word" entries
  of the vocabulary, i.e. the lexical dimensions V' shared by both towers. `lexvla vocab --tokenizer PATH` prints
  what each rule keeps and drops.
"""

from __future__ import annotations

import abc
import argparse
import io
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from lexvla_jax.configlib import ConfigError, first_line

PLACEHOLDER = "[TEXT]"
DEFAULT_PROMPT = (
    'The focus of "The man is riding a white horse." lies on important words: "man", "riding", "white", "horse". '
    'The focus of "[TEXT]" lies on important words:'
)
WORD_START = "\u2581"  # SentencePiece's "▁": the piece begins a new whitespace-separated word.
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


# ----------------------------------------------------------------------------------------------- tokenizer


class Tokenizer(abc.ABC):
    """A Llama-style tokenizer: `encode` gives exactly the ids Llama 2 sees (dummy prefix, byte fallback).

    Text is always text: "<s>" inside a caption is tokenised as the characters `<`, `s`, `>` (as SentencePiece
    does), never as a control token, so captions cannot inject BOS/EOS.

    `pad_id` is the model's pad piece, or `unk_id` (0 for Llama 2, which has no pad piece) when there is none:
    padded positions are always masked out, so any valid id serves.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    path: str

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """`(ids, starts, ends)`, no BOS: token k covers the characters `text[starts[k]:ends[k]]`.

        A byte-fallback token covers the whole character its byte belongs to; a token may cover no character
        (the dummy-prefix piece before a leading non-space), then `starts[k] == ends[k]`.
        """

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids` (control tokens dropped)."""

    @abc.abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id `i` (e.g. `▁horse`)."""

    @abc.abstractmethod
    def is_special(self, i: int) -> bool:
        """Control tokens (unk/bos/eos/pad and other special tokens): never text."""

    def is_byte(self, i: int) -> bool:
        """Byte-fallback pieces `<0x00>`…`<0xFF>`."""
        return bool(_BYTE_PIECE.match(self.id_to_piece(i)))

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS."""


class SentencePieceTokenizer(Tokenizer):
    """Wraps a SentencePiece model proto (Llama 2's `tokenizer.model`)."""

    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        self.path = path
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.unk_id

    def __getstate__(self):
        return {"model_proto": self._model_proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        pieces = self._sp.encode(text, return_type="proto").pieces
        ids = [p.id for p in pieces]
        starts = [p.begin for p in pieces]
        ends = [p.end for p in pieces]
        if not text.isascii():  # SentencePiece reports UTF-8 byte offsets: map them to character offsets.
            data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            byte_to_char = np.concatenate([[0], np.cumsum((data & 0xC0) != 0x80)]).tolist()
            starts = [byte_to_char[s] for s in starts]
            ends = [byte_to_char[e] for e in ends]
            # Leading bytes of a multi-byte character are empty pieces at its start: give them the whole character.
            for k in range(len(ids) - 2, -1, -1):
                if starts[k] == ends[k] == starts[k + 1] and self._sp.is_byte(ids[k]):
                    ends[k] = ends[k + 1]
        return ids, starts, ends

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def is_special(self, i: int) -> bool:
        i = int(i)
        return self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i)

    def is_byte(self, i: int) -> bool:
        return self._sp.is_byte(int(i))


class HFTokenizer(Tokenizer):
    """Wraps an HF `tokenizers` `tokenizer.json`; special token names come from a sibling `tokenizer_config.json`.

    Its ids are whatever the json specifies: Meta's Llama 2 `tokenizer.json` reproduces SentencePiece exactly, but a
    json converted by a tool that orders BPE merges by id rather than piece score splits runs of spaces
    differently, so `load_tokenizer` prefers `tokenizer.model` when a directory has both. As in SentencePiece,
    special-token strings in the text ("<s>") are plain text, never control tokens.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as BackendTokenizer

        self.path = path
        self._tokenizer = BackendTokenizer.from_file(path)
        self._tokenizer.encode_special_tokens = True
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            for key in names:
                value = config.get(key)
                names[key] = value.get("content") if isinstance(value, dict) else (value or names[key])
        ids = {key: self._tokenizer.token_to_id(name) if name else None for key, name in names.items()}
        for key in ("bos_token", "eos_token"):
            if ids[key] is None:
                raise ValueError(
                    f"{path}: {key} {names[key]!r} is not in the vocabulary; set it in tokenizer_config.json"
                )
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.unk_id = ids["unk_token"] if ids["unk_token"] is not None else 0
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.unk_id
        self._special = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        self._special |= {self.bos_id, self.eos_id, self.unk_id}

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [s for s, _ in encoding.offsets], [e for _, e in encoding.offsets]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tokenizer.id_to_token(int(i))

    def is_special(self, i: int) -> bool:
        return int(i) in self._special


class TokenizerError(ConfigError):
    """A tokenizer path that cannot be loaded; the message is one line naming the path and the field to set."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No tokenizer file at the path given."""


def load_tokenizer(path: str, field: str = "config.data.tokenizer") -> Tokenizer:
    """A `tokenizer.model` / `tokenizer.json` file, or a directory holding one (`tokenizer.model` preferred).

    `field` is where the path came from; errors name it (`TokenizerNotFound`, `TokenizerError`: one line).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), field)
        raise TokenizerNotFound(f"{path} holds no tokenizer.model or tokenizer.json; set {field} to the tokenizer file")
    if not os.path.isfile(path):
        raise TokenizerNotFound(
            f"tokenizer {path} does not exist; set {field} to a tokenizer.model, tokenizer.json or their directory"
        )
    if path.endswith(".json"):
        try:
            return HFTokenizer(path)
        except ValueError as e:
            raise TokenizerError(f"{e}; check {field}") from None
        except Exception as e:  # the tokenizers library raises its own exception type
            raise TokenizerError(f"{path} is not a tokenizer.json ({first_line(e)}); check {field}") from None
    with open(path, "rb") as f:
        model_proto = f.read()
    try:
        return SentencePieceTokenizer(model_proto, path)
    except RuntimeError:
        raise TokenizerError(
            f"{path} is not a SentencePiece model; set {field} to a tokenizer.model or tokenizer.json"
        ) from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
    """Trains a small Llama-style SentencePiece BPE model on `texts`, writes it to `out_path` and loads it.

    Llama 2's settings: BPE, byte fallback, unk/bos/eos = 0/1/2 and no pad piece, dummy prefix, digits split,
    whitespace-only pieces allowed, no normalisation. Every character of `texts` gets a piece
    (`character_coverage=1`). One thread and no sampling make the model a function of `texts` alone.
    """
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            character_coverage=1.0,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        reason = str(e).rsplit("] ", 1)[-1]
        raise ValueError(f"train_tokenizer(vocab_size={vocab_size}): {reason}") from None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(buffer.getvalue())
    return load_tokenizer(out_path)


# -------------------------------------------------------------------------------------------------- prompt


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


# --------------------------------------------------------------------------------------- vocabulary filter

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


def main(argv: Sequence[str]) -> int:
    """`lexvla vocab --tokenizer PATH [--rule NAME] [--examples N] [--out kept_ids.npy]`."""
    parser = argparse.ArgumentParser(prog="lexvla vocab", description="Report the filtered lexical vocabulary.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, tokenizer.json or a directory with one")
    parser.add_argument(
        "--rule", choices=sorted(RULES), help=f"report this rule only (default: every rule; {DEFAULT_RULE} is used)"
    )
    parser.add_argument("--examples", type=int, default=20, help="examples shown per group (default 20)")
    parser.add_argument("--out", help=f"write the kept ids of --rule (default {DEFAULT_RULE}), sorted int32, to .npy")
    args = parser.parse_args(list(argv))
    try:
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    except (OSError, ValueError) as e:
        print(f"lexvla vocab: {e}", file=sys.stderr)
        return 2
    print(vocabulary_report(tokenizer, [args.rule] if args.rule else tuple(RULES), args.examples))
    if args.out:
        np.save(args.out, filter_vocabulary(tokenizer, args.rule or DEFAULT_RULE))
        print(f"wrote {args.out}")
    return 0
