"""`lexvla export`: a model's sparse lexical vectors of an eval set's images and/or captions, as a collection.

  lexvla export --config configs/tiny.py --workdir runs/tiny --out runs/tiny/sparse [--what images captions]
      [--threshold T | --top-k K] [--scale 1000] [--max-images N] [--source NAME] [--step N]

Reads the image-text set of a retrieval evaluator of `config.evals` (`--source NAME`; default: the first one —
webdataset, Karpathy json or TFDS; override its fields with `--config.evals.NAME.*`) and writes it with the
encoder and part writer of `lexvla encode` (`lexvla_jax.encode`): OUT/images/ and OUT/captions/ part files in
the collection format (Anserini/Seismic) and OUT/meta.json. Image ids are the sample keys, caption ids `KEY#n`
(the n-th caption of image KEY); an image's content is its captions joined by " | ".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lexvla_jax import configlib
from lexvla_jax.commands import common
from lexvla_jax.data.eval_set import image_text_records, read_image_text_set
from lexvla_jax.evaluate.base import entry_settings
from lexvla_jax.evaluate.retrieval import RetrievalEvaluator

WHAT = ("images", "captions")


def eval_set_sources(eval_set: dict, prompt, batch_size: int, process_index: int, process_count: int,
                     what: Sequence[str] = WHAT) -> dict:  # fmt: skip
    """`{kind: () -> (source, count)}` of the eval set's images and/or captions for `encode.encode_collection`."""
    from lexvla_jax.data.corpus import ArrayBatches

    keys, captions = eval_set["keys"], eval_set["captions"]
    captions_of_image, caption_ids = [[] for _ in keys], []
    for caption, image in zip(captions, eval_set["image_of_text"], strict=True):
        caption_ids.append(f"{keys[image]}#{len(captions_of_image[image])}")
        captions_of_image[image].append(caption)
    share = (batch_size, process_index, process_count)

    def images():
        contents = [" | ".join(c) for c in captions_of_image]
        return ArrayBatches(keys, contents, {"image": eval_set["image"]}, *share), len(keys)

    def texts():
        rows = prompt.batch(list(captions))
        columns = {name: rows[name] for name in ("input_ids", "attention_mask")}
        return ArrayBatches(caption_ids, list(captions), columns, *share), len(captions)

    sources = {"images": images, "captions": texts}
    return {kind: sources[kind] for kind in what}


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
    parser.add_argument("--out", required=True, help="output directory (gets images/, captions/ and meta.json)")
    parser.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT), help="what to export")
    common.add_sparse_args(parser)
    parser.add_argument("--max-images", type=int, help="export only the first N images (and their captions)")
    parser.add_argument("--source", help="the config.evals entry whose image-text set is exported")
    config, args = configlib.parse_command(argv, parser)
    common.check_positive(scale=args.scale, top_k=args.top_k)
    name, source = _source(config, args.source)
    where = f"config.evals.{name}"
    records = image_text_records(source, where)
    eval_set = read_image_text_set(records, config.data, source.get("captions_per_image", 0), args.max_images, where)
    from lexvla_jax import encode

    if args.workdir:
        encode.check_before_restore(config, args.workdir, args.step, args.out, threshold=args.threshold,
                                    top_k=args.top_k, scale=args.scale, compress=False)  # fmt: skip
    encoder, step = common.restore_encoder(config, args.workdir, args.step, with_step=True)
    common.check_top_k(args.top_k, encoder)
    import jax

    meta, device = encode.open_collection(config, encoder, step, args.out, threshold=args.threshold, top_k=args.top_k,
                                          scale=args.scale)  # fmt: skip
    share = (device.local_batch, jax.process_index(), jax.process_count())
    encode.encode_collection(args.out, meta, device, eval_set_sources(eval_set, encoder.prompt, *share, args.what))
    return 0
