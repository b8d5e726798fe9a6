"""Encoding host data with a (trained) LexVLA on its mesh: images, captions and patches → lexical vectors.

`LexicalEncoder` is what evaluators, `lexvla explain` and `lexvla export` use. It works the same on one
process and on many: every process passes the same full host arrays, each device reads only its rows of
every batch, and the results come back replicated, so every process gets the same full NumPy arrays.
Batches are padded to a fixed size (a multiple of the data-parallel size), so any number of rows works and
each function compiles once.

`restore(config, workdir)` builds the model of a config (frozen towers from their Hugging Face
checkpoints), restores only the trained parameters of a workdir's checkpoint onto the mesh (no optimiser, no
train step), and returns the encoder; `load(workdir)` does the same with the config saved beside the checkpoint
(`lexvla_jax.load`, the Python API).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lexvla_jax import build, configlib, explain, optim, sharding
from lexvla_jax.checkpoints import CheckpointDamaged, Checkpointer, CheckpointNotFound
from lexvla_jax.models.split import SplitModel
from lexvla_jax.text import bow
from lexvla_jax.text.prompt import PromptEncoder
from lexvla_jax.text.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted encoders of one split model on one mesh (shared by encoders that differ in params)."""

    images: Callable
    texts: Callable
    patches: Callable
    projected_patches: Callable

    @classmethod
    def make(cls, model: SplitModel, mesh) -> _Programs:
        replicated = NamedSharding(mesh, PartitionSpec())
        jit = lambda f: jax.jit(f, out_shardings=replicated)

        def images(params, frozen, rest, pixels):
            m = model.merge(params, frozen, rest)
            return m.encode_image(m.normalize(pixels))

        def texts(params, frozen, rest, input_ids, attention_mask):
            return model.merge(params, frozen, rest).encode_text(input_ids, attention_mask)

        def patches(params, frozen, rest, pixels):
            m = model.merge(params, frozen, rest)
            return m.patch_lexical(m.normalize(pixels))

        def projected_patches(params, frozen, rest, pixels, project):
            p = patches(params, frozen, rest, pixels)
            return jnp.einsum("bpv,vc->bpc", p, project, preferred_element_type=jnp.float32)

        return cls(jit(images), jit(texts), jit(patches), jit(projected_patches))


