"""Input pipeline: bad samples skipped and counted exactly, exactly-once reading, exact resume, eval sets."""

import io
import json
import multiprocessing
import os
import tarfile
import time
from collections import Counter

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from support import corrupt_data

from lexvla_jax.data import (
    array_record,
    device_batch,
    eval_set,
    pipeline,
    records,
    streams,
    tar_reader,
    transforms,
)
from lexvla_jax.data.config import DataConfigError, default_data_config, resolve_shards
from lexvla_jax.data.shuffle import WindowShuffleDataset
from lexvla_jax.data.webdataset import shards_for_process
from lexvla_jax.miniature import synthetic
from lexvla_jax.models import image_norm
from lexvla_jax.sharding import DEFAULT_RULES
from lexvla_jax.text.prompt import DEFAULT_PROMPT, PromptEncoder
from lexvla_jax.text.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.make_synthetic(out, num_train=400, num_eval=30, seed=0, image_size=64, shard_size=100)
    return out


@pytest.fixture(scope="session")
def corrupt(tmp_path_factory):
    return corrupt_data.write_corrupt_shards(str(tmp_path_factory.mktemp("corrupt")))


@pytest.fixture(scope="session")
def prompt(synthetic_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    tokenizer = train_tokenizer([*synthetic.all_captions(synthetic_dir), DEFAULT_PROMPT], 320, path)
    return PromptEncoder(tokenizer, max_caption_tokens=24)


def data_config(shards, **overrides):
    config = default_data_config()
    config.train_shards = shards
    config.update({**dict(image_size=32, num_workers=0, shuffle_buffer=8, interleave_shards=2), **overrides})
    return config


def read_all(config, batch_size, prompt, **kwargs):
    iterator = pipeline.train_iterator(config, batch_size, prompt_encoder=prompt, drop_remainder=False, **kwargs)
    batches = list(iterator)
    iterator.close()
    return batches, iterator


# ------------------------------------------------------------------------------------------- tar reading


def test_tar_reader_resumes_at_sample_offsets(synthetic_dir):
    path = os.path.join(synthetic_dir, "train", "shard-00000.tar")
    with open(path, "rb") as f:
        samples = list(tar_reader.iter_samples(f))
        assert len(samples) == 100 and samples[-1].resume == tar_reader.END
        assert all(sorted(s.files) == ["jpg", "json", "txt"] and s.error is None for s in samples)
        for i in (0, 1, 57, 98):
            resumed = list(tar_reader.iter_samples(f, samples[i].resume))
            assert [s.key for s in resumed] == [s.key for s in samples[i + 1 :]]
            assert resumed[0].files == samples[i + 1].files


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_long_and_unicode_names(tmp_path, fmt):
    folder = "d" * 120 + "/sub"
    names = [f"{folder}/k1.jpg", f"{folder}/k1.txt", "ünïcode.seg.png", "ünïcode.txt", "__index__.json"]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name.encode())
            tar.addfile(info, io.BytesIO(name.encode()))
    samples = list(tar_reader.iter_samples(io.BytesIO(out.getvalue())))
    assert [(s.key, sorted(s.files)) for s in samples] == [
        (f"{folder}/k1", ["jpg", "txt"]),
        ("ünïcode", ["seg.png", "txt"]),
    ]
    assert samples[1].files["seg.png"] == "ünïcode.seg.png".encode()


# ------------------------------------------------------------------------------------------ bad samples


@pytest.mark.parametrize("process_count", [1, 2])
def test_bad_samples_skipped_counted_and_good_ones_read_once(corrupt, prompt, process_count):
    config = data_config(corrupt["shards"], num_epochs=1, **corrupt["limits"])
    keys, skipped = [], Counter()
    for process_index in range(process_count):
        batches, iterator = read_all(
            config, 4 * process_count, prompt, process_index=process_index, process_count=process_count, keep_keys=True
        )
        keys += [k for b in batches for k in b["key"]]
        skipped.update(iterator.skip_counts)
        assert sum(int(b["skipped"].sum()) for b in batches) == sum(iterator.skip_counts.values())
        batch = batches[0]
        assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (32, 32, 3)
        assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape[1] == prompt.max_length
        assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert sorted(keys) == corrupt["good_keys"]  # every good sample, once, across the processes
    assert dict(skipped) == corrupt["skipped"]
    assert set(corrupt["skipped"]) == set(records.SKIP_REASONS) and all(corrupt["skipped"].values())


