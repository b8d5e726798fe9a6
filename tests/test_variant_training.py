"""The variants that change training (configs/variants) train a few steps of the tiny job (`:tiny`), with their
setting in effect. (registers and adapter17m change only shapes: tests/test_variants.py checks them abstractly.)

Each run is the real `train.run` on the small synthetic set of `test_train_loop` (1 layer per tower, 32 px,
batch 16). The loss function is wrapped so that each step also logs numbers computed independently from the
same lexical vectors (`probe/...`), which the checks compare with what the step reported.
"""

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import local_cluster

from lexvla_jax import build, configlib, inference, losses, train
from lexvla_jax import step as step_lib
from lexvla_jax.evaluate import registry
from lexvla_jax.models import image_norm, split

VARIANTS = os.path.join(local_cluster.REPO, "configs", "variants")
STEPS = 8
TOP_K = 16  # q512's k on :tiny


def _flops(s_img, s_txt, scale):
    return {"flops_img": jnp.sum(jnp.mean(s_img, 0) ** 2), "flops_txt": jnp.sum(jnp.mean(s_txt, 0) ** 2)}


def _top_k(s_img, s_txt, scale):
    top = lambda s: losses.sparsify(s, top_k=TOP_K)
    return {
        "topk_info_nce": losses.info_nce(top(s_img), top(s_txt), scale),
        "dense_info_nce": losses.info_nce(s_img, s_txt, scale),
    }


def _bag_of_words(s_img, s_txt, scale):
    """How far each text vector is from `1/√n` on its n non-zero entries (0 for a unit bag of words)."""
    on = (s_txt > 0).astype(jnp.float32)
    unit = on / jnp.sqrt(jnp.maximum(jnp.sum(on, axis=1, keepdims=True), 1.0))
    return {"bow_deviation": jnp.max(jnp.abs(s_txt - unit)), "bow_words": jnp.mean(jnp.sum(on, axis=1))}


PROBES = {"qflops": _flops, "q512": _top_k, "qbow": _bag_of_words, "qclip": None, "siglip": None}


# The mean and std each tower was trained with (DESIGN.md), written out here rather than read from `image_norm`.
TOWER_NORMS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclasses.dataclass
class Run:
    """A finished few-step run: its logged train rows, final trainable parameters (flat) and evaluation; its whole
    final train state (flat); the vision tower's and adapter's parameters as built (flat nnx paths, host arrays);
    every image normalisation the run traced."""

    rows: list
    params: dict
    final: dict
    config: object
    workdir: str
    state: dict
    initial: dict
    normalizations: list


class NormalizationProbe:
    """Wraps `image_norm.normalize_images` (what `LexVLA.normalize` calls) and records each traced call: whether the
    train step's `SplitModel.encode` made it, the norm named, and the mean and std it applied, measured by running the
    real function on black and white pixels."""

    def __init__(self, monkeypatch):
        self.calls, self._in_step = [], False
        real_normalize, real_encode = image_norm.normalize_images, split.SplitModel.encode

        def normalize(images, norm="imagenet", dtype=jnp.float32):
            with jax.ensure_compile_time_eval():
                black, white = np.asarray(real_normalize(jnp.asarray([[0] * 3, [255] * 3], jnp.uint8), norm))
            std = 1.0 / (white - black)
            self.calls.append({"in_step": self._in_step, "norm": norm, "mean": -black * std, "std": std})
            return real_normalize(images, norm, dtype)

        def encode(model, *args, **kwargs):
            with self.in_step():
                return real_encode(model, *args, **kwargs)

        monkeypatch.setattr(image_norm, "normalize_images", normalize)
        monkeypatch.setattr(split.SplitModel, "encode", encode)

    @contextlib.contextmanager
    def in_step(self):
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False


def _check_qflops(run):
    for r in run.rows:  # the logged penalties are SPLADE's FLOPs regulariser of the step's vectors
        assert r["penalty_img"] == pytest.approx(r["probe/flops_img"], rel=1e-5)
        assert r["penalty_txt"] == pytest.approx(r["probe/flops_txt"], rel=1e-5)


