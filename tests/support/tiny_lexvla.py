"""A tiny LexVLA, its optimiser and deterministic batches, shared by the step and sharding tests."""

import functools

import jax
import ml_collections
import numpy as np
from flax import nnx

from lexvla_jax import optim, sharding
from lexvla_jax import step as step_lib
from lexvla_jax.models import dinov2, lexvla, llama
from lexvla_jax.models.split import SplitModel

TRAINABLE = ("adapter", "visual_codebook", "logit_scale", "lora")
OPTIM = ml_collections.ConfigDict(
    dict(learning_rate=1e-2, warmup_steps=0, end_lr_fraction=1.0, grad_clip_norm=1.0, b1=0.9, b2=0.99, weight_decay=0.1)
)


def tiny_config(remat: str = "none", drop_path_rate: float = 0.0, lora_dropout: float = 0.0) -> lexvla.LexVLAConfig:
    vision = dinov2.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
        image_size=32,
        remat=remat,
        drop_path_rate=drop_path_rate,
    )
    text = llama.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        lora_rank=4,
        lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
        lora_dropout=lora_dropout,
        remat=remat,
    )
    return lexvla.LexVLAConfig(
        vision=vision, text=text, vocab_size=40, adapter_heads=4, adapter_mlp_dim=64, max_pool_chunk=16
    )


def tiny_model(seed: int = 0, **config) -> lexvla.LexVLA:
    """A tiny LexVLA, a new one each call; `config` goes to `tiny_config` (remat, drop_path_rate, lora_dropout)."""
    return nnx.merge(*_initial(seed, tiny_config(**config)), copy=True)


@functools.cache
def _initial(seed: int, config: lexvla.LexVLAConfig):
    """The split of a freshly initialised model (made once per session and config: an eager init takes ~10 s)."""
    model = lexvla.LexVLA(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    # LoRA B starts at zero; give it values so LoRA gradients are not trivially tied to A's.
    for _, node in nnx.iter_graph(model):
        if hasattr(node, "lora_b"):
            node.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(7), node.lora_b[...].shape)
    return nnx.split(model)


def tiny_batch(batch_size: int = 16, seed: int = 0, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, size=(batch_size, 1))
    return {
        "image": rng.integers(0, 256, size=(batch_size, 32, 32, 3), dtype=np.uint8),
        "input_ids": rng.integers(3, 96, size=(batch_size, length)).astype(np.int32),
        "attention_mask": (np.arange(length)[None] < lengths).astype(np.int32),
    }


def split(model):
    return nnx.split(model, optim.trainable_filter(TRAINABLE), nnx.Param, ...)


def split_model(graphdef) -> SplitModel:
    return SplitModel(graphdef)


def loss_config() -> step_lib.LossConfig:
    return step_lib.LossConfig(lambda_img=0.05, lambda_txt=0.05, penalty="overuse", warmup_steps=0)


def as_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def sharded_step(mesh, graphdef, params, frozen, rest, tx, schedule, num_micro: int = 2):
    """The jitted train step on `mesh` and its placed inputs `(frozen, rest, state)`.

    Values are copied onto the mesh shard by shard (works across processes; the donated state never
    aliases the caller's arrays).
    """
    rules = sharding.DEFAULT_RULES
    frozen_sh = sharding.state_shardings(frozen, mesh, rules)
    rest_sh = sharding.state_shardings(rest, mesh, rules)
    state = step_lib.init_train_state(params, tx, seed=0)
    state_sh = step_lib.train_state_shardings(jax.eval_shape(lambda: state), tx, mesh, rules)
    place = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: np.asarray(x)[i]), tree, shardings
    )
    step = step_lib.jit_train_step(
        split_model(graphdef),
        tx,
        schedule,
        loss_config(),
        num_micro,
        frozen_shardings=frozen_sh,
        rest_shardings=rest_sh,
        state_shardings=state_sh,
        batch_sharding=sharding.batch_sharding(mesh, rules),
    )
    return step, (place(frozen, frozen_sh), place(rest, rest_sh), place(state, state_sh))
