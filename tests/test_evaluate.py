"""Retrieval evaluators (dense / threshold / top-k), their readers, the registry, the table and `lexvla eval`."""

import io
import json
import os
import types

import numpy as np
import pytest
from PIL import Image
from support.fake_encoder import FakeEncoder, code_of, colour_of

from lexvla_jax import cli, configlib
from lexvla_jax.data.class_set import ReadCounts
from lexvla_jax.data.config import DataConfigError, default_data_config
from lexvla_jax.evaluate import registry, retrieval, table, word_precision
from lexvla_jax.evaluate.base import EvalConfigError, entry_settings
from lexvla_jax.evaluate.classification import ClassificationEvaluator
from lexvla_jax.evaluate.patchdis import PatchDisEvaluator
from lexvla_jax.evaluate.retrieval import RetrievalEvaluator
from lexvla_jax.miniature import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**overrides):
    config = default_data_config()
    config.update({"image_size": 32, "num_workers": 0, "min_image_size": 8, **overrides})
    return config


def retrieval_evaluator(name="ret", **entry):
    return RetrievalEvaluator(name, entry_settings(name, entry, RetrievalEvaluator), data_config())


def flat_jpeg(code: int, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour_of(code)).save(out, "JPEG", quality=95)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ by hand

# V' = 4, so the default threshold is 1/√4 = 0.5; top_k = 1. One caption per image.
IMAGES = np.array([[0.9, 0.1, 0.4, 0.1], [0.1, 0.6, 0.45, 0.45]])
TEXTS = np.array([[0.2, 0.0, 0.9, 0.1], [0.6, 0.5, 0.0, 0.0]])


def test_sparse_modes_by_hand():
    scores = retrieval.retrieval_scores(IMAGES, TEXTS, np.array([0, 1]), ks=(1, 2), top_k=1)
    # Dense: image·text = [[0.55, 0.59], [0.47, 0.36]]: both images rank the other's caption first;
    # caption 0 finds image 0, caption 1 finds image 0 too.
    assert scores["dense/i2t_r@1"] == 0.0 and scores["dense/t2i_r@1"] == 0.5
    # ≥ 0.5 keeps images [0.9,0,0,0], [0,0.6,0,0] and texts [0,0,0.9,0], [0.6,0.5,0,0]: products [[0, 0.54],
    # [0, 0.3]]. Image 1 now ranks its caption first; caption 0 ties at 0 (the lower index, image 0, wins).
    assert scores["threshold/i2t_r@1"] == 0.5 and scores["threshold/t2i_r@1"] == 0.5
    assert scores["threshold/active_words_image"] == 1.0 and scores["threshold/active_words_text"] == 1.5
    # Top-1 keeps texts [0,0,0.9,0], [0.6,0,0,0]: products [[0, 0.54], [0, 0]]; image 1 ties (caption 0 first).
    assert scores["topk/i2t_r@1"] == 0.0 and scores["topk/t2i_r@1"] == 0.5
    assert scores["topk/active_words_image"] == 1.0 and scores["topk/active_words_text"] == 1.0
    assert all(scores[f"{m}/{d}_r@2"] == 1.0 for m in retrieval.MODES for d in ("i2t", "t2i"))
    assert "dense/active_words_image" not in scores


def test_chance_recall():
    # 3 images × 2 captions: a random ranking puts one of an image's 2 captions first with p = 2/6;
    # in the top 2 with p = 1 − (4/6)(3/5); k beyond the 6 texts retrieves all of them.
    assert retrieval.chance_recall(3, 2, 1) == pytest.approx({"i2t_r@1": 2 / 6, "t2i_r@1": 1 / 3})
    assert retrieval.chance_recall(3, 2, 2)["i2t_r@2"] == pytest.approx(1 - 4 / 6 * 3 / 5)
    assert retrieval.chance_recall(3, 2, 10) == {"i2t_r@10": 1.0, "t2i_r@10": 1.0}


def test_clip_benchmark_key_names():
    # CLIP_benchmark's image_retrieval_recall@k retrieves images for a text query (our t2i), and
    # text_retrieval_recall@k texts for an image query (our i2t); the hand case has i2t ≠ t2i.
    scores = retrieval.retrieval_scores(IMAGES, TEXTS, np.array([0, 1]), ks=(1,), modes=("dense",))
    assert scores["dense/image_retrieval_recall@1"] == scores["dense/t2i_r@1"] == 0.5
    assert scores["dense/text_retrieval_recall@1"] == scores["dense/i2t_r@1"] == 0.0


