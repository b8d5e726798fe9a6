"""A collection to encode, read once in order: images from shards through grain, texts from a TSV/JSONL file.

Images: the training data path without its randomness. Process `p` of `P` reads shards `p::P` (webdataset,
in sorted order, one at a time per worker) or records `p::P` (ArrayRecord, in file order); each sample is
decoded in `num_workers` grain worker processes to `{"key", "image" uint8 [S,S,3] (centre crop, as evaluation),
"content" (its caption, or "")}`; bad samples are skipped and counted by reason (`records.SKIP_REASONS`), never
fatal (`config.max_consecutive_skips`, a training guard, does not apply). A process whose share is empty (fewer
shards or records than processes, or shards without samples) gets no batch, and no error. `image_batches` is
checkpointable like the training iterator (`get_state`/`set_state`), which is what makes `lexvla encode`
resumable.

Texts: `id<TAB>text` lines, or JSONL `{"id", "text"}` (by the suffix `.jsonl`/`.json`); process `p` takes
lines `p::P`. Malformed lines, empty texts and non-UTF-8 lines are skipped and counted (`TEXT_SKIP_REASONS`).
Both sources yield batches `{"key": [str], "content": [str], ...inputs, "skipped": counts since the last batch}`.
"""

from __future__ import annotations

import json
import sys

import grain
import numpy as np
from etils import epath

from lexvla_jax.data.array_record import SUFFIX, DecodeRecord
from lexvla_jax.data.batching import SkipTotalsDataset
from lexvla_jax.data.config import DataConfigError, check_data_config, resolve_shards
from lexvla_jax.data.eval_set import eval_image
from lexvla_jax.data.pipeline import decoded_batches
from lexvla_jax.data.records import CAPTION_EXTENSION, REASON_INDEX, SKIP_REASONS, BadSample, skip_counts_dict
from lexvla_jax.data.transforms import decode_caption, image_member
from lexvla_jax.data.webdataset import WebDatasetSource

TEXT_SKIP_REASONS = ("malformed_line", "empty_text", "non_utf8_text")


class ImageDecoder:
    """Raw sample → `{"key", "image", "content"}` or a skip marker (runs in grain workers: no JAX). Images go through
    the evaluation transform (`eval_set.eval_image`), so a collection is encoded as evaluation sets are."""

    def __init__(self, config):
        self.config = config

    def __call__(self, sample: dict) -> dict:
        try:
            if sample["error"] is not None:
                raise BadSample(sample["error"])
            image = eval_image({"image": image_member(sample["files"])}, self.config)
        except BadSample as e:
            return {"skip": REASON_INDEX[e.reason], "key": sample["key"]}
        try:
            content = decode_caption(sample["files"][CAPTION_EXTENSION])
        except (KeyError, BadSample):
            content = ""  # a caption is optional: the image is what gets encoded
        return {"key": sample["key"], "image": image, "content": content}


def image_shards(spec, data_format: str) -> list[str]:
    return resolve_shards(spec, "--images", SUFFIX if data_format == "array_record" else ".tar")


def share_is_empty(paths: list[str], data_format: str, process_index: int, process_count: int) -> bool:
    """Whether process `process_index` of `process_count` gets no shard (webdataset) or no record (ArrayRecord)."""
    if data_format == "array_record":
        return len(grain.sources.ArrayRecordDataSource(paths)) <= process_index
    return len(paths) <= process_index


def _raw_images(paths: list[str], data_format: str, process_index: int, process_count: int):
    if data_format == "array_record":
        source = grain.sources.ArrayRecordDataSource(paths)
        return grain.MapDataset.source(source).map_with_index(DecodeRecord(0))[process_index::process_count]
    # Shards p::P in order, as WebDatasetSource would pick them, which also takes fewer shards than processes.
    return WebDatasetSource(paths[process_index::process_count], num_epochs=1, cycle_length=1, shuffle_shards=False)


def expected_images(paths: list[str], data_format: str, process_count: int) -> int | None:
    """The collection's sample count when it is known without reading it (ArrayRecord; img2dataset's
    `*_stats.json` "successes" next to every tar); None otherwise."""
    if data_format == "array_record":
        return len(grain.sources.ArrayRecordDataSource(paths))
    total = 0
    for path in paths:
        stats = epath.Path(path.removesuffix(".tar") + "_stats.json")
        if not stats.exists():
            return None
        total += int(json.loads(stats.read_text()).get("successes", 0))
    return total


def image_batches(config, paths: list[str], batch_size: int, process_index: int, process_count: int):
    """This process's images in batches of `batch_size` (the last one shorter); see the module docstring.
    `config` is `config.data` (format, decoding limits, `num_workers`, `prefetch_buffer`)."""
    check_data_config(config)
    if share_is_empty(paths, config.format, process_index, process_count):
        return EmptyShare()
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.max_consecutive_skips = sys.maxsize  # a run of bad samples is counted, never fatal
    ds = _raw_images(paths, config.format, process_index, process_count).map(ImageDecoder(config))
    ds = decoded_batches(ds, config, batch_size, keep_keys=True)
    return _WithContents(SkipTotalsDataset(ds, batch_size=batch_size, drop_remainder=False, empty_error=None))


