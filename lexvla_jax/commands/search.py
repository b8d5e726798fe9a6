"""`lexvla search`: the best matches of a query in an exported collection, with the words they share.

  lexvla search --index DIR --query-text "a red circle" --config configs/tiny.py --workdir runs/tiny
  lexvla search --index DIR --query-image photo.jpg --config configs/tiny.py --workdir runs/tiny
  lexvla search --index DIR --query-id KEY#0 [--queries OTHER_DIR]
      [--method seismic|exact] [-k 10] [--words 5] [--query-cut N] [--heap-factor F] [--rerank N]

Text queries against an image collection search text→image; image queries against a caption collection
search image→text. `--query-id` takes an exported vector (of `--queries`, default the collection itself) and
needs no model. The query is sparsified like the collection was. Prints rank, id, score, the shared words by
contribution, and the content. `--method exact` reads a collection anywhere `etils.epath` does (`gs://…`); Seismic's
index is local files, so `--method seismic` needs a local DIR.
"""

from __future__ import annotations

import argparse

import numpy as np

from lexvla_jax import configlib
from lexvla_jax.commands import common
from lexvla_jax.commands.index import add_search_args, check_local, search_settings
from lexvla_jax.sparse import export, index, parts


def encoded_query(args, vectors: export.SparseVectors) -> tuple[np.ndarray, np.ndarray, str]:
    """(words, weights, description) of the query given on the command line."""
    if args.query_id is not None:
        source = parts.read_collection(args.queries) if args.queries else vectors
        if source.words != vectors.words:
            raise export.CollectionError("--queries and --index were exported with different vocabularies")
        words, weights = source.row(source.position(args.query_id))
        return words, weights, f"vector {args.query_id!r}"
    if args.config_spec is None:
        raise configlib.ConfigError("--query-text/--query-image need the model: pass --config FILE and --workdir DIR")
    config = configlib.load_config(args.config_spec, args.overrides)
    encoder = common.restore_encoder(config, args.workdir, args.step)
    if list(encoder.words) != vectors.words:
        raise export.CollectionError(
            f"the model's vocabulary (V'={len(encoder.words)}) is not the collection's (V'={len(vectors.words)}); "
            "export the collection with this model"
        )
    if args.query_text is not None:
        s, description = encoder.encode_texts([args.query_text])[0], f"text {args.query_text!r}"
    else:
        images = common.read_images([args.query_image], config.data, encoder.image_size)
        s, description = encoder.encode_images(images)[0], f"image {args.query_image!r}"
    words, weights = export.sparse_query(s, **vectors.sparsification)
    return words, weights, description


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla search", description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="a collection: OUT/images or OUT/texts of `lexvla encode`")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--query-text", help="a caption, encoded by the model")
    query.add_argument("--query-image", help="an image file, encoded by the model")
    query.add_argument("--query-id", help="the id of an exported vector")
    parser.add_argument("--queries", help="the collection holding --query-id (default: --index)")
    parser.add_argument("--method", choices=("seismic", "exact"), default="seismic")
    parser.add_argument("-k", type=int, default=10, help="results")
    parser.add_argument("--words", type=int, default=5, help="shared words shown per result")
    common.add_model_args(parser)
    add_search_args(parser)
    spec, overrides, rest = configlib.split_config_args(argv)
    args = parser.parse_args(rest)
    args.config_spec, args.overrides = spec, overrides
    if args.k < 1:
        raise configlib.ConfigError(f"-k {args.k}: must be at least 1")
    if args.method == "seismic":
        check_local(args.index, "lexvla index")
    vectors = parts.read_collection(args.index)
    settings = search_settings(args)
    if args.method == "exact":
        searcher = index.ExactIndex.build(vectors)
    else:
        searcher = index.SeismicIndex.load(args.index, vectors, **settings)
    words, weights, description = encoded_query(args, vectors)
    print(f"query: {description}, {len(words)} words; {args.method} search of {len(vectors.ids)} vectors")
    hits = index.search(searcher, vectors, words, weights, k=args.k, n_words=args.words)
    for rank, hit in enumerate(hits, 1):
        shared = ", ".join(f"{w} {c:.3f}" for w, c in hit.words)
        print(f"{rank:>3}  {hit.id}  {hit.score:.4f}  [{shared}]  {hit.content}")
    if not hits:
        print("no vector shares a word with the query")
    return 0
