"""Llama-style tokenizers from local files, and training a small one.

`Tokenizer` / `load_tokenizer`: Llama 2's tokenizer from a local `tokenizer.model` (SentencePiece, preferred: it is
the tokenizer Llama 2 was trained with) or `tokenizer.json` (HF `tokenizers`). `train_tokenizer` trains a small
Llama-style SentencePiece BPE model (tests, the embedded job). Plain Python + NumPy: runs inside grain data workers.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from lexvla_jax.configlib import ConfigError, first_line

WORD_START = "\u2581"  # SentencePiece's "▁": the piece begins a new whitespace-separated word.
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


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

    def word(self, token_id: int) -> str:
        """The readable word of a piece: its text with SentencePiece's word-start mark removed."""
        return self.id_to_piece(int(token_id)).replace(WORD_START, "")

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