@dataclasses.dataclass(frozen=True)
class LexicalEncoder:
    """A LexVLA model on its mesh, encoding host arrays into lexical vectors (see the module docstring)."""

    model: SplitModel
    params: object
    frozen: object
    rest: object
    mesh: jax.sharding.Mesh
    rules: tuple
    tokenizer: Tokenizer
    prompt: PromptEncoder | bow.BowEncoder  # caption → the text side's rows (`build.caption_encoder`)
    kept_ids: np.ndarray
    image_size: int
    patch_size: int
    batch_size: int
    programs: _Programs

    @classmethod
    def create(cls, model: SplitModel, params, frozen, rest, mesh, rules, prompt, kept_ids, *, image_size: int,
               patch_size: int, batch_size: int) -> LexicalEncoder:  # fmt: skip
        dp = sharding.data_parallel_size(mesh, rules)
        batch_size = -(-batch_size // dp) * dp  # a multiple of the data-parallel size
        return cls(
            model, params, frozen, rest, mesh, tuple(rules), prompt.tokenizer, prompt, np.asarray(kept_ids),
            image_size, patch_size, batch_size, _Programs.make(model, mesh),
        )  # fmt: skip

    @classmethod
    def for_program(cls, config, program, params, frozen, rest, prompt, kept_ids, patch_size: int) -> LexicalEncoder:
        """The encoder of a training program's model (`program.make_program`) under `config`."""
        return cls.create(
            program.model, params, frozen, rest, program.mesh, program.rules, prompt, kept_ids,
            image_size=config.data.image_size, patch_size=patch_size, batch_size=config.eval.batch_size,
        )  # fmt: skip

    def top_words(self, s: np.ndarray, k: int = 8) -> list[tuple[str, float]]:
        """The `k` strongest words of one lexical vector `[V']`, as (word, weight), strongest first."""
        return explain.top_words(s, self.kept_ids, self.tokenizer, k)

    def with_params(self, params) -> LexicalEncoder:
        """The same encoder (same compiled functions) with other trainable parameters."""
        return dataclasses.replace(self, params=params)

    @property
    def words(self) -> list[str]:
        """The readable word of each dimension (SentencePiece's word-start mark removed)."""
        return [self.tokenizer.word(i) for i in self.kept_ids]

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid at `image_size`; patch vectors are in row-major order."""
        side = self.image_size // self.patch_size
        return side, side

    def _place(self, array: np.ndarray) -> jax.Array:
        spec = sharding.named_sharding(self.mesh, ("batch",) + (None,) * (array.ndim - 1), self.rules, array.shape)
        return jax.make_array_from_callback(array.shape, spec, lambda index: array[index])

    def _batches(self, function, arrays: Sequence[np.ndarray], *extra) -> np.ndarray:
        n = len(arrays[0])
        outputs = []
        with sharding.use_mesh_rules(self.mesh, self.rules):
            for start in range(0, n, self.batch_size):
                chunk = [a[start : start + self.batch_size] for a in arrays]
                rows = len(chunk[0])
                pad = self.batch_size - rows
                chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) if pad else c for c in chunk]
                out = function(self.params, self.frozen, self.rest, *(self._place(c) for c in chunk), *extra)
                outputs.append(np.asarray(out)[:rows])
        return np.concatenate(outputs)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 `[N,S,S,3]` → float32 `[N,V']` normalised image lexical vectors (max over patches)."""
        return self._batches(self.programs.images, [self._check_images(images)])

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        """Captions → float32 `[N,V']` normalised text lexical vectors (prompt → LM → last token → codebook, or the
        bag of the caption's content words for `text_encoder="bow"`)."""
        batch = self.prompt.batch(list(captions))
        return self.encode_tokens(batch["input_ids"], batch["attention_mask"])

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Text rows (as `self.prompt` makes them) → float32 `[N,V']`."""
        return self._batches(self.programs.texts, [np.asarray(input_ids), np.asarray(attention_mask)])

    def encode_patches(self, images: np.ndarray, project: np.ndarray | None = None) -> np.ndarray:
        """Per-patch lexical vectors (ELU1p, L2-normalised per patch, no max-pool): float32 `[N,P,V']`.

        With `project` `[V',C]`, returns `[N,P,C] = patches @ project` computed on the devices (PatchDis,
        word maps: never holds `[N,P,V']` on the host).
        """
        images = self._check_images(images)
        if project is None:
            return self._batches(self.programs.patches, [images])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        project = jax.device_put(np.asarray(project, np.float32), replicated)
        return self._batches(self.programs.projected_patches, [images], project)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N,{self.image_size},{self.image_size},3], got {images.dtype} "
                f"{list(images.shape)}; resize them to config.data.image_size"
            )
        return images


def restore(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> tuple[LexicalEncoder, int]:
    """The trained parameters of `workdir` (latest step, or `step`) on the config's mesh, and that step.

    Builds the model of `config` (frozen towers from their Hugging Face checkpoints) and reads only the trained
    parameters of the checkpoint: no optimiser, no train step.
    """
    sharding.initialize_distributed(config.dist)
    tokenizer, kept_ids = build.load_vocabulary(config)
    checkpointer = Checkpointer(workdir, every_steps=1, keep=None, async_save=False, create=False)
    try:
        # The checkpoint and its vocabulary are checked before the model is built: user errors come fast.
        step = _existing_step(checkpointer, step)
        try:
            checkpointer.check_vocabulary(step, tokenizer, kept_ids, config.data.tokenizer)
            mesh, rules = sharding.mesh_and_rules(config)
            with sharding.use_mesh_rules(mesh, rules):
                model = build.build_model(config, mesh, kept_ids)
            graphdef, params, frozen, rest = nnx.split(
                model, optim.trainable_filter(config.train.trainable), nnx.Param, ...
            )
            shardings = sharding.state_shardings(params, mesh, rules)
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
            del params
            params = checkpointer.restore_params(step, abstract)
        except CheckpointDamaged as e:
            older = [s for s in checkpointer.all_steps() if s < step]
            steps = ", ".join(map(str, older))
            choice = f"read an older one with --step N (steps {steps})" if older else "no older step exists"
            raise CheckpointDamaged(f"{e}; {choice}", step) from e
    finally:
        checkpointer.close()
    encoder = LexicalEncoder.create(
        SplitModel(graphdef), params, frozen, rest, mesh, rules, build.caption_encoder(config, tokenizer, kept_ids),
        kept_ids, image_size=config.data.image_size, patch_size=model.config.vision.patch_size,
        batch_size=config.eval.batch_size,
    )  # fmt: skip
    return encoder, step


def _existing_step(checkpointer: Checkpointer, step: int | None) -> int:
    """`step`, or the latest one, when the workdir has it; else a one-line `CheckpointNotFound`."""
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.all_steps():
        raise CheckpointNotFound(
            f"no checkpoint {'' if step is None else f'at step {step} '}under {checkpointer.directory}; "
            "pass the workdir `lexvla train` wrote (and an existing --step)"
        )
    return step


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a workdir's checkpoint (latest, or `step`) was trained with."""
    checkpointer = Checkpointer(workdir, every_steps=1, keep=None, async_save=False, create=False)
    try:
        return ml_collections.ConfigDict(checkpointer.restore_config(_existing_step(checkpointer, step)))
    finally:
        checkpointer.close()


def load(
    workdir: str, config: ml_collections.ConfigDict | str | None = None, step: int | None = None
) -> LexicalEncoder:
    """A trained LexVLA, ready to encode: `lexvla_jax.load("runs/tiny")`.

    `config`: the config the run was trained with — by default the one saved with the checkpoint; or a config
    file (`"configs/tiny.py"`, with `:arg`) or a `ConfigDict`. Relative paths in it (tokenizer, Hugging Face
    towers) are read from the current directory. `step`: a checkpoint step (default: the latest).
    """
    if config is None:
        config = saved_config(workdir, step)
    elif isinstance(config, str):
        config = configlib.load_config(config)
    return restore(config, workdir, step)[0]
