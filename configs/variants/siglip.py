"""SigLIP as the image tower (not in the paper): SigLIP So400m/14 at 224 px (frozen) instead of DINOv2.

SigLIP is CLIP's tower without a class token (so every output token is a patch token and all go to the adapter),
with a patch bias, no pre-LayerNorm, a LayerNorm on every output token and an attention-pooling head (unused here);
images are normalised with 0.5 / 0.5. Point `config.model.vision_checkpoint` at a local
`google/siglip-so400m-patch14-224` directory (`SiglipModel` or `SiglipVisionModel`). With `:tiny`, the tiny vision
tower is a SigLIP one of the same widths.

  lexvla train --config configs/variants/siglip.py --workdir DIR \\
      --config.model.vision_checkpoint=/ckpt/siglip-so400m-patch14-224
"""

from lexvla_jax import configlib


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    configlib.swap_vision_tower(config, "siglip", "siglip_so400m14")
    # SiglipImageProcessor squashes the whole image to 224×224 (bicubic, no crop); our evaluation transform keeps the
    # aspect ratio, so we take the nearest it offers: shorter side to 224, centre crop 224 (same scale, the long
    # side's ends cut instead of the image distorted), not DINOv2's 256 → 224.
    config.data.eval_crop_pct = 1.0
    return config
