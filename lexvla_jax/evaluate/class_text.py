"""Class names → text lexical vectors, shared by PatchDis and zero-shot classification.

1. Prompt names: a dataset's label names as a caption would say them, through a per-dataset name map
   (`NAME_MAPS`; VOC: "aeroplane" → "airplane", "tv monitor" → "tv", "motorbike" → "motorcycle", "pottedplant" →
   "potted plant", as COCO names them).
   Names the map does not hold pass through unchanged.
2. Templates: each template's `{c}` is filled with the prompt name ("a photo of a {c}." → "a photo of a dog."),
   and that text fills the model's caption prompt like any caption.
3. Combining: a class's vector is the mean of its templates' text vectors (each L2-normalised), L2-normalised
   again: CLIP's prompt ensembling on lexical vectors. The mean of non-negative vectors stays non-negative, so the
   class vector still weighs words. With one template it is that template's vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lexvla_jax.evaluate.base import EvalConfigError

# Label names → the words a caption uses. VOC: our spaced names and the devkit's joined ones.
NAME_MAPS: dict[str, dict[str, str]] = {
    "voc": {
        "aeroplane": "airplane",
        "diningtable": "dining table",
        "motorbike": "motorcycle",
        "pottedplant": "potted plant",
        "tvmonitor": "tv",
        "tv monitor": "tv",
    },
}
DEFAULT_TEMPLATES = ("{c}",)


def prompt_names(classes: Sequence[str], name_map, where: str) -> list[str]:
    """`classes` through `name_map`: "none", a `NAME_MAPS` key, or a dict {label name: prompt name}."""
    if isinstance(name_map, Mapping):
        mapping = dict(name_map)
    elif name_map == "none":
        mapping = {}
    elif name_map in NAME_MAPS:
        mapping = NAME_MAPS[name_map]
    else:
        raise EvalConfigError(
            f"{where}.name_map={name_map!r}: use 'none', one of {', '.join(NAME_MAPS)}, or a dict of label → name"
        )
    return [mapping.get(name, name) for name in classes]


def check_templates(templates: Sequence[str], where: str) -> tuple[str, ...]:
    """The templates as a tuple; each must hold `{c}` once."""
    if isinstance(templates, str) or not templates:
        raise EvalConfigError(
            f"{where}.templates={templates!r}: give a list of templates such as ('a photo of a {{c}}.',)"
        )
    bad = [t for t in templates if str(t).count("{c}") != 1]
    if bad:
        raise EvalConfigError(f"{where}.templates: {bad[0]!r} must hold {{c}} (the class name) exactly once")
    return tuple(str(t) for t in templates)


def class_texts(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's texts, class-major: `[t.replace("{c}", name) for name in names for t in templates]`."""
    return [template.replace("{c}", name) for name in names for template in templates]


def class_vectors(encoder, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """float32 `[C, V']`: per class, the L2-normalised mean of its templates' text vectors (module docstring)."""
    texts = np.asarray(encoder.encode_texts(class_texts(names, templates)), np.float32)
    mean = texts.reshape(len(names), len(templates), -1).mean(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return np.where(norm > 0, mean / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
