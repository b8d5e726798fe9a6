"""`lexvla index`: build the approximate (Seismic) inverted index of an exported collection.

  lexvla index DIR [--doc-words 64] [--n-postings 3500] [--centroid-fraction 0.1] [--summary-energy 0.4]
      [--max-fraction 1.5] [--query-cut 20] [--heap-factor 0.9] [--rerank 300] [--threads 0]

DIR is a finished collection, OUT/images or OUT/texts of `lexvla encode --out OUT` (or OUT/captions of `lexvla
export`); its part files are read one at a time into Seismic, and the index (`seismic.index.seismic`,
`seismic.json`) is saved into DIR (a local directory: Seismic writes local files). Documents enter Seismic with
their `--doc-words` strongest words; searches re-score Seismic's best `--rerank` candidates exactly
(`lexvla_jax.sparse.index`). The exact index needs no build: `lexvla search --method exact` reads the parts,
local or remote. For a collection on `gs://` (or any remote path), copy it to a local directory and index that.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time

from lexvla_jax.sparse import export, index


def check_local(directory: str, command: str) -> None:
    """A one-line error for a remote DIR (`gs://…`): Seismic writes and reads its index as local files."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", directory):
        raise export.CollectionError(
            f"{directory!r} is not a local directory, and Seismic's index is local files: copy the collection "
            f"(e.g. `gsutil -m cp -r {directory} DIR`), then `{command} DIR`; `lexvla search --method exact` reads "
            f"{directory!r} as it is"
        )


def add_search_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query-cut", type=int, help="the query's strongest words whose posting lists are read")
    parser.add_argument("--heap-factor", type=float, help="block-skipping aggressiveness, in (0, 1]")
    parser.add_argument("--rerank", type=int, help="Seismic candidates re-scored exactly")


def search_settings(args) -> dict:
    """The query-time Seismic settings given on the command line."""
    for name in ("query_cut", "rerank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise export.CollectionError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.heap_factor is not None and not 0 < args.heap_factor <= 1:
        raise export.CollectionError(f"--heap-factor {args.heap_factor}: must be in (0, 1]")
    settings = {"query_cut": args.query_cut, "heap_factor": args.heap_factor, "rerank": args.rerank}
    return {k: v for k, v in settings.items() if v is not None}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla index", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a collection: OUT/images or OUT/texts of `lexvla encode`")
    defaults = index.SeismicParams()
    parser.add_argument("--doc-words", type=int, default=defaults.doc_words, help="words per document (0: all)")
    parser.add_argument("--n-postings", type=int, default=defaults.n_postings)
    parser.add_argument("--centroid-fraction", type=float, default=defaults.centroid_fraction)
    parser.add_argument("--summary-energy", type=float, default=defaults.summary_energy)
    parser.add_argument("--max-fraction", type=float, default=defaults.max_fraction)
    add_search_args(parser)
    parser.add_argument("--threads", type=int, default=0, help="build threads (0: all cores)")
    args = parser.parse_args(argv)
    check_local(args.directory, "lexvla index")
    if args.n_postings < 1:
        raise export.CollectionError(f"--n-postings {args.n_postings}: must be at least 1")
    params = index.SeismicParams(
        doc_words=args.doc_words,
        n_postings=args.n_postings,
        centroid_fraction=args.centroid_fraction,
        summary_energy=args.summary_energy,
        max_fraction=args.max_fraction,
    )
    params = dataclasses.replace(params, **search_settings(args))
    start = time.perf_counter()
    built, rows = index.SeismicIndex.build_from_parts(args.directory, params, num_threads=args.threads)
    seconds = time.perf_counter() - start
    path = built.save(args.directory)
    words = f"each cut to its {params.doc_words} strongest words" if params.doc_words else "whole"
    print(f"indexed {rows} vectors ({words}) in {seconds:.2f}s")
    print(f"  {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0