def _check_q512(run):
    for r in run.rows:  # InfoNCE saw the top-16 vectors, not the whole ones
        assert r["info_nce"] == pytest.approx(r["probe/topk_info_nce"], rel=1e-5)
        assert r["info_nce"] != pytest.approx(r["probe/dense_info_nce"], rel=1e-4)
        assert r["topk_words_img"] == r["topk_words_txt"] == TOP_K
    assert run.final["retrieval/topk/active_words_image"] == run.final["retrieval/topk/active_words_text"] == TOP_K


def _check_qbow(run):
    assert not [k for k in run.params if k[0].startswith("text")]  # no language model, no text codebook
    for r in run.rows:  # every text vector is a unit bag of words; no caption of the synthetic set is empty
        assert r["probe/bow_deviation"] < 1e-6 and 4 <= r["probe/bow_words"] <= 8 and r["empty_txt"] == 0
    final = run.final
    assert final["retrieval/num_empty_texts"] == 0 and final["retrieval/num_texts"] == 120
    first, last = np.mean([r["loss"] for r in run.rows[:2]]), np.mean([r["loss"] for r in run.rows[-2:]])
    assert last < first
    # `lexvla eval`'s path: the restored encoder reads bags of words and reproduces the final evaluation.
    encoder, step = inference.restore(run.config, run.workdir)
    s = encoder.encode_texts(["a small red circle above it", "what is it"])
    assert step == STEPS and np.count_nonzero(s[0]) == 3 and not s[1].any()
    np.testing.assert_allclose(s[0][s[0] > 0], 3**-0.5, rtol=1e-6)
    assert [encoder.words[j] for j in np.flatnonzero(s[0])] == sorted(
        ["small", "red", "circle"], key=encoder.words.index
    )
    again = registry.run_evaluators(registry.build_evaluators(run.config), encoder)
    for key in ("retrieval/dense/i2t_r@1", "retrieval/dense/t2i_r@5", "patchdis/miou"):
        assert again[key] == pytest.approx(final[key], abs=1e-6)


def _check_clip_tower(run, family: str):
    """The trained vision tower is a CLIP (class token, pre-LayerNorm) or SigLIP (MAP head) one; the train step and
    the evaluation normalised images with that tower's own mean and std; the tower trained (this test adds it to the
    trainable set, the variant config itself freezes it) through its patch tokens only, and the adapter trained."""
    vision = run.params
    assert (("vision", "class_embedding", "value") in vision) == (family == "clip")
    assert (("vision", "pre_layernorm", "scale", "value") in vision) == (family == "clip")
    assert (("vision", "head", "probe", "value") in vision) == (family == "siglip")
    assert not [k for k in vision if k[:2] == ("vision", "cls_token")]
    assert build.vision_config(run.config).image_norm == family

    # Normalisation: the step traced it (inside `SplitModel.encode`), and every call, evaluation's included,
    # applied the tower's constants.
    assert [c for c in run.normalizations if c["in_step"]], "the train step never normalised its images"
    mean, std = TOWER_NORMS[family]
    for call in run.normalizations:
        assert call["norm"] == family
        np.testing.assert_allclose(call["mean"], mean, rtol=1e-4)
        np.testing.assert_allclose(call["std"], std, rtol=1e-4)

    # What trained: the variant freezes its tower; here it trains, through its patch tokens only. Each parameter on
    # their path changed (but the attention's key bias: softmax is blind to it, its gradient is rounding noise); the
    # ones that only make the pooled output LexVLA never reads (CLIP's post_layernorm of the class token, SigLIP's
    # head) got no gradient at all: Adam's first moment is exactly zero. Every adapter parameter changed.
    variant = configlib.load_config(f"{VARIANTS}/{'qclip' if family == 'clip' else family}.py:tiny")
    assert "vision" not in variant.train.trainable and "vision" in run.config.train.trainable
    pooled_only = ("post_layernorm",) if family == "clip" else ("head",)
    moments = _first_moments(run.state)
    tower = {p[1] for p in run.initial if p[0] == "vision"}
    assert tower >= {"patch_embeddings", "position_embeddings", "layers", *pooled_only}
    assert any(p[0] == "adapter" for p in run.initial)
    for path, before in run.initial.items():
        after = vision[(*path, "value")]
        assert after.shape == before.shape and after.dtype == np.float32, path
        if path[0] == "vision" and path[1] in pooled_only:
            assert not moments[path].any(), f"{path} got a gradient"
        elif path[-2:] != ("k_proj", "bias"):
            assert not np.array_equal(after, before), f"{path} did not train"


