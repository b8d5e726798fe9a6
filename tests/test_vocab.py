"""Tokenizer parity with transformers' Llama tokenizer, the in-context prompt, and the vocabulary filter."""

import contextlib
import io
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from lexvla_jax.text.prompt import DEFAULT_PROMPT, PromptEncoder
from lexvla_jax.text.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_tokenizer
from lexvla_jax.text.vocabulary import (
    DEFAULT_RULE,
    LLAMA2_KEPT_COUNT,
    LLAMA2_KEPT_COUNTS,
    RULES,
    drop_reasons,
    filter_vocabulary,
    piece_drop_reason,
)

CAPTIONS = [
    "The man is riding a white horse.",
    "A brown dog runs on the sandy beach at sunset.",
    "Two cats sleep on a red sofa near 3 windows.",
    "A photo of a horse in a green field, with 12 sheep.",
    "A café in Paris serves croissants; naïve tourists queue.",
    "Children play football in the park (Saturday morning).",
    "A city street at night: cars, lights and people.",
    "Город ночью. 山 と 人 の 写真.",
    "An old woman reads a book by the window!",
    "Boats float on the calm blue lake - 2024.",
]

# Strings on which tokenizers tend to disagree. Whitespace runs before a word (" x", "a  b") are where an HF BPE
# whose merges are ranked by id rather than by SentencePiece's piece scores differs from Llama 2's own tokenizer.
TRICKY = [
    "",
    "Hello world",
    "The man is riding a white horse.",
    " leading space",
    "  two leading spaces",
    " ",
    "   ",
    "\n",
    "line one\nline two\n\nline four",
    "\ttabbed\tcolumns",
    "trailing spaces  ",
    "a  b   c",
    "digits 1234567890 and 3.14159",
    "ünïcödé Ωμέγα город café",
    "emoji 🦙🐎 ok",
    "日本語のテキスト 山",
    "quotes \"inside\" and 'single'",
]
CONTROL_STRINGS = "<s> is text here, not a control token </s>"


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_tokenizer(CAPTIONS * 20, vocab_size=520, out_path=str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny(tiny_path):
    return load_tokenizer(tiny_path)


@pytest.fixture(scope="session")
def llama(llama2_tokenizer_path):
    return load_tokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="session", params=["tiny", "llama2"])
def any_tokenizer(request):
    return request.getfixturevalue("tiny" if request.param == "tiny" else "llama")


def _meta_layout_transformers_tokenizer(model_path):
    """transformers' LlamaTokenizer laid out like Meta's Llama 2 `tokenizer.json`.

    BPE merges ranked by SentencePiece piece score, byte fallback, a `Prepend("▁") + Replace(" ", "▁")` normaliser
    and no pre-tokenizer. Built from the .model file alone (offline).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(pieces, {p.piece: p.score for p in proto.pieces})
    reference = LlamaTokenizer(vocab=pieces, merges=merges, legacy=True, add_bos_token=True)
    backend = reference.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return reference


@pytest.fixture(scope="session", params=["tiny", "llama2"])
def model_and_reference(request, tiny_path):
    path = tiny_path if request.param == "tiny" else request.getfixturevalue("llama2_tokenizer_path")
    return path, _meta_layout_transformers_tokenizer(path)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_encode_matches_transformers_llama_tokenizer(model_and_reference):
    path, reference = model_and_reference
    tokenizer = load_tokenizer(path)
    for text in TRICKY:
        expected = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.encode(text, add_bos=True) == reference.encode(text) == [tokenizer.bos_id, *expected], text
    # Special-token strings are text (as in SentencePiece): transformers' `split_special_tokens=True` behaviour.
    expected = reference.encode(CONTROL_STRINGS, add_special_tokens=False, split_special_tokens=True)
    assert tokenizer.encode(CONTROL_STRINGS) == expected
    assert tokenizer.bos_id not in expected and tokenizer.eos_id not in expected


def test_encode_matches_transformers_from_pretrained_outside_whitespace_runs(model_and_reference, tmp_path):
    """`LlamaTokenizer.from_pretrained` on a dir with only tokenizer.model: agrees except on leading/repeated spaces."""
    from transformers import LlamaTokenizer

    path, _ = model_and_reference
    os.symlink(path, tmp_path / "tokenizer.model")
    reference = LlamaTokenizer.from_pretrained(str(tmp_path), legacy=True)
    tokenizer = load_tokenizer(path)
    for text in TRICKY:
        if text.startswith(" ") or "  " in text.strip(" ") or text.strip() == "":
            continue
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_llama2_known_ids(llama):
    """Llama 2's ids for a few strings (dummy prefix, byte fallback, split digits, lone spaces)."""
    assert llama.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert llama.encode(" x") == [29871, 921]  # "▁" + "▁x", not "▁▁" + "x"
    assert llama.encode("🦙") == [29871, 243, 162, 169, 156]
    assert llama.encode("12") == [29871, 29896, 29906]
    assert llama.encode("\n") == [29871, 13]
    assert llama.encode("") == [] and llama.encode("", add_bos=True) == [1]
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_id) == (32000, 1, 2, 0, 0)


