"""Search over LexVLA-shaped sparse vectors: dense brute force vs exact sparse vs Seismic (approximate).

Vectors have the paper's shape: V' = 17,149 words, ~300 or ~1,100 active words each (the paper's sparsified
averages), unit L2 norm, quantised to impacts round(1000 · w) like `lexvla export`. Words follow a skewed
(Zipf–Mandelbrot) document frequency, and each vector mixes the global distribution with one of a few hundred
topics whose words also weigh more, so neighbours share strong words as real image/caption vectors do. Queries
come from the same process (a caption's vector against an image collection has the same shape).

Measured per size N: build time, index size, single-thread query latency (median, p99; the process is pinned
to one core) and recall@10 against the exact sparse top-10, for
- dense brute force: a jitted JAX matvec + top-k over the dense float32 [N, V'] matrix, measured up to
  `--dense-max-docs` (what fits in memory) and extrapolated linearly in N above;
- exact sparse: `lexvla_jax.sparse.index.ExactIndex` (scipy CSC posting lists, term-at-a-time);
- Seismic: `lexvla_jax.sparse.index.SeismicIndex` built at each `--n-postings` and searched at each `--search`
  setting (query_cut:heap_factor:rerank).

    python benchmarks/sparse_search.py --docs 100000 1000000 --active 300 1100
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for everything: latencies are single-thread
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse  # noqa: E402

from lexvla_jax.sparse import index  # noqa: E402

VOCAB = 17_149
SCALE = 1000
TOPICS = 400
TOPIC_WORDS = 400
BLOCK = 2048
MIB = 2**20


def _scaled_to_mean(base: np.ndarray, mean: float, cap: float) -> np.ndarray:
    """min(cap, c · base) with c chosen (bisection) so the entries sum to `mean`."""
    low, high = 0.0, mean / base.min()
    for _ in range(60):
        c = 0.5 * (low + high)
        low, high = (c, high) if np.minimum(cap, c * base).sum() < mean else (low, c)
    return np.minimum(cap, high * base)


class Collection:
    """Integer impacts round(1000 · w) of N vectors, compact: int16 words and impacts (4 bytes per entry).

    Serves the re-ranking rows of `SeismicIndex` (`collection[rows]`), CSR row ranges and CSC postings."""

    def __init__(self, n: int, capacity: int):
        # np.empty does not touch its pages: the unused tail of the buffers costs no memory.
        self.words, self.impacts = np.empty(capacity, np.int16), np.empty(capacity, np.int16)
        self.indptr = np.zeros(n + 1, np.int64)
        self.filled = 0

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.indptr) - 1, VOCAB

    @property
    def nnz(self) -> int:
        return int(self.indptr[self.filled])

    def append(self, block: scipy.sparse.csr_array) -> None:
        a = self.nnz
        b = a + block.nnz
        self.words[a:b], self.impacts[a:b] = block.indices, block.data
        self.indptr[self.filled + 1 : self.filled + 1 + block.shape[0]] = a + block.indptr[1:]
        self.filled += block.shape[0]

    def rows(self, start: int, stop: int) -> scipy.sparse.csr_array:
        """Rows start..stop-1 as a CSR of float32 impacts."""
        a, b = self.indptr[start], self.indptr[stop]
        data = (
            self.impacts[a:b].astype(np.float32),
            self.words[a:b].astype(np.int32),
            self.indptr[start : stop + 1] - a,
        )
        return scipy.sparse.csr_array(data, shape=(stop - start, VOCAB))

    def blocks(self, stop: int | None = None, size: int = 8192):
        """(first row, CSR rows) over rows 0..stop-1."""
        stop = self.shape[0] if stop is None else stop
        for start in range(0, stop, size):
            yield start, self.rows(start, min(start + size, stop))

    def __getitem__(self, rows: np.ndarray) -> scipy.sparse.csr_array:
        """Arbitrary rows as an int16 CSR (what `SeismicIndex` re-ranks)."""
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        at = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return scipy.sparse.csr_array((self.impacts[at], self.words[at].astype(np.int32), indptr), (len(rows), VOCAB))

    def postings(self, stop: int) -> scipy.sparse.csc_array:
        """float32 CSC [stop, V'] of the weights of rows 0..stop-1 (impact / 1000), filled block by block."""
        counts = np.bincount(self.words[: self.indptr[stop]], minlength=VOCAB)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rows, weights = np.empty(indptr[-1], np.int32), np.empty(indptr[-1], np.float32)
        fill = indptr[:-1].copy()
        for first, block in self.blocks(stop):
            block = block.tocsc()  # rows ascending within each word
            per_word = np.diff(block.indptr)
            target = np.repeat(fill - block.indptr[:-1], per_word) + np.arange(block.nnz)
            rows[target] = block.indices + first
            weights[target] = block.data / SCALE
            fill += per_word
        return scipy.sparse.csc_array((weights, rows, indptr), shape=(stop, VOCAB))

    def exact_top10(self, queries: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """The exact top-10 rows of each query (ties: lower row first), one block of rows at a time."""
        q = np.zeros((VOCAB, len(queries)), np.float32)
        for i, (words, weights) in enumerate(queries):
            q[words, i] = weights
        best_rows = np.zeros((0, len(queries)), np.int64)
        best_scores = np.zeros((0, len(queries)), np.float32)
        for first, block in self.blocks():
            scores = np.vstack([best_scores, np.asarray(block @ q, np.float32) / SCALE])
            rows = np.vstack([best_rows, np.repeat(np.arange(first, first + block.shape[0])[:, None], len(queries), 1)])
            order = np.lexsort((rows, -scores), axis=0)[:10]
            best_rows, best_scores = np.take_along_axis(rows, order, 0), np.take_along_axis(scores, order, 0)
        return list(best_rows.T)


class LexicalVectorModel:
    """Unit-norm sparse vectors with a skewed word frequency and topical structure.

    Word j (frequency rank j) is in a vector of topic t with probability π_tj = min(0.95, c_t · f_j · (1 + 8·z_tj)):
    f_j = 1 / (1 + j / r0) is a Zipf (exponent 1) document-frequency profile, z_tj marks the topic's 400 words,
    and r0, c_t give `active` words on average with the most frequent word in ~80% of vectors. A present word
    weighs lognormal(0, 0.5) · (1 + 2·z_tj) · f_j^-¼ (rarer and topical words weigh more), then the vector is
    L2-normalised. Words are drawn as Poisson counts with rates -log(1 - π_tj) (present ⇔ count ≥ 1, so
    presence is exactly Bernoulli(π_tj)), i.e. ~1.3 draws per active word instead of V' coin flips.
    """

    def __init__(self, active: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        rank = np.arange(VOCAB, dtype=np.float64)
        # r0 such that the capped Zipf profile 0.9 / (1 + rank / r0) has `active` words on average.
        low, high = 1e-3, 1e5
        for _ in range(60):
            r0 = np.sqrt(low * high)
            low, high = (r0, high) if (0.9 / (1 + rank / r0)).sum() < active else (low, r0)
        frequency = 1.0 / (1.0 + rank / r0)
        topical = np.zeros((TOPICS, VOCAB), bool)
        for t in range(TOPICS):
            topical[t, rng.choice(VOCAB, TOPIC_WORDS, replace=False)] = True
        inclusion = np.stack([_scaled_to_mean(frequency * (1 + 8 * z), active, 0.95) for z in topical])
        self.cumulative_rate = np.cumsum(-np.log1p(-inclusion), axis=1)  # [T, V'] cumulative Poisson rates
        self.weight_scale = ((1 + 2 * topical) * frequency**-0.25).astype(np.float32)
        self.rng, self.active = rng, active

    def impacts(self, topic: int, n: int) -> scipy.sparse.csr_array:
        """CSR [n, V'] of round(1000 · w) for n fresh unit vectors of `topic` (zeros dropped)."""
        rng, cumulative = self.rng, self.cumulative_rate[topic]
        counts = rng.poisson(cumulative[-1], n)
        # Sorted uniforms per row (normalised sums of exponential gaps): searchsorted walks them in order.
        gaps = np.cumsum(rng.standard_exponential((n, counts.max() + 1), dtype=np.float32), axis=1)
        uniform = gaps[:, :-1] / gaps[np.arange(n), counts][:, None]
        draws = np.searchsorted(cumulative, uniform * cumulative[-1], side="right")
        draws[uniform >= 1] = VOCAB  # past each vector's count: padding
        first = np.ones(draws.shape, bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        rows, position = np.nonzero(first & (draws < VOCAB))
        cols = draws[rows, position]
        weight = self.weight_scale[topic, cols] * np.exp(0.5 * rng.standard_normal(len(rows), dtype=np.float32))
        norm = np.sqrt(np.bincount(rows, weights=weight.astype(np.float64) ** 2, minlength=n)).astype(np.float32)
        impact = np.rint(SCALE * weight / norm[rows]).astype(np.int32)
        keep = impact > 0
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=n))])
        return scipy.sparse.csr_array((impact[keep], cols[keep].astype(np.int32), indptr), shape=(n, VOCAB))

    def collection(self, n: int) -> Collection:
        """n vectors, topics drawn uniformly; stored topic by topic (row order carries no meaning for search)."""
        collection = Collection(n, capacity=int(n * self.active * 1.1) + 100_000)
        for topic, count in enumerate(self.rng.multinomial(n, np.full(TOPICS, 1 / TOPICS))):
            for start in range(0, count, BLOCK):
                collection.append(self.impacts(topic, min(BLOCK, count - start)))
        return collection