# ------------------------------------------------------------------------------- evaluator end to end


def reference_recall(sim: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Brute force: rank by descending similarity, lower index first among equals."""
    hits = [any(positive[q, d] for d in sorted(range(sim.shape[1]), key=lambda d: (-sim[q, d], d))[:k]) for q in
            range(sim.shape[0])]  # fmt: skip
    return float(np.mean(hits))


def reference_sparse(s: np.ndarray, mode: str, top_k: int) -> np.ndarray:
    if mode == "threshold":
        return np.where(s >= 1 / np.sqrt(s.shape[1]), s, 0)
    if mode == "topk":
        keep = np.argsort(-s, axis=1, kind="stable")[:, :top_k]
        out = np.zeros_like(s)
        np.put_along_axis(out, keep, np.take_along_axis(s, keep, axis=1), axis=1)
        return out
    return s


@pytest.fixture(scope="module")
def karpathy_coco(tmp_path_factory):
    """A COCO-layout Karpathy json: 6 test images (image i painted with code i), 2-3 captions each."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    images = []
    for i in range(7):
        name = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014" / name).write_bytes(flat_jpeg(i))
        sentences = [{"raw": f"picture {i} caption {j}"} for j in range(3 if i % 2 else 2)]
        split = "train" if i == 6 else "test"
        images.append({"filepath": "val2014", "filename": name, "split": split, "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(root / "dataset_coco.json"), str(root)


def vectors_for(data: dict, vocab: int = 32, seed: int = 1):
    """Random lexical vectors: each caption near its image, so recall is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    images = rng.random((len(data["image"]), vocab)) ** 4
    texts = images[data["image_of_text"]] + 2.0 * rng.random((len(data["captions"]), vocab)) ** 4
    normalise = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return normalise(images), normalise(texts)


def test_retrieval_evaluator_on_a_karpathy_json(karpathy_coco):
    json_path, root = karpathy_coco
    ret = retrieval_evaluator(format="karpathy", json=json_path, image_root=root, top_k=4, ks=(1, 2, 5))
    data = ret.data
    assert data["keys"] == [f"COCO_val2014_{i:012d}.jpg" for i in range(6)]  # the train image is not read
    assert [code_of(image) for image in data["image"]] == list(range(6)) and data["image"].shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(data["image_of_text"], [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5])
    assert data["captions"][2:5] == [f"picture 1 caption {j}" for j in range(3)]
    s_img, s_txt = vectors_for(data)
    encoder = FakeEncoder(
        32,
        image_vectors=dict(enumerate(s_img)),
        text_vectors=dict(zip(data["captions"], s_txt, strict=True)),
    )
    encoder.words[:2] = ["picture", "caption"]  # content words of every caption
    metrics = ret.run(encoder)
    assert encoder.calls == [("images", 6), ("texts", 15)]
    positive = data["image_of_text"][None, :] == np.arange(6)[:, None]  # [images, texts]
    for mode in retrieval.MODES:
        a, b = reference_sparse(s_img, mode, 4), reference_sparse(s_txt, mode, 4)
        for k in (1, 2, 5):
            assert metrics[f"ret/{mode}/i2t_r@{k}"] == pytest.approx(reference_recall(a @ b.T, positive, k))
            assert metrics[f"ret/{mode}/t2i_r@{k}"] == pytest.approx(reference_recall(b @ a.T, positive.T, k))
            assert metrics[f"ret/{mode}/image_retrieval_recall@{k}"] == metrics[f"ret/{mode}/t2i_r@{k}"]
        if mode != "dense":
            assert metrics[f"ret/{mode}/active_words_image"] == np.count_nonzero(a) / 6
            assert metrics[f"ret/{mode}/active_words_text"] == np.count_nonzero(b) / 15
    assert metrics["ret/topk/active_words_image"] == 4.0
    assert all(0 < metrics[f"ret/{m}/{d}_r@1"] < 1 for m in retrieval.MODES for d in ("i2t", "t2i"))
    assert metrics["ret/num_texts"] == 15 and metrics["ret/num_skipped"] == 0
    assert metrics["ret/chance/t2i_r@1"] == pytest.approx(1 / 6)
    # Word precision of the same dense vectors (top 5 words against the captions' content words).
    words = word_precision.word_precision(s_img, s_txt, data["image_of_text"], data["captions"], encoder.words)
    assert {k: metrics[f"ret/word_precision/{k}"] for k in words} == pytest.approx(words)
    assert metrics["ret/word_precision/image_random"] == pytest.approx(2 / 32)
    assert 0 < metrics["ret/word_precision/image"] < 1


def test_retrieval_counts_all_zero_text_vectors(karpathy_coco):
    json_path, root = karpathy_coco
    ret = retrieval_evaluator(format="karpathy", json=json_path, image_root=root, top_k=4)
    s_img, s_txt = vectors_for(ret.data)
    s_txt[[3, 7]] = 0.0  # e.g. bag-of-words captions with no kept word
    texts = dict(zip(ret.data["captions"], s_txt, strict=True))
    metrics = ret.run(FakeEncoder(32, image_vectors=dict(enumerate(s_img)), text_vectors=texts))
    assert metrics["ret/num_empty_texts"] == 2 and metrics["ret/num_texts"] == 15


def test_karpathy_flickr_layout_and_bad_paths(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    entries = []
    for i in range(3):
        (tmp_path / "flickr30k-images" / f"{i}.jpg").write_bytes(flat_jpeg(i, size=(50, 40)))
        sentences = [{"raw": f"flickr {i} {j}"} for j in range(5)]
        entries.append({"filename": f"{i}.jpg", "split": "test" if i else "val", "sentences": sentences})
    json_path = tmp_path / "dataset_flickr30k.json"
    json_path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    root = str(tmp_path / "flickr30k-images")
    data = retrieval_evaluator(format="karpathy", json=str(json_path), image_root=root).data
    assert data["keys"] == ["1.jpg", "2.jpg"] and len(data["captions"]) == 10
    with pytest.raises(DataConfigError, match=r"^config.evals.ret.json='.*nope.json' does not exist; point it at"):
        retrieval_evaluator(format="karpathy", json=str(tmp_path / "nope.json"), image_root=root)
    with pytest.raises(DataConfigError, match=r"^config.evals.ret.image_root='.*gone' does not exist"):
        retrieval_evaluator(format="karpathy", json=str(json_path), image_root=str(tmp_path / "gone"))
    with pytest.raises(DataConfigError, match=r"no images with split='restval'; check config.evals.ret.split"):
        retrieval_evaluator(format="karpathy", json=str(json_path), image_root=root, split="restval")
    # An image root that exists but is not the one the json's paths start from; then one image file missing.
    wrong = rf"^config.evals.ret.image_root='{tmp_path}' does not hold the json's images \(.*1.jpg does not exist\)"
    with pytest.raises(DataConfigError, match=wrong + "; point it at the folder the json's filename paths start from$"):
        retrieval_evaluator(format="karpathy", json=str(json_path), image_root=str(tmp_path))
    os.remove(os.path.join(root, "2.jpg"))
    with pytest.raises(DataConfigError, match=r"^config.evals.ret: 2.jpg: \[Errno 2\] No such file or directory: .*$"):
        retrieval_evaluator(format="karpathy", json=str(json_path), image_root=root)


def test_karpathy_coco_image_root_is_the_folder_above_filepath(karpathy_coco):
    json_path, root = karpathy_coco
    message = r"image_root='.*val2014' does not hold the json's images \(.*val2014/val2014/COCO_val2014_000000000000"
    with pytest.raises(DataConfigError, match=message + r".*the json's filepath/filename paths start from$"):
        retrieval_evaluator(format="karpathy", json=json_path, image_root=os.path.join(root, "val2014"))


def test_tfds_array_record_reader(tmp_path):
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                out = io.BytesIO()
                Image.new("RGB", (48, 36), colour_of(i)).save(out, "PNG")
                captions = [{"text": f"tfds {i} {j}", "id": j} for j in range(1 + i)]
                yield i, {"image": out.getvalue(), "captions": captions}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ret = retrieval_evaluator(format="tfds", tfds_name="tiny_captions", tfds_data_dir=str(tmp_path))
    data = ret.data
    codes = [code_of(image) for image in data["image"]]
    assert sorted(codes) == [0, 1, 2, 3] and data["image"].shape == (4, 32, 32, 3)
    for index, code in enumerate(codes):  # every image keeps its own captions, whatever order TFDS stored
        captions = [c for c, i in zip(data["captions"], data["image_of_text"], strict=True) if i == index]
        assert captions == [f"tfds {code} {j}" for j in range(1 + code)]
    assert data["keys"] == [f"test[{i}]" for i in range(4)]
    with pytest.raises(DataConfigError, match=r"caption_key='text' is not a feature of 'tiny_captions'; it has"):
        retrieval_evaluator(format="tfds", tfds_name="tiny_captions", tfds_data_dir=str(tmp_path), caption_key="text")
    with pytest.raises(DataConfigError, match=r"^config.evals.ret: TFDS 'no_such_set' split 'test' cannot be read"):
        retrieval_evaluator(format="tfds", tfds_name="no_such_set", tfds_data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------- registry and errors


def config_with(**evals):
    config = configlib.load_config(os.path.join(REPO, "configs", "tiny.py"))
    config.data.update({"image_size": 32, "num_workers": 0})
    config.evals = evals
    return config


def test_registry_errors_are_one_line(karpathy_coco):
    json_path, root = karpathy_coco
    unknown = r"^config.evals.x.type='segmentation' is not an evaluator type; use one of retrieval, patchdis, class"
    with pytest.raises(EvalConfigError, match=unknown):
        registry.build_evaluators(config_with(x=dict(type="segmentation")))
    with pytest.raises(EvalConfigError, match=r"^config.evals.x: jsn not a field of type 'retrieval'; its fields are"):
        registry.build_evaluators(config_with(x=dict(type="retrieval", jsn=json_path)))
    with pytest.raises(EvalConfigError, match=r"config.evals.x.modes=\('dense', 'sparse'\): choose from dense"):
        registry.build_evaluators(config_with(x=dict(type="retrieval", modes=("dense", "sparse"))))
    ret = registry.build_evaluators(config_with(x=dict(type="retrieval", format="karpathy", json=json_path,
                                                       image_root=root, top_k=64)))[0]  # fmt: skip
    with pytest.raises(EvalConfigError, match=r"config.evals.x.top_k=64 exceeds the vocabulary \(V'=32\); lower it"):
        ret.run(FakeEncoder(32))
    with pytest.raises(EvalConfigError, match=r"read at config.data.image_size=32 but the model takes 64"):
        ret.run(FakeEncoder(128, image_size=64))


def test_evaluators_run_when_due(karpathy_coco):
    json_path, root = karpathy_coco
    entry = dict(type="retrieval", format="karpathy", json=json_path, image_root=root, modes=("dense",))
    config = config_with(often={**entry, "every_steps": 2}, final=entry)
    often, final = registry.build_evaluators(config)[::-1]
    assert (often.name, often.every_steps, final.every_steps) == ("often", 2, 0)
    s_img, s_txt = vectors_for(often.data)
    encoder = FakeEncoder(32, image_vectors=dict(enumerate(s_img)),
                          text_vectors=dict(zip(often.data["captions"], s_txt, strict=True)))  # fmt: skip
    at_4 = registry.run_evaluators([final, often], encoder, step=4)
    assert {k.split("/")[0] for k in at_4} == {"often"} and not registry.run_evaluators([final, often], encoder, step=3)
    everything = registry.run_evaluators([final, often], encoder)
    assert everything["final/dense/i2t_r@1"] == everything["often/dense/i2t_r@1"] and "final/seconds" in everything


# -------------------------------------------------------------------------------------------- the table


def test_table_is_laid_out_like_the_papers(karpathy_coco):
    json_path, root = karpathy_coco
    entry = dict(type="retrieval", format="karpathy", json=json_path, image_root=root)
    config = config_with(coco={**entry, "label": "MSCOCO 5k"}, flickr={**entry, "label": "Flickr30k 1k"})
    evaluators = registry.build_evaluators(config)  # in name order
    metrics = {}
    for name, base in (("coco", 0.554), ("flickr", 0.839)):
        for mode, shift in (("dense", 0.0), ("threshold", -0.01), ("topk", 0.002)):
            for i, k in enumerate((1, 5, 10)):
                metrics[f"{name}/{mode}/i2t_r@{k}"] = base + shift + 0.1 * i
                metrics[f"{name}/{mode}/t2i_r@{k}"] = base - 0.15 + shift + 0.1 * i
            if mode != "dense":
                metrics[f"{name}/{mode}/active_words_image"] = 1081.25 if mode == "threshold" else 512
                metrics[f"{name}/{mode}/active_words_text"] = 35.5 if mode == "threshold" else 512
    for key, value in (("image", 0.9), ("image_random", 0.046), ("text", 0.95), ("text_random", 0.033)):
        metrics[f"coco/word_precision/{key}"] = value
    lines = table.format_results(evaluators, metrics).splitlines()
    assert lines[0].split() == ["Retrieval", "(%)", "MSCOCO", "5k", "Flickr30k", "1k"]
    assert lines[1].split() == ["image-to-text", "text-to-image"] * 2
    assert lines[2].split() == ["vectors"] + ["R@1", "R@5", "R@10"] * 4
    assert lines[3].split() == ["dense", "55.4", "65.4", "75.4", "40.4", "50.4", "60.4",
                                "83.9", "93.9", "103.9", "68.9", "78.9", "88.9"]  # fmt: skip
    assert lines[4].startswith("≥ 1/√V′") and lines[5].startswith("top-512") and lines[5].split()[1] == "55.6"
    assert lines[3].index("83.9") == lines[2].index("R@1", lines[2].index("R@10") + 30) - 1  # columns line up
    assert lines[6] == "active words per image / text, MSCOCO 5k: ≥ 1/√V′ 1081.2 / 35.5, top-512 512.0 / 512.0"
    assert lines[7] == "word precision@5 (%), MSCOCO 5k: images 90.0 (random 4.6), captions 95.0 (random 3.3)"
    assert lines[8].startswith("active words per image / text, Flickr30k 1k: ")


def test_patchdis_table_puts_random_assignment_next_to_the_model():
    voc = types.SimpleNamespace(type="patchdis", name="voc", label="VOC 2012 val", classes=["c"] * 20)
    shapes = types.SimpleNamespace(type="patchdis", name="shapes", label="shapes", classes=["c"] * 6)
    metrics = {"voc/miou": 0.363, "voc/random_miou": 0.0256, "voc/miou_per_image": 0.41,
               "voc/random_miou_per_image": 0.05, "voc/mean_class_recall": 0.45, "voc/random_mean_class_recall": 0.05,
               "shapes/miou": 0.089, "shapes/random_miou": 0.086}  # fmt: skip
    lines = table.format_results([voc, shapes], metrics).splitlines()
    # Per-image mIoU first: the protocol the paper's random 5.0 matches.
    assert lines[0].split() == ["PatchDis", "(%)", "classes", "mIoU/image", "random", "mIoU/set", "random", "recall",
                                "random"]  # fmt: skip
    assert lines[1].split() == ["VOC", "2012", "val", "20", "41.0", "5.0", "36.3", "2.6", "45.0", "5.0"]
    assert lines[2].split() == ["shapes", "6", "-", "-", "8.9", "8.6", "-", "-"]
    assert lines[1].index("41.0") + len("41.0") == lines[0].index("mIoU/image") + len("mIoU/image")  # under its head


# ---------------------------------------------------------------------------------------- lexvla eval


def write_config(tmp_path, evals: str) -> str:
    path = tmp_path / "eval_config.py"
    path.write_text(
        "import ml_collections\n"
        "from lexvla_jax.data.config import default_data_config\n\n"
        "def get_config(arg=None):\n"
        "    config = ml_collections.ConfigDict()\n"
        "    config.data = default_data_config()\n"
        "    config.data.update(dict(image_size=32, num_workers=0))\n"
        f"    config.evals = {evals}\n"
        "    return config\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "evals, message",
    [
        ("dict()", "config.evals declares no evaluators; add e.g. config.evals.coco = dict(type='retrieval', ...)"),
        ("dict(a=dict(type='zeroshot'))", "config.evals.a.type='zeroshot' is not an evaluator type"),
        ("dict(a=dict(type='retrieval', format='karpathy', json='/no/such.json', image_root='/'))",
         "config.evals.a.json='/no/such.json' does not exist; point it at dataset_coco.json or dataset_flickr30k.json"),
        ("dict(a=dict(type='patchdis', format='voc', root='/no/VOC'))", "config.evals.a.root='/no/VOC' does not exist"),
        ("dict(a=dict(type='patchdis', format='coco', json='/', image_root='/', classes='cityscapes'))",
         "config.evals.a.classes='cityscapes' is not a class list for coco data; use coco or voc"),
        ("dict(a=dict(type='patchdis', format='webdataset', shards='/', classes='shapes'))",
         "config.evals.a.classes='shapes': a webdataset segmentation set needs its class names in label order"),
    ],
)  # fmt: skip
def test_lexvla_eval_bad_input_is_one_line(tmp_path, capsys, evals, message):
    code = cli.main(["eval", "--config", write_config(tmp_path, evals), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"lexvla eval: {message}") and err.count("\n") == 1, err


def test_lexvla_eval_prints_tables_and_writes_json(tmp_path, capsys, monkeypatch, karpathy_coco):
    json_path, root = karpathy_coco
    out = str(tmp_path / "synthetic")
    synthetic.make_synthetic(out, num_train=0, num_eval=6, seed=0, image_size=32, shard_size=100)
    evals = (
        f"dict(coco=dict(type='retrieval', label='MSCOCO', format='karpathy', json={json_path!r}, "
        f"image_root={root!r}, top_k=4), shapes=dict(type='patchdis', format='webdataset', shards={out + '/eval'!r}, "
        f"classes={synthetic.SHAPES!r}), zs=dict(type='classification', label='one-shape', format='webdataset', "
        f"shards={out + '/eval'!r}, classes={synthetic.SHAPES!r}, templates=('{{c}}',), top_k=4))"
    )
    config_file = write_config(tmp_path, evals)
    data = RetrievalEvaluator("c", entry_settings("c", dict(format="karpathy", json=json_path, image_root=root),
                                                   RetrievalEvaluator), data_config()).data  # fmt: skip
    s_img, s_txt = vectors_for(data)
    texts = dict(zip(data["captions"], s_txt, strict=True))
    texts.update({name: np.eye(32, dtype=np.float32)[i] for i, name in enumerate(synthetic.SHAPES)})
    encoder = FakeEncoder(32, image_vectors=dict(enumerate(s_img)), text_vectors=texts,
                          patch_vector=lambda code: np.eye(32, dtype=np.float32)[code % 6])  # fmt: skip
    restored = []

    def restore(config, workdir, step=None):
        restored.append((config.data.image_size, workdir, step))
        return encoder, 700

    from lexvla_jax import inference

    monkeypatch.setattr(inference, "restore", restore)
    workdir = str(tmp_path / "run")
    assert cli.main(["eval", "--config", config_file, "--workdir", workdir, "--step", "700"]) == 0
    assert restored == [(32, workdir, 700)]
    printed = capsys.readouterr().out
    assert "MSCOCO" in printed and "image-to-text" in printed and "PatchDis (%)" in printed and "top-4" in printed
    lines = printed.splitlines()
    (patchdis_head,) = [line for line in lines if line.startswith("PatchDis (%)")]
    assert patchdis_head.split()[2:5] == ["classes", "mIoU/image", "random"]  # per-image mIoU first
    (zero_shot_head,) = [i for i, line in enumerate(lines) if line.startswith("Zero-shot (%)")]
    assert lines[zero_shot_head].split()[2:] == ["classes", "vectors", "acc@1", "acc@5", "recall"]
    assert lines[zero_shot_head + 1].split()[:3] == ["one-shape", "6", "dense"]
    record = json.loads(open(os.path.join(workdir, "eval", "step_700.json")).read())
    assert record["step"] == 700 and record["evals"]["shapes"]["type"] == "patchdis"
    metrics = record["metrics"]
    for k in (1, 5, 10):
        assert metrics[f"coco/dense/image_retrieval_recall@{k}"] == metrics[f"coco/dense/t2i_r@{k}"]
        assert metrics[f"coco/topk/text_retrieval_recall@{k}"] == metrics[f"coco/topk/i2t_r@{k}"]
    shapes = dict(format="webdataset", shards=out + "/eval", classes=synthetic.SHAPES)
    seg = PatchDisEvaluator("shapes", entry_settings("shapes", shapes, PatchDisEvaluator), data_config())
    direct = seg.run(encoder)
    assert sorted(set(direct) - set(metrics)) == [] and {k: metrics[k] for k in direct} == pytest.approx(direct)
    assert 0 < metrics["shapes/random_miou"] < 1
    zs = dict(format="webdataset", shards=out + "/eval", classes=synthetic.SHAPES, templates=("{c}",), top_k=4)
    direct = ClassificationEvaluator("zs", entry_settings("zs", zs, ClassificationEvaluator), data_config()).run(
        encoder
    )
    assert record["evals"]["zs"]["type"] == "classification" and record["results"]["zs"]["num_images"] > 0
    assert record["results"]["zs"].pop("seconds") > 0
    assert record["results"]["zs"] == pytest.approx({k.removeprefix("zs/"): v for k, v in direct.items()})
    assert "dense/acc1" in record["results"]["zs"] and record["results"]["zs"]["chance/acc1"] == pytest.approx(1 / 6)
    acc1 = f"{100 * metrics['zs/dense/acc1']:.1f}"
    assert lines[zero_shot_head + 1].split()[3] == acc1
    assert (
        f"{100 * metrics['coco/dense/i2t_r@1']:.1f}"
        in printed.splitlines()[[i for i, line in enumerate(printed.splitlines()) if line.startswith("dense")][0]]
    )


def test_tiny_config_declares_retrieval_and_patchdis(tmp_path):
    out = str(tmp_path / "synthetic")
    synthetic.make_synthetic(out, num_train=0, num_eval=5, seed=0, image_size=32, shard_size=100)
    overrides = [f"data.eval_shards={out}/eval", "data.image_size=32", "data.num_workers=0"]
    config = configlib.load_config(os.path.join(REPO, "configs", "tiny.py"), overrides)
    evaluators = {e.name: e for e in registry.build_evaluators(config)}
    kinds = {n: e.type for n, e in evaluators.items()}
    assert kinds == {"retrieval": "retrieval", "patchdis": "patchdis", "zeroshot": "classification"}
    zeroshot = evaluators["zeroshot"]  # the one-shape images of the 5
    counts = ReadCounts()
    assert sum(len(batch["label"]) for batch in zeroshot.data.batches(2, counts)) == counts.images > 0
    assert zeroshot.classes == list(synthetic.SHAPES) and counts.images + counts.multi_class == 5
    assert evaluators["retrieval"].modes == retrieval.MODES and len(evaluators["retrieval"].data["image"]) == 5
    assert evaluators["patchdis"].classes == list(synthetic.SHAPES) and len(evaluators["patchdis"].data["mask"]) == 5
    paper = configlib.load_config(os.path.join(REPO, "configs", "lexvla_cc12m.py"))
    assert {n: e.type for n, e in paper.evals.items()} == dict(coco="retrieval", flickr="retrieval", voc="patchdis")
    assert paper.evals.coco.top_k == 512 and paper.evals.voc.format == "voc"


def test_lexvla_eval_without_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, synthetic_text):
    """The checkpoint is looked for before the model is built; no checkpoint (or no such step) is one line."""
    from lexvla_jax import build

    monkeypatch.setattr(build, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    out = str(tmp_path / "synthetic")
    # 8 images: some show one kind of shape, which the zero-shot entry needs.
    synthetic.make_synthetic(out, num_train=0, num_eval=8, seed=0, image_size=32, shard_size=100)
    args = [
        "--config",
        os.path.join(REPO, "configs", "tiny.py:scratch"),
        "--config.data.tokenizer",
        synthetic_text[1].path,
    ]
    args += [f"--config.data.eval_shards={out}/eval", "--config.data.image_size=32", "--config.data.num_workers=0"]
    for workdir, step, expected in (
        (tmp_path / "none", [], f"no checkpoint under {tmp_path / 'none' / 'checkpoints'}; pass the workdir"),
        (tmp_path / "empty", ["--step", "5"], f"no checkpoint at step 5 under {tmp_path / 'empty' / 'checkpoints'}"),
    ):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True, exist_ok=True)
        assert cli.main(["eval", *args, "--workdir", str(workdir), *step]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lexvla eval: {expected}") and err.count("\n") == 1, err