def test_json_backend_equals_sentencepiece(model_and_reference, tmp_path):
    path, reference = model_and_reference
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = load_tokenizer(str(tmp_path / "tokenizer.json"))
    from_model = load_tokenizer(path)
    assert isinstance(from_json, HFTokenizer) and isinstance(from_model, SentencePieceTokenizer)
    assert (from_json.vocab_size, from_json.bos_id, from_json.eos_id, from_json.pad_id) == (
        from_model.vocab_size,
        from_model.bos_id,
        from_model.eos_id,
        from_model.pad_id,
    )
    for text in [*TRICKY, CONTROL_STRINGS]:
        assert from_json.encode(text, add_bos=True) == from_model.encode(text, add_bos=True), text
        assert from_json.decode(from_json.encode(text)) == from_model.decode(from_model.encode(text)), text
    np.testing.assert_array_equal(filter_vocabulary(from_json), filter_vocabulary(from_model))
    captions = [*CAPTIONS, LONG_CAPTION, "🦙" * 20, "é" * 40, '"quoted".']
    batch_json = PromptEncoder(from_json, max_caption_tokens=8).batch(captions)
    batch_model = PromptEncoder(from_model, max_caption_tokens=8).batch(captions)
    for key in ("input_ids", "attention_mask", "last_index"):
        np.testing.assert_array_equal(batch_json[key], batch_model[key])


def test_decode_round_trip_and_offsets(any_tokenizer):
    for text in TRICKY:
        ids = any_tokenizer.encode(text, add_bos=True)
        assert any_tokenizer.decode(np.asarray(ids)) == text, text
        ids, starts, ends = any_tokenizer.encode_with_offsets(text)
        assert ids == any_tokenizer.encode(text)
        assert all(0 <= s <= e <= len(text) for s, e in zip(starts, ends, strict=True))
        if ids:
            assert max(ends) == len(text)
    _, starts, ends = any_tokenizer.encode_with_offsets("é 🦙")
    assert starts[-4:] == [2, 2, 2, 2] and ends[-4:] == [3, 3, 3, 3]  # four byte pieces, one character


def test_load_tokenizer_paths_and_errors(tiny_path, tmp_path):
    assert load_tokenizer(os.path.dirname(tiny_path)).encode("a horse") == load_tokenizer(tiny_path).encode("a horse")
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_tokenizer(str(tmp_path / "missing.model"))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.model or tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "garbage.model"))


