"""The adapter at the paper's reported size (~17M parameters): a whole transformer block at the vision width,
then a projection into the text width (`LexVLAConfig.adapter_shape="block"`).

For DINOv2 ViT-L (1024) into Llama-2-7B (4096) with MLP width 4096 that is 16.8M parameters; the default
"mlp" adapter (attention, then 1024 → 4096 → 4096) has 25.2M. `models/lexvla.py:Adapter` shows both.
The paper config (`:paper`) already uses "block", so there this variant changes nothing; on `:tiny` it does.
"""

from lexvla_jax import configlib


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    config.model.adapter_shape = "block"
    return config