def query_set(model: LexicalVectorModel, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n query vectors as (words, float32 weights) of their quantised impacts."""
    block = model.collection(n).rows(0, n)
    return [
        (block.indices[a:b], block.data[a:b] / SCALE) for a, b in zip(block.indptr[:-1], block.indptr[1:], strict=True)
    ]


class DenseIndex:
    """Brute force: the dense float32 [N, V'] matrix on the JAX device, one jitted matvec + top-k per query."""

    def __init__(self, collection: Collection, n: int):
        update = jax.jit(lambda m, block, first: jax.lax.dynamic_update_slice(m, block, (first, 0)), donate_argnums=0)
        self.matrix = jnp.zeros((n, VOCAB), jnp.float32)
        for first, block in collection.blocks(n, size=2048):
            self.matrix = update(self.matrix, jnp.asarray(block.toarray() / SCALE, jnp.float32), first)
        self.matrix.block_until_ready()
        self.search = jax.jit(lambda matrix, q: jax.lax.top_k(matrix @ q, 10))

    def top_k(self, words: np.ndarray, weights: np.ndarray, k: int):
        q = np.zeros(VOCAB, np.float32)
        q[words] = weights
        scores, rows = self.search(self.matrix, q)
        return np.asarray(rows)[:k], np.asarray(scores)[:k]


def timed(searcher, queries, warmup: int = 3) -> tuple[list[float], list[np.ndarray]]:
    """Per-query seconds and top-10 rows of `searcher.top_k`, after `warmup` untimed queries."""
    for words, weights in queries[:warmup]:
        searcher.top_k(words, weights, 10)
    seconds, results = [], []
    for words, weights in queries:
        start = time.perf_counter()
        rows, _ = searcher.top_k(words, weights, 10)
        seconds.append(time.perf_counter() - start)
        results.append(np.asarray(rows))
    return seconds, results


def recall_at_10(results, truth) -> float:
    pairs = zip(results, truth, strict=False)
    return float(np.mean([len(set(r[:10].tolist()) & set(t[:10].tolist())) / 10 for r, t in pairs]))


class Stopwatch:
    """Wall and CPU seconds since creation (CPU: this process, all threads; the machine is shared)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def row(n, active, method, setting, build, size_bytes, seconds, recall, measured_docs):
    """A result; measured on the first `measured_docs` < n rows means build, size and latency scaled by n / it."""
    factor = n / measured_docs
    ms = np.asarray(seconds) * 1e3 * factor
    return {
        "docs": n,
        "active": active,
        "method": method,
        "setting": setting,
        "build_s": build[0] * factor,
        "build_cpu_s": build[1] * factor,
        "size_mib": size_bytes * factor / MIB,
        "median_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "queries": len(ms),
        "recall": recall if factor == 1 else None,
        "note": "" if factor == 1 else f"extrapolated ×{factor:g} from {measured_docs:,} docs",
    }


def run(n: int, active: int, args) -> list[dict]:
    model = LexicalVectorModel(active, seed=args.seed)
    start = time.perf_counter()
    collection = model.collection(n)
    seconds = time.perf_counter() - start
    print(f"# {n:,} docs × ~{active} words: {collection.nnz:,} weights, generated in {seconds:.0f}s", flush=True)
    queries = query_set(model, args.queries)
    start = time.perf_counter()
    truth = collection.exact_top10(queries)
    print(f"# exact top-10 of {len(queries)} queries (batched) in {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    if "exact" in args.methods:
        rows.append(exact_row(collection, queries, truth, active, args.exact_max_nnz))
    if "seismic" in args.methods:
        rows += seismic_rows(collection, queries, truth, active, args)
    if "dense" in args.methods:
        some = slice(args.dense_queries)
        rows.append(dense_row(collection, queries[some], truth[some], active, args.dense_max_docs))
    return rows


def exact_row(collection: Collection, queries, truth, active: int, max_nnz: int) -> dict:
    n = collection.shape[0]
    measured = min(n, max_nnz * n // collection.nnz)
    watch = Stopwatch()
    exact = index.ExactIndex(collection.postings(measured))
    build = watch.read()
    seconds, results = timed(exact, queries)
    recall = recall_at_10(results, truth)
    result = row(n, active, "exact sparse (scipy CSC)", "", build, exact.nbytes(), seconds, recall, measured)
    print(result, flush=True)
    return result


def seismic_rows(collection: Collection, queries, truth, active: int, args) -> list[dict]:
    n, rows = collection.shape[0], []
    for n_postings in args.n_postings:
        params = index.SeismicParams(doc_words=args.doc_words, n_postings=n_postings)
        watch = Stopwatch()
        dataset = index.SeismicIndex.dataset(VOCAB)
        for first, block in collection.blocks():
            index.SeismicIndex.add_rows(dataset, first, block.astype(np.int32), params.doc_words)
        seismic = index.SeismicIndex.from_dataset(dataset, collection, SCALE, params, num_threads=1)
        del dataset
        build = watch.read()
        with tempfile.TemporaryDirectory() as tmp:
            file_size = os.path.getsize(seismic.save(tmp))
        vectors_size = collection.nnz * 4  # int16 word + int16 impact per weight, read by re-ranking
        for setting in args.search:
            query_cut, heap_factor, rerank = setting.split(":")
            seismic.params = dataclasses.replace(
                seismic.params, query_cut=int(query_cut), heap_factor=float(heap_factor), rerank=int(rerank)
            )
            seconds, results = timed(seismic, queries)
            name = (
                f"doc_words={args.doc_words} n_postings={n_postings} query_cut={query_cut} "
                f"heap_factor={heap_factor} rerank={rerank}"
            )
            recall = recall_at_10(results, truth)
            size = file_size + vectors_size
            rows.append(row(n, active, "Seismic + exact re-rank", name, build, size, seconds, recall, n))
            rows[-1]["note"] = f"size: index file {file_size / MIB:,.0f} MiB + vectors {vectors_size / MIB:,.0f} MiB"
            print(rows[-1], flush=True)
        del seismic
    return rows


def dense_row(collection: Collection, queries, truth, active: int, max_docs: int) -> dict:
    n = collection.shape[0]
    measured = min(n, max_docs)
    watch = Stopwatch()
    dense = DenseIndex(collection, measured)
    build = watch.read()
    seconds, results = timed(dense, queries)
    recall = recall_at_10(results, truth)
    del dense
    size = measured * VOCAB * 4
    result = row(n, active, "dense brute force (JAX f32)", "", build, size, seconds, recall, measured)
    print(result, flush=True)
    return result


def markdown(rows: list[dict]) -> str:
    lines = [
        "| docs | active | method | setting | build s (CPU s) | size MiB | median ms | p99 ms | recall@10 | note |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        recall = "—" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(
            f"| {r['docs']:,} | {r['active']} | {r['method']} | {r['setting']} | "
            f"{r['build_s']:.0f} ({r['build_cpu_s']:.0f}) | {r['size_mib']:,.0f} | {r['median_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {recall} | {r['note']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[100_000])
    parser.add_argument("--active", type=int, nargs="+", default=[300, 1100])
    methods = ("exact", "seismic", "dense")
    parser.add_argument("--methods", nargs="+", choices=methods, default=list(methods))
    parser.add_argument("--queries", type=int, default=100, help="queries timed for the sparse methods")
    parser.add_argument("--dense-queries", type=int, default=20, help="queries timed for dense brute force")
    parser.add_argument("--dense-max-docs", type=int, default=100_000, help="largest dense matrix built")
    parser.add_argument("--exact-max-nnz", type=int, default=400_000_000, help="largest exact index built")
    parser.add_argument("--doc-words", type=int, default=64, help="words per document in Seismic")
    parser.add_argument("--n-postings", type=int, nargs="+", default=[1000])
    parser.add_argument("--search", nargs="+", default=["20:0.9:300"], help="Seismic query_cut:heap_factor:rerank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"# {platform.node()}, one core of {os.cpu_count()}, jax {jax.__version__}; {os.getloadavg()=}")
    rows = []
    for n in args.docs:
        for active in args.active:
            rows += run(n, active, args)
    print(f"# load average at the end: {os.getloadavg()}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
