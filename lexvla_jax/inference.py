"""Encoding host data with a (trained) LexVLA on its mesh: images, captions and patches → lexical vectors.

`LexicalEncoder` is what evaluators, `lexvla explain` and `lexvla export` use. It works the same on one
process and on many: every process passes the same full host arrays, each device reads only its rows of
every batch, and the results come back replicated, so every process gets the same full NumPy arrays.
Batches are padded to a fixed size (a multiple of the data-parallel size), so any number of rows works and
each function compiles once.

`restore(config, workdir)` builds the model of a config (frozen towers from their Hugging Face
checkpoints), restores the trained parameters of a workdir's checkpoint onto the mesh, and returns the
encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lexvla_jax import sharding
from lexvla_jax.models.split import SplitModel
from lexvla_jax.text import bow
from lexvla_jax.text.prompt import PromptEncoder
from lexvla_jax.text.tokenizer import WORD_START, Tokenizer


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

    def with_params(self, params) -> LexicalEncoder:
        """The same encoder (same compiled functions) with other trainable parameters."""
        return dataclasses.replace(self, params=params)

    @property
    def words(self) -> list[str]:
        """The readable word of each dimension (SentencePiece's word-start mark removed)."""
        return [self.tokenizer.id_to_piece(int(i)).replace(WORD_START, "") for i in self.kept_ids]

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
    """The trained parameters of `workdir` (latest step, or `step`) on the config's mesh, and that step."""
    from lexvla_jax import build
    from lexvla_jax.checkpoints import CheckpointDamaged, Checkpointer, CheckpointNotFound
    from lexvla_jax.program import make_program

    sharding.initialize_distributed(config.dist)
    tokenizer, kept_ids = build.load_vocabulary(config)
    checkpointer = Checkpointer(workdir, every_steps=1, keep=None, async_save=False, create=False)
    try:
        # The checkpoint and its vocabulary are checked before the model is built: user errors come fast.
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise CheckpointNotFound(
                f"no checkpoint {'' if step is None else f'at step {step} '}under {checkpointer.directory}; "
                "pass the workdir `lexvla train` wrote (and an existing --step)"
            )
        try:
            checkpointer.check_vocabulary(step, tokenizer, kept_ids, config.data.tokenizer)
            mesh = sharding.mesh_from_config(config.mesh)
            rules = tuple(tuple(r) for r in config.sharding.rules)
            with sharding.use_mesh_rules(mesh, rules):
                model = build.build_model(config, mesh, kept_ids)
                program, _, frozen, rest = make_program(config, mesh, model)
            state = checkpointer.restore(step, program.abstract_state)
        except CheckpointDamaged as e:
            older = [s for s in checkpointer.all_steps() if s < step]
            steps = ", ".join(map(str, older))
            choice = f"read an older one with --step N (steps {steps})" if older else "no older step exists"
            raise CheckpointDamaged(f"{e}; {choice}", step) from e
    finally:
        checkpointer.close()
    prompt = build.caption_encoder(config, tokenizer, kept_ids)
    patch_size = model.config.vision.patch_size
    encoder = LexicalEncoder.for_program(config, program, state.params, frozen, rest, prompt, kept_ids, patch_size)
    return encoder, step
