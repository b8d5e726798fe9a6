"""`lexvla encode`: a collection's sparse lexical vectors as part files, on every device of every process.

  lexvla encode --config CFG --workdir W --images 'SHARDS' --out OUT [--texts FILE] [--threshold T | --top-k K]
      [--scale 1000] [--step N] [--batch-size B] [--part-size 100000] [--gzip]

Streams images from webdataset tars (img2dataset's layout) or ArrayRecord shards (`.array_record`) through the
training data path (`config.data.num_workers` decoding workers; bad samples skipped and counted by reason) and
texts from FILE (`id<TAB>text` lines, or JSONL with `id` and `text`), encodes them on the config's mesh and
writes OUT/images/ and OUT/texts/ part files in the collection format Anserini and Seismic read, plus
OUT/meta.json (`lexvla_jax.sparse.parts`). Ids are the sample keys. Killed at any moment, the same command
continues after the last finished part of each process; a finished OUT is not encoded again. Several processes
(`config.dist`) write the same vectors as one, each its own part files (OUT must be shared: a `gs://` path or a
shared file system).
"""

from __future__ import annotations

import argparse

from lexvla_jax import configlib
from lexvla_jax.commands import common
from lexvla_jax.sparse import export


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla encode", description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--images", help="image shards: a glob, directory, brace range or comma-separated list")
    parser.add_argument("--texts", help="a TSV (id<TAB>text) or JSONL ({id, text}) file of texts")
    parser.add_argument("--out", required=True, help="output directory (any etils.epath path)")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--threshold", type=float, help="keep weights >= this (default 1/sqrt(V'))")
    cut.add_argument("--top-k", type=int, help="keep the k largest weights of each vector instead")
    parser.add_argument("--scale", type=int, default=export.DEFAULT_SCALE, help="impact = round(scale * weight)")
    parser.add_argument("--batch-size", type=int, help="global batch (default config.eval.batch_size)")
    parser.add_argument("--part-size", type=int, help="vectors per part file and process (the unit of resume)")
    parser.add_argument("--gzip", action="store_true", help="write part-*.jsonl.gz")
    config, args = configlib.parse_command(argv, parser)
    from lexvla_jax import encode

    for name, value, low in (("--scale", args.scale, 1), ("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                             ("--part-size", args.part_size, 1)):  # fmt: skip
        if value is not None and value < low:
            raise configlib.ConfigError(f"{name} {value}: must be at least {low}")
    if not args.images and not args.texts:
        raise configlib.ConfigError("nothing to encode: pass --images SHARDS and/or --texts FILE")
    paths = None
    if args.images:
        from lexvla_jax.data import corpus

        paths = corpus.image_shards(args.images, _format(args.images, config))
    encoder, step = common.restore_encoder(config, args.workdir, args.step, with_step=True)
    if args.top_k is not None and args.top_k > len(encoder.words):
        raise configlib.ConfigError(f"--top-k {args.top_k}: the model has only {len(encoder.words)} words")
    settings = encode.run_settings(config, step, encoder.words, threshold=args.threshold, top_k=args.top_k,
                                   scale=args.scale, compress=args.gzip)  # fmt: skip
    meta = encode.prepare_out(args.out, settings)
    device = encode.DeviceEncoder(encoder, threshold=args.threshold, top_k=args.top_k, scale=args.scale,
                                  batch_size=args.batch_size or config.eval.batch_size)  # fmt: skip
    part_size = args.part_size or encode.DEFAULT_PART_SIZE
    for kind in ("images", "texts"):
        if not (paths if kind == "images" else args.texts):
            continue
        done = meta["kinds"].get(kind)
        if done and done.get("finished"):
            _say(f"{args.out}/{kind}: finished before ({done['vectors']:,} vectors); nothing to encode")
            continue
        source, expected = _source(kind, config, args, paths, encoder, device)
        totals = encode.encode_kind(args.out, kind, source, device, part_size=part_size, expected=expected,
                                    compress=args.gzip)  # fmt: skip
        encode.finish_kind(args.out, meta, kind, totals)
        skipped = {r: n for r, n in totals["skipped"].items() if n}
        _say(f"{args.out}/{kind}: {totals['vectors']:,} vectors in {totals['parts']} parts; skipped {skipped or 0}")
    return 0


def _format(spec: str, config) -> str:
    return "array_record" if ".array_record" in spec else config.data.format


def _source(kind: str, config, args, paths, encoder, device):
    import jax

    from lexvla_jax.data import corpus

    process, count = jax.process_index(), jax.process_count()
    if kind == "texts":
        source = corpus.TextBatches(args.texts, encoder.prompt.batch, device.local_batch, process, count)
        return source, corpus.expected_texts(args.texts)
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.format = _format(args.images, config)
    source = corpus.image_batches(data, paths, device.local_batch, process, count)
    return source, corpus.expected_images(paths, data.format, count)


def _say(line: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(line, flush=True)
