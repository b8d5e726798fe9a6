"""PatchDis: ground truth on the patch grid, mIoU by hand, random baselines, VOC / COCO / synthetic readers."""

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
from support.fake_encoder import FakeEncoder, colour_of

from lexvla_jax.data import masks
from lexvla_jax.data.config import DataConfigError, default_data_config
from lexvla_jax.data.seg_set import VOC_CLASSES
from lexvla_jax.evaluate import class_text, patchdis
from lexvla_jax.evaluate.base import entry_settings
from lexvla_jax.evaluate.patchdis import UNSCORED, PatchDisEvaluator
from lexvla_jax.miniature import synthetic

# Every class name the tests use; an image region of class `n` is painted `colour_of(NAMES.index(n))`.
NAMES = ("background", *VOC_CLASSES, "cup")
BLOCK = 16  # pixels per patch in the written images (image_size 32 with a 4x4 grid halves them)


def data_config(**overrides):
    config = default_data_config()
    # eval_crop_pct=1: the centre square (the written images' layouts are drawn for it)
    config.update({"image_size": 32, "num_workers": 0, "min_image_size": 8, "eval_crop_pct": 1.0, **overrides})
    return config


def evaluator(name="seg", **entry):
    return PatchDisEvaluator(name, entry_settings(name, entry, PatchDisEvaluator), data_config())


def one_hot(index: int, size: int = len(NAMES)) -> np.ndarray:
    return np.eye(size, dtype=np.float32)[index]


def fake(confuse: dict[str, str] | None = None) -> FakeEncoder:
    """Assigns each patch the class its colour encodes, or `confuse[class]` instead."""
    confuse = confuse or {}

    def patch_vector(code: int) -> np.ndarray:
        name = NAMES[code]
        return one_hot(NAMES.index(confuse.get(name, name)))

    texts = {name: one_hot(i) for i, name in enumerate(NAMES)}
    texts |= {class_text.NAME_MAPS["voc"].get(name, name): one_hot(i) for i, name in enumerate(NAMES)}  # prompt names
    return FakeEncoder(len(NAMES), text_vectors=texts, patch_vector=patch_vector, image_size=32, patch_grid=(4, 4))


def paint(blocks: np.ndarray, colours: bool) -> np.ndarray:
    """Blocks of class indices (into NAMES) → a picture (uint8 RGB) or a label layout, BLOCK pixels per block."""
    layout = np.kron(blocks, np.ones((BLOCK, BLOCK), np.int64))
    if not colours:
        return layout
    return np.asarray([colour_of(c) for c in range(len(NAMES))], np.uint8)[layout]


def jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


# --------------------------------------------------------------------------------- protocol, by hand


def test_patch_labels_majority_ignores_255_and_background():
    mask = np.array(
        [
            [1, 1, 2, 3],
            [2, 255, 255, 255],
            [0, 0, 255, 255],
            [0, 1, 255, 255],
        ],
        np.uint8,
    )[None]
    labels = patchdis.patch_labels(mask, (2, 2), num_classes=3)
    # (0,0): 1,1,2 vote (255 does not) → class 1; (0,1): 2 vs 3 tie → the smaller, 2;
    # (1,0): background majority → unscored; (1,1): only 255 → unscored.
    np.testing.assert_array_equal(labels, [[0, 1, UNSCORED, UNSCORED]])


def test_miou_by_hand_over_the_set_and_per_image():
    # Two images of 4 patches, classes a=0, b=1, c=2. Image 0: a a b -; image 1: c c c a.
    labels = np.array([[0, 0, 1, UNSCORED], [2, 2, 2, 0]])
    assigned = np.array([[1, 1, 1, 2], [2, 2, 2, 1]])  # every a patch assigned b; the unscored one does not count
    scores = patchdis.patchdis_scores(labels, assigned, ["a", "b", "c"])
    # a: I 0, U 3 → 0; b: I 1, U 1 + 3 → 1/4; c: I 3, U 3 → 1.
    assert scores["iou/a"] == 0 and scores["iou/b"] == 0.25 and scores["iou/c"] == 1
    assert scores["miou"] == pytest.approx((0 + 0.25 + 1) / 3)
    # Per image, over its ground-truth classes: image 0 a 0, b 1/3 → 1/6; image 1 c 1, a 0 → 1/2.
    assert scores["miou_per_image"] == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert scores["mean_class_recall"] == pytest.approx((0 + 1 + 1) / 3)
    assert scores["patch_accuracy"] == pytest.approx(4 / 7)


