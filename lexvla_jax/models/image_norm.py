"""Image normalisation on the device: uint8 pixels → the (x/255 − mean) / std each vision tower was trained with.

Images travel to the devices as uint8 (a quarter of float32's host→device traffic) and are normalised inside the
jitted functions. The vision tower's config names its normalisation (`image_norm`): DINOv2 uses ImageNet's mean
and std, CLIP its own, SigLIP 0.5 / 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DINOv2
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGENET_MEAN, IMAGENET_STD = NORMALIZATIONS["imagenet"]


def check_image_norm(name: str) -> str:
    if name not in NORMALIZATIONS:
        raise ValueError(f"image_norm {name!r} unknown; choose one of {sorted(NORMALIZATIONS)}")
    return name


def normalize_images(images: jax.Array, image_norm: str = "imagenet", dtype=jnp.float32) -> jax.Array:
    """uint8 `[..., 3]` → `(x/255 − mean) / std` with the mean and std of `image_norm`, in float32 then `dtype`."""
    mean, std = NORMALIZATIONS[check_image_norm(image_norm)]
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
