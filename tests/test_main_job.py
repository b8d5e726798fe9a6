"""The embedded main job, shortened: stages 0 and 1 then stage 2 make an image's strongest dimensions words of its
captions, around a stage-0 vision tower that stage 2 leaves bit for bit as stage 0 saved it.

`configs/tiny.py` as the README runs it, on a small synthetic set with few steps of each stage.
"""

import os
import subprocess

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from support import local_cluster, xla_env

from lexvla_jax import configlib, hf_loader, inference, train
from lexvla_jax.miniature import lm_pretrain, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def short_job(root: str) -> list[str]:
    data = os.path.join(root, "data")
    values = {
        "miniature.synthetic.dir": data,
        "miniature.synthetic.train": 1500,
        "miniature.synthetic.eval": 40,
        "data.train_shards": os.path.join(data, "train"),
        "data.eval_shards": os.path.join(data, "eval"),
        "data.tokenizer": os.path.join(data, "tokenizer.model"),
        "miniature.vision.dir": os.path.join(data, "vision"),
        "miniature.vision.steps": 40,
        "miniature.vision.batch_size": 32,
        "miniature.vision.warmup_steps": 10,
        "miniature.vision.log_every": 20,
        "miniature.vision.probe_images": 0,
        "miniature.lm.dir": os.path.join(data, "lm"),
        "miniature.lm.steps": 150,
        "miniature.lm.log_every": 50,
        "train.num_steps": 150,
        "train.log_every": 50,
        "checkpoint.every_steps": 150,
        "evals.retrieval.every_steps": 0,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_short_main_job_names_the_words_of_its_images(tmp_path):
    """`lexvla train --config configs/tiny.py` itself, shortened, on 8 CPU devices. It runs for longer than it
    compiles, so its process keeps LLVM's optimisation (`xla_env.cpu_env`)."""
    overrides = short_job(str(tmp_path))
    config = configlib.load_config(TINY, overrides)
    assert config.model.text_checkpoint == config.miniature.lm.dir  # stage 2 reads what stage 1 writes
    assert config.model.vision_checkpoint == config.miniature.vision.dir  # and what stage 0 writes
    workdir = tmp_path / "work"
    run = subprocess.run(
        local_cluster.cli("train", TINY, workdir, overrides),
        env=xla_env.cpu_env(8, optimised_code=True),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = run.stdout
    assert run.returncode == 0, (out + run.stderr)[-3000:]
    (metrics,) = [row for row in local_cluster.metric_rows(workdir) if "retrieval/word_precision/image" in row]
    assert "stage 1 (language model): step 150/150" in out and "saved to" in out
    assert "stage 0 (vision tower): step 40/40" in out
    assert "one-class images the image's own class ranks first" in out

    image, random = metrics["retrieval/word_precision/image"], metrics["retrieval/word_precision/image_random"]
    assert image >= 3 * random, (image, random)  # measured 0.500 against 0.045
    assert metrics["retrieval/word_precision/text"] >= 3 * metrics["retrieval/word_precision/text_random"]
    assert metrics["patchdis/num_images"] == 40
    assert "word precision@5" in out and "PatchDis" in out

    # Zero-shot classification of the one-shape eval images, printed in its table. Only its presence and range are
    # asserted: the full job measured acc@1 0.333 against 0.167 (BENCHMARKS.md), but this short run's stage-0 tower
    # has not learnt shapes: it measured 0.077 on 13 one-shape images, below chance.
    assert 0 < metrics["zeroshot/num_images"] <= 40 and metrics["zeroshot/num_classes"] == 6
    assert 0 <= metrics["zeroshot/dense/acc1"] <= metrics["zeroshot/dense/acc5"] <= 1
    assert metrics["zeroshot/chance/acc1"] == pytest.approx(1 / 6)
    lines = out.splitlines()
    (head,) = [i for i, line in enumerate(lines) if line.startswith("Zero-shot (%)")]
    acc1 = f"{100 * metrics['zeroshot/dense/acc1']:.1f}"
    assert lines[head + 1].split()[:5] == ["synthetic", "one-shape", "6", "dense", acc1], lines[head : head + 5]

    maps = sorted(os.listdir(workdir / "word_maps"))
    assert maps == [f"eval-image-{i}.png" for i in range(config.train.word_maps)]
    width, height = Image.open(workdir / "word_maps" / maps[0]).size
    assert width > 400 and height > 200

    # Stage 2 trained around the frozen tower without touching it: the restored run's tower is stage 0's, bit for bit.
    assert "vision" not in config.train.trainable
    encoder, _ = inference.restore(config, str(workdir))
    assert not _vision_params(encoder.params)  # no vision weight among the trained ones
    restored = _vision_params(encoder.frozen)
    tower = hf_loader.load_hf_dinov2(config.miniature.vision.dir)
    saved = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}
    assert restored.keys() == saved.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=str(path))

    # A second invocation finds stages 0 and 1 complete and leaves them as they were.
    weights = [os.path.join(d, "model.safetensors") for d in (config.miniature.vision.dir, config.miniature.lm.dir)]
    assert lm_pretrain.is_complete(config.miniature.lm.dir)
    before = [os.stat(w).st_mtime_ns for w in weights]
    logged = []
    prepare.prepare(config, logged.append)
    assert logged == [
        f"stage 0 (vision tower): using {config.miniature.vision.dir}",
        f"stage 1 (language model): using {config.miniature.lm.dir}",
    ]
    assert [os.stat(w).st_mtime_ns for w in weights] == before


