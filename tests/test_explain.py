"""Word maps and bar charts: heat maps peak where the activation was constructed; PNGs are real images."""

import pathlib

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from support.fake_encoder import FakeEncoder

from lexvla_jax import cli, explain
from lexvla_jax.commands import common

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py") + ":scratch"
PATCH = 8


def two_patch_image(red_at=(0, 3), blue_at=(2, 1), size=32) -> np.ndarray:
    """Black except one red patch and one blue patch (row, col) of the 8-pixel patch grid."""
    image = np.zeros((size, size, 3), np.uint8)
    for (row, col), channel in ((red_at, 0), (blue_at, 2)):
        image[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH, channel] = 255
    return image


def patch_of_pixel(flat_index: int, size: int) -> tuple[int, int]:
    y, x = divmod(int(flat_index), size)
    return y // PATCH, x // PATCH


def test_word_heat_maps_peak_on_the_patch_that_holds_the_word():
    encoder = FakeEncoder.colours(extra_words=[f"w{i}" for i in range(20)])
    images = np.stack([two_patch_image(), two_patch_image(red_at=(3, 0), blue_at=(1, 2))])
    explained = explain.explain_images(encoder, images, k=4)
    patches = encoder.encode_patches(images)
    for i, red_at, blue_at in [(0, (0, 3), (2, 1)), (1, (3, 0), (1, 2))]:
        image_words = explained[i]
        assert set(image_words.words[:2]) == {"red", "blue"}
        maps = image_words.maps((32, 32))
        assert maps.shape == (4, 32, 32)
        for word, expected in (("red", red_at), ("blue", blue_at)):
            j = image_words.words.index(word)
            assert np.unravel_index(image_words.grids[j].argmax(), (4, 4)) == expected
            assert patch_of_pixel(maps[j].argmax(), 32) == expected
            # The map is the encoder's own per-patch activation of that word, upsampled.
            column = encoder.words.index(word)
            np.testing.assert_allclose(image_words.grids[j].ravel(), patches[i, :, column], rtol=1e-6)
        np.testing.assert_allclose(image_words.weights, np.sort(image_words.weights)[::-1])


def test_a_top_k_above_the_vocabulary_gives_every_word():
    encoder = FakeEncoder.colours(extra_words=["w0", "w1"])  # V' = 5
    (explained,) = explain.explain_images(encoder, two_patch_image()[None], k=8)
    assert sorted(explained.words) == sorted(encoder.words) and explained.grids.shape == (5, 4, 4)
    words, weights = explain.explain_texts(encoder, ["red"], k=8)[0]
    assert words[0] == "red" and len(words) == len(weights) == 5


def test_upsample_is_bilinear_and_centred():
    grid = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    up = explain.upsample(grid, (4, 4))
    np.testing.assert_allclose(up[0, 0], 0.0, atol=1e-6)  # corner pixels keep the corner patch's value
    np.testing.assert_allclose(up[3, 3], 3.0, atol=1e-6)
    np.testing.assert_allclose(up.mean(), grid.mean(), atol=1e-6)
    np.testing.assert_allclose(up[:, 1], [0.25, 0.75, 1.75, 2.25], atol=1e-6)  # pixel centres: 1/4, 3/4 between patches


def assert_png(path: str, min_size=(200, 150)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn


def test_figures_are_valid_pngs(tmp_path):
    encoder = FakeEncoder.colours(extra_words=[f"w{i}" for i in range(20)])
    image = two_patch_image()
    (explained,) = explain.explain_images(encoder, image[None], k=5)
    assert_png(explain.plot_image_words(image, explained, str(tmp_path / "image.png"), title="two patches"))
    words, weights = explain.explain_texts(encoder, ["a red w3 and a red w7"], k=4)[0]
    assert words[:3] == ["red", "w3", "w7"]
    assert_png(explain.plot_text_words("a red w3 and a red w7", words, weights, str(tmp_path / "text.png")))


def clipped_panels(fig) -> list[str]:
    """Titles (or labels) of the panels whose drawn extent (titles, tick labels, colour-bar label) leaves the
    figure."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    clipped = []
    for ax in fig.axes:
        box = ax.get_tightbbox(renderer)
        if box.x0 < 0 or box.y0 < 0 or box.x1 > fig.bbox.width or box.y1 > fig.bbox.height:
            clipped.append(ax.get_title() or ax.get_xlabel())
    return clipped


@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_figures_keep_every_title_and_label_inside(k):
    encoder = FakeEncoder.colours(extra_words=[f"w{i}" for i in range(20)])
    image = two_patch_image()
    (explained,) = explain.explain_images(encoder, image[None], k=k)
    caption = "a small purple triangle left of a large green cross"[:48]  # titles as `lexvla train` writes them
    fig = explain.image_words_figure(image, explained, title=caption)
    assert len(fig.axes) == -(-(1 + k) // min(4, 1 + k)) * min(4, 1 + k) + 2  # panels, colour bar, bar chart
    assert clipped_panels(fig) == []
    words, weights = explain.explain_texts(encoder, ["red w1 w2 " * 20], k=k)[0]
    assert clipped_panels(explain.text_words_figure("red w1 w2 " * 20, words, weights)) == []


@pytest.fixture
def fake_model(monkeypatch):
    encoder = FakeEncoder.colours(extra_words=[f"w{i}" for i in range(20)])
    monkeypatch.setattr(common, "restore_encoder", lambda config, workdir, step=None: encoder)
    return encoder


def test_explain_command_writes_and_lists_pngs(fake_model, tmp_path, capsys):
    image_path = tmp_path / "two.png"
    Image.fromarray(two_patch_image()).save(image_path)
    args = ["explain", "--config", CONFIG, "--workdir", str(tmp_path), "--image", str(image_path), "--top-k", "3"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{image_path}: ") and "red" in lines[0] and "blue" in lines[0]
    assert_png(lines[1])
    assert cli.main(["explain", "--config", CONFIG, "--workdir", str(tmp_path), "--text", "red w1", "blue"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("'red w1': red ")
    for png in lines[1::2]:
        assert png.startswith(str(tmp_path / "explain")) and png.endswith(".png")
        assert_png(png)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.jpg"], "lexvla explain: image 'missing.jpg' does not exist"),
        (["--text", "red", "--top-k", "0"], "lexvla explain: --top-k 0: must be at least 1"),
    ],
)
def test_explain_command_bad_input_is_one_line(fake_model, tmp_path, capsys, args, message):
    assert cli.main(["explain", "--config", CONFIG, "--workdir", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_explain_command_rejects_a_file_that_is_no_image(fake_model, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert cli.main(["explain", "--config", CONFIG, "--workdir", str(tmp_path), "--image", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lexvla explain: image '{bad}' cannot be used") and "\n" not in err
