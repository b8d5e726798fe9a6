"""Inner-product search over exported sparse vectors: an exact inverted index and Seismic's approximate one.

Both answer `top_k(words, weights, k)` for a sparse query (word indices, float weights) with the rows and scores
of the best documents, score = Σ_j q_j · d_j over shared words with `d` the dequantised document weights (for
L2-normalised LexVLA vectors, ≈ their cosine). `search` adds ids, contents and the words each hit shares with
the query, strongest contribution first.

- `ExactIndex`: the collection as a `scipy.sparse` CSC matrix, one column per word = that word's posting list;
  a query sums the posting lists of its words (term-at-a-time, exact).
- `SeismicIndex`: pyseismic-lsr (Bruch et al., SIGIR 2024): posting lists pruned to the strongest postings
  and clustered into blocks with summary vectors, so a query skips most blocks. `build_from_parts` feeds it the
  part files of `lexvla encode` (`sparse/parts.py`) one part at a time; the index is saved as local files.
  Seismic is made for learned sparse vectors of ~100–200 words; its build time grows with postings × words
  per document (each block summary merges its documents' full vectors), which for LexVLA's ~1,000-word vectors
  is prohibitive at scale. So each document enters Seismic with only its `doc_words` strongest words, and
  Seismic's best `rerank` candidates are re-scored exactly on the full vectors (static pruning + exact
  re-ranking): the reported scores are exact, only the candidate set is approximate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import numpy as np
import scipy.sparse

from lexvla_jax.sparse.export import CollectionError, SparseVectors

SEISMIC_FILE = "seismic"  # saved as seismic.index.seismic (pyseismic adds the suffix)
SEISMIC_SUFFIX = ".index.seismic"
SEISMIC_PARAMS = "seismic.json"


@dataclasses.dataclass(frozen=True)
class Hit:
    id: str
    score: float
    content: str
    words: list[tuple[str, float]]  # shared words with their contribution q_j·d_j, strongest first


def top_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, scores) of the `k` highest positive scores, best first (ties: lower row first)."""
    candidates = np.flatnonzero(scores > 0)
    if len(candidates) > k:
        candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
    order = np.lexsort((candidates, -scores[candidates]))
    rows = candidates[order]
    return rows, scores[rows]


class ExactIndex:
    """Exact search: sums the posting lists of the query's words (`scipy.sparse` CSC columns)."""

    name = "exact"

    def __init__(self, postings: scipy.sparse.csc_array):
        self.postings = postings  # float32 [N, V'] document weights, column j = word j's postings

    @classmethod
    def build(cls, vectors: SparseVectors):
        return cls(vectors.weights().tocsc())

    def top_k(self, words: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.postings[:, np.asarray(words)] @ np.asarray(weights, np.float32)
        return top_rows(scores, k)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.postings.data, self.postings.indices, self.postings.indptr))


def _seismic():
    """pyseismic-lsr, an optional dependency (the `search` extra)."""
    try:
        import seismic
    except ImportError:
        raise CollectionError("the approximate index needs pyseismic-lsr: pip install 'lexvla_jax[search]'") from None
    return seismic