def test_to_rgb_modes():
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(transforms.to_rgb(la)) == 255).all()  # transparent → white
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    out = np.asarray(transforms.to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    np.testing.assert_allclose(out[0, 0], [228, 127, 127], atol=2)  # half red over white
    wide = Image.fromarray(np.array([[0, 32768, 65535, 257]], np.uint16))
    assert wide.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(transforms.to_rgb(wide))[0, :, 0], [0, 128, 255, 1])
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(transforms.to_rgb(palette))[0], [[255, 255, 255], [0, 0, 255]])
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    np.testing.assert_array_equal(np.asarray(transforms.to_rgb(cmyk))[0, 0], [255, 0, 0])


def test_mode_variants_decode_like_the_original(corrupt):
    pixels = np.asarray(Image.open(io.BytesIO(synthetic.make_sample(0, "train", 3, "k", 64)["jpg"])).convert("RGB"))
    gray = np.asarray(Image.fromarray(pixels).convert("L")).astype(float)
    for name, (_, data) in corrupt_data.mode_variants(pixels).items():
        decoded = transforms.load_image(data, 64, max_pixels=10**6, min_size=1, crop_pct=1.0).astype(float)
        reference = np.repeat(gray[..., None], 3, -1) if name in ("gray", "la", "i16") else pixels
        if name == "palette":  # palette index 0 is transparent: composited on white
            continue
        assert np.abs(decoded - reference).mean() < 6, name


