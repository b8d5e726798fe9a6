"""PatchDis's image-level check: on one-class images, does the image's own class rank first among the class names?"""

import numpy as np

from lexvla_jax.evaluate import patchdis
from lexvla_jax.evaluate.patchdis import UNSCORED

CLASSES = ("circle", "square", "potted plant")


def test_single_class_images_are_those_whose_scored_patches_share_one_class():
    labels = np.array(
        [
            [0, 0, UNSCORED, UNSCORED],  # one class
            [0, 1, UNSCORED, UNSCORED],  # two classes
            [UNSCORED] * 4,  # none
            [UNSCORED, 2, 2, UNSCORED],  # one class
        ],
        np.int32,
    )
    index, truth = patchdis.single_class_images(labels, 3)
    np.testing.assert_array_equal(index, [0, 3])
    np.testing.assert_array_equal(truth, [0, 2])


def test_top_class_and_confusion_count_every_pair():
    truth = np.array([0, 0, 1, 2, 2, 2])
    first = np.array([0, 1, 1, 2, 0, 2])
    metrics = patchdis.top_class_scores(truth, first, CLASSES)
    assert metrics["top_class"] == 4 / 6 and metrics["top_class_images"] == 6
    assert metrics["confusion/circle/square"] == 1 and metrics["confusion/potted_plant/circle"] == 1
    assert metrics["confusion/potted_plant/potted_plant"] == 2 and metrics["confusion/square/circle"] == 0
    assert sum(v for k, v in metrics.items() if k.startswith("confusion/")) == 6
    table = patchdis.confusion_table({f"e/{k}": v for k, v in metrics.items()}, "e/", CLASSES).splitlines()
    assert len(table) == 4 and table[3].split() == ["potted_plant", "1", "0", "2"]


def test_evaluator_ranks_the_class_of_one_object_images():
    """The evaluator reports top_class from the pooled image vectors against the class texts (fake encoder)."""

    class Encoder:
        image_size, patch_grid, batch_size = 4, (2, 2), 4

        def encode_texts(self, names):
            return np.eye(len(names), 5, dtype=np.float32)

        def encode_images(self, images):
            # each image's vector names the class in its red channel's first pixel
            return np.eye(5, dtype=np.float32)[images[:, 0, 0, 0]]

        def encode_patches(self, images, project):
            return np.repeat(self.encode_images(images)[:, None] @ project, 4, axis=1)

    evaluator = patchdis.PatchDisEvaluator.__new__(patchdis.PatchDisEvaluator)
    evaluator.name, evaluator.classes, evaluator.where = "shapes", list(CLASSES), "config.evals.shapes"
    evaluator.settings = {"random_seed": 0}
    evaluator.prompt_names, evaluator.templates = list(CLASSES), ["{c}"]
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0], masks[1, :2], masks[1, 2:], masks[2] = 1, 2, 3, 3  # circle; square above plant; plant
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = [0, 1, 1]  # the plant image reads "square"
    evaluator.data = {"image": images, "mask": masks, "skipped": {}}
    metrics = evaluator.run(Encoder())
    assert metrics["shapes/top_class_images"] == 2 and metrics["shapes/top_class"] == 0.5
    assert metrics["shapes/confusion/potted_plant/square"] == 1 and metrics["shapes/random_top_class"] == 1 / 3
