"""`lexvla explain`: the top words of images or texts, as word-map and bar-chart PNGs.

  lexvla explain --config configs/tiny.py --workdir runs/tiny --image a.jpg b.png [--top-k 8] [--out DIR]
  lexvla explain --config configs/tiny.py --workdir runs/tiny --text "a red circle" "a blue square"

Prints each input's top words with weights and the path of every PNG it writes (default DIR: WORKDIR/explain).
"""

from __future__ import annotations

import argparse
import os

from lexvla_jax import configlib, explain
from lexvla_jax.commands import common


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla explain", description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", metavar="PATH", help="image files")
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="captions")
    parser.add_argument("--top-k", type=int, default=8, help="words per input")
    parser.add_argument("--out", help="directory for the PNGs (default: WORKDIR/explain)")
    config, args = configlib.parse_command(argv, parser)
    if args.top_k < 1:
        raise configlib.ConfigError(f"--top-k {args.top_k}: must be at least 1")
    encoder = common.restore_encoder(config, args.workdir, args.step)
    out = args.out or os.path.join(args.workdir, "explain")
    os.makedirs(out, exist_ok=True)
    if args.image:
        images = common.read_images(args.image, config.data, encoder.image_size)
        explained_images = explain.explain_images(encoder, images, args.top_k)
        for i, (path, image, explained) in enumerate(zip(args.image, images, explained_images, strict=True)):
            name = os.path.splitext(os.path.basename(path))[0]
            print(f"{path}: {explain.format_top_words(zip(explained.words, explained.weights, strict=True))}")
            png = os.path.join(out, f"image-{i}-{name}.words.png")
            print(explain.plot_image_words(image, explained, png, title=name))
    else:
        explained_texts = explain.explain_texts(encoder, args.text, args.top_k)
        for i, (text, (words, weights)) in enumerate(zip(args.text, explained_texts, strict=True)):
            print(f"{text!r}: {explain.format_top_words(zip(words, weights, strict=True))}")
            print(explain.plot_text_words(text, words, weights, os.path.join(out, f"text-{i}.words.png")))
    return 0
