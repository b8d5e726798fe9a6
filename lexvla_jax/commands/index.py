"""`lexvla index`: build the approximate (Seismic) inverted index of an exported collection.

  lexvla index DIR [--n-postings 3500] [--centroid-fraction 0.1] [--summary-energy 0.4] [--max-fraction 1.5]
      [--query-cut 10] [--heap-factor 0.8] [--threads 0]

DIR is a directory written by `lexvla export`; the index (`seismic.index.seismic`, `seismic.json`) is saved
into it. The exact index needs no build: `lexvla search --method exact` reads `vectors.npz`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from lexvla_jax.sparse import export, index


def add_search_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query-cut", type=int, help="the query's strongest words whose posting lists are read")
    parser.add_argument("--heap-factor", type=float, help="block-skipping aggressiveness, in (0, 1]")


def search_settings(args) -> dict:
    """The query-time Seismic settings given on the command line."""
    settings = {"query_cut": args.query_cut, "heap_factor": args.heap_factor}
    if settings["query_cut"] is not None and settings["query_cut"] < 1:
        raise export.CollectionError(f"--query-cut {args.query_cut}: must be at least 1")
    if settings["heap_factor"] is not None and not 0 < settings["heap_factor"] <= 1:
        raise export.CollectionError(f"--heap-factor {args.heap_factor}: must be in (0, 1]")
    return {k: v for k, v in settings.items() if v is not None}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla index", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a collection written by `lexvla export`")
    defaults = index.SeismicParams()
    parser.add_argument("--n-postings", type=int, default=defaults.n_postings)
    parser.add_argument("--centroid-fraction", type=float, default=defaults.centroid_fraction)
    parser.add_argument("--summary-energy", type=float, default=defaults.summary_energy)
    parser.add_argument("--max-fraction", type=float, default=defaults.max_fraction)
    add_search_args(parser)
    parser.add_argument("--threads", type=int, default=0, help="build threads (0: all cores)")
    args = parser.parse_args(argv)
    if args.n_postings < 1:
        raise export.CollectionError(f"--n-postings {args.n_postings}: must be at least 1")
    vectors = export.read_collection(args.directory)
    params = index.SeismicParams(
        n_postings=args.n_postings,
        centroid_fraction=args.centroid_fraction,
        summary_energy=args.summary_energy,
        max_fraction=args.max_fraction,
    )
    params = dataclasses.replace(params, **search_settings(args))
    start = time.perf_counter()
    built = index.SeismicIndex.build(vectors, params, num_threads=args.threads)
    seconds = time.perf_counter() - start
    path = built.save(args.directory)
    print(f"indexed {len(vectors.ids)} vectors ({vectors.matrix.nnz} weights) in {seconds:.2f}s")
    print(f"  {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0
