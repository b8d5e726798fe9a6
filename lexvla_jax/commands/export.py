"""`lexvla export`: a model's sparse lexical vectors of an eval set's images and/or captions, on disk.

  lexvla export --config configs/tiny.py --workdir runs/tiny --out runs/tiny/sparse [--what images captions]
      [--threshold T | --top-k K] [--scale 1000] [--max-images N] [--source NAME]

Reads the image-text set of a retrieval evaluator of `config.evals` (`--source NAME`; default: the first one —
webdataset, Karpathy json or TFDS; override its fields with `--config.evals.NAME.*`) and writes
OUT/images/ and OUT/captions/, each an exported collection (`lexvla_jax.sparse.export`): collection.jsonl
(Anserini/Seismic), queries.tsv, vectors.npz (scipy.sparse) and meta.json. Image ids are the sample keys, caption
ids `KEY#n` (the n-th caption of image KEY); an image's content is its captions joined by " | ".
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from lexvla_jax import configlib
from lexvla_jax.commands import common
from lexvla_jax.data.eval_set import image_text_records, read_image_text_set
from lexvla_jax.evaluate.base import entry_settings
from lexvla_jax.evaluate.retrieval import RetrievalEvaluator
from lexvla_jax.sparse import export

WHAT = ("images", "captions")


def export_eval_set(
    encoder,
    eval_set: dict,
    out: str,
    what: Sequence[str] = WHAT,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    scale: int = export.DEFAULT_SCALE,
) -> dict[str, tuple[export.SparseVectors, list[str]]]:
    """Encodes the eval set's images and/or captions into collections under `out`: {kind: (vectors, files)}."""
    keys, captions = eval_set["keys"], eval_set["captions"]
    captions_of_image, caption_ids = [[] for _ in keys], []
    for caption, image in zip(captions, eval_set["image_of_text"], strict=True):
        caption_ids.append(f"{keys[image]}#{len(captions_of_image[image])}")
        captions_of_image[image].append(caption)
    sources = {
        "images": (encoder.encode_images, eval_set["image"], list(keys), [" | ".join(c) for c in captions_of_image]),
        "captions": (encoder.encode_texts, list(captions), caption_ids, list(captions)),
    }
    written = {}
    for kind in what:
        encode, items, ids, contents = sources[kind]
        matrix = export.encode_sparse(encode, items, encoder.batch_size, threshold=threshold, top_k=top_k, scale=scale)
        settings = {"threshold": threshold, "top_k": top_k}
        vectors = export.SparseVectors(ids, contents, matrix, list(encoder.words), scale, settings)
        written[kind] = (vectors, export.write_collection(os.path.join(out, kind), vectors))
    return written


def _source(config, name: str | None) -> tuple[str, dict]:
    """The `config.evals` retrieval entry to export (by name, or the first one)."""
    entries = {k: v.to_dict() for k, v in (config.get("evals") or {}).items() if v.get("type") == "retrieval"}
    if not entries:
        raise configlib.ConfigError("config.evals has no retrieval entry to export; add one (see configs/tiny.py)")
    name = name or sorted(entries)[0]
    if name not in entries:
        raise configlib.ConfigError(f"--source {name!r} is not a retrieval entry of config.evals: {', '.join(entries)}")
    return name, entry_settings(name, entries[name], RetrievalEvaluator)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla export", description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--out", required=True, help="output directory (gets images/ and captions/)")
    parser.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT), help="what to export")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--threshold", type=float, help="keep weights >= this (default 1/sqrt(V'))")
    cut.add_argument("--top-k", type=int, help="keep the k largest weights of each vector instead")
    parser.add_argument("--scale", type=int, default=export.DEFAULT_SCALE, help="impact = round(scale * weight)")
    parser.add_argument("--max-images", type=int, help="export only the first N images (and their captions)")
    parser.add_argument("--source", help="the config.evals entry whose image-text set is exported")
    config, args = configlib.parse_command(argv, parser)
    if args.scale < 1:
        raise configlib.ConfigError(f"--scale {args.scale}: must be a positive integer, e.g. {export.DEFAULT_SCALE}")
    if args.top_k is not None and args.top_k < 1:
        raise configlib.ConfigError(f"--top-k {args.top_k}: must be at least 1")
    name, source = _source(config, args.source)
    where = f"config.evals.{name}"
    records = image_text_records(source, where)
    eval_set = read_image_text_set(records, config.data, source.get("captions_per_image", 0), args.max_images, where)
    encoder = common.restore_encoder(config, args.workdir, args.step)
    if args.top_k is not None and args.top_k > len(encoder.words):
        raise configlib.ConfigError(f"--top-k {args.top_k}: the model has only {len(encoder.words)} words")
    written = export_eval_set(
        encoder, eval_set, args.out, args.what, threshold=args.threshold, top_k=args.top_k, scale=args.scale
    )
    for kind, (vectors, paths) in written.items():
        active = np.diff(vectors.matrix.indptr)
        print(f"{kind}: {len(vectors.ids)} vectors, {active.mean():.1f} active words on average (scale {args.scale})")
        for path in paths:
            print(f"  {path}")
    return 0
