"""`lexvla encode` end to end: 1 process × 8 devices against 2 processes × 4, each killed mid-way and resumed; the
vectors against the model's own dense encoder; export through the same path; index and search over the parts;
parts written to a `gs://` emulator. One short training run (2 steps) is shared by every test here."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from support import local_cluster
from support.corrupt_data import write_corrupt_shards

from lexvla_jax import cli, configlib, inference
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
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    if processes > 1:
        command.append("--config.dist.mode=explicit")
        env.update(LEXVLA_COORDINATOR=f"127.0.0.1:{local_cluster.free_port()}", LEXVLA_NUM_PROCESSES=str(processes))
    runs = []
    for i in range(processes):
        log = f"{out}.log{i}"
        with open(log, "w") as f:
            proc = subprocess.Popen(command, env={**env, "LEXVLA_PROCESS_ID": str(i)}, stdout=f,
                                    stderr=subprocess.STDOUT, cwd=local_cluster.REPO)  # fmt: skip
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


@pytest.fixture(scope="session")
def encoded(trained, tmp_path_factory):
    """The collection encoded by 1 process × 8 devices and by 2 × 4 (gzip parts), each SIGKILLed once every
    process had recorded a part, then run again to the end."""
    root = tmp_path_factory.mktemp("encoded")
    result = {}
    for name, processes, devices, args in (("one", 1, 8, ()), ("two", 2, 4, ("--gzip",))):
        out = root / name
        ledgers = kill_after_first_parts(start_encode(trained, out, processes, devices, *args), out, processes)
        outputs = finish(start_encode(trained, out, processes, devices, *args))
        result[name] = {"out": str(out), "killed_ledgers": ledgers, "outputs": outputs}
    return result


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_encode_what_one_does_after_kill_and_resume(encoded):
    for name in ("one", "two"):
        ledgers = encoded[name]["killed_ledgers"]
        assert all(not ledger["finished"] and 1 <= ledger["parts"] for ledger in ledgers.values()), ledgers
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


def test_parts_are_whole_or_absent_and_unfinished_collections_are_refused(tmp_path):
    words = ["red", "circle", "red"]
    impacts = export.quantise(np.array([[0.5, 0.25, 0.0], [0.0, 0.0, 0.75]], np.float32))
    writer = parts.PartWriter(tmp_path / "images", 0, words, compress=True)
    writer.add(["a", "b"], ["x", "y"], impacts)
    assert list((tmp_path / "images").glob("part-*")) == [tmp_path / "images" / "part-00000-00000.jsonl.gz.tmp"]
    assert writer.finish_part() == "part-00000-00000.jsonl.gz" and writer.finish_part() is None
    writer.add(["c"], ["z"], impacts[[0]])  # a part that is never finished, then a rerun from the ledger's part 1
    parts.PartWriter(tmp_path / "images", 0, words, next_part=1).remove_unrecorded()
    assert [p.name for p in (tmp_path / "images").glob("part-*")] == ["part-00000-00000.jsonl.gz"]
    with pytest.raises(parts.CollectionError, match="has no meta.json beside it"):
        parts.read_collection(tmp_path / "images")
    meta = {"words": words, "scale": 1000, "sparsification": {}, "kinds": {"images": {"finished": False}}}
    parts.write_json(epath.Path(tmp_path) / "meta.json", meta)
    with pytest.raises(parts.CollectionError, match="run the same `lexvla encode` again to finish it"):
        parts.read_collection(tmp_path / "images")
    meta["kinds"]["images"]["finished"] = True
    parts.write_json(epath.Path(tmp_path) / "meta.json", meta)
    collection = parts.read_collection(tmp_path / "images")
    assert collection.ids == ["a", "b"] and (collection.matrix != impacts).nnz == 0
    assert read_parts(tmp_path / "images")["b"] == {"red@2": 750}


@pytest.mark.slow
def test_encode_writes_parts_and_meta_to_gcs(gcs_emulator, trained, tmp_path, monkeypatch, capsys):
    """`lexvla encode --out gs://…` (the eval shards and the texts): parts, ledgers and meta.json in the bucket
    through epath, nothing local, and the vectors of a local run of the same command."""
    monkeypatch.chdir(tmp_path)
    data_dir, workdir, texts = trained
    out = gcs_emulator.new_workdir()
    args = ["encode", *config_args(data_dir), "--workdir", workdir, "--texts", texts]
    args += ["--images", os.path.join(data_dir, "eval"), "--part-size", "16"]
    assert cli.main([*args, "--out", out]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "local")]) == 0
    objects = gcs_emulator.objects(out)
    assert sorted(objects) == sorted(
        ["meta.json", "images/part-00000-00000.jsonl", "images/part-00000-00001.jsonl", "images/progress-00000.json",
         "texts/part-00000-00000.jsonl", "texts/progress-00000.json"]
    )  # fmt: skip
    for kind in ("images", "texts"):
        assert read_parts(f"{out}/{kind}") == read_parts(tmp_path / "local" / kind)
    assert len(parts.read_collection(f"{out}/images").ids) == 24
    assert not [name for name in os.listdir(tmp_path) if name in ("gs:", "gs")]
