"""`lexvla vocab`: report what each vocabulary filter rule keeps and drops of a tokenizer."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from lexvla_jax.text.tokenizer import load_tokenizer
from lexvla_jax.text.vocabulary import DEFAULT_RULE, RULES, filter_vocabulary, vocabulary_report


def main(argv: Sequence[str]) -> int:
    """`lexvla vocab --tokenizer PATH [--rule NAME] [--examples N] [--out kept_ids.npy]`."""
    parser = argparse.ArgumentParser(prog="lexvla vocab", description="Report the filtered lexical vocabulary.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, tokenizer.json or a directory with one")
    parser.add_argument(
        "--rule", choices=sorted(RULES), help=f"report this rule only (default: every rule; {DEFAULT_RULE} is used)"
    )
    parser.add_argument("--examples", type=int, default=20, help="examples shown per group (default 20)")
    parser.add_argument("--out", help=f"write the kept ids of --rule (default {DEFAULT_RULE}), sorted int32, to .npy")
    args = parser.parse_args(list(argv))
    try:
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    except (OSError, ValueError) as e:
        print(f"lexvla vocab: {e}", file=sys.stderr)
        return 2
    print(vocabulary_report(tokenizer, [args.rule] if args.rule else tuple(RULES), args.examples))
    if args.out:
        np.save(args.out, filter_vocabulary(tokenizer, args.rule or DEFAULT_RULE))
        print(f"wrote {args.out}")
    return 0