def _vision_params(state) -> dict:
    flat = nnx.to_flat_state(state)
    return {p[1:]: np.asarray(v.get_value()) for p, v in flat if p[0] == "vision"}


def test_scratch_config_has_no_stage_1():
    """`configs/tiny.py:scratch`: a random text tower that trains, and `prepare` pretrains nothing."""
    tiny = configlib.load_config(TINY)
    scratch = configlib.load_config(TINY + ":scratch")
    assert prepare.uses_pretrained_lm(tiny) and not prepare.uses_pretrained_lm(scratch)
    assert "text" not in tiny.train.trainable and "text" in scratch.train.trainable
    moved = configlib.load_config(TINY, ["miniature.lm.dir=/elsewhere/lm"])
    assert moved.model.text_checkpoint == "/elsewhere/lm"
    off = configlib.load_config(TINY, ["model.text_checkpoint="])
    assert off.miniature.lm.dir == tiny.miniature.lm.dir and not prepare.uses_pretrained_lm(off)
    with pytest.raises(configlib.ConfigError, match="only argument is :scratch"):
        configlib.load_config(TINY + ":huge")


def test_word_maps_are_written_for_the_first_eval_images(tmp_path):
    """`train._write_word_maps`: one PNG per requested image of the retrieval set, none without one."""

    class Retrieval:
        type = "retrieval"
        data = {
            "image": np.zeros((3, 16, 16, 3), np.uint8),
            "captions": ["a red circle", "a blue square", "a green star"],
            "image_of_text": np.arange(3),
        }

    class Encoder:
        words = ["red", "blue", "green", "circle", "square", "star", "small", "large", "left", "right"]
        patch_grid = (2, 2)

        def encode_images(self, images):
            return np.tile(np.arange(10, dtype=np.float32), (len(images), 1))

        def encode_patches(self, images, project):
            return np.ones((len(images), 4, project.shape[1]), np.float32)

    from etils import epath

    paths = train._write_word_maps(Encoder(), [Retrieval()], 2, epath.Path(tmp_path) / "maps")
    assert sorted(os.listdir(tmp_path / "maps")) == ["eval-image-0.png", "eval-image-1.png"]
    assert [p.name for p in paths] == ["eval-image-0.png", "eval-image-1.png"]
    assert train._write_word_maps(Encoder(), [], 2, epath.Path(tmp_path) / "none") == []
