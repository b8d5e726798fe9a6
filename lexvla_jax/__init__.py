"""LexVLA in JAX / Flax NNX: interpretable vision-language alignment through one lexical vocabulary.

import lexvla_jax
model = lexvla_jax.load("runs/tiny")           # a trained workdir; its saved config, latest checkpoint
s_img = model.encode_images(images)            # uint8 [N, S, S, 3] → [N, V'] lexical vectors
s_txt = model.encode_texts(["a red circle"])   # captions → [N, V']
print(model.top_words(s_img[0], k=5))          # [(word, weight), ...]
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `load` imports JAX; `import lexvla_jax` alone (the `lexvla` entry point, data workers) does not.
    if name == "load":
        from lexvla_jax.inference import load

        return load
    raise AttributeError(f"module 'lexvla_jax' has no attribute {name!r}")
