"""Sparse export round trip, exact vs Seismic search, and the export/index/search commands."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from PIL import Image
from support.fake_encoder import FakeEncoder

from lexvla_jax import cli, losses
from lexvla_jax.commands import common
from lexvla_jax.sparse import export, index, parts

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py") + ":scratch"
EXTRA_WORDS = [f"w{i}" for i in range(40)]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def test_quantise_rounds_and_drops_zeros():
    s = np.array([[0.0, 0.0004, 0.0006, 0.25, 1.0]], np.float32)
    q = export.quantise(s, scale=1000)
    assert q.dtype == np.int32 and q.nnz == 3
    np.testing.assert_array_equal(q.toarray(), [[0, 0, 1, 250, 1000]])
    with pytest.raises(ValueError, match="must be positive"):
        export.quantise(s, scale=0)


def test_sparsify_keeps_the_paper_threshold_or_top_k():
    s = np.array([[0.5, 0.2, 0.01, 0.3]], np.float32)  # V'=4: threshold 1/2
    np.testing.assert_array_equal(export.sparsify(s), [[0.5, 0, 0, 0]])
    np.testing.assert_array_equal(export.sparsify(s, top_k=2), s * [[1, 0, 0, 1]])
    assert losses.default_threshold(4) == 0.5


def test_repeated_words_get_distinct_terms():
    assert export.terms_of(["cat", "dog", "cat", "cat"]) == ["cat", "dog", "cat@2", "cat@3"]


def random_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Images of random 8-pixel patches; the first three are plain red, green and blue."""
    rng = np.random.default_rng(seed)
    images = np.repeat(np.repeat(rng.integers(0, 256, (n, size // 8, size // 8, 3)), 8, 1), 8, 2).astype(np.uint8)
    for i, colour in enumerate(COLOURS.values()):
        images[i] = colour
    return images


def fake_eval_set(n_images: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    captions, image_of_text = [], []
    for i in range(n_images):
        for _ in range(2):
            words = [*(list(COLOURS)[i : i + 1] if i < 3 else []), *rng.choice(EXTRA_WORDS, 4, replace=False)]
            captions.append(" ".join(words))
            image_of_text.append(i)
    return {
        "image": random_images(n_images, seed),
        "captions": captions,
        "image_of_text": np.array(image_of_text, np.int32),
        "keys": [f"img{i:03d}" for i in range(n_images)],
    }


def write_vectors(root, kind: str, vectors: export.SparseVectors, parts_of: int = 5) -> None:
    """`vectors` as the finished collection `root/kind` (parts of `parts_of` rows) with `root/meta.json`."""
    writer = parts.PartWriter(root / kind, 0, vectors.words)
    for start in range(0, len(vectors.ids), parts_of):
        rows = slice(start, start + parts_of)
        writer.add(vectors.ids[rows], vectors.contents[rows], vectors.matrix[rows])
        writer.finish_part()
    meta = parts.read_json(root / parts.META) or {"words": vectors.words, "scale": vectors.scale, "kinds": {}}
    meta.update(sparsification=vectors.sparsification)
    meta["kinds"][kind] = {"vectors": len(vectors.ids), "finished": True}
    parts.write_json(root / parts.META, meta)


def fake_export(encoder, eval_set: dict, out, top_k: int | None = None, scale: int = 1000) -> dict:
    """The eval set's images and captions through the fake encoder, written as `lexvla export` lays them out."""
    keys = eval_set["keys"]
    caption_ids = [f"{keys[i]}#{list(eval_set['image_of_text'][:t]).count(i)}" for t, i in
                   enumerate(eval_set["image_of_text"])]  # fmt: skip
    contents = [" | ".join(c for c, i in zip(eval_set["captions"], eval_set["image_of_text"], strict=True) if i == k)
                for k in range(len(keys))]  # fmt: skip
    written = {}
    for kind, dense, ids, texts in (
        ("images", encoder.encode_images(eval_set["image"]), list(keys), contents),
        ("captions", encoder.encode_texts(eval_set["captions"]), caption_ids, list(eval_set["captions"])),
    ):
        matrix = export.quantise(export.sparsify(dense, top_k=top_k), scale)
        settings = {"threshold": None, "top_k": top_k}
        written[kind] = export.SparseVectors(ids, texts, matrix, list(encoder.words), scale, settings)
        write_vectors(epath.Path(out), kind, written[kind])
    return written


@pytest.mark.parametrize("top_k", [None, 6])
def test_part_files_round_trip_words_weights_and_top_k(tmp_path, top_k):
    encoder = FakeEncoder.colours(extra_words=EXTRA_WORDS)
    eval_set = fake_eval_set()
    scale = 1000
    written = fake_export(encoder, eval_set, tmp_path, top_k=top_k, scale=scale)
    for kind, model in (
        ("images", encoder.encode_images(eval_set["image"])),
        ("captions", encoder.encode_texts(eval_set["captions"])),
    ):
        expected = export.sparsify(model, top_k=top_k)
        loaded = parts.read_collection(str(tmp_path / kind))
        assert loaded.words == encoder.words and loaded.scale == scale
        assert loaded.ids == written[kind].ids and loaded.sparsification == {"threshold": None, "top_k": top_k}
        weights = loaded.weights().toarray()
        # Same kept words (less those that round to zero) and weights within quantisation.
        np.testing.assert_array_equal(weights != 0, np.rint(expected * scale) != 0)
        assert np.abs(weights - expected).max() <= 0.5 / scale + 1e-7
        # The JSONL lines hold the same integer weights.
        lines = [line for path in parts.part_files(tmp_path / kind) for line in path.read_text().splitlines()]
        assert len(lines) == len(loaded.ids) and len(parts.part_files(tmp_path / kind)) == -(-len(lines) // 5)
        for i, line in enumerate(lines):
            record = json.loads(line)
            assert record["id"] == loaded.ids[i] and record["content"] == loaded.contents[i]
            words, _ = loaded.row(i)
            row = loaded.matrix[[i]].toarray()[0]
            assert record["vector"] == {loaded.words[j]: int(row[j]) for j in words}
    captions = parts.read_collection(str(tmp_path / "captions"))
    assert captions.ids[:3] == ["img000#0", "img000#1", "img001#0"]
    assert parts.read_collection(str(tmp_path / "images")).contents[0] == " | ".join(eval_set["captions"][:2])


def zipf_collection(n_docs: int, vocab_size: int, active: int, seed: int) -> np.ndarray:
    """float32 [n, V] unit vectors with `active` words each, drawn with Zipf-like frequencies."""
    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, vocab_size + 1)
    frequency /= frequency.sum()
    s = np.zeros((n_docs, vocab_size), np.float32)
    for i in range(n_docs):
        words = rng.choice(vocab_size, active, replace=False, p=frequency)
        s[i, words] = rng.lognormal(0.0, 0.7, active)
    return s / np.linalg.norm(s, axis=1, keepdims=True)


def vectors_of(s: np.ndarray, scale: int = 1000) -> export.SparseVectors:
    n, v = s.shape
    ids = [f"d{i}" for i in range(n)]
    return export.SparseVectors(ids, ids, export.quantise(s, scale), [f"t{j}" for j in range(v)], scale)


def test_strongest_per_row_keeps_the_largest_entries():
    m = export.quantise(np.array([[0.1, 0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.9, 0.0, 0.0]], np.float32))
    np.testing.assert_array_equal(index.strongest_per_row(m, 2).toarray(), [[0, 500, 0, 300, 0], [0, 0, 900, 0, 0]])
    assert index.strongest_per_row(m, 0) is m


def test_exact_search_equals_brute_force_and_seismic_agrees():
    docs = vectors_of(zipf_collection(1500, 400, 60, seed=0))
    queries = zipf_collection(25, 400, 60, seed=1)
    dense = docs.weights().toarray()
    exact = index.ExactIndex.build(docs)
    params = index.SeismicParams(doc_words=20, n_postings=400, query_cut=20, heap_factor=0.9, rerank=50)
    approximate = index.SeismicIndex.build(docs, params, num_threads=1)
    recalls = []
    for q in queries:
        words = np.flatnonzero(q)
        rows, scores = exact.top_k(words, q[words], 10)
        brute = dense @ q
        np.testing.assert_array_equal(rows, np.lexsort((np.arange(len(brute)), -brute))[:10])
        np.testing.assert_allclose(scores, brute[rows], rtol=1e-5)
        seismic_rows, seismic_scores = approximate.top_k(words, q[words], 10)
        recalls.append(len(set(seismic_rows) & set(rows)) / 10)
        # Re-ranked on the full vectors: the scores are exact and in order.
        np.testing.assert_allclose(seismic_scores, brute[seismic_rows], rtol=1e-5)
        assert np.all(np.diff(seismic_scores) <= 0)
    assert np.mean(recalls) >= 0.95
    # Re-ranking only the top 10 leaves Seismic's order over 20-word documents: it misses more.
    approximate.params.rerank = 10
    truth = [set(exact.top_k(np.flatnonzero(q), q[q > 0], 10)[0]) for q in queries]
    found = [set(approximate.top_k(np.flatnonzero(q), q[q > 0], 10)[0]) for q in queries]
    assert np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)]) < np.mean(recalls) - 0.2


def test_seismic_reads_the_exported_jsonl(tmp_path):
    seismic = pytest.importorskip("seismic")
    docs = vectors_of(zipf_collection(300, 200, 20, seed=2))
    write_vectors(tmp_path, "docs", docs, parts_of=300)
    (part,) = parts.part_files(tmp_path / "docs")
    with index.native_stdout_silenced():
        from_jsonl = seismic.SeismicIndex.build(str(part), n_postings=300, num_threads=1)
    assert (from_jsonl.len, from_jsonl.nnz) == (300, docs.matrix.nnz)
    exact = index.ExactIndex.build(docs)
    words, weights = docs.row(7)
    terms = np.array([docs.words[j] for j in words], dtype=seismic.get_seismic_string())
    found = from_jsonl.search("q", terms, weights, k=5, query_cut=20, heap_factor=1.0)
    rows, scores = exact.top_k(words, weights, 5)
    assert [doc for _, _, doc in found] == [docs.ids[r] for r in rows]
    np.testing.assert_allclose([score / docs.scale for _, score, _ in found], scores, rtol=1e-3)


def test_hits_name_the_shared_words_by_contribution():
    words = ["red", "circle", "blue", "square"]
    s = np.array([[0.8, 0.6, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    docs = export.SparseVectors(
        ["a", "b", "c"], ["red circle", "blue circle", "square"], export.quantise(s), words, 1000
    )
    query_words, query_weights = np.array([0, 1]), np.array([0.3, 0.9], np.float32)  # "red circle", circle-heavy
    hits = index.search(index.ExactIndex.build(docs), docs, query_words, query_weights, k=5)
    assert [h.id for h in hits] == ["a", "b"]  # c shares no word
    assert hits[0].words == [("circle", pytest.approx(0.54)), ("red", pytest.approx(0.24))]
    assert hits[0].score == pytest.approx(0.78) and hits[1].words == [("circle", pytest.approx(0.54))]


@pytest.fixture
def exported(tmp_path, monkeypatch):
    encoder = FakeEncoder.colours(extra_words=EXTRA_WORDS)
    monkeypatch.setattr(common, "restore_encoder", lambda config, workdir, step=None: encoder)
    fake_export(encoder, fake_eval_set(), tmp_path / "sparse")
    return tmp_path / "sparse"


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_index_and_search_commands_find_by_text_image_and_id(exported, tmp_path, capsys):
    images, captions = str(exported / "images"), str(exported / "captions")
    code, out, _ = run(capsys, "index", images, "--n-postings", "100", "--threads", "1")
    assert code == 0 and os.path.isfile(os.path.join(images, "seismic.index.seismic"))
    assert out.startswith("indexed 8 vectors")
    model = ["--config", CONFIG, "--workdir", str(tmp_path)]
    for method in ("seismic", "exact"):
        # text → image: "blue" finds the plain blue image first.
        code, out, _ = run(capsys, "search", "--index", images, "--query-text", "blue", "--method", method, *model)
        assert code == 0
        first = out.splitlines()[1].split()
        assert first[:2] == ["1", "img002"] and first[3] == "[blue"
    # image → text: the red image finds a caption of image 0 (which says "red") first.
    red = tmp_path / "red.png"
    Image.fromarray(np.full((32, 32, 3), COLOURS["red"], np.uint8)).save(red)
    code, out, _ = run(capsys, "search", "--index", captions, "--method", "exact", "--query-image", str(red), *model)
    assert code == 0 and out.splitlines()[1].split()[1].startswith("img000#")
    # An exported caption as the query, no model needed.
    code, out, _ = run(capsys, "search", "--index", images, "--query-id", "img001#0", "--queries", captions, "-k", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("query: vector 'img001#0'") and len(lines) == 4
    assert lines[1].split()[1] == "img001"


EXACT = ["--method", "exact"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--index", "{tmp}", "--query-id", "x"], "lexvla search: '{tmp}' has no meta.json beside it"),
        (["search", "--index", "{images}", "--query-id", "nope", *EXACT], "lexvla search: no vector has id 'nope'"),
        (["search", "--index", "{images}", "--query-text", "red", *EXACT], "lexvla search: --query-text/--query-image"),
        (["search", "--index", "{images}", "--query-id", "img000"], "lexvla search: '{images}' holds no Seismic index"),
        (["search", "--index", "{images}", "--query-id", "a", "--heap-factor", "2"], "lexvla search: --heap-factor 2"),
        (["search", "--index", "{images}", "--query-id", "a", "--rerank", "0"], "lexvla search: --rerank 0: must be"),
        (["index", "{images}", "--n-postings", "0"], "lexvla index: --n-postings 0: must be at least 1"),
        (["index", "gs://b/run/images"], "lexvla index: 'gs://b/run/images' is not a local directory, and Seismic's"),
        (["search", "--index", "gs://b/run/images", "--query-id", "a"], "lexvla search: 'gs://b/run/images' is not a"),
        (
            ["export", "--config", CONFIG, "--out", "{tmp}", "--scale", "0"],
            "lexvla export: --scale 0: must be a positive",
        ),
        (["export", "--config", CONFIG, "--out", "{tmp}", "--top-k", "0"], "lexvla export: --top-k 0: must be"),
    ],
)
def test_commands_report_bad_input_in_one_line(exported, tmp_path, capsys, args, message):
    paths = {"tmp": str(tmp_path), "images": str(exported / "images")}
    code, _, err = run(capsys, *[a.format(**paths) for a in args])
    assert code == 2
    assert err.startswith(message.format(**paths)) and err.count("\n") == 1


@pytest.mark.slow
def test_sparse_search_benchmark_agrees_with_exact_at_a_small_size():
    """benchmarks/sparse_search.py end to end on 1,000 docs: dense brute force (measured on all docs) and an
    exhaustive Seismic (whole documents, every posting, every query word, all docs re-ranked) find the exact
    top-10; the vectors have the asked number of active words; the table has every method."""
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_search.py"
    args = ["--docs", "1000", "--active", "300", "--queries", "10", "--dense-queries", "5", "--dense-max-docs", "1000"]
    args += ["--doc-words", "0", "--n-postings", "5000", "--search", "1000:1.0:1000"]
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    weights = int(re.search(r"1,000 docs × ~300 words: ([\d,]+) weights", result.stdout)[1].replace(",", ""))
    assert 0.95 * 300 <= weights / 1000 <= 1.05 * 300
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 1,000 ")]
    methods = {row[2].strip(): row for row in rows}
    assert sorted(methods) == ["Seismic + exact re-rank", "dense brute force (JAX f32)", "exact sparse (scipy CSC)"]
    for row in methods.values():
        assert float(row[8]) == 1.0  # recall@10
        assert 0 < float(row[6]) <= float(row[7])  # median <= p99 latency