def test_random_resized_crop_box_in_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = transforms.random_resized_crop_box(500, 375, rng, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 375
        assert 0.29 <= (x1 - x0) * (y1 - y0) / (500 * 375) <= 1.0
        assert 3 / 4 - 0.02 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 0.02
    # A very wide image falls back to the widest allowed centred box.
    assert transforms.random_resized_crop_box(1000, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 506, 10)


def test_jpeg_draft_mode_matches_full_decode():
    y, x = np.mgrid[0:750, 0:1000]
    pixels = np.stack([x * 255 // 1000, y * 255 // 750, (x + y) % 256], -1).astype(np.uint8)
    jpeg = synthetic.encode_jpeg(pixels)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")  # same pixels, no draft mode
    image = transforms.open_image(jpeg, max_pixels=10**7, min_size=1)
    fast = transforms.crop_resize(image, (100, 50, 900, 700), 64, draft=True)
    assert image.size == (125, 94)  # decoded at 1/8 scale: the 800x650 crop is still 100x81 >= 64
    slow = transforms.crop_resize(
        transforms.open_image(png.getvalue(), max_pixels=10**7, min_size=1), (100, 50, 900, 700), 64
    )
    assert np.abs(fast.astype(float) - slow).mean() < 3


def test_flip_mirrors_image_and_swaps_left_right(prompt):
    assert transforms.swap_left_right("Left of a bright, right of the left") == "Right of a bright, left of the right"
    files = synthetic.make_sample(0, "train", 0, "k", 64)
    caption = "a small red circle left of a large blue square"
    files["txt"] = caption.encode()
    kwargs = dict(image_size=32, train=True, min_image_size=1, max_image_pixels=10**6, prompt_encoder=prompt)
    plain = transforms.SampleDecoder(random_flip=False, **kwargs)
    flipping = transforms.SampleDecoder(random_flip=True, **kwargs)
    flips = 0
    for seed in range(8):
        sample = records.raw_sample("k", files, None, [seed])
        a, b = plain(sample), flipping(sample)
        flipped = not np.array_equal(a["image"], b["image"])
        flips += flipped
        expected = transforms.swap_left_right(caption) if flipped else caption
        np.testing.assert_array_equal(b["image"], a["image"][:, ::-1] if flipped else a["image"])
        np.testing.assert_array_equal(b["input_ids"], prompt(expected)[0])
    assert 0 < flips < 8


@pytest.mark.slow
def test_closing_mid_stream_lets_every_data_worker_exit_on_its_own(synthetic_dir, prompt):
    """Closed after a few batches, while the worker is still producing, each data worker exits by itself (exit
    code 0), never killed: without emptying its queue while it stops, about one close in four left a worker
    blocked on a half-sent batch until grain (or the close's timeout) killed it."""
    config = data_config(os.path.join(synthetic_dir, "train"), num_workers=1)
    for _ in range(6):
        iterator = pipeline.train_iterator(config, 16, prompt_encoder=prompt)
        for _ in range(3):
            next(iterator)
        time.sleep(0.5)  # the worker fills its queue meanwhile
        workers = multiprocessing.active_children()
        iterator.close(timeout=60)
        assert workers and [w.exitcode for w in workers] == [0] * len(workers)


# --------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_orbax_checkpoint_is_exact(corrupt, prompt, tmp_path, num_workers):
    """Two epochs with a restart mid-way: the batches after the restore equal the uninterrupted ones."""
    config = data_config(corrupt["shards"], num_epochs=2, num_workers=num_workers, **corrupt["limits"])
    manager = ocp.CheckpointManager(
        str(tmp_path / "ckpt"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": streams.StreamsCheckpointHandler()},
    )
    tree = {"w": np.arange(4.0)}
    k = 5
    iterator = pipeline.train_iterator(config, 4, prompt_encoder=prompt, keep_keys=True, drop_remainder=False)
    before = [next(iterator) for _ in range(k)]
    manager.save(k, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), data=streams.StreamsSave(iterator)))
    manager.wait_until_finished()
    after = list(iterator)
    totals = iterator.skip_counts
    iterator.close()

    restored_iterator = pipeline.train_iterator(config, 4, prompt_encoder=prompt, keep_keys=True, drop_remainder=False)
    restored = manager.restore(
        k,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(tree), data=streams.StreamsRestore(restored_iterator)),
    )
    np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
    resumed = list(restored_iterator)
    restored_iterator.close()
    manager.close()

    assert len(resumed) == len(after) > 0
    for a, b in zip(after, resumed, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert restored_iterator.skip_counts == totals
    keys = Counter(k for b in before + after for k in b["key"])
    assert sorted(keys) == corrupt["good_keys"] and set(keys.values()) == {2}  # each good sample once per epoch
    assert totals == {reason: 2 * n for reason, n in corrupt["skipped"].items()}
    images = {}
    for batch in before + after:
        for key, image in zip(batch["key"], batch["image"], strict=True):
            images.setdefault(key, []).append(image)
    differ = sum(not np.array_equal(*pair) for pair in images.values())
    assert differ >= 0.8 * len(images)  # each epoch crops and flips afresh


def test_window_shuffle_permutes_windows_and_resumes_anywhere():
    source = grain.MapDataset.range(23).to_iter_dataset()
    shuffled = WindowShuffleDataset(source, window=5, seed=1)
    iterator = iter(shuffled)
    out, states = [], []
    for element in iterator:
        states.append(iterator.get_state())
        out.append(element)
    assert out != list(range(23))
    assert [sorted(out[i : i + 5]) for i in range(0, 23, 5)] == [
        list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)
    ]
    assert out[:5] != [e for e in WindowShuffleDataset(source, window=5, seed=2)][:5]
    for k, state in enumerate(states):
        resumed = iter(shuffled)
        resumed.set_state(json.loads(json.dumps(state)))
        assert list(resumed) == out[k + 1 :], k


def test_shard_specs_expand_braces_lists_and_directories(synthetic_dir):
    train = os.path.join(synthetic_dir, "train")
    expected = [os.path.join(train, f"shard-{i:05d}.tar") for i in range(4)]
    assert resolve_shards(train, "f") == expected
    assert resolve_shards(os.path.join(train, "shard-{00001..00002}.tar"), "f") == expected[1:3]
    assert resolve_shards(f"{expected[3]},{train}/*0.tar", "f") == [expected[3], expected[0]]
    assert resolve_shards(expected[:2], "f") == expected[:2]


def test_epochs_reshuffle_shards_and_split_them_across_processes():
    shards = [f"s{i}" for i in range(10)]
    epoch0 = [shards_for_process(shards, 0, 0, i, 3) for i in range(3)]
    assert sorted(sum(epoch0, [])) == shards and [len(s) for s in epoch0] == [4, 3, 3]
    assert epoch0 != [shards_for_process(shards, 0, 1, i, 3) for i in range(3)]
    with pytest.raises(DataConfigError, match="2 shard"):
        shards_for_process(shards[:2], 0, 0, 0, 3)


# ---------------------------------------------------------------------------------------- ArrayRecord


def test_array_record_matches_webdataset_and_resumes(corrupt, prompt, tmp_path):
    totals = array_record.convert(corrupt["shards"], str(tmp_path), workers=1)
    assert totals["records"] == len(corrupt["good_keys"]) + sum(corrupt["skipped"].values())  # one per sample
    assert {k: totals[k] for k in ("truncated_member", "truncated_tar", "corrupt_tar")} == {
        "truncated_member": 1,
        "truncated_tar": 1,
        "corrupt_tar": 1,
    }
    config = data_config(str(tmp_path), format="array_record", num_epochs=2, **corrupt["limits"])
    keys, skipped = [], Counter()
    for process_index in range(2):
        batches, iterator = read_all(config, 6, prompt, process_index=process_index, process_count=2, keep_keys=True)
        keys += [k for b in batches for k in b["key"]]
        skipped.update(iterator.skip_counts)
    assert Counter(keys) == Counter({k: 2 for k in corrupt["good_keys"]})
    assert dict(skipped) == {reason: 2 * n for reason, n in corrupt["skipped"].items()}

    reference, _ = read_all(config, 4, prompt, keep_keys=True)
    epoch = len(corrupt["good_keys"]) // 4
    first, second = (
        [k for b in reference for k in b["key"]][: 4 * epoch],
        [k for b in reference for k in b["key"]][-4 * epoch :],
    )
    assert first != second  # reshuffled each epoch

    iterator = pipeline.train_iterator(config, 4, prompt_encoder=prompt, keep_keys=True, drop_remainder=False)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = pipeline.train_iterator(config, 4, prompt_encoder=prompt, keep_keys=True, drop_remainder=False)
    resumed.set_state(state)
    for a, b in zip(reference[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["key"], b["key"])


# ---------------------------------------------------------------------------------------- start-up errors


def test_sources_that_yield_nothing_fail_clearly(tmp_path, prompt):
    with pytest.raises(DataConfigError, match="does not exist"):
        resolve_shards(str(tmp_path / "missing"), "config.data.train_shards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataConfigError, match="matches no .tar files"):
        pipeline.make_train_dataset(data_config(str(tmp_path / "empty")), 4, prompt)
    with pytest.raises(DataConfigError, match="not set"):
        resolve_shards(None, "config.data.train_shards")
    empty_tars = tmp_path / "empty_tars"
    empty_tars.mkdir()
    for i in range(2):
        (empty_tars / f"{i}.tar").write_bytes(synthetic.tar_bytes([])[0])
    iterator = pipeline.train_iterator(data_config(str(empty_tars)), 4, prompt_encoder=prompt)
    with pytest.raises(DataConfigError, match="hold no samples"):
        next(iterator)
    with pytest.raises(DataConfigError, match="yielded no samples"):
        next(pipeline.train_iterator(data_config(str(empty_tars), num_epochs=1), 4, prompt_encoder=prompt))
    with pytest.raises(DataConfigError, match="processes"):
        pipeline.make_train_dataset(data_config(str(empty_tars)), 4, prompt, process_index=0, process_count=3)


def test_only_bad_samples_is_an_error_not_a_hang(tmp_path, prompt):
    members = synthetic.sample_members("a", {"txt": b"caption only"})
    (tmp_path / "bad.tar").write_bytes(synthetic.tar_bytes(members)[0])
    iterator = pipeline.train_iterator(data_config(str(tmp_path), max_consecutive_skips=50), 4, prompt_encoder=prompt)
    with pytest.raises(DataConfigError, match="51 bad samples in a row"):
        next(iterator)


# ------------------------------------------------------------------------------------------ on device


def test_global_batch_and_normalisation():
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    local = {
        "image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
        "input_ids": rng.integers(0, 100, (16, 5), dtype=np.int32),
        "attention_mask": np.ones((16, 5), np.int32),
        "skipped": np.zeros(len(records.SKIP_REASONS), np.int64),
    }
    batch = device_batch.make_global_batch(local, mesh, DEFAULT_RULES)
    assert set(batch) == {"image", "input_ids", "attention_mask"}
    assert batch["image"].sharding.spec[0] == ("data", "fsdp")
    assert len(batch["input_ids"].addressable_shards) == 8 and batch["input_ids"].addressable_shards[0].data.shape == (
        2,
        5,
    )
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    normalised = np.asarray(jax.jit(image_norm.normalize_images)(batch["image"]))
    expected = (local["image"] / 255.0 - np.array(image_norm.IMAGENET_MEAN)) / np.array(image_norm.IMAGENET_STD)
    np.testing.assert_allclose(normalised, expected, atol=1e-5)
    with pytest.raises(DataConfigError, match="not divisible"):
        device_batch.make_global_batch({"image": local["image"][:6]}, mesh, DEFAULT_RULES)


# ------------------------------------------------------------------------------------------- eval sets


def test_webdataset_eval_set_has_all_captions(synthetic_dir, prompt):
    config = data_config(None)
    records = eval_set.image_text_records({"format": "webdataset", "shards": os.path.join(synthetic_dir, "eval")}, "x")
    data = eval_set.read_image_text_set(records, config, captions_per_image=5)
    n = 30
    assert data["image"].shape == (n, 32, 32, 3) and len(data["captions"]) == 5 * n
    np.testing.assert_array_equal(data["image_of_text"], np.repeat(np.arange(n), 5))
    with tarfile.open(os.path.join(synthetic_dir, "eval", "shard-00000.tar")) as tar:
        meta = json.loads(tar.extractfile("000000007.json").read())
        jpg = tar.extractfile("000000007.jpg").read()
    assert data["keys"][7] == "000000007" and data["captions"][35:40] == meta["captions"]
    expected = transforms.load_image(jpg, 32, max_pixels=10**6, min_size=1, **eval_set.eval_transform(config))
    np.testing.assert_array_equal(data["image"][7], expected)
    assert sum(data["skipped"].values()) == 0


def test_karpathy_eval_set(tmp_path, prompt):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    images = []
    for i in range(4):
        name = f"img{i}.jpg"
        data = synthetic.make_sample(1, "eval", i, name, 48)["jpg"] if i != 2 else b"broken"
        (root / "val2014" / name).write_bytes(data)
        sentences = [{"raw": f"caption {j} of image {i}"} for j in range(6 if i == 0 else 5)]
        images.append(
            {"filepath": "val2014", "filename": name, "split": "train" if i == 3 else "test", "sentences": sentences}
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    source = {
        "format": "karpathy",
        "json": str(tmp_path / "dataset_coco.json"),
        "image_root": str(root),
        "split": "test",
    }
    records = eval_set.image_text_records(source, "config.evals.coco")
    data = eval_set.read_image_text_set(records, data_config(None), captions_per_image=5)
    assert data["keys"] == ["img0.jpg", "img1.jpg"] and data["image"].shape == (2, 32, 32, 3)
    assert data["captions"][:5] == [f"caption {j} of image 0" for j in range(5)]  # 6 sentences → first 5
    np.testing.assert_array_equal(data["image_of_text"], [0] * 5 + [1] * 5)
    assert data["skipped"]["undecodable_image"] == 1


# ------------------------------------------------------------------------------------------ synthetic set


def test_synthetic_set_is_deterministic_and_img2dataset_shaped(synthetic_dir, tmp_path):
    synthetic.make_synthetic(str(tmp_path), num_train=100, num_eval=30, seed=0, image_size=64, shard_size=100)
    for split in ("train", "eval"):
        a = open(os.path.join(synthetic_dir, split, "shard-00000.tar"), "rb").read()
        assert a == open(tmp_path / split / "shard-00000.tar", "rb").read()
    manifest = json.load(open(os.path.join(synthetic_dir, "manifest.json")))
    assert manifest["train"]["shards"] == [f"train/shard-{i:05d}.tar" for i in range(4)]
    assert synthetic.exists(synthetic_dir) and not synthetic.exists(str(tmp_path / "nothing"))
    other = synthetic.make_sample(1, "train", 0, "k", 64)
    assert other["jpg"] != synthetic.make_sample(0, "train", 0, "k", 64)["jpg"]
    with tarfile.open(os.path.join(synthetic_dir, "train", "shard-00001.tar")) as tar:
        assert tar.getnames()[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"]
        meta = json.loads(tar.extractfile("000010000.json").read())
        assert tar.extractfile("000010000.txt").read().decode() == meta["caption"]
    assert meta["status"] == "success" and meta["width"] == meta["height"] == 64 and meta["key"] == "000010000"


def test_synthetic_captions_describe_the_pixels(synthetic_dir):
    captions = []
    with tarfile.open(os.path.join(synthetic_dir, "eval", "shard-00000.tar")) as tar:
        for name in tar.getnames():
            key, ext = name.split(".", 1)
            if ext != "json":
                continue
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            pixels = np.asarray(Image.open(tar.extractfile(f"{key}.jpg")).convert("RGB")).astype(int)
            for obj in meta["objects"]:
                x0, y0, x1, y1 = obj["bbox"]
                centre = pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]
                assert np.abs(centre - synthetic.COLORS[obj["color"]]).max() < 60, (key, obj)
                assert obj["color"] in meta["caption"] and obj["shape"] in meta["caption"]
            assert len(set(meta["captions"])) == 5 and meta["captions"][0] == meta["caption"]
            captions.append(meta["caption"])
    scenes = [synthetic.random_scene(np.random.default_rng([0, 1, i])) for i in range(500)]
    canonical = [synthetic.captions_for(s)[0] for s in scenes]
    assert len(set(canonical)) >= 490  # eval captions rarely collide


# ------------------------------------------------------------------------------------------------- CLI


def test_inspect_data_cli(corrupt, tmp_path, capsys):
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import ml_collections\n"
        "from lexvla_jax.data.config import default_data_config\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.data = default_data_config()\n"
        f"    c.data.train_shards = {corrupt['shards']!r}\n"
        f"    c.data.update({corrupt['limits']!r})\n"
        "    c.data.update(dict(image_size=32, num_workers=0, shuffle_buffer=4, num_epochs=1))\n"
        "    c.train = dict(global_batch_size=4)\n"
        "    return c\n"
    )
    from lexvla_jax import cli

    assert cli.main(["inspect-data", "--config", str(config_file), "--batches", "100"]) == 0
    out = capsys.readouterr().out
    assert f"({len(corrupt['good_keys']) // 4 * 4} samples)" in out
    assert f"samples skipped: {sum(corrupt['skipped'].values())}" in out
    assert "image_too_large    2" in out and "captions were not tokenised" in out