@contextlib.contextmanager
def native_stdout_silenced():
    """Redirects file descriptor 1 (where pyseismic's Rust code prints its progress) to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclasses.dataclass
class SeismicParams:
    """Build and search settings of a Seismic index (Seismic's own: see its docs/Guidelines.md)."""

    doc_words: int = 64  # each document's strongest words that enter Seismic (0: all)
    n_postings: int = 3500  # postings kept per word on average (the pruning budget)
    centroid_fraction: float = 0.1  # blocks per posting list, as a fraction of its length
    summary_energy: float = 0.4  # fraction of a block summary's L1 mass kept
    max_fraction: float = 1.5  # longest posting list, in units of n_postings
    query_cut: int = 20  # the query's strongest words whose posting lists are scanned
    heap_factor: float = 0.9  # a block is skipped unless summary score > heap_factor × k-th best so far
    rerank: int = 300  # Seismic's best candidates re-scored exactly on the full vectors


def strongest_per_row(impacts: scipy.sparse.csr_array, limit: int, chunk: int = 4096) -> scipy.sparse.csr_array:
    """Integer CSR rows with only their `limit` largest entries (ties: lower word first); all if limit is 0."""
    lengths = np.diff(impacts.indptr)
    if limit <= 0 or lengths.max(initial=0) <= limit:
        return impacts
    vocab = impacts.shape[1]
    keep = np.empty(impacts.nnz, bool)
    for start in range(0, impacts.shape[0], chunk):  # a padded [rows, longest] key table per chunk of rows
        stop = min(start + chunk, impacts.shape[0])
        a, b = impacts.indptr[start], impacts.indptr[stop]
        rows = np.repeat(np.arange(stop - start), lengths[start:stop])
        key = impacts.data[a:b].astype(np.int64) * (vocab + 1) + (vocab - impacts.indices[a:b])  # unique per row
        table = np.full((stop - start, lengths[start:stop].max()), -1, np.int64)
        table[rows, np.arange(b - a) - (impacts.indptr[start:stop] - a)[rows]] = key
        width = table.shape[1]
        cut = np.partition(table, width - limit, axis=1)[:, width - limit] if width > limit else np.full(len(table), -1)
        keep[a:b] = key >= cut[rows]
    indptr = np.concatenate([[0], np.cumsum(np.minimum(lengths, limit))])
    return scipy.sparse.csr_array((impacts.data[keep], impacts.indices[keep], indptr), shape=impacts.shape)


class SeismicIndex:
    """pyseismic-lsr over the strongest words of each document (row i ↔ Seismic document "i"), with exact
    re-ranking on `forward`, the full integer impacts `round(scale · w)` [N, V'] (any integer CSR)."""

    name = "seismic"

    def __init__(self, index, forward: scipy.sparse.csr_array, scale: int, params: SeismicParams):
        self.index, self.forward, self.scale, self.params = index, forward, scale, params
        self.string_type = _seismic().get_seismic_string()

    @staticmethod
    def dataset(vocab_size: int):
        """An empty `seismic.SeismicDataset`; fill it with `add_rows`."""
        return _seismic().SeismicDataset(dim=vocab_size)

    @staticmethod
    def add_rows(dataset, first_row: int, impacts: scipy.sparse.csr_array, doc_words: int) -> None:
        """Appends CSR rows of integer impacts, each cut to its `doc_words` strongest, as documents "first_row", …"""
        impacts = strongest_per_row(impacts, doc_words)
        dataset.add_documents_by_id(
            [str(first_row + i) for i in range(impacts.shape[0])],
            impacts.indices.astype(np.int64),
            impacts.data.astype(np.float32),  # integers: exact in Seismic's float16 storage up to 2048
            impacts.indptr.astype(np.int64),
        )

    @classmethod
    def build(cls, vectors: SparseVectors, params: SeismicParams | None = None, num_threads: int = 0):
        params = params or SeismicParams()
        dataset = cls.dataset(vectors.matrix.shape[1])
        cls.add_rows(dataset, 0, vectors.matrix, params.doc_words)
        return cls.from_dataset(dataset, vectors.matrix, vectors.scale, params, num_threads)

    @classmethod
    def build_from_parts(cls, directory, params: SeismicParams | None = None, num_threads: int = 0):
        """The index of a finished part-file collection (`sparse/parts.py`), read one part at a time; its
        `forward` is left empty (`load` takes the vectors from the parts)."""
        from lexvla_jax.sparse import parts

        params = params or SeismicParams()
        meta, _ = parts.read_meta(directory)
        vocab_size = len(meta["words"])
        dataset, rows = cls.dataset(vocab_size), 0
        for ids, _, impacts in parts.iter_parts(directory):
            cls.add_rows(dataset, rows, impacts, params.doc_words)
            rows += len(ids)
        if rows == 0:
            raise CollectionError(f"{str(directory)!r} holds no vectors to index")
        forward = scipy.sparse.csr_array((0, vocab_size), dtype=np.int32)
        return cls.from_dataset(dataset, forward, int(meta["scale"]), params, num_threads), rows

    @classmethod
    def from_dataset(cls, dataset, forward, scale: int, params: SeismicParams, num_threads: int = 0):
        """Indexes a dataset filled by `add_rows` from the impacts `forward`."""
        with native_stdout_silenced():
            index = _seismic().SeismicIndex.build_from_dataset(
                dataset,
                n_postings=params.n_postings,
                centroid_fraction=params.centroid_fraction,
                summary_energy=params.summary_energy,
                max_fraction=params.max_fraction,
                num_threads=num_threads,
            )
        return cls(index, forward, scale, params)

    def top_k(self, words: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        weights = np.asarray(weights, np.float32)
        candidates = self.index.search(
            "q",
            np.asarray([str(j) for j in words], dtype=self.string_type),
            weights,
            k=max(k, self.params.rerank),
            query_cut=self.params.query_cut,
            heap_factor=self.params.heap_factor,
        )
        rows = np.array([int(doc) for _, _, doc in candidates], np.int64)
        query = np.zeros(self.forward.shape[1], np.float32)
        query[np.asarray(words)] = weights
        scores = np.asarray(self.forward[rows] @ query, np.float32) / self.scale
        best = np.lexsort((rows, -scores))[:k]
        return rows[best], scores[best]

    def save(self, directory: str) -> str:
        """Writes `seismic.index.seismic` and its settings into `directory`; returns the index path."""
        with native_stdout_silenced():
            self.index.save(os.path.join(directory, SEISMIC_FILE))
        with open(os.path.join(directory, SEISMIC_PARAMS), "w") as f:
            json.dump({"scale": self.scale, **dataclasses.asdict(self.params)}, f, indent=1)
        return os.path.join(directory, SEISMIC_FILE + SEISMIC_SUFFIX)

    @classmethod
    def load(cls, directory: str, vectors: SparseVectors, **search_settings):
        """The index `save` wrote for `vectors`; `search_settings` (query_cut, heap_factor, rerank) override
        the saved ones."""
        path = os.path.join(directory, SEISMIC_FILE + SEISMIC_SUFFIX)
        if not os.path.isfile(path):
            raise CollectionError(f"{directory!r} holds no Seismic index; build it with `lexvla index {directory}`")
        with open(os.path.join(directory, SEISMIC_PARAMS)) as f:
            saved = json.load(f)
        if saved.pop("scale") != vectors.scale:
            raise CollectionError(f"the Seismic index in {directory!r} is stale; rebuild it with `lexvla index`")
        params = dataclasses.replace(SeismicParams(**saved), **search_settings)
        with native_stdout_silenced():
            index = _seismic().SeismicIndex.load(path)
        if index.len > len(vectors.ids):
            raise CollectionError(f"the Seismic index in {directory!r} is stale; rebuild it with `lexvla index`")
        return cls(index, vectors.matrix, vectors.scale, params)


def shared_words(
    vectors: SparseVectors, row: int, words: np.ndarray, weights: np.ndarray, limit: int
) -> list[tuple[str, float]]:
    """The words document `row` shares with the query, by contribution q_j·d_j, strongest first."""
    doc_words, doc_weights = vectors.row(row)
    common, in_query, in_doc = np.intersect1d(words, doc_words, assume_unique=True, return_indices=True)
    contribution = np.asarray(weights, np.float32)[in_query] * doc_weights[in_doc]
    order = np.lexsort((common, -contribution))[:limit]
    return [(vectors.words[common[i]], float(contribution[i])) for i in order]


def search(
    index, vectors: SparseVectors, words: np.ndarray, weights: np.ndarray, k: int = 10, n_words: int = 5
) -> list[Hit]:
    """The `k` best documents of `index` (built on `vectors`) for the sparse query, with their shared words."""
    words = np.asarray(words)
    rows, scores = index.top_k(words, weights, k)
    return [
        Hit(vectors.ids[r], float(s), vectors.contents[r], shared_words(vectors, r, words, weights, n_words))
        for r, s in zip(rows, scores, strict=True)
    ]
