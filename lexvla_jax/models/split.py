"""The model held in parts, `(graphdef; params, frozen, rest)`, as the jitted train step and the encoders hold it."""

from __future__ import annotations

import jax
from flax import nnx


def trains(params: nnx.State, tower: str) -> bool:
    """Whether any trainable parameter (`params`) lies in the model's attribute `tower` (LoRA weights count)."""
    return any(path[0] == tower for path, _ in nnx.to_flat_state(params))


class SplitModel:
    """The model held as `(graphdef; params, frozen, rest)`: merges the parts and runs the two towers.

    Training and evaluation share it; frozen state is wrapped in `stop_gradient` on every merge.
    """

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef

    def merge(self, params, frozen, rest, rng=None):
        # Fresh variables (`copy`): reseeding must not mutate the caller's `rest`, which may belong to an outer trace.
        model = nnx.merge(self.graphdef, params, jax.lax.stop_gradient(frozen), rest, copy=True)
        if rng is not None:  # stacked layers hold one dropout key per layer: split `rng` to their shape
            nnx.reseed(model, policy="match_shape", dropout=rng)
        return model

    def encode(self, params, frozen, rest, batch, rng, deterministic: bool):
        """`(s_img, s_txt)` of a batch `{"image": uint8, "input_ids", "attention_mask"}`.

        `deterministic=False` turns drop path and LoRA dropout on, but only in a tower that trains (`trains`):
        a frozen tower runs deterministic whatever its checkpoint's `drop_path_rate` or dropout says.
        """
        model = self.merge(params, frozen, rest, rng)
        vision_fixed = deterministic or not trains(params, "vision")
        text_fixed = deterministic or not trains(params, "text")
        s_img = model.encode_image(model.normalize(batch["image"]), deterministic=vision_fixed)
        s_txt = model.encode_text(batch["input_ids"], batch["attention_mask"], deterministic=text_fixed)
        return s_img, s_txt

    def logit_scale(self, params, frozen, rest):
        return self.merge(params, frozen, rest).logit_scale_value()