def test_random_baselines_match_the_documented_expectations():
    classes, images, patches = 20, 400, 64
    rng = np.random.default_rng(1)
    labels = np.repeat(rng.integers(classes, size=(images, 1)), patches, axis=1)  # one class per image
    scores = patchdis.patchdis_scores(labels, patchdis.random_assignment(labels, classes, 0), list(map(str, range(20))))
    n = np.bincount(labels.ravel(), minlength=classes)
    expected_miou = np.mean(n / (classes * n + n.sum() - n))
    assert scores["miou"] == pytest.approx(expected_miou, rel=0.1)
    assert scores["miou"] == pytest.approx(1 / (2 * classes - 1), rel=0.15)  # ≈ 2.6% for VOC's 20 classes
    assert scores["miou_per_image"] == pytest.approx(1 / classes, rel=0.05)  # the paper's 5.0
    assert scores["mean_class_recall"] == pytest.approx(1 / classes, rel=0.05)


# -------------------------------------------------------------------------------------------- VOC layout

VOC_IMAGES = {
    # Blocks of the centre crop (4x4 patches); the written images are 64 wide and 128 high, the 32 rows above
    # and below the crop are painted "car" and must not count.
    "2007_000001": [["aeroplane"] * 4, ["aeroplane"] * 4, ["bicycle", "bicycle", "background", "background"],
                    ["bicycle", "bicycle", "background", "background"]],
    "2007_000002": [["bird"] * 4, ["bird", "bird", "aeroplane", "aeroplane"],
                    ["bird", "bird", "aeroplane", "aeroplane"], ["bird"] * 4],
}  # fmt: skip


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("VOC2012")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for key, rows in VOC_IMAGES.items():
        blocks = np.array([[NAMES.index(n) for n in row] for row in rows])
        border = np.full((2, 4), NAMES.index("car"))
        full = np.concatenate([border, blocks, border])  # 8 block rows of 16 px; the crop keeps the middle 4
        full_layout, pixels = paint(full, colours=False), paint(full, colours=True)
        label = full_layout.astype(np.uint8)  # NAMES index = VOC label
        label[:, 31:33] = masks.IGNORE  # VOC-style boundary band: 255 does not vote
        (root / "JPEGImages" / f"{key}.jpg").write_bytes(jpeg(pixels))
        (root / "SegmentationClass" / f"{key}.png").write_bytes(masks.encode_mask_png(label))
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_IMAGES) + "\n")
    return root


def test_voc_reader_crops_image_and_mask_alike(voc_root):
    data = evaluator(format="voc", root=str(voc_root)).data
    assert data["keys"] == list(VOC_IMAGES) and data["classes"] == list(VOC_CLASSES)
    assert data["image"].shape == (2, 32, 32, 3) and data["mask"].shape == (2, 32, 32)
    assert masks.IGNORE in data["mask"] and VOC_CLASSES.index("car") + 1 not in data["mask"]  # borders cropped off
    labels = patchdis.patch_labels(data["mask"], (4, 4), 20)
    plane, bike, bird = (VOC_CLASSES.index(n) for n in ("aeroplane", "bicycle", "bird"))
    np.testing.assert_array_equal(labels[0], [plane] * 8 + [bike, bike, UNSCORED, UNSCORED] * 2)
    np.testing.assert_array_equal(labels[1], [bird] * 4 + [bird, bird, plane, plane] * 2 + [bird] * 4)
    palette = Image.open(voc_root / "SegmentationClass" / "2007_000001.png").getpalette()
    assert tuple(palette[3 * 15 : 3 * 16]) == (192, 128, 128)  # VOC's colour of person (15)


