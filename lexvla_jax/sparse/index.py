"""Inner-product search over exported sparse vectors: an exact inverted index and Seismic's approximate one.

Both answer `top_k(words, weights, k)` for a sparse query (word indices, float weights) with the rows and scores
of the best documents, score = Σ_j q_j · d_j over shared words with `d` the dequantised document weights (for
L2-normalised LexVLA vectors, ≈ their cosine). `search` adds ids, contents and the words each hit shares with
the query, strongest contribution first.

- `ExactIndex`: the collection as a `scipy.sparse` CSC matrix, one column per word = that word's posting list;
  a query sums the posting lists of its words (term-at-a-time, exact).
- `SeismicIndex`: pyseismic-lsr (Bruch et al., SIGIR 2024): posting lists pruned to the strongest postings
  and clustered into blocks with summary vectors, so a query skips most blocks. It indexes the integer impacts
  (exact in its float16 storage up to 2048) and reads `collection.jsonl` as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import numpy as np

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

    def __init__(self, vectors: SparseVectors):
        self.postings = vectors.weights().tocsc()

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
    """Build and search settings of a Seismic index (see pyseismic's docs/Guidelines.md)."""

    n_postings: int = 3500  # postings kept per word on average (the pruning budget)
    centroid_fraction: float = 0.1  # blocks per posting list, as a fraction of its length
    summary_energy: float = 0.4  # fraction of a block summary's L1 mass kept
    max_fraction: float = 1.5  # longest posting list, in units of n_postings
    query_cut: int = 10  # the query's strongest words whose posting lists are scanned
    heap_factor: float = 0.8  # a block is skipped unless summary score > heap_factor × k-th best so far


class SeismicIndex:
    """pyseismic-lsr's approximate index over the integer impacts of a collection (row i ↔ document id "i")."""

    name = "seismic"

    def __init__(self, index, scale: int, params: SeismicParams):
        self.index, self.scale, self.params = index, scale, params
        self.string_type = _seismic().get_seismic_string()

    @classmethod
    def build(cls, vectors: SparseVectors, params: SeismicParams | None = None, num_threads: int = 0):
        params = params or SeismicParams()
        matrix, seismic = vectors.matrix, _seismic()
        dataset = seismic.SeismicDataset(dim=matrix.shape[1])
        dataset.add_documents_by_id(
            [str(i) for i in range(matrix.shape[0])],
            matrix.indices.astype(np.int64),
            matrix.data.astype(np.float32),
            matrix.indptr.astype(np.int64),
        )
        with native_stdout_silenced():
            index = seismic.SeismicIndex.build_from_dataset(
                dataset,
                n_postings=params.n_postings,
                centroid_fraction=params.centroid_fraction,
                summary_energy=params.summary_energy,
                max_fraction=params.max_fraction,
                num_threads=num_threads,
            )
        return cls(index, vectors.scale, params)

    def top_k(self, words: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        results = self.index.search(
            "q",
            np.asarray([str(j) for j in words], dtype=self.string_type),
            np.asarray(weights, np.float32),
            k=k,
            query_cut=self.params.query_cut,
            heap_factor=self.params.heap_factor,
        )
        rows = np.array([int(doc) for _, _, doc in results], np.int64)
        scores = np.array([score for _, score, _ in results], np.float32) / self.scale
        return rows, scores

    def save(self, directory: str) -> str:
        """Writes `seismic.index.seismic` and its settings into `directory`; returns the index path."""
        with native_stdout_silenced():
            self.index.save(os.path.join(directory, SEISMIC_FILE))
        with open(os.path.join(directory, SEISMIC_PARAMS), "w") as f:
            json.dump({"scale": self.scale, **dataclasses.asdict(self.params)}, f, indent=1)
        return os.path.join(directory, SEISMIC_FILE + SEISMIC_SUFFIX)

    @classmethod
    def load(cls, directory: str, **search_settings):
        """The index `save` wrote; `search_settings` (query_cut, heap_factor) override the saved ones."""
        path = os.path.join(directory, SEISMIC_FILE + SEISMIC_SUFFIX)
        if not os.path.isfile(path):
            raise CollectionError(f"{directory!r} holds no Seismic index; build it with `lexvla index {directory}`")
        with open(os.path.join(directory, SEISMIC_PARAMS)) as f:
            saved = json.load(f)
        scale = saved.pop("scale")
        params = dataclasses.replace(SeismicParams(**saved), **search_settings)
        with native_stdout_silenced():
            index = _seismic().SeismicIndex.load(path)
        return cls(index, scale, params)


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
