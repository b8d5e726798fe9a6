"""What a run needs before it trains, when the config asks: the embedded synthetic set, its tokenizer, and the
pretrained language model of stage 1 (`lm_pretrain.py`) when `config.model.text_checkpoint` is its directory.

Runs on the main process only; the others wait at a barrier, so every process then reads the same files.
`lexvla pretrain-lm` (`pretrain_lm_main`) runs stage 1 alone.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import ml_collections

from lexvla_jax import configlib, lm_pretrain, sharding, vocab
from lexvla_jax.data import synthetic


def prepare_synthetic(config: ml_collections.ConfigDict, log=print) -> None:
    """Generates `config.data.synthetic`'s set and trains its tokenizer when they are absent."""
    syn = config.data.get("synthetic")
    if syn is None:
        return
    if not synthetic.exists(syn.dir):
        log(f"generating the synthetic dataset in {syn.dir} ...")
        synthetic.make_synthetic(
            syn.dir, num_train=syn.train, num_eval=syn.eval, seed=syn.seed, image_size=syn.image_size
        )
    if config.data.tokenizer and not os.path.exists(config.data.tokenizer):
        captions = synthetic.all_captions(syn.dir)
        vocab.train_tokenizer(
            [*captions, config.data.prompt_template], config.model.text.vocab_size, config.data.tokenizer
        )


def uses_pretrained_lm(config: ml_collections.ConfigDict) -> bool:
    """Whether the text tower loads stage 1's language model (`config.lm_pretrain.dir`)."""
    stage = config.get("lm_pretrain")
    checkpoint = config.model.get("text_checkpoint")
    return bool(stage and checkpoint) and os.path.abspath(checkpoint) == os.path.abspath(stage.dir)


def prepare(config: ml_collections.ConfigDict, log=print) -> None:
    """Everything the run reads that the project generates itself, made once, on the main process."""
    if sharding.is_main_process():
        prepare_synthetic(config, log)
        if uses_pretrained_lm(config):
            lm_pretrain.ensure_pretrained_lm(config, log=log)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lexvla prepare")


def pretrain_lm_main(argv: Sequence[str]) -> int:
    """`lexvla pretrain-lm --config CFG [--out DIR] [--config.a.b=value ...]`."""
    description = lm_pretrain.__doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="lexvla pretrain-lm", description=description)
    parser.add_argument("--out", help="output directory (default: config.lm_pretrain.dir)")
    config, args = configlib.parse_command(argv, parser)
    if "lm_pretrain" not in config:
        raise configlib.ConfigError("the config has no lm_pretrain section; use e.g. --config configs/tiny.py")
    prepare_synthetic(config)
    lm_pretrain.ensure_pretrained_lm(config, args.out)
    return 0
