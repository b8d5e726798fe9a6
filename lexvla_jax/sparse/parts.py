"""A collection of sparse lexical vectors as part files: written by `lexvla encode` and `lexvla export`, read by
`lexvla index` and `lexvla search`. Every path goes through `etils.epath` (local, `gs://`, ...).

    OUT/meta.json                         the vocabulary (column j is word j), scale, sparsification, model
                                          step, config digest, process count; per kind, its counts when finished
    OUT/KIND/part-PPPPP-NNNNN.jsonl[.gz]  process P's N-th part: one {"id", "content", "vector": {term: impact}}
                                          a line, Anserini's JsonVectorCollection that Seismic reads too
    OUT/KIND/progress-PPPPP.json          process P's ledger: its finished parts, vectors, skips, data position

A part is written under a `.tmp` name and renamed once complete, then the ledger (itself written and renamed)
records it: a part in the ledger is whole, and one outside it (a kill between the two renames) is rewritten
with the same rows on resume. KIND is `images`, `texts` or (from `lexvla export`) `captions`.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse
from etils import epath

from lexvla_jax.sparse.export import CollectionError, SparseVectors, terms_of

META = "meta.json"
PART_GLOB = "part-*.jsonl*"


def write_json(path: epath.Path, record: dict) -> None:
    """`record` as JSON at `path`, atomically (written under a temporary name, then renamed)."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def read_json(path: epath.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def part_name(process: int, number: int, compress: bool) -> str:
    return f"part-{process:05d}-{number:05d}.jsonl" + (".gz" if compress else "")


def quoted_terms(terms: Sequence[str]) -> np.ndarray:
    """Each term as the JSON of its key in a vector, `"term": `, ready to be followed by its impact."""
    return np.asarray([json.dumps(term) + ": " for term in terms], dtype=object)


def collection_lines(ids, contents, impacts: scipy.sparse.csr_array, keys: np.ndarray) -> Iterator[str]:
    """One JSON line per row of the integer impacts (zeros are not stored, so not written), as `json.dumps` of
    `{"id", "content", "vector": {term: impact}}` writes it; `keys` from `quoted_terms`. Each entry is formatted
    once as `"term": impact` and each row joined from them (twice as fast as a dict per row through `json.dumps`)."""
    entries = [key + str(w) for key, w in zip(keys[impacts.indices].tolist(), impacts.data.tolist(), strict=True)]
    bounds = impacts.indptr.tolist()
    for i, (item_id, content) in enumerate(zip(ids, contents, strict=True)):
        head = json.dumps({"id": item_id, "content": content})[:-1]  # without its closing brace
        yield head + ', "vector": {' + ", ".join(entries[bounds[i] : bounds[i + 1]]) + "}}\n"


class PartWriter:
    """Process `process`'s part files in `directory`: `add` rows to the open part, `finish_part` renames it."""

    def __init__(self, directory, process: int, words: Sequence[str], *, compress: bool = False, next_part: int = 0):
        self.directory, self.process, self.compress = epath.Path(directory), process, compress
        self.keys = quoted_terms(terms_of(words))
        self.next_part, self.rows = next_part, 0
        self._file = self._raw = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self) -> epath.Path:
        return self.directory / part_name(self.process, self.next_part, self.compress)

    def add(self, ids: Sequence[str], contents: Sequence[str], impacts: scipy.sparse.csr_array) -> None:
        if self._file is None:
            self._raw = (self.directory / (self._path().name + ".tmp")).open("wb")
            binary = gzip.GzipFile(fileobj=self._raw, mode="wb") if self.compress else self._raw
            self._file = io.TextIOWrapper(binary, encoding="utf-8")
        self._file.writelines(collection_lines(ids, contents, impacts, self.keys))
        self.rows += len(ids)

    def finish_part(self) -> str | None:
        """Completes the open part (None when it has no rows); returns its name."""
        if self._file is None:
            return None
        self._file.close()  # closes the gzip stream (writing its trailer) and the file
        if self.compress:
            self._raw.close()
        path = self._path()
        (self.directory / (path.name + ".tmp")).replace(path)
        self._file = self._raw = None
        self.next_part, self.rows = self.next_part + 1, 0
        return path.name

    def remove_unrecorded(self) -> list[str]:
        """Deletes this process's temporary files and parts numbered from `next_part` on (not in its ledger: a
        kill came between a part's rename and the ledger's); returns their names."""
        removed = []
        for path in sorted(self.directory.glob(f"part-{self.process:05d}-*")):
            number = int(path.name.split("-")[2].split(".")[0])
            if path.name.endswith(".tmp") or number >= self.next_part:
                path.unlink()
                removed.append(path.name)
        return removed


