"""`lexvla encode` end to end: 1 process × 8 devices against 2 processes × 4, each killed mid-way and resumed; the
vectors against the model's own dense encoder; export through the same path; index and search over the parts;
parts written to a `gs://` emulator, stopped and resumed there. One short training run (2 steps) is shared by
those tests. In process, with a stand-in for the model (`FakeDevice`): a kill between a part's rename and its
ledger, bad samples through the command's own data path, empty shares, bounded memory, the progress line."""

import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
import urllib.parse
import urllib.request
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from support import local_cluster
from support.corrupt_data import write_corrupt_shards
from support.fake_encoder import FakeEncoder, colour_of

from lexvla_jax import cli, configlib, encode, inference
from lexvla_jax.commands import encode as encode_command
from lexvla_jax.configlib import ConfigError
from lexvla_jax.data import array_record, corpus
from lexvla_jax.data.tar_reader import iter_samples
from lexvla_jax.sparse import export, parts

PART_SIZE = 48  # vectors per part and process: 600 images make 13 parts on 1 process, 7 on each of 2
TRAIN = {"train.num_steps": 2, "checkpoint.every_steps": 1, "train.show_top_words": 0, "train.word_maps": 0}
TEXTS = [
    "t0\ta small red circle",
    "t1\ta large blue square above a green star",
    "no tab on this line",
    "t2\t   ",
    "t3\tthere is a white diamond on a beige background",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(data dir, workdir trained 2 steps with checkpoints at steps 1 and 2, texts file)."""
    root = tmp_path_factory.mktemp("encode")
    data_dir = local_cluster.make_data(str(root / "data"))
    run = local_cluster.Cluster(root / "work", data_dir, 1, 8, **TRAIN)
    run.check()
    texts = root / "texts.tsv"
    texts.write_text("\n".join(TEXTS) + "\n")
    return data_dir, str(root / "work"), str(texts)


def config_args(data_dir: str) -> list[str]:
    overrides = local_cluster.overrides(data_dir, **TRAIN)
    return ["--config", local_cluster.TINY_CONFIG, *(f"--config.{o}" for o in overrides)]


def start_encode(trained, out, processes: int, devices: int, *args) -> list[tuple[subprocess.Popen, str]]:
    """`lexvla encode` of the training shards and the texts as `processes` × `devices` on 127.0.0.1."""
    data_dir, workdir, texts = trained
    command = [sys.executable, "-m", "lexvla_jax.cli", "encode", *config_args(data_dir), "--workdir", workdir]
    command += ["--images", os.path.join(data_dir, "train"), "--texts", texts, "--out", str(out)]
    command += ["--part-size", str(PART_SIZE), *args]
    if processes > 1:
        command.append("--config.dist.mode=explicit")
    runs = []
    for i, env in enumerate(local_cluster.process_envs(processes, devices, "encode")):
        log = f"{out}.log{i}"
        with open(log, "w") as f:
            proc = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=local_cluster.REPO)
        runs.append((proc, log))
    return runs


def finish(runs, timeout: float = 600) -> list[str]:
    outputs = []
    for proc, log in runs:
        code = proc.wait(timeout=timeout)
        outputs.append(open(log).read())
        assert code == 0, outputs[-1][-3000:]
    return outputs


def kill_after_first_parts(runs, out, processes: int, timeout: float = 300) -> dict:
    """SIGKILLs every process once each has recorded a part of its images; returns the ledgers then."""
    ledgers = [epath.Path(out) / "images" / f"progress-{p:05d}.json" for p in range(processes)]
    deadline = time.time() + timeout
    while not all(path.exists() for path in ledgers):
        assert time.time() < deadline and all(p.poll() is None for p, _ in runs), open(runs[0][1]).read()[-3000:]
        time.sleep(0.02)
    for proc, _ in runs:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return {p: json.loads(path.read_text()) for p, path in enumerate(ledgers)}


def read_parts(directory) -> dict[str, dict]:
    """{id: vector} over every part file of `directory`; an id twice is a failure."""
    vectors = {}
    for path in sorted(epath.Path(directory).glob("part-*")):
        data = path.read_bytes()
        lines = (gzip.decompress(data) if path.name.endswith(".gz") else data).decode().splitlines()
        for line in lines:
            record = json.loads(line)
            assert record["id"] not in vectors, f"{record['id']} twice"
            vectors[record["id"]] = record["vector"]
    return vectors


def assert_same_vectors(a: dict, b: dict) -> None:
    """The same ids; every impact within ±1 (a word missing on one side counts as 0 there)."""
    assert sorted(a) == sorted(b)
    for key in a:
        for term in set(a[key]) | set(b[key]):
            assert abs(a[key].get(term, 0) - b[key].get(term, 0)) <= 1, (key, term)


def recorded_parts(out, ledgers: dict, compress: bool) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime in ns)} of the image parts each ledger records (its parts 0 … parts-1)."""
    names = [parts.part_name(p, n, compress) for p, ledger in ledgers.items() for n in range(ledger["parts"])]
    return {name: (os.stat(path).st_ino, os.stat(path).st_mtime_ns) for name in names
            for path in [os.path.join(out, "images", name)]}  # fmt: skip


@pytest.fixture(scope="session")
def encoded(trained, tmp_path_factory):
    """The collection encoded by 1 process × 8 devices in one go, and by 2 × 4 (gzip parts) SIGKILLed once every
    process had recorded a part, then run again to the end; the recorded parts' inodes and mtimes at the kill and
    after the rerun."""
    root = tmp_path_factory.mktemp("encoded")
    one, two = root / "one", root / "two"
    result = {"one": {"out": str(one), "outputs": finish(start_encode(trained, one, 1, 8))}}
    ledgers = kill_after_first_parts(start_encode(trained, two, 2, 4, "--gzip"), two, 2)
    kept = recorded_parts(two, ledgers, True)
    outputs = finish(start_encode(trained, two, 2, 4, "--gzip"))
    result["two"] = {"out": str(two), "killed_ledgers": ledgers, "outputs": outputs, "recorded_at_kill": kept,
                     "recorded_after_rerun": recorded_parts(two, ledgers, True)}  # fmt: skip
    return result


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_encode_what_one_does_after_kill_and_resume(encoded):
    ledgers, outputs = encoded["two"]["killed_ledgers"], encoded["two"]["outputs"]
    assert all(not ledger["finished"] and 1 <= ledger["parts"] for ledger in ledgers.values()), ledgers
    # A resume, not a restart: the parts the ledgers recorded are the same files, untouched, and each process read
    # on from its ledger's data position (the rerun encoded only what the ledgers did not hold).
    kept = encoded["two"]["recorded_at_kill"]
    assert len(kept) == sum(ledger["parts"] for ledger in ledgers.values())
    assert encoded["two"]["recorded_after_rerun"] == kept
    for p, ledger in ledgers.items():
        resumed = f"images: process {p} resumes after its {ledger['parts']} recorded parts ({ledger['vectors']} "
        assert resumed in outputs[p], outputs[p][-3000:]
    rest = 600 - sum(ledger["vectors"] for ledger in ledgers.values())
    assert f"images: 600 vectors ({rest} this run), " in outputs[0], outputs[0][-3000:]
    assert "images: 600 vectors (600 this run), " in encoded["one"]["outputs"][0]
    for name in ("one", "two"):
        meta = json.loads((epath.Path(encoded[name]["out"]) / "meta.json").read_text())
        assert meta["kinds"]["images"]["vectors"] == 600 and meta["kinds"]["texts"]["vectors"] == 3
        assert meta["kinds"]["texts"]["skipped"] == {"malformed_line": 1, "empty_text": 1, "non_utf8_text": 0}
        assert meta["step"] == 2 and meta["process_count"] == (1 if name == "one" else 2)
    one, two = (encoded[name]["out"] for name in ("one", "two"))
    names = sorted(n for n in os.listdir(os.path.join(two, "images")) if n.startswith("part-"))
    assert names[:2] == ["part-00000-00000.jsonl.gz", "part-00000-00001.jsonl.gz"]
    assert {n.split("-")[1] for n in names} == {"00000", "00001"}  # each process its own parts
    for kind in ("images", "texts"):
        vectors_one, vectors_two = read_parts(os.path.join(one, kind)), read_parts(os.path.join(two, kind))
        assert len(vectors_one) == (600 if kind == "images" else 3)
        assert_same_vectors(vectors_one, vectors_two)
    assert "images: " in encoded["one"]["outputs"][0] and "/s per device)" in encoded["one"]["outputs"][0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_encoded_vectors_are_the_models_dense_vectors_sparsified(encoded, trained):
    """Every image of the first shard and every text: the parts hold round(1000 · w) of the model's own dense
    vector (LexicalEncoder, threshold 1/√V′), within ±1."""
    data_dir, workdir, texts = trained
    config = configlib.load_config(local_cluster.TINY_CONFIG, local_cluster.overrides(data_dir, **TRAIN))
    encoder, _ = inference.restore(config, workdir)
    decode = corpus.ImageDecoder(config.data)
    with open(os.path.join(data_dir, "train", "shard-00000.tar"), "rb") as f:
        samples = [decode({"key": s.key, "files": s.files, "error": s.error}) for s in iter_samples(f)]
    images = np.stack([s["image"] for s in samples])
    lines = [line.split("\t") for line in TEXTS if line.count("\t") == 1 and line.split("\t")[1].strip()]
    for kind, ids, dense in (
        ("images", [s["key"] for s in samples], encoder.encode_images(images)),
        ("texts", [i for i, _ in lines], encoder.encode_texts([t for _, t in lines])),
    ):
        impacts = export.quantise(export.sparsify(dense), 1000).toarray()
        terms = export.terms_of(encoder.words)
        expected = {i: {terms[j]: int(r[j]) for j in np.flatnonzero(r)} for i, r in zip(ids, impacts, strict=True)}
        stored = read_parts(os.path.join(encoded["one"]["out"], kind))
        assert_same_vectors({i: stored[i] for i in ids}, expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rerun_settings_and_export(encoded, trained, tmp_path, capsys):
    """A finished OUT is not encoded again; another step or sparsification is one line; `lexvla export` of the
    eval shards writes what `lexvla encode` writes for them; index and search read the parts."""
    data_dir, workdir, texts = trained
    out = encoded["one"]["out"]
    before = {p.name: os.stat(p).st_mtime_ns for p in epath.Path(out, "images").glob("*")}
    model = ["encode", *config_args(data_dir), "--workdir", workdir]
    base = [*model, "--images", os.path.join(data_dir, "train"), "--texts", texts, "--out", out]
    assert cli.main(base) == 0
    printed = capsys.readouterr().out
    assert f"{out}/images: finished before (600 vectors); nothing to encode" in printed
    assert f"{out}/texts: finished before (3 vectors); nothing to encode" in printed
    assert {p.name: os.stat(p).st_mtime_ns for p in epath.Path(out, "images").glob("*")} == before
    for args, message in (
        (["--step", "1"], f"lexvla encode: {out} was encoded with step=2, this run has 1: pass another --out\n"),
        (["--top-k", "5"], "sparsification={'threshold': None, 'top_k': None}, this run has {'threshold': None, 'top"),
        (["--config.data.resample=bicubic"], "was encoded with config_digest="),
    ):
        assert cli.main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    # Export of the eval set = encode of the same shards.
    eval_shards = os.path.join(data_dir, "eval")
    exported, encoded_eval = tmp_path / "exported", tmp_path / "encoded"
    assert cli.main(["export", *config_args(data_dir), "--workdir", workdir, "--out", str(exported)]) == 0
    assert cli.main([*model, "--images", eval_shards, "--out", str(encoded_eval)]) == 0
    assert_same_vectors(read_parts(exported / "images"), read_parts(encoded_eval / "images"))
    captions = parts.read_collection(str(exported / "captions"))
    assert len(captions.ids) == 120 and captions.ids[:2] == ["000000000#0", "000000000#1"]
    capsys.readouterr()

    # Index the 2-process gzip parts and search them by text and by an encoded text's id.
    images = os.path.join(encoded["two"]["out"], "images")
    assert cli.main(["index", images, "--n-postings", "200", "--threads", "1", "--doc-words", "0"]) == 0
    assert capsys.readouterr().out.startswith("indexed 600 vectors")
    collection = parts.read_collection(images)
    assert len(collection.ids) == 600 == len(set(collection.ids))
    query = parts.read_collection(os.path.join(out, "texts"))
    words, weights = query.row(query.position("t1"))
    expected = collection.weights() @ np.bincount(words, weights, len(collection.words)).astype(np.float32)
    best = np.argsort(-expected, kind="stable")[:3]
    for method in ("exact", "seismic"):
        args = ["search", "--index", images, "--query-id", "t1", "--queries", os.path.join(out, "texts"), "-k", "3"]
        assert cli.main([*args, "--method", method, "--heap-factor", "1.0", "--rerank", "600"]) == 0
        hits = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
        assert [h[1] for h in hits] == [collection.ids[i] for i in best]
        np.testing.assert_allclose([float(h[2]) for h in hits], expected[best], atol=5e-5 + 1e-7)  # printed: 4 decimals


@pytest.mark.parametrize("data_format", ["webdataset", "array_record"])
def test_image_batches_skip_and_count_bad_samples_and_resume(tmp_path, data_format):
    """The corrupt shards (or their ArrayRecord conversion) through 1 worker: every good image once (a missing or
    bad caption is only an empty content), skips counted by reason; restored mid-way, the rest follows exactly."""
    expected = write_corrupt_shards(str(tmp_path / "tars"))
    shards = expected["shards"]
    if data_format == "array_record":
        array_record.convert(shards, str(tmp_path / "records"))
        shards = corpus.image_shards(str(tmp_path / "records" / "*.array_record"), data_format)
    config = configlib.load_config(local_cluster.TINY_CONFIG).data
    with config.unlocked():
        config.update(num_workers=1, image_size=32, format=data_format, **expected["limits"])
    caption_skips = ("missing_caption", "empty_caption", "non_utf8_caption")
    keys_then = sorted([*expected["good_keys"], "bad_nocaption", "bad_emptycaption", "bad_latin1"])
    batches = corpus.image_batches(config, shards, 4, 0, 1)
    first = next(batches)
    state = batches.get_state()
    rest = list(batches)
    keys = first["key"] + [k for b in rest for k in b["key"]]
    assert sorted(keys) == keys_then
    contents = dict(zip(keys, first["content"] + [c for b in rest for c in b["content"]], strict=True))
    assert contents["bad_nocaption"] == "" and contents[expected["good_keys"][0]].startswith(("a ", "there"))
    assert batches.skip_counts == {r: 0 if r in caption_skips else n for r, n in expected["skipped"].items()}
    batches.close()
    resumed = corpus.image_batches(config, shards, 4, 0, 1)
    resumed.set_state(state)
    assert [k for b in resumed for k in b["key"]] == keys[4:]
    resumed.close()


def test_text_batches_split_lines_over_processes_and_resume(tmp_path):
    path = tmp_path / "texts.jsonl"
    rows = [json.dumps({"id": f"q{i}", "text": f"text {i}"}) for i in range(7)]
    path.write_text("\n".join([*rows[:3], "{not json", json.dumps({"id": "e", "text": " "}), *rows[3:]]) + "\n")
    encode = lambda texts: {"input_ids": np.zeros((len(texts), 2)), "attention_mask": np.ones((len(texts), 2))}  # noqa: E731
    shares = [corpus.TextBatches(str(path), encode, 2, p, 2) for p in range(2)]
    keys = [[k for batch in share for k in batch["key"]] for share in shares]
    assert sorted(keys[0] + keys[1]) == [f"q{i}" for i in range(7)] and not set(keys[0]) & set(keys[1])
    assert {r: shares[0].skip_counts[r] + shares[1].skip_counts[r] for r in corpus.TEXT_SKIP_REASONS} == {
        "malformed_line": 1, "empty_text": 1, "non_utf8_text": 0}  # fmt: skip
    first = corpus.TextBatches(str(path), encode, 2, 0, 1)
    next(first)
    again = corpus.TextBatches(str(path), encode, 2, 0, 1)
    again.set_state(first.get_state())
    assert [k for batch in again for k in batch["key"]] == [k for batch in first for k in batch["key"]]


def test_collection_lines_are_what_json_dumps_writes_for_each_row():
    """The part writer's formatting shortcut writes exactly `json.dumps({"id", "content", "vector"})`, escapes and
    all: quotes, backslashes and non-ASCII in ids, contents and terms, empty rows, repeated words (`word@j`)."""
    import scipy.sparse

    words = ["cat", 'say "hi"', "back\\slash", "caf\u00e9", "cat", "\u2603"]
    dense = np.array([[3, 0, 7, 1, 0, 250], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]], dtype=np.int32)
    ids, contents = ["a/1", 'q"2', "\u00fcber"], ["", "two\nlines", "caf\u00e9 au lait"]
    impacts = scipy.sparse.csr_array(dense)
    terms = export.terms_of(words)
    lines = list(parts.collection_lines(ids, contents, impacts, parts.quoted_terms(terms)))
    expected = [
        json.dumps({"id": i, "content": c, "vector": {terms[j]: int(w) for j, w in enumerate(row) if w}}) + "\n"
        for i, c, row in zip(ids, contents, dense, strict=True)
    ]
    assert lines == expected
    assert json.loads(lines[0])["vector"] == {"cat": 3, "back\\slash": 7, "caf\u00e9": 1, "\u2603": 250}
    assert json.loads(lines[2])["vector"]["cat@4"] == 5


def test_parts_are_whole_or_absent_and_unfinished_collections_are_refused(tmp_path):
    words = ["red", "circle", "red"]
    impacts = export.quantise(np.array([[0.5, 0.25, 0.0], [0.0, 0.0, 0.75]], np.float32))
    writer = parts.PartWriter(tmp_path / "images", 0, words, compress=True)
    writer.add(["a", "b"], ["x", "y"], impacts)
    assert list((tmp_path / "images").glob("part-*")) == [tmp_path / "images" / "part-00000-00000.jsonl.gz.tmp"]
    assert writer.finish_part() == "part-00000-00000.jsonl.gz" and writer.finish_part() is None
    # Killed after renaming part 1 and before the ledger recorded it (the ledger's next part is 1), with part 2
    # open; process 1's part is not process 0's to delete. A rerun from the ledger deletes parts 1 and 2.
    writer.add(["c"], ["z"], impacts[[0]])
    assert writer.finish_part() == "part-00000-00001.jsonl.gz"
    writer.add(["d"], ["w"], impacts[[1]])
    other = parts.PartWriter(tmp_path / "images", 1, words, compress=True)
    other.add(["e"], ["v"], impacts[[1]])
    other.finish_part()
    removed = parts.PartWriter(tmp_path / "images", 0, words, compress=True, next_part=1).remove_unrecorded()
    assert removed == ["part-00000-00001.jsonl.gz", "part-00000-00002.jsonl.gz.tmp"]
    assert sorted(p.name for p in (tmp_path / "images").glob("part-*")) == [
        "part-00000-00000.jsonl.gz", "part-00001-00000.jsonl.gz"]  # fmt: skip
    with pytest.raises(parts.CollectionError, match="has no meta.json beside it"):
        parts.read_collection(tmp_path / "images")
    meta = {"words": words, "scale": 1000, "sparsification": {}, "kinds": {"images": {"finished": False}}}
    parts.write_json(epath.Path(tmp_path) / "meta.json", meta)
    with pytest.raises(parts.CollectionError, match="run the same `lexvla encode` again to finish it"):
        parts.read_collection(tmp_path / "images")
    meta["kinds"]["images"]["finished"] = True
    parts.write_json(epath.Path(tmp_path) / "meta.json", meta)
    collection = parts.read_collection(tmp_path / "images")
    assert collection.ids == ["a", "b", "e"] and (collection.matrix[[0, 1]] != impacts).nnz == 0
    assert read_parts(tmp_path / "images")["b"] == {"red@2": 750}


class Stopped(Exception):
    """Raised in place of the crash hook's SIGKILL (`encode._kill_self`) by in-process tests."""


def stop_instead_of_kill(monkeypatch, when: str) -> None:
    """`LEXVLA_DEBUG_KILL_ENCODE=when`, with the kill replaced by `Stopped` (this process is the test's)."""

    def stop(kind, number):
        raise Stopped(f"part {number} of {kind} renamed, not recorded")

    monkeypatch.setattr(encode, "_kill_self", stop)
    monkeypatch.setenv(encode.KILL_ENV, when)


def gcs_generation(emulator, path: str) -> str:
    """The generation of the object at `path` (`gs://bucket/name`): a new one for every write of it."""
    name = path.removeprefix(f"gs://{emulator.bucket}/")
    url = f"{emulator.url}/storage/v1/b/{emulator.bucket}/o/{urllib.parse.quote(name, safe='')}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)["generation"]


@pytest.mark.slow
def test_encode_writes_parts_and_meta_to_gcs(gcs_emulator, trained, tmp_path, monkeypatch, capsys):
    """`lexvla encode --gzip --out gs://…` (the eval shards and the texts), stopped once its image part 1 is renamed
    and before its ledger records it, then run again: it deletes part 1, resumes after part 0 (the same object) and
    finishes; parts, ledgers and meta.json are in the bucket through epath, nothing local, and the vectors are
    those of a local run of the same command."""
    monkeypatch.chdir(tmp_path)
    data_dir, workdir, texts = trained
    out = gcs_emulator.new_workdir()
    args = ["encode", *config_args(data_dir), "--workdir", workdir, "--texts", texts, "--gzip"]
    args += ["--images", os.path.join(data_dir, "eval"), "--part-size", "8", "--batch-size", "8"]
    stop_instead_of_kill(monkeypatch, "images:1")
    with pytest.raises(Stopped):
        cli.main([*args, "--out", out])
    monkeypatch.delenv(encode.KILL_ENV)
    assert gcs_emulator.objects(out) == [
        "images/part-00000-00000.jsonl.gz", "images/part-00000-00001.jsonl.gz", "images/progress-00000.json",
        "meta.json"]  # fmt: skip
    assert json.loads(epath.Path(out, "images", "progress-00000.json").read_text())["parts"] == 1
    first = gcs_generation(gcs_emulator, f"{out}/images/part-00000-00000.jsonl.gz")
    capsys.readouterr()
    assert cli.main([*args, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "images: process 0 deleted part-00000-00001.jsonl.gz (renamed, not in its ledger)" in printed
    assert "images: process 0 resumes after its 1 recorded parts (8 vectors)" in printed
    assert "images: 24 vectors (16 this run), " in printed
    assert gcs_generation(gcs_emulator, f"{out}/images/part-00000-00000.jsonl.gz") == first
    assert cli.main([*args, "--out", str(tmp_path / "local")]) == 0
    objects = gcs_emulator.objects(out)
    assert sorted(objects) == sorted(
        ["meta.json", "images/part-00000-00000.jsonl.gz", "images/part-00000-00001.jsonl.gz",
         "images/part-00000-00002.jsonl.gz", "images/progress-00000.json", "texts/part-00000-00000.jsonl.gz",
         "texts/progress-00000.json"]
    )  # fmt: skip
    for kind in ("images", "texts"):
        assert read_parts(f"{out}/{kind}") == read_parts(tmp_path / "local" / kind)
    assert len(parts.read_collection(f"{out}/images").ids) == 24
    assert not [name for name in os.listdir(tmp_path) if name in ("gs:", "gs")]


# In process: `encode.encode_kind` and the command's data path with a stand-in for the model.


class FakeDevice:
    """`encode.DeviceEncoder`'s interface over a `FakeEncoder` (no model, no jit): `dispatch` returns the impacts
    `round(1000 · s)` of the entries ≥ 1/√V′ as a jax array, as the jitted function does. `alive_at_dispatch` notes,
    at each call, how many arrays it returned before are still referenced."""

    def __init__(self, encoder: FakeEncoder, local_batch: int):
        self.encoder, self.local_batch = encoder, local_batch
        self.returned, self.alive_at_dispatch = [], []

    def dispatch(self, kind: str, batch: dict | None) -> jnp.ndarray:
        self.alive_at_dispatch.append(sum(ref() is not None for ref in self.returned))
        impacts = np.zeros((self.local_batch, len(self.encoder.words)), np.int32)
        if batch:
            s = self.encoder.encode_images(np.asarray(batch["image"]))
            impacts[: len(s)] = np.rint(np.where(s >= 1 / np.sqrt(s.shape[1]), s, 0) * 1000)
        array = jnp.asarray(impacts)
        self.returned.append(weakref.ref(array))
        return array


class Watched:
    """A batch source that notes, each time it is asked for a batch: (batches delivered so far, how many of them are
    still referenced, finished part files in `directory`); `rows` counts the rows it delivered."""

    def __init__(self, source, directory):
        self.source, self.directory = source, epath.Path(directory)
        self.delivered, self.log, self.rows = [], [], 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        alive = sum(ref() is not None for ref in self.delivered)
        self.log.append((len(self.delivered), alive, len(parts.part_files(self.directory))))
        batch = next(self.source)
        self.delivered.append(weakref.ref(batch["image"]))
        self.rows += len(batch["key"])
        return batch

    def __getattr__(self, name):
        return getattr(self.source, name)


def coloured_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """`n` images, each one flat colour of random code."""
    codes = np.random.default_rng(seed).integers(0, 30, n)
    return np.stack([np.full((size, size, 3), colour_of(int(c)), np.uint8) for c in codes])


def in_memory_source(images: np.ndarray, directory, batch: int = 4) -> Watched:
    keys = [f"k{i:04d}" for i in range(len(images))]
    return Watched(corpus.ArrayBatches(keys, keys, {"image": images}, batch, 0, 1), directory)


def encode_images(out, source, device, part_size: int = 8, compress: bool = False) -> dict:
    return encode.encode_kind(str(out), "images", source, device, part_size=part_size, expected=None,
                              compress=compress, log_seconds=1e9)  # fmt: skip


def test_a_kill_between_a_parts_rename_and_its_ledger_is_resumed_exactly(tmp_path, monkeypatch, capsys):
    """The worst moment (`LEXVLA_DEBUG_KILL_ENCODE=images:2`: part 2 renamed, the ledger still at 2 parts): the
    rerun deletes part 2, keeps parts 0-1 as they are, reads on from the ledger's position and writes what an
    uninterrupted run writes, every id once."""
    images, encoder = coloured_images(40), FakeEncoder.colours()
    encode_images(tmp_path / "whole", in_memory_source(images, tmp_path / "whole" / "images"), FakeDevice(encoder, 4))
    out = tmp_path / "out"
    stop_instead_of_kill(monkeypatch, "images:2")
    with pytest.raises(Stopped):
        encode_images(out, in_memory_source(images, out / "images"), FakeDevice(encoder, 4))
    monkeypatch.delenv(encode.KILL_ENV)
    ledger = json.loads((out / "images" / "progress-00000.json").read_text())
    assert (ledger["parts"], ledger["vectors"], ledger["finished"]) == (2, 16, False)
    assert [p.name for p in parts.part_files(out / "images")] == [parts.part_name(0, n, False) for n in range(3)]
    kept = recorded_parts(out, {0: ledger}, False)
    capsys.readouterr()
    rerun = in_memory_source(images, out / "images")
    totals = encode_images(out, rerun, FakeDevice(encoder, 4))
    printed = capsys.readouterr().out
    assert f"{out}/images: process 0 deleted part-00000-00002.jsonl (renamed, not in its ledger)\n" in printed
    assert f"{out}/images: process 0 resumes after its 2 recorded parts (16 vectors)\n" in printed
    assert recorded_parts(out, {0: ledger}, False) == kept
    assert rerun.rows == 40 - 16 and totals["vectors"] == 40 and totals["parts"] == 5
    assert read_parts(out / "images") == read_parts(tmp_path / "whole" / "images")
    with pytest.raises(ConfigError, match=r"^LEXVLA_DEBUG_KILL_ENCODE='images': use KIND:N"):
        encode.parse_kill_part("images")
    assert encode.parse_kill_part("") is None and encode.parse_kill_part("texts:0") == ("texts", 0)


def test_encode_holds_a_bounded_number_of_batches_and_writes_parts_as_it_goes(tmp_path):
    """8 and 32 batches of 4 (part size 4): whenever the encoder asks for a batch, at most one batch it read before
    and one device result are still referenced and every batch but the last two is already in a finished part;
    the peak of traced host memory does not grow with the collection."""
    encoder = FakeEncoder.colours(extra_words=[f"w{j}" for j in range(509)], image_size=64, patch_size=16)  # V' 512
    warm_up = in_memory_source(coloured_images(8, size=64), tmp_path / "warm-up" / "images")
    encode_images(tmp_path / "warm-up", warm_up, FakeDevice(encoder, 4))  # jax's first-call allocations
    peaks = []
    for batches in (8, 32):
        images = coloured_images(4 * batches, seed=batches, size=64)
        out = tmp_path / str(batches)
        source, device = in_memory_source(images, out / "images"), FakeDevice(encoder, 4)
        tracemalloc.start()
        totals = encode_images(out, source, device, part_size=4)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert totals["vectors"] == 4 * batches and totals["parts"] == batches
        assert max(alive for _, alive, _ in source.log) == 1 and max(device.alive_at_dispatch) == 1
        assert all(finished >= delivered - 1 for delivered, _, finished in source.log), source.log
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_progress_line_gives_rate_and_an_eta_in_days(capsys):
    assert [encode.format_duration(s) for s in (0, 59.6, 3600 * 25, 86_399, 2 * 86_400 + 61)] == [
        "00:00:00", "00:01:00", "1d 01:00:00", "23:59:59", "2d 00:01:01"]  # fmt: skip
    now = [0.0]
    progress = encode.Progress("images", 1000, 1_001_000, devices=4, every_seconds=10, clock=lambda: now[0])
    now[0] = 5.0
    progress.update(50, 0)  # before every_seconds: nothing printed
    now[0] = 10.0
    progress.update(50, 10)  # 100 vectors in 10 s: 10/s; (1,001,000 - 1,100 - 10) / 10 s = 99,989 s
    now[0] = 20.0
    progress.update(0, 10, final=True)
    assert capsys.readouterr().out == (
        "images: 1,100 vectors, 10.0/s (2.5/s per device), 10 skipped, ETA 1d 03:46:29\n"
        "images: 1,100 vectors (100 this run), 5.0/s (1.2/s per device), 10 skipped\n"
    )


@pytest.mark.parametrize("data_format", ["webdataset", "array_record"])
def test_encode_command_path_counts_bad_samples_in_meta(tmp_path, data_format, capsys):
    """The corrupt shards (or their ArrayRecord conversion) through the command's own data path and
    `encode.encode_collection`, with `max_consecutive_skips=0` (training would stop at the first bad sample):
    nothing is fatal, meta.json counts the skips by reason, every good image is encoded once. A directory of
    ArrayRecord files given without `.array_record` is one line saying how to name them."""
    expected = write_corrupt_shards(str(tmp_path / "tars"))
    spec = str(tmp_path / "tars")
    config = configlib.load_config(local_cluster.TINY_CONFIG)
    with config.data.unlocked():
        config.data.update(num_workers=0, image_size=32, max_consecutive_skips=0, **expected["limits"])
    if data_format == "array_record":
        array_record.convert(expected["shards"], str(tmp_path / "records"))
        code = cli.main(["encode", "--config", local_cluster.TINY_CONFIG, "--images", str(tmp_path / "records"),
                         "--out", str(tmp_path / "unused")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"lexvla encode: --images '{tmp_path}/records' holds ArrayRecord files, no .tar"), err
        assert err.endswith(f"pass '{tmp_path}/records/*.array_record'\n")
        spec = str(tmp_path / "records" / "*.array_record")
    paths = encode_command.image_paths(spec, config)
    assert encode_command.image_format(spec, config) == data_format
    device, out = FakeDevice(FakeEncoder.colours(), 4), str(tmp_path / "out")
    meta = encode.prepare_out(out, {"words": device.encoder.words, "scale": 1000})
    images = lambda: encode_command.image_source(config, spec, paths, device)  # noqa: E731
    encode.encode_collection(out, meta, device, {"images": images}, part_size=8)
    saved = json.loads((tmp_path / "out" / "meta.json").read_text())["kinds"]["images"]
    caption_skips = ("missing_caption", "empty_caption", "non_utf8_caption")  # an image without a caption is kept
    assert saved["skipped"] == {r: 0 if r in caption_skips else n for r, n in expected["skipped"].items()}
    keys = sorted([*expected["good_keys"], "bad_nocaption", "bad_emptycaption", "bad_latin1"])
    assert saved["vectors"] == len(keys) and sorted(read_parts(tmp_path / "out" / "images")) == keys


def test_a_process_with_an_empty_share_writes_nothing_and_finishes(tmp_path):
    """One shard for two processes, ArrayRecord with fewer records than processes, a tar with no sample: no batch
    and no error (not "the training data yielded no samples"); `encode_kind` on an empty share finishes its
    ledger with no part file."""
    expected = write_corrupt_shards(str(tmp_path / "tars"))
    shard = expected["shards"][-1]  # 4 good samples
    empty_tar = str(tmp_path / "empty.tar")
    tarfile.open(empty_tar, "w").close()
    array_record.convert([shard], str(tmp_path / "records"))
    records = corpus.image_shards(str(tmp_path / "records" / "*.array_record"), "array_record")
    config = configlib.load_config(local_cluster.TINY_CONFIG).data
    with config.unlocked():
        config.update(num_workers=0, image_size=32)
    assert [len(b["key"]) for b in corpus.image_batches(config, [shard], 4, 0, 2)] == [4]
    for paths, data_format, process, count in (([shard], "webdataset", 1, 2), (records, "array_record", 4, 5),
                                               ([empty_tar], "webdataset", 0, 1)):  # fmt: skip
        with config.unlocked():
            config.format = data_format
        batches = corpus.image_batches(config, paths, 4, process, count)
        assert list(batches) == [] and not any(batches.skip_counts.values())
    with config.unlocked():
        config.format = "webdataset"
    out = tmp_path / "out"
    totals = encode_images(out, corpus.image_batches(config, [shard], 4, 1, 2), FakeDevice(FakeEncoder.colours(), 4))
    assert totals["vectors"] == 0 and totals["parts"] == 0 and parts.part_files(out / "images") == []
    assert json.loads((out / "images" / "progress-00000.json").read_text())["finished"]