def test_train_tokenizer_is_llama_style_and_deterministic(tiny_path, tmp_path):
    again = train_tokenizer(CAPTIONS * 20, vocab_size=520, out_path=str(tmp_path / "again.model"))
    with open(tiny_path, "rb") as a, open(tmp_path / "again.model", "rb") as b:
        assert a.read() == b.read()
    assert (again.vocab_size, again.unk_id, again.bos_id, again.eos_id, again.pad_id) == (520, 0, 1, 2, 0)
    assert [again.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert again.encode("🐴")[-4:] == [3 + b for b in "🐴".encode()]  # unseen character: byte fallback
    assert again.id_to_piece(again.encode("horse")[0]).startswith("▁")  # dummy prefix
    with pytest.raises(ValueError, match=r"train_tokenizer\(vocab_size=100\): Vocabulary size is smaller"):
        train_tokenizer(CAPTIONS, vocab_size=100, out_path=str(tmp_path / "small.model"))


def test_tokenizer_pickles(tiny, tmp_path):
    copy = pickle.loads(pickle.dumps(tiny))
    assert copy.encode(CAPTIONS[0], add_bos=True) == tiny.encode(CAPTIONS[0], add_bos=True)


def test_module_imports_no_jax():
    modules = "lexvla_jax.text.tokenizer, lexvla_jax.text.prompt, lexvla_jax.text.vocabulary, lexvla_jax.text.bow"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------- prompt

LONG_CAPTION = (
    "A very long caption about a brown dog and two cats that run across the green field near a calm blue lake "
    "while children play football in the park and boats float by under the city lights at night."
)


def test_prompt_untruncated_equals_filled_string(any_tokenizer):
    prompt = PromptEncoder(any_tokenizer, max_caption_tokens=64)
    for caption in [*CAPTIONS, "", ".", "ends with a dot.", '"quoted"', "  extra   spaces  ", "🦙 emoji"]:
        filled = DEFAULT_PROMPT.replace("[TEXT]", " ".join(caption.split()))
        assert prompt.fill(caption) == filled
        assert prompt.encode(caption) == any_tokenizer.encode(filled, add_bos=True), caption


def test_prompt_truncation_keeps_template_tail(any_tokenizer):
    max_caption_tokens = 6
    prompt = PromptEncoder(any_tokenizer, max_caption_tokens=max_caption_tokens)
    _, suffix = DEFAULT_PROMPT.split("[TEXT]")
    tail = any_tokenizer.encode(prompt.fill("A dog"))[-4:]  # "...important words:" after the closing quote
    captions = [LONG_CAPTION, "🦙" * 20, "x" * 300, CAPTIONS[1], "", "ends with a dot. " * 10]
    batch = prompt.batch(captions)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(captions), prompt.max_length)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["last_index"].dtype == np.int32
    for row, caption in enumerate(captions):
        length = int(batch["last_index"][row]) + 1
        ids = batch["input_ids"][row, :length].tolist()
        assert ids[-4:] == tail, caption
        assert any_tokenizer.decode(ids).endswith(suffix), caption
        kept = any_tokenizer.decode(ids)[len(prompt.prefix) : -len(suffix)]
        assert " ".join(caption.split()).startswith(kept), caption
        assert ids == any_tokenizer.encode(prompt.fill(kept), add_bos=True), caption  # exact ids of what is kept
        # no more caption tokens than allowed: tokens beyond the template's own
        assert length - prompt.num_template_tokens <= max_caption_tokens, caption


def test_prompt_truncation_keeps_the_first_caption_tokens(llama):
    prompt = PromptEncoder(llama, max_caption_tokens=8)
    full = llama.encode(prompt.fill(LONG_CAPTION), add_bos=True)
    ids = prompt.encode(LONG_CAPTION)
    assert prompt.num_template_tokens == 43  # BOS + 36 before the caption + 6 after it
    assert len(ids) == prompt.max_length == prompt.num_template_tokens + 8
    kept = len(llama.encode(prompt.prefix, add_bos=True)) + 8
    assert ids[:kept] == full[:kept]
    pieces = [llama.id_to_piece(i) for i in ids[kept - 8 :]]
    assert pieces == ["A", "▁very", "▁long", "▁ca", "ption", "▁about", "▁a", "▁brown"] + [
        '"',
        "▁lies",
        "▁on",
        "▁important",
        "▁words",
        ":",
    ]
    assert llama.decode(ids).endswith('The focus of "A very long caption about a brown" lies on important words:')


def test_prompt_padding_and_last_index(any_tokenizer):
    prompt = PromptEncoder(any_tokenizer, max_caption_tokens=16)
    captions = ["A dog.", LONG_CAPTION, "Two cats sleep on a red sofa."]
    batch = prompt.batch(captions)
    for row, caption in enumerate(captions):
        ids = prompt.encode(caption)
        input_ids, mask = prompt(caption)
        assert int(batch["last_index"][row]) == len(ids) - 1
        assert batch["input_ids"][row, len(ids) - 1] == ids[-1]
        np.testing.assert_array_equal(batch["input_ids"][row], input_ids)
        np.testing.assert_array_equal(input_ids[: len(ids)], ids)
        assert (input_ids[len(ids) :] == any_tokenizer.pad_id).all()
        np.testing.assert_array_equal(mask, np.arange(prompt.max_length) < len(ids))
    assert int(batch["last_index"][1]) == prompt.max_length - 1  # the long caption fills the row
    assert len({int(i) for i in batch["last_index"]}) == 3


def test_prompt_max_length_and_template_errors(tiny):
    default = PromptEncoder(tiny, max_caption_tokens=10)
    assert default.max_length == default.num_template_tokens + 10
    assert len(default.encode("x")) == default.num_template_tokens + 1  # "x" is one byte-fallback token here
    tight = PromptEncoder(tiny, max_caption_tokens=10, max_length=default.num_template_tokens + 1)
    ids = tight.encode(LONG_CAPTION)
    assert len(ids) == tight.max_length and ids[-3:] == default.encode("A dog")[-3:]
    with pytest.raises(ValueError, match=r"max_length=\d+ cannot hold the prompt template .* use max_length >= \d+"):
        PromptEncoder(tiny, max_length=default.num_template_tokens)
    for template in ["no placeholder", "[TEXT] and [TEXT]"]:
        with pytest.raises(ValueError, match=r"must contain '\[TEXT\]' exactly once") as info:
            PromptEncoder(tiny, template=template)
        assert "\n" not in str(info.value)
    custom = PromptEncoder(tiny, template="Caption: [TEXT]", add_bos=False)
    assert custom.encode("a horse") == tiny.encode("Caption: a horse")


