"""Sparse export round trip, exact vs Seismic search, and the export/index/search commands."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
from PIL import Image
from support.fake_encoder import FakeEncoder

from lexvla_jax import cli, losses
from lexvla_jax.commands import common
from lexvla_jax.commands.export import export_eval_set
from lexvla_jax.miniature import synthetic
from lexvla_jax.sparse import export, index

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


@pytest.mark.parametrize("top_k", [None, 6])
def test_export_round_trip_keeps_words_weights_and_top_k(tmp_path, top_k):
    encoder = FakeEncoder.colours(extra_words=EXTRA_WORDS)
    eval_set = fake_eval_set()
    scale = 1000
    written = export_eval_set(encoder, eval_set, str(tmp_path), top_k=top_k, scale=scale)
    for kind, model in (
        ("images", encoder.encode_images(eval_set["image"])),
        ("captions", encoder.encode_texts(eval_set["captions"])),
    ):
        expected = export.sparsify(model, top_k=top_k)
        loaded = export.read_collection(str(tmp_path / kind))
        assert loaded.words == encoder.words and loaded.scale == scale
        assert loaded.ids == written[kind][0].ids
        weights = loaded.weights().toarray()
        # Same kept words (less those that round to zero) and weights within quantisation.
        np.testing.assert_array_equal(weights != 0, np.rint(expected * scale) != 0)
        assert np.abs(weights - expected).max() <= 0.5 / scale + 1e-7
        # Same top-k words, up to swaps between weights closer than the quantisation step.
        for row_loaded, row_model in zip(weights, expected, strict=True):
            kth = np.sort(row_model)[::-1][4]
            assert row_model[np.argsort(-row_loaded, kind="stable")[:5]].min() >= kth - 1.0 / scale
        # The JSONL holds the same integer weights, the query TSV them at ×100 as repeated terms.
        lines = (tmp_path / kind / export.COLLECTION).read_text().splitlines()
        tsv = (tmp_path / kind / export.QUERIES).read_text().splitlines()
        assert len(lines) == len(tsv) == len(loaded.ids)
        for i, (line, query) in enumerate(zip(lines, tsv, strict=True)):
            record = json.loads(line)
            assert record["id"] == loaded.ids[i] and record["content"] == loaded.contents[i]
            words, _ = loaded.row(i)
            row = loaded.matrix[[i]].toarray()[0]
            assert record["vector"] == {loaded.words[j]: int(row[j]) for j in words}
            query_id, terms = query.split("\t")
            assert query_id == loaded.ids[i]
            counts = {w: terms.split().count(w) for w in set(terms.split())}
            tsv_weights = {w: round(n * export.QUERY_TSV_SCALE / scale) for w, n in record["vector"].items()}
            assert counts == {w: n for w, n in tsv_weights.items() if n}
    images = export.read_collection(str(tmp_path / "images"))
    captions = export.read_collection(str(tmp_path / "captions"))
    assert captions.ids[:3] == ["img000#0", "img000#1", "img001#0"]
    assert images.contents[0] == " | ".join(eval_set["captions"][:2])
    # scipy reads the matrix on its own.
    direct = scipy.sparse.load_npz(str(tmp_path / "images" / export.VECTORS))
    assert (direct != images.matrix).nnz == 0


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
    export.write_collection(str(tmp_path), docs)
    with index.native_stdout_silenced():
        from_jsonl = seismic.SeismicIndex.build(str(tmp_path / export.COLLECTION), n_postings=300, num_threads=1)
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
    export_eval_set(encoder, fake_eval_set(), str(tmp_path / "sparse"))
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


def test_export_command_reads_a_webdataset_eval_set(tmp_path, monkeypatch, capsys):
    encoder = FakeEncoder.colours(extra_words=EXTRA_WORDS, image_size=64)
    monkeypatch.setattr(common, "restore_encoder", lambda config, workdir, step=None: encoder)
    (tmp_path / "eval").mkdir()
    synthetic.write_shard(str(tmp_path / "eval" / "shard-00000.tar"), "eval", 0, 0, 4, seed=0, image_size=64)
    out = tmp_path / "sparse"
    code, stdout, err = run(
        capsys,
        "export",
        "--config",
        CONFIG,
        f"--config.data.eval_shards={tmp_path / 'eval'}",
        "--workdir",
        str(tmp_path),
        "--out",
        str(out),
        "--top-k",
        "5",
    )
    assert code == 0, err
    assert stdout.splitlines()[0] == "images: 4 vectors, 5.0 active words on average (scale 1000)"
    assert stdout.splitlines()[5].startswith("captions: 20 vectors, ")
    for kind in ("images", "captions"):
        for name in (export.COLLECTION, export.QUERIES, export.VECTORS, export.META):
            assert str(out / kind / name) in stdout
    assert export.read_collection(str(out / "captions")).sparsification == {"threshold": None, "top_k": 5}
    # More words than the model has: one line.
    code, _, err = run(capsys, "export", "--config", CONFIG, f"--config.data.eval_shards={tmp_path / 'eval'}",
                       "--workdir", str(tmp_path), "--out", str(out), "--top-k", "44")  # fmt: skip
    assert code == 2 and err == "lexvla export: --top-k 44: the model has only 43 words\n"


EXACT = ["--method", "exact"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--index", "{tmp}", "--query-id", "x"], "lexvla search: '{tmp}' holds no vectors.npz; pass a"),
        (["search", "--index", "{images}", "--query-id", "nope", *EXACT], "lexvla search: no vector has id 'nope'"),
        (["search", "--index", "{images}", "--query-text", "red", *EXACT], "lexvla search: --query-text/--query-image"),
        (["search", "--index", "{images}", "--query-id", "img000"], "lexvla search: '{images}' holds no Seismic index"),
        (["search", "--index", "{images}", "--query-id", "a", "--heap-factor", "2"], "lexvla search: --heap-factor 2"),
        (["search", "--index", "{images}", "--query-id", "a", "--rerank", "0"], "lexvla search: --rerank 0: must be"),
        (["index", "{images}", "--n-postings", "0"], "lexvla index: --n-postings 0: must be at least 1"),
        (["export", "--config", CONFIG, "--out", "{tmp}", "--scale", "0"], "lexvla export: --scale 0: must be"),
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
