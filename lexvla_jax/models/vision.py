"""The image towers LexVLA can use, by name: "dinov2" (the paper's), "clip" (Q(CLIP)) and "siglip".

A tower's config class decides which module is built (`make_tower`) and which Hugging Face model types load into it
(`tower_of_model_type`). All three return `vit.ViTOutput` and expose `num_prefix_tokens`, the tokens before the
patch tokens that LexVLA's adapter reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from lexvla_jax.models import clip, dinov2

TOWERS = ("dinov2", "clip", "siglip")
VisionConfig = dinov2.Dinov2Config | clip.ClipVisionConfig


def tower_config(tower: str, preset: str = "", **fields) -> VisionConfig:
    """The config of a `tower` from an optional preset and explicit (HF-named) fields."""
    if tower not in TOWERS:
        raise ValueError(f"vision tower {tower!r} unknown; choose one of {TOWERS}")
    cls = dinov2.Dinov2Config if tower == "dinov2" else clip.ClipVisionConfig
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{unknown[0]!r} is no field of the {tower} tower's config; its fields: {sorted(known)}")
    if tower == "dinov2":
        return dinov2.dinov2_preset(preset, **fields) if preset else dinov2.Dinov2Config(**fields)
    return clip.clip_vision_config(tower, preset, **fields)


def tower_name(config: VisionConfig) -> str:
    return "dinov2" if isinstance(config, dinov2.Dinov2Config) else config.family


def tower_of_model_type(model_type: Any) -> str | None:
    """The tower a Hugging Face `model_type` loads into (None: none of ours)."""
    if model_type in dinov2.MODEL_TYPES:
        return "dinov2"
    return clip.MODEL_TYPES[model_type][0] if model_type in clip.MODEL_TYPES else None


def config_from_hf(hf: dict, **runtime) -> VisionConfig:
    """The tower config of a checkpoint's `config.json` (`ValueError` for a model type that is no tower of ours)."""
    tower = tower_of_model_type(hf.get("model_type"))
    if tower is None:
        known = sorted([*dinov2.MODEL_TYPES, *clip.MODEL_TYPES])
        raise ValueError(f"config model_type {hf.get('model_type')!r} is no vision tower; expected one of {known}")
    cls = dinov2.Dinov2Config if tower == "dinov2" else clip.ClipVisionConfig
    return cls.from_hf(hf, **runtime)


def make_tower(config: VisionConfig, *, rngs: nnx.Rngs) -> dinov2.Dinov2Model | clip.ClipVisionModel:
    if isinstance(config, dinov2.Dinov2Config):
        return dinov2.Dinov2Model(config, rngs=rngs)
    return clip.ClipVisionModel(config, rngs=rngs)