class EmptyShare:
    """The batches of a process that has no shard or record to read: none (and no data workers started)."""

    @property
    def skip_counts(self) -> dict[str, int]:
        return skip_counts_dict(np.zeros(len(SKIP_REASONS), np.int64))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        raise StopIteration

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _WithContents:
    """Keys and contents as lists of str; `skip_counts` are the totals by reason (restored with the state)."""

    def __init__(self, dataset):
        self.iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)
        if "content" in batch:
            batch["content"] = [str(c) for c in batch["content"]]
            batch["key"] = [str(k) for k in batch["key"]]
        return batch

    @property
    def skip_counts(self) -> dict[str, int]:
        return skip_counts_dict(self.iterator.skipped)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def start_prefetch(self) -> None:
        getattr(self.iterator, "start_prefetch", lambda: None)()

    def close(self) -> None:
        getattr(self.iterator, "close", lambda: None)()


def parse_text_line(line: bytes, jsonl: bool) -> tuple[str, str]:
    """(id, text) of one line; raises `BadSample` with one of `TEXT_SKIP_REASONS`."""
    try:
        line = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadSample("non_utf8_text") from None
    if jsonl:
        try:
            record = json.loads(line)
            item_id, text = str(record["id"]), record["text"]
        except (ValueError, KeyError, TypeError):
            raise BadSample("malformed_line") from None
        if not isinstance(text, str):
            raise BadSample("malformed_line")
    else:
        item_id, tab, text = line.partition("\t")
        if not tab or not item_id.strip():
            raise BadSample("malformed_line")
    text = " ".join(text.split())
    if not text:
        raise BadSample("empty_text")
    return item_id.strip(), text


class TextBatches:
    """This process's lines `p::P` of a text file as batches (see the module docstring); state = lines read."""

    def __init__(self, path: str, encode, batch_size: int, process_index: int, process_count: int):
        if not epath.Path(path).exists():
            raise DataConfigError(f"--texts {path!r} does not exist; pass a TSV (id<TAB>text) or JSONL file")
        self.path, self.encode, self.batch_size = path, encode, batch_size
        self.process_index, self.process_count = process_index, process_count
        self.jsonl = path.endswith((".jsonl", ".json"))
        self.lines, self._file = 0, None
        self.skipped = np.zeros(len(TEXT_SKIP_REASONS), np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._file is None:
            self._file = epath.Path(self.path).open("rb")
            for _ in range(self.lines):
                self._file.readline()
        keys, texts = [], []
        skipped = np.zeros(len(TEXT_SKIP_REASONS), np.int64)
        while len(keys) < self.batch_size:
            line = self._file.readline()
            if not line:
                break
            self.lines += 1
            if (self.lines - 1) % self.process_count != self.process_index or not line.strip():
                continue
            try:
                item_id, text = parse_text_line(line, self.jsonl)
            except BadSample as e:
                skipped[TEXT_SKIP_REASONS.index(e.reason)] += 1
                continue
            keys.append(item_id)
            texts.append(text)
        self.skipped += skipped
        if not keys and not skipped.any():
            raise StopIteration
        batch = {"key": keys, "content": texts, "skipped": skipped}
        if keys:
            rows = self.encode(texts)
            batch.update(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
        return batch

    @property
    def skip_counts(self) -> dict[str, int]:
        return {reason: int(n) for reason, n in zip(TEXT_SKIP_REASONS, self.skipped, strict=True)}

    def get_state(self) -> dict:
        return {"lines": self.lines, "skipped": self.skipped.tolist()}

    def set_state(self, state: dict) -> None:
        self.close()
        self.lines, self.skipped = state["lines"], np.asarray(state["skipped"], np.int64)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def expected_texts(path: str) -> int:
    """Non-blank lines of the file (the texts to encode, before skips)."""
    with epath.Path(path).open("rb") as f:
        return sum(1 for line in f if line.strip())


class ArrayBatches:
    """Rows `p::P` of in-memory columns (an evaluation set already decoded) as batches; state = rows read."""

    def __init__(self, keys, contents, columns: dict, batch_size: int, process_index: int, process_count: int):
        self.rows = np.arange(process_index, len(keys), process_count)
        self.keys, self.contents, self.columns, self.batch_size = list(keys), list(contents), columns, batch_size
        self.position = 0
        self.skip_counts: dict[str, int] = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self.rows[self.position : self.position + self.batch_size]
        if not len(rows):
            raise StopIteration
        self.position += len(rows)
        batch = {name: np.asarray(column)[rows] for name, column in self.columns.items()}
        return {**batch, "key": [self.keys[i] for i in rows], "content": [self.contents[i] for i in rows]}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]
