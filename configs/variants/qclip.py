"""Q(CLIP), Table 1: a CLIP ViT-L/14 (224 px, frozen) instead of DINOv2 as the image tower; all else as the paper.

The paper's evidence for DINOv2: with CLIP's patch tokens MSCOCO image→text R@1 drops from 55.4 to 51.8 and PatchDis
from 36.3 to 13.9 (Table 2). As with DINOv2, the patch tokens (not the class token) go to the adapter and the
max-pool, and images are normalised with CLIP's mean and std (`models/image_norm.py`), which the tower's config names.
Point `config.model.vision_checkpoint` at a local `openai/clip-vit-large-patch14` directory: a `CLIPModel`
(vision and text weights, as OpenAI's checkpoints ship; the text tower is ignored) or a `CLIPVisionModel`.
With `:tiny`, the tiny vision tower is a CLIP one of the same widths.

  lexvla train --config configs/variants/qclip.py --workdir DIR \\
      --config.model.vision_checkpoint=/ckpt/clip-vit-large-patch14
"""

from lexvla_jax import configlib


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    configlib.swap_vision_tower(config, "clip", "clip_vitl14")
    # CLIP evaluates as CLIPImageProcessor and open_clip do: shorter side to 224 (bicubic), centre crop 224, no 256.
    config.data.eval_crop_pct = 1.0
    return config