def read_meta(directory) -> tuple[dict, str]:
    """(`OUT/meta.json`, kind) of a collection directory `OUT/KIND`; a one-line error if there is none or the
    kind was not finished."""
    directory = epath.Path(directory)
    meta = read_json(directory.parent / META)
    if meta is None:
        raise CollectionError(
            f"{str(directory)!r} has no {META} beside it; pass OUT/images (or OUT/texts) of `lexvla encode --out OUT`"
        )
    kind = directory.name
    state = meta.get("kinds", {}).get(kind)
    if state is None or not state.get("finished"):
        raise CollectionError(
            f"{str(directory)!r} is not a finished collection ({sorted(meta.get('kinds', {}))} in {META}); "
            "run the same `lexvla encode` again to finish it"
        )
    return meta, kind


def part_files(directory) -> list[epath.Path]:
    return sorted(p for p in epath.Path(directory).glob(PART_GLOB) if not p.name.endswith(".tmp"))


def read_part(path: epath.Path, column: dict[str, int], vocab_size: int):
    """(ids, contents, int32 CSR impacts [n, V']) of one part file, read line by line."""
    ids, contents, indptr, indices, data = [], [], [0], [], []
    with path.open("rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        for line in lines:
            record = json.loads(line)
            ids.append(record["id"])
            contents.append(record.get("content", ""))
            try:
                indices.extend(column[term] for term in record["vector"])
            except KeyError as e:
                raise CollectionError(f"{path}: term {e.args[0]!r} is not in the vocabulary of {META}") from None
            data.extend(record["vector"].values())
            indptr.append(len(indices))
    impacts = scipy.sparse.csr_array(
        (np.asarray(data, np.int32), np.asarray(indices, np.int32), np.asarray(indptr, np.int64)),
        shape=(len(ids), vocab_size),
    )
    impacts.sort_indices()
    return ids, contents, impacts


def iter_parts(directory) -> Iterator[tuple[list[str], list[str], scipy.sparse.csr_array]]:
    """The finished collection `OUT/KIND` part by part: (ids, contents, impacts)."""
    meta, _ = read_meta(directory)
    column = {term: j for j, term in enumerate(terms_of(meta["words"]))}
    for path in part_files(directory):
        yield read_part(path, column, len(meta["words"]))


def read_collection(directory) -> SparseVectors:
    """All vectors of the finished collection `OUT/KIND` (parts read one at a time into one CSR matrix)."""
    meta, _ = read_meta(directory)
    ids, contents, blocks = [], [], []
    for part_ids, part_contents, impacts in iter_parts(directory):
        ids += part_ids
        contents += part_contents
        blocks.append(impacts)
    vocab_size = len(meta["words"])
    matrix = scipy.sparse.csr_array(scipy.sparse.vstack(blocks, format="csr")) if blocks else None
    if matrix is None:
        matrix = scipy.sparse.csr_array((0, vocab_size), dtype=np.int32)
    return SparseVectors(ids, contents, matrix.astype(np.int32), meta["words"], int(meta["scale"]),
                         meta.get("sparsification", {}))  # fmt: skip
