"""The vision tower with registers: DINOv2 ViT-L/14 with 4 register tokens (`dinov2_vitl14_reg`).

Registers are extra tokens beside CLS that soak up the high-norm artefacts DINOv2 otherwise writes into
background patches; the adapter reads patch tokens only, so they never reach a lexical vector. Point
`config.model.vision_checkpoint` at a local `dinov2-with-registers-large` directory. With `:tiny`, the tiny
vision tower gets 4 registers.

  lexvla train --config configs/variants/registers.py --workdir DIR --config.model.vision_checkpoint=/ckpt/...
"""

from lexvla_jax import configlib


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    if config.model.vision.preset:
        config.model.vision.preset += "_reg"
    else:
        # Stage 0 pretrains a tower with registers in its own directory, antialiasing resampled position embeddings
        # as transformers' Dinov2WithRegistersModel does.
        config.model.vision.num_register_tokens = 4
        config.model.vision.pos_embed_antialias = True
        config.miniature.vision.dir += "_registers"
    return config
