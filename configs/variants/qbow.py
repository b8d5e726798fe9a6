"""Q(BoW), Table 1: the text vector is the caption's bag of content words; no language model at all.

`model.text_encoder="bow"`: a caption's text lexical vector is the L2-normalised indicator of its content words
over the kept vocabulary (`text/bow.py`: NLTK's English stopword list removed from the caption's lowercase words, so
its nouns, adjectives and verbs remain; each word counts through every kept piece of its tokenisation). Llama is
neither built nor loaded, so there is no text codebook, no LoRA and no `lm_head` to start the visual codebook
from: it starts from random rows (normal, std 0.02) at the text config's width, and the image side trains to
predict the caption's words. Training, `lexvla eval`, retrieval and PatchDis (class names → bags of words) all
read the same bag-of-words rows.

  lexvla train --config configs/variants/qbow.py --workdir DIR --config.model.vision_checkpoint=/ckpt/...
"""

from lexvla_jax import configlib


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    config.model.text_encoder = "bow"
    config.model.text_checkpoint = ""  # no language model to load
    config.train.trainable = tuple(g for g in config.train.trainable if g not in ("text", "lora"))  # no text tower
    config.optim.lr_scales = {g: s for g, s in (config.optim.get("lr_scales") or {}).items() if g != "lora"}
    return config