def _first_moments(state: dict) -> dict:
    """Adam's first moment `mu` of each trainable parameter, by nnx path, from a flat train state."""

    def find(tree):
        if isinstance(tree, dict):
            if "mu" in tree:
                return tree["mu"]
            tree = list(tree.values())
        for sub in tree if isinstance(tree, list | tuple) else ():
            if (found := find(sub)) is not None:
                return found
        return None

    return {k[:-1]: v for k, v in _flatten(find(state[("opt_state",)])).items()}


CHECKS = {
    "qclip": lambda run: _check_clip_tower(run, "clip"),
    "siglip": lambda run: _check_clip_tower(run, "siglip"),
    "qflops": _check_qflops,
    "q512": _check_q512,
    "qbow": _check_qbow,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_variant_trains_a_few_steps(name, data_dir, tmp_path, monkeypatch):
    probe, real_loss = PROBES[name], losses.lexvla_loss

    def probed_loss(s_img, s_txt, logit_scale, **kwargs):
        loss, metrics = real_loss(s_img, s_txt, logit_scale, **kwargs)
        extra = probe(s_img, s_txt, logit_scale) if probe else {}
        return loss, {**metrics, **{f"probe/{k}": v for k, v in extra.items()}}

    monkeypatch.setattr(step_lib.losses, "lexvla_loss", probed_loss)
    normalizations = NormalizationProbe(monkeypatch)
    initial, real_build = {}, build.build_model

    def recorded_build(*args, **kwargs):  # the weights the run starts from, as built
        model = real_build(*args, **kwargs)
        if not initial:
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                if path[0] in ("vision", "adapter"):
                    initial[path] = np.array(v[...])
        return model

    monkeypatch.setattr(build, "build_model", recorded_build)
    extra = {
        "train.num_steps": STEPS,
        "train.log_every": 1,
        "train.show_top_words": 0,
        "checkpoint.every_steps": STEPS,
        "train.final_eval": True,
        "model.text_checkpoint": "",  # from scratch, whatever the tiny base loads
        "model.vision_checkpoint": "",
    }
    config = configlib.load_config(f"{VARIANTS}/{name}.py:tiny", local_cluster.overrides(data_dir, **extra))
    # The tiny job freezes stage 0's tower; with no stage 0 here the random tower trains, as a from-scratch run does.
    config.train.trainable = ("vision", *config.train.trainable)
    if name != "qbow":
        del config.evals["patchdis"]
    workdir = str(tmp_path / "work")
    final = train.run(config, workdir)
    rows = [r for r in local_cluster.metric_rows(workdir) if "loss" in r]
    flat = local_cluster.final_state(workdir, STEPS)
    params = {k[1:]: v for k, v in _flatten(flat).items() if k[0] == "params"}
    losses_seen = [r["loss"] for r in rows]
    print(f"\n{name}: loss {' '.join(f'{x:.3f}' for x in losses_seen)}")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert np.all(np.isfinite(losses_seen)) and len(set(losses_seen)) == STEPS
    assert final["retrieval/num_images"] == 24 and final["retrieval/num_texts"] == 120  # the whole eval set
    run = Run(rows, params, final, config, workdir, _flatten(flat), initial, normalizations.calls)
    CHECKS[name](run)


def _flatten(tree, prefix=()) -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, (*prefix, key)).items()}
    return {prefix: tree}
