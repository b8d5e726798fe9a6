"""`lexvla <command>`: one entry point, one module per command.

Each command is `module:function` taking the remaining argv; modules are imported only when their
command runs, so `lexvla --help` is instant and needs no JAX.
"""

from __future__ import annotations

import importlib
import sys

from lexvla_jax.configlib import ConfigError
from lexvla_jax.libtpu_env import quiet_libtpu_without_tpu

COMMANDS: dict[str, tuple[str, str]] = {
    "vocab": ("lexvla_jax.commands.vocab:main", "report the filtered vocabulary of a tokenizer (count, examples)"),
    "prepare": (
        "lexvla_jax.commands.prepare:main",
        "make the embedded job's data and pretrained towers (config.miniature; each part skipped when done)",
    ),
    "train": ("lexvla_jax.commands.train:main", "train LexVLA (resumes from the workdir's latest checkpoint)"),
    "goodput": (
        "lexvla_jax.commands.goodput:main",
        "what a run's wall time went to: productive steps, compilation, input, checkpoints, restarts",
    ),
    "eval": ("lexvla_jax.commands.eval:main", "run config.evals (retrieval, PatchDis) on a trained checkpoint"),
    "compile": (
        "lexvla_jax.commands.compile:main",
        "compile the train step for a TPU topology ahead of time and check it fits",
    ),
    "make-synthetic": (
        "lexvla_jax.commands.make_synthetic:main",
        "write the synthetic captioned-shapes dataset (webdataset)",
    ),
    "convert-data": ("lexvla_jax.commands.convert_data:main", "convert webdataset tars to ArrayRecord shards"),
    "inspect-data": (
        "lexvla_jax.commands.inspect_data:main",
        "read N training batches: samples, skips by reason, speed",
    ),
    "explain": ("lexvla_jax.commands.explain:main", "top words of images or texts: word-map and bar-chart PNGs"),
    "encode": (
        "lexvla_jax.commands.encode:main",
        "encode a collection (image shards, a text file) into sparse part files on every device; resumable",
    ),
    "export": ("lexvla_jax.commands.export:main", "write an eval set's images and captions as sparse part files"),
    "index": ("lexvla_jax.commands.index:main", "build the approximate (Seismic) index of an exported collection"),
    "search": ("lexvla_jax.commands.search:main", "search an exported collection by text, image or vector id"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: lexvla <command> [args]  (lexvla <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in sorted(COMMANDS.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lexvla: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_libtpu_without_tpu()  # before any command imports JAX
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(function(rest) or 0)
    except ConfigError as e:
        print(f"lexvla {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