# -------------------------------------------------------------------------------------------------- filter


WORD_START_REASONS = {
    "▁horse": None,
    "▁Horse": None,
    "▁a": None,
    "▁über": None,
    "▁город": None,
    "山": None,  # CJK ideograph: a word without a word-start marker
    "ing": "continuation",
    "rse": "continuation",
    "の": "continuation",  # kana: syllables, not words
    "▁": "whitespace",
    "▁▁▁▁": "whitespace",
    "1": "number",
    "▁²": "number",
    ".": "punctuation",
    '."': "punctuation",
    "▁(": "punctuation",
    "▁=": "symbol",
    "▁$": "symbol",
    "\u0301": "mark",
    "▁\r": "other",
}
LOWERCASE_ALPHA_REASONS = {
    **{piece: reason for piece, reason in WORD_START_REASONS.items() if reason not in (None, "continuation")},
    "▁horse": None,
    "horse": None,
    "er": None,  # sub-word pieces, as in the paper's figures
    "ing": None,
    "▁ab": None,
    "▁Horse": "capitalised",
    "HTTP": "capitalised",
    "▁Город": "capitalised",
    "▁über": "non_ascii",
    "▁город": "non_ascii",
    "山": "non_ascii",
    "の": "non_ascii",
    "▁a": "single_letter",
    "e": "single_letter",
}


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("word_start", WORD_START_REASONS),
        ("lowercase_alpha", LOWERCASE_ALPHA_REASONS),
        ("lowercase_alpha_single", {**LOWERCASE_ALPHA_REASONS, "▁a": None, "e": None}),
    ],
)
def test_piece_drop_reason_rules(rule, expected):
    assert {piece: piece_drop_reason(piece, rule) for piece in expected} == expected


def test_default_rule_and_unknown_rule(tiny):
    assert DEFAULT_RULE == "lowercase_alpha"
    assert piece_drop_reason("▁a") == "single_letter"
    np.testing.assert_array_equal(filter_vocabulary(tiny), filter_vocabulary(tiny, "lowercase_alpha"))
    with pytest.raises(ValueError, match=r"unknown vocabulary rule 'words'; choose one of \[") as info:
        filter_vocabulary(tiny, "words")
    assert "\n" not in str(info.value)


def test_filter_on_trained_tokenizer(tiny):
    ids = {tiny.id_to_piece(i): i for i in range(tiny.vocab_size)}
    common = {
        "<unk>": "special",
        "<s>": "special",
        "</s>": "special",
        "<0x0A>": "byte",
        "<0xF0>": "byte",
        "▁horse": None,
        "▁white": None,
        "▁city": None,
        ".": "punctuation",
        ").": "punctuation",
        "1": "number",
        "▁": "whitespace",
    }
    expected = {
        "word_start": {
            **common,
            "▁café": None,
            "▁Город": None,
            "山": None,
            "▁写真": None,
            "ing": "continuation",
            "Го": "continuation",
            "の": "continuation",
        },
        "lowercase_alpha": {
            **common,
            "▁café": "non_ascii",
            "▁Город": "capitalised",
            "山": "non_ascii",
            "ing": None,
            "▁The": "capitalised",
            "▁a": "single_letter",
        },
    }
    for rule, pieces in expected.items():
        reasons = drop_reasons(tiny, rule)
        assert {piece: reasons[ids[piece]] for piece in pieces} == pieces, rule
        kept = filter_vocabulary(tiny, rule)
        assert kept.dtype == np.int32 and (np.diff(kept) > 0).all()
        np.testing.assert_array_equal(kept, [i for i, reason in enumerate(reasons) if reason is None])
        np.testing.assert_array_equal(kept, filter_vocabulary(load_tokenizer(tiny.path), rule))
    kept = filter_vocabulary(tiny, "word_start")
    assert {tiny.id_to_piece(i) for i in kept if not tiny.id_to_piece(i).startswith("▁")} == {"人", "写", "山", "真"}
    kept_pieces = [tiny.id_to_piece(i) for i in filter_vocabulary(tiny)]
    assert all(piece.lstrip("▁").isascii() and piece.lstrip("▁").islower() for piece in kept_pieces)