def test_voc_patchdis_right_and_wrong_models(voc_root):
    seg = evaluator(format="voc", root=str(voc_root))
    right = seg.run(fake())
    assert right["seg/miou"] == 1.0 and right["seg/miou_per_image"] == 1.0 and right["seg/mean_class_recall"] == 1.0
    assert right["seg/num_patches"] == 12 + 16 and right["seg/num_images"] == 2 and right["seg/num_classes"] == 20
    wrong = seg.run(fake(confuse={"aeroplane": "bicycle"}))
    # aeroplane: I 0, U 12 → 0; bicycle: I 4, U 4 + 12 → 1/4; bird: 1. Per image: (0 + 1/3) / 2 and (1 + 0) / 2.
    assert wrong["seg/iou/aeroplane"] == 0 and wrong["seg/iou/bicycle"] == 0.25 and wrong["seg/iou/bird"] == 1
    assert wrong["seg/miou"] == pytest.approx(1.25 / 3)
    assert wrong["seg/miou_per_image"] == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert wrong["seg/mean_class_recall"] == pytest.approx(2 / 3)
    assert 0 < wrong["seg/random_miou"] < 0.2 and wrong["seg/random_miou"] == right["seg/random_miou"]  # seeded


def test_voc_missing_folders_are_one_line_errors(voc_root, tmp_path):
    with pytest.raises(DataConfigError, match=r"config.evals.seg.root='.*nowhere' does not exist"):
        evaluator(format="voc", root=str(tmp_path / "nowhere"))
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataConfigError, match="SegmentationClass/"):
        evaluator(format="voc", root=str(tmp_path))
    with pytest.raises(DataConfigError, match=r"config.evals.seg.split=.*test.txt' does not exist"):
        evaluator(format="voc", root=str(voc_root), split="test")
    with pytest.raises(DataConfigError, match=r"classes='coco' is not a class list for voc data; use voc$"):
        evaluator(format="voc", root=str(voc_root), classes="coco")


def test_voc_bad_images_are_counted_and_mismatched_masks_named(voc_root, tmp_path):
    root = tmp_path / "VOC"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for key in VOC_IMAGES:
        for folder, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            (root / folder / f"{key}.{ext}").write_bytes((voc_root / folder / f"{key}.{ext}").read_bytes())
    (root / "JPEGImages" / "broken.jpg").write_bytes(b"not a jpeg" * 10)
    (root / "SegmentationClass" / "broken.png").write_bytes(
        (voc_root / "SegmentationClass/2007_000001.png").read_bytes()
    )
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join([*VOC_IMAGES, "broken"]))
    seg = evaluator(format="voc", root=str(root))
    assert seg.data["keys"] == list(VOC_IMAGES) and seg.data["skipped"]["undecodable_image"] == 1
    assert seg.run(fake())["seg/num_skipped"] == 1
    (root / "SegmentationClass" / "2007_000002.png").write_bytes(masks.encode_mask_png(np.zeros((10, 10), np.uint8)))
    with pytest.raises(
        DataConfigError, match=r"^config.evals.seg: 2007_000002: the mask is 10x10 but the image is 64x128$"
    ):
        evaluator(format="voc", root=str(root))


# ------------------------------------------------------------------------------------------- COCO layout


