"""`lexvla encode`: a collection's sparse lexical vectors as part files, on every device of every process.

  lexvla encode --config CFG --workdir W --images 'SHARDS' --out OUT [--texts FILE] [--threshold T | --top-k K]
      [--scale 1000] [--step N] [--batch-size B] [--part-size 100000] [--gzip]

Streams images from webdataset tars (img2dataset's layout) or ArrayRecord shards through the training data path
(`config.data.num_workers` decoding workers; bad samples skipped and counted by reason, never fatal) and
texts from FILE (`id<TAB>text` lines, or JSONL with `id` and `text`), encodes them on the config's mesh and
writes OUT/images/ and OUT/texts/ part files in the collection format Anserini and Seismic read, plus
OUT/meta.json (`lexvla_jax.sparse.parts`). Ids are the sample keys. Killed at any moment, the same command
continues after the last finished part of each process; a finished OUT is not encoded again. Several processes
(`config.dist`) write the same vectors as one, each its own part files (OUT must be shared: a `gs://` path or a
shared file system); a process with no shard of its own writes none.

`--images` is read as ArrayRecord when `.array_record` appears in it (e.g. 'DIR/*.array_record') or
`config.data.format` is `array_record`; otherwise as webdataset tars.
"""

from __future__ import annotations

import argparse

from lexvla_jax import configlib
from lexvla_jax.commands import common


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla encode", description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--images", help="image shards: a glob, directory, brace range or comma-separated list")
    parser.add_argument("--texts", help="a TSV (id<TAB>text) or JSONL ({id, text}) file of texts")
    parser.add_argument("--out", required=True, help="output directory (any etils.epath path)")
    common.add_sparse_args(parser)
    parser.add_argument("--batch-size", type=int, help="global batch (default config.eval.batch_size)")
    parser.add_argument("--part-size", type=int, help="vectors per part file and process (the unit of resume)")
    parser.add_argument("--gzip", action="store_true", help="write part-*.jsonl.gz")
    config, args = configlib.parse_command(argv, parser)
    from lexvla_jax import encode

    common.check_positive(scale=args.scale, top_k=args.top_k, batch_size=args.batch_size, part_size=args.part_size)
    if not args.images and not args.texts:
        raise configlib.ConfigError("nothing to encode: pass --images SHARDS and/or --texts FILE")
    paths = None
    if args.images:
        paths = image_paths(args.images, config)
    if args.workdir:
        encode.check_before_restore(config, args.workdir, args.step, args.out, threshold=args.threshold,
                                    top_k=args.top_k, scale=args.scale, compress=args.gzip)  # fmt: skip
    encoder, step = common.restore_encoder(config, args.workdir, args.step, with_step=True)
    common.check_top_k(args.top_k, encoder)
    meta, device = encode.open_collection(config, encoder, step, args.out, threshold=args.threshold, top_k=args.top_k,
                                          scale=args.scale, compress=args.gzip, batch_size=args.batch_size)  # fmt: skip
    sources = {}
    if paths:
        sources["images"] = lambda: image_source(config, args.images, paths, device)
    if args.texts:
        sources["texts"] = lambda: _texts(args.texts, encoder, device)
    encode.encode_collection(args.out, meta, device, sources, part_size=args.part_size or encode.DEFAULT_PART_SIZE,
                             compress=args.gzip)  # fmt: skip
    return 0


def image_format(spec: str, config) -> str:
    """ArrayRecord when `.array_record` appears in `--images`, else `config.data.format`."""
    return "array_record" if ".array_record" in spec else config.data.format


def image_paths(spec: str, config) -> list[str]:
    """The shards of `--images`; a directory of ArrayRecord files given as tars is one line saying how to name them."""
    from etils import epath

    from lexvla_jax.data import corpus
    from lexvla_jax.data.array_record import SUFFIX
    from lexvla_jax.data.config import DataConfigError

    data_format = image_format(spec, config)
    try:
        return corpus.image_shards(spec, data_format)
    except DataConfigError:
        directory = epath.Path(spec)
        if data_format == "array_record" or not directory.is_dir() or not any(directory.glob(f"*{SUFFIX}")):
            raise
        raise DataConfigError(
            f"--images {spec!r} holds ArrayRecord files, no .tar shards; ArrayRecord is read when `{SUFFIX}` appears "
            f"in --images: pass '{spec.rstrip('/')}/*{SUFFIX}'"
        ) from None


def image_source(config, spec: str, paths: list[str], device):
    """(this process's image batches, the collection's expected count or None): what `lexvla encode` encodes."""
    import jax

    from lexvla_jax.data import corpus

    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.format = image_format(spec, config)
    source = corpus.image_batches(data, paths, device.local_batch, jax.process_index(), jax.process_count())
    return source, corpus.expected_images(paths, data.format, jax.process_count())


def _texts(path: str, encoder, device):
    import jax

    from lexvla_jax.data import corpus

    share = (device.local_batch, jax.process_index(), jax.process_count())
    source = corpus.TextBatches(path, encoder.prompt.batch, *share)
    return source, corpus.expected_texts(path)