def test_filter_on_llama2(llama):
    for rule, count in LLAMA2_KEPT_COUNTS.items():
        assert len(filter_vocabulary(llama, rule)) == count, rule
    assert LLAMA2_KEPT_COUNT == LLAMA2_KEPT_COUNTS["lowercase_alpha"] == 17182
    assert abs(LLAMA2_KEPT_COUNT - 17149) / 17149 < 0.01  # the paper's V'
    kept = filter_vocabulary(llama)
    kept_pieces = {llama.id_to_piece(i) for i in kept}
    for piece in ["▁horse", "▁ride", "▁white", "▁man", "▁dog", "▁city", "▁important", "er", "en", "cou"]:
        assert piece in kept_pieces, piece
    assert {"er", "en", "cou", "kne", "woj"} <= {piece.lstrip("▁") for piece in kept_pieces}  # the paper's figures
    for piece in ["<0x0A>", "<s>", '▁"', ",", "▁(", "1", "▁", "▁▁", "▁Paris", "▁a", "▁über", ".", '."']:
        assert piece not in kept_pieces, piece
    # Every piece whose text is lowercase a-z: the default plus the 52 single letters (26 with "▁", 26 without).
    single = set(filter_vocabulary(llama, "lowercase_alpha_single").tolist()) - set(kept.tolist())
    assert sorted(llama.id_to_piece(i).lstrip("▁") for i in single) == sorted("abcdefghijklmnopqrstuvwxyz" * 2)
    counts = Counter(reason for reason in drop_reasons(llama) if reason is not None)
    assert counts["special"] == 3 and counts["byte"] == 256 and counts["whitespace"] == 16
    assert counts["single_letter"] == 52 and "continuation" not in counts
    assert sum(counts.values()) + len(kept) == 32000
    word_start = Counter(drop_reasons(llama, "word_start"))
    assert word_start["continuation"] == 13405 and word_start[None] == 16754


def test_synthetic_tokenizer_keeps_caption_words(synthetic_text):
    """The embedded job's tokenizer (trained on synthetic captions) has every content word as one kept piece."""
    from lexvla_jax.text.content_words import content_words

    captions, tokenizer = synthetic_text
    kept = set(filter_vocabulary(tokenizer).tolist())
    content = sorted({w for caption in captions for w in content_words(caption)})
    assert len(content) > 25
    for word in content:
        ids = tokenizer.encode(word)  # the dummy prefix makes it the word-start piece
        assert len(ids) == 1 and ids[0] in kept, (word, [tokenizer.id_to_piece(i) for i in ids])


# ---------------------------------------------------------------------------------------------------- command


def _run_main(argv):
    from lexvla_jax.commands.vocab import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def test_vocab_command_prints_count_and_writes_ids(tiny, tmp_path):
    out = tmp_path / "kept.npy"
    code, stdout, _ = _run_main(["--tokenizer", tiny.path, "--examples", "5", "--out", str(out)])
    kept = filter_vocabulary(tiny)
    assert code == 0
    sections = stdout.split("\n\n")
    assert len(sections) == 1 + len(RULES)
    for rule, section in zip(RULES, sections[1:], strict=True):
        assert section.startswith(f"rule {rule}") and "e.g." in section
        assert f"kept: {len(filter_vocabulary(tiny, rule))} of {tiny.vocab_size}" in section
    assert "'▁horse'" not in sections[1].split("dropped:")[1] and "single_letter" in sections[1]
    np.testing.assert_array_equal(np.load(out), kept)
    code, stdout, _ = _run_main(["--tokenizer", tiny.path, "--rule", "word_start", "--out", str(out)])
    assert code == 0 and stdout.count("rule ") == 1 and "continuation" in stdout
    np.testing.assert_array_equal(np.load(out), filter_vocabulary(tiny, "word_start"))
    code, _, stderr = _run_main(["--tokenizer", str(tmp_path / "nope.model")])
    assert code == 2 and "does not exist" in stderr and stderr.count("\n") == 1


def test_vocab_command_on_llama2(llama2_tokenizer_path):
    code, stdout, _ = _run_main(["--tokenizer", llama2_tokenizer_path])
    assert code == 0
    for rule, count in LLAMA2_KEPT_COUNTS.items():
        assert f"rule {rule}" in stdout and f"kept: {count} of 32000" in stdout


def test_cli_dispatches_vocab(tiny, capsys):
    from lexvla_jax import cli

    assert cli.main(["vocab", "--tokenizer", tiny.path, "--examples", "3"]) == 0
    assert f"kept: {len(filter_vocabulary(tiny))} of" in capsys.readouterr().out