def _box(x0, y0, x1, y1):
    return {"segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0)}  # fmt: skip


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 47, "name": "cup"},
                  {"id": 62, "name": "chair"}]  # fmt: skip
    pictures = {
        # Person over rows 0-2 with a dog (smaller, so painted on top) at row 1, cols 0-1; a cup at row 3,
        # cols 0-1; a crowd of people at row 3, cols 2-3.
        5: np.array([["person"] * 4, ["dog", "dog", "person", "person"], ["person"] * 4,
                     ["cup", "cup", "person", "person"]]),
        9: np.array([["chair"] * 4] * 4),
        11: np.array([["background"] * 4] * 4),  # no annotations: left out
    }  # fmt: skip
    annotations = [
        {"image_id": 5, "category_id": 1, "iscrowd": 0, **_box(0, 0, 64, 48)},
        {"image_id": 5, "category_id": 18, "iscrowd": 0, **_box(0, 16, 32, 32)},
        {"image_id": 5, "category_id": 47, "iscrowd": 0, **_box(0, 48, 32, 64)},
        {"image_id": 5, "category_id": 1, "iscrowd": 1, **_box(32, 48, 64, 64)},
        {"image_id": 9, "category_id": 62, "iscrowd": 0, **_box(0, 0, 64, 64)},
    ]
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    images = []
    for image_id, blocks in pictures.items():
        name = f"{image_id:012d}.jpg"
        codes = np.vectorize(NAMES.index)(blocks)
        (root / "val2017" / name).write_bytes(jpeg(paint(codes, colours=True)))
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
    path = root / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(root / "val2017")


def test_coco_instance_masks_with_coco_and_voc_classes(coco_files):
    json_path, image_root = coco_files
    own = evaluator(format="coco", json=json_path, image_root=image_root)
    assert own.data["classes"] == ["person", "dog", "cup", "chair"] and own.data["keys"] == [
        "000000000005.jpg",
        "000000000009.jpg",
    ]
    labels = patchdis.patch_labels(own.data["mask"], (4, 4), 4)
    np.testing.assert_array_equal(labels[0], [0] * 4 + [1, 1, 0, 0] + [0] * 4 + [2, 2, UNSCORED, UNSCORED])
    np.testing.assert_array_equal(labels[1], [3] * 16)
    right = own.run(fake())
    assert right["seg/miou"] == 1.0 and right["seg/num_patches"] == 14 + 16
    assert {k for k in right if k.startswith("seg/iou/")} == {f"seg/iou/{n}" for n in ("person", "dog", "cup", "chair")}

    voc = evaluator(format="coco", json=json_path, image_root=image_root, classes="voc")
    assert voc.data["classes"] == list(VOC_CLASSES)
    scores = voc.run(fake())  # the cup is no VOC class: its patches are not scored
    assert scores["seg/miou"] == 1.0 and scores["seg/num_patches"] == 12 + 16
    assert {k for k in scores if k.startswith("seg/iou/")} == {"seg/iou/person", "seg/iou/dog", "seg/iou/chair"}
    wrong = voc.run(fake(confuse={"dog": "cat"}))
    # dog: I 0, U 2; cat: I 0, U 2; person and chair 1 → mIoU 2/4.
    assert wrong["seg/miou"] == pytest.approx(0.5) and wrong["seg/iou/cat"] == 0


def test_coco_bad_input(coco_files, tmp_path):
    json_path, image_root = coco_files
    with pytest.raises(DataConfigError, match=r"config.evals.seg.json='.*missing.json' does not exist"):
        evaluator(format="coco", json=str(tmp_path / "missing.json"), image_root=image_root)
    with pytest.raises(DataConfigError, match=r"config.evals.seg.image_root is not set"):
        evaluator(format="coco", json=json_path)
    with pytest.raises(DataConfigError, match=r"classes='ade20k' is not a class list for coco data; use coco or voc"):
        evaluator(format="coco", json=json_path, image_root=image_root, classes="ade20k")
    parent = os.path.dirname(image_root)  # the folder above val2017/: exists, but the images are not in it
    message = rf"^config.evals.seg.image_root='{parent}' does not hold the json's images \(.*/000000000005.jpg does not"
    with pytest.raises(DataConfigError, match=message + r" exist\); point it at the folder the json's file_name paths"):
        evaluator(format="coco", json=json_path, image_root=parent)


