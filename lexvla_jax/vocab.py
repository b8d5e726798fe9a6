"""Tokenizer, in-context prompt and vocabulary filter for the text tower.

Three pieces, all plain Python + NumPy (no JAX: this module runs inside grain data workers):

- `Tokenizer` / `load_tokenizer`: Llama 2's tokenizer from a local `tokenizer.model` (SentencePiece, preferred:
  it is the tokenizer Llama 2 was trained with) or `tokenizer.json` (HF `tokenizers`). `train_tokenizer` trains a
  small Llama-style SentencePiece BPE model for tests and synthetic data.
- `PromptEncoder`: fills the in-context prompt (`DEFAULT_PROMPT`) with a caption; the model reads the lexical
  prediction at the prompt's last token.
- `filter_vocabulary`: the explicit rule that picks the "word" entries of the vocabulary, i.e. the lexical
  dimensions V' shared by both towers. `lexvla vocab --tokenizer PATH` prints what it keeps and drops.
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


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.model` / `tokenizer.json` file, or a directory holding one (`tokenizer.model` preferred)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"{path} holds no tokenizer.model or tokenizer.json; pass the tokenizer file itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist; pass a tokenizer.model, tokenizer.json or their dir")
    if path.endswith(".json"):
        return HFTokenizer(path)
    with open(path, "rb") as f:
        model_proto = f.read()
    try:
        return SentencePieceTokenizer(model_proto, path)
    except RuntimeError:
        raise ValueError(f"{path} is not a SentencePiece model; pass a tokenizer.model or tokenizer.json") from None


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

# Llama 2's vocabulary (32,000 pieces) keeps this many under `filter_vocabulary`; tests check it on the real file.
LLAMA2_KEPT_COUNT = 16754

DROP_REASONS = (
    "special",
    "byte",
    "whitespace",
    "number",
    "punctuation",
    "symbol",
    "mark",
    "other",
    "continuation",
)


def _is_ideograph(char: str) -> bool:
    return unicodedata.name(char, "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"))


def piece_drop_reason(piece: str) -> str | None:
    """Why an ordinary (non-special, non-byte) piece is not a word, or None when it is kept.

    The first rule that matches names the reason; `body` is the piece without its leading "▁"s.
    - whitespace: the body is empty ("▁", "▁▁", …): runs of spaces, no word.
    - number / punctuation / symbol / mark / other: the body has a character that is not a letter (Unicode
      category L*). Named by the first such character's category: N* (digits; Llama splits every digit into its
      own piece), P* (",", "▁(", '."'), S* ("▁=", "▁$"), M* (combining accents and vowel signs: fragments of a
      character or syllable), anything else (control characters, no-break space). Letters are what words are made of;
      pieces are never mixed letters-and-punctuation because SentencePiece does not merge across those classes.
    - continuation: letters without a leading "▁", i.e. the inside or end of a longer word ("ing", "rse"). A
      lone CJK ideograph is the exception and kept: Chinese and Japanese put no spaces between words, so
      their pieces never carry "▁", and each ideograph is itself a word or morpheme ("山" mountain, "人" person).
    What remains is kept: "▁" followed only by letters, i.e. a whole word or the first piece of one, in any
    alphabetic script and either case ("▁horse", "▁Horse", "▁a", "▁Paris", "▁über", "▁город").
    """
    body = piece.lstrip(WORD_START)
    if not body:
        return "whitespace"
    for char in body:
        if not char.isalpha():
            category = unicodedata.category(char)[0]
            return {"N": "number", "P": "punctuation", "S": "symbol", "M": "mark"}.get(category, "other")
    if piece.startswith(WORD_START) or (len(body) == 1 and _is_ideograph(body)):
        return None
    return "continuation"


def drop_reasons(tokenizer: Tokenizer) -> list[str | None]:
    """Per id: the reason it is dropped (`DROP_REASONS`) or None when it is kept.

    Special tokens (unk/bos/eos…) and byte-fallback pieces `<0x..>` are dropped first; every other piece goes
    through `piece_drop_reason`.
    """
    reasons = []
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_special(i):
            reasons.append("special")
        elif tokenizer.is_byte(i):
            reasons.append("byte")
        else:
            reasons.append(piece_drop_reason(tokenizer.id_to_piece(i)))
    return reasons


def filter_vocabulary(tokenizer: Tokenizer) -> np.ndarray:
    """Sorted int32 ids of the kept "word" pieces: the lexical vocabulary V' (rules in `piece_drop_reason`).

    The LexVLA paper keeps 17,149 of Llama 2's 32,000 pieces; its public material does not state the rule. This
    rule keeps `LLAMA2_KEPT_COUNT` = 16,754: the 16,054 pieces that are "▁" + letters and 700 CJK ideographs. Only
    16,409 pieces start with "▁" at all, so no rule that drops sub-word continuations can reach 17,149; narrower
    variants move further away ("▁" + ASCII letters only: 13,864; "▁" + at least two letters: 15,898).
    """
    return np.array([i for i, reason in enumerate(drop_reasons(tokenizer)) if reason is None], dtype=np.int32)


def _spread(items: list, count: int) -> list:
    """`count` items evenly spread over `items` (deterministic, covers short and long pieces alike)."""
    if len(items) <= count:
        return items
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, count).round().astype(int)]


def vocabulary_report(tokenizer: Tokenizer, examples: int = 20) -> str:
    """Kept / dropped counts, the count per drop reason, and evenly spread examples of each."""
    reasons = drop_reasons(tokenizer)
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    counts = Counter(reason for reason in reasons if reason is not None)
    total = tokenizer.vocab_size

    def show(ids):
        return ", ".join(repr(tokenizer.id_to_piece(i)) for i in _spread(ids, examples))

    lines = [
        f"tokenizer: {tokenizer.path} ({total} pieces)",
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


def main(argv: Sequence[str]) -> int:
    """`lexvla vocab --tokenizer PATH [--examples N] [--out kept_ids.npy]`."""
    parser = argparse.ArgumentParser(prog="lexvla vocab", description="Report the filtered lexical vocabulary.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, tokenizer.json or a directory with one")
    parser.add_argument("--examples", type=int, default=20, help="examples shown per group (default 20)")
    parser.add_argument("--out", help="write the kept ids (sorted int32) to this .npy file")
    args = parser.parse_args(list(argv))
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        print(f"lexvla vocab: {e}", file=sys.stderr)
        return 2
    print(vocabulary_report(tokenizer, args.examples))
    if args.out:
        np.save(args.out, filter_vocabulary(tokenizer))
        print(f"wrote {args.out}")
    return 0