def test_coco_without_pycocotools_is_a_one_line_error(coco_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # import fails as when it is not installed
    json_path, image_root = coco_files
    message = r"^config.evals.seg: COCO instance masks need pycocotools: pip install 'lexvla_jax\[eval\]'$"
    with pytest.raises(DataConfigError, match=message):
        evaluator(format="coco", json=json_path, image_root=image_root)


# ---------------------------------------------------------------------------------------- synthetic set


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.make_synthetic(out, num_train=0, num_eval=16, seed=3, image_size=32, shard_size=100)
    return out


def test_synthetic_masks_match_the_pixels(synthetic_dir):
    with tarfile.open(f"{synthetic_dir}/eval/shard-00000.tar") as tar:
        keys = [n[: -len(".json")] for n in tar.getnames() if n.endswith(".json")]
        assert len(keys) == 16
        for key in keys:
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            mask_png = Image.open(tar.extractfile(f"{key}.mask.png"))
            assert mask_png.mode == "P"
            mask = np.asarray(mask_png)
            pixels = np.asarray(Image.open(tar.extractfile(f"{key}.jpg")).convert("RGB")).astype(int)
            for obj in meta["objects"]:
                x0, y0, x1, y1 = obj["bbox"]
                assert mask[int((y0 + y1) / 2), int((x0 + x1) / 2)] == synthetic.SHAPES.index(obj["shape"]) + 1
            assert set(np.unique(mask)) <= {0, *(synthetic.SHAPES.index(o["shape"]) + 1 for o in meta["objects"])}
            # Away from shape edges, background pixels have the background's colour and object pixels theirs
            # (JPEG's chroma subsampling shifts small shapes' colours, so: the nearest of the scene's colours).
            for label in np.unique(mask):
                region = mask == label
                inner = region.copy()
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    inner &= np.roll(region, (dy, dx), axis=(0, 1))
                if label == 0:
                    expected = synthetic.BACKGROUNDS[meta["background"]]
                else:
                    colours = [o["color"] for o in meta["objects"] if synthetic.SHAPES.index(o["shape"]) + 1 == label]
                    if len(colours) > 1:
                        continue  # two objects of one shape: one label, two colours
                    expected = synthetic.COLORS[colours[0]]
                candidates = [
                    synthetic.BACKGROUNDS[meta["background"]],
                    *(synthetic.COLORS[o["color"]] for o in meta["objects"]),
                ]
                distance = [np.abs(pixels[inner].mean(axis=0) - c).max() for c in candidates]
                assert min(distance) == np.abs(pixels[inner].mean(axis=0) - expected).max(), (key, label)


def test_synthetic_patchdis_with_a_constant_model(synthetic_dir):
    seg = evaluator(format="webdataset", shards=f"{synthetic_dir}/eval", classes=synthetic.SHAPES)
    assert seg.classes == list(synthetic.SHAPES) and seg.data["mask"].shape == (16, 32, 32)
    with tarfile.open(f"{synthetic_dir}/eval/shard-00000.tar") as tar:
        first = np.asarray(Image.open(tar.extractfile("000000000.mask.png")))
    np.testing.assert_array_equal(seg.data["mask"][0], first)  # same size: the crop is the identity
    texts = {name: np.eye(6, dtype=np.float32)[i] for i, name in enumerate(synthetic.SHAPES)}
    always_circle = FakeEncoder(6, text_vectors=texts, patch_vector=lambda code: texts["circle"], patch_grid=(4, 4))
    scores = seg.run(always_circle)
    labels = patchdis.patch_labels(seg.data["mask"], (4, 4), 6)
    counts = np.bincount(labels[labels != UNSCORED], minlength=6)
    present = counts > 0
    assert counts[0] > 0 and scores["seg/num_patches"] == counts.sum()
    assert scores["seg/miou"] == pytest.approx(counts[0] / counts.sum() / present.sum())
    assert scores["seg/mean_class_recall"] == pytest.approx(1 / present.sum())
    assert scores["seg/patch_accuracy"] == pytest.approx(counts[0] / counts.sum())


def test_old_synthetic_sets_without_masks_are_one_line_errors(tmp_path):
    members = synthetic.sample_members("k", synthetic.make_sample(0, "train", 0, "k", 32))
    (tmp_path / "old.tar").write_bytes(synthetic.tar_bytes(members)[0])
    with pytest.raises(DataConfigError, match="sample k has no mask.png; rewrite the set"):
        evaluator(format="webdataset", shards=str(tmp_path), classes=synthetic.SHAPES)
