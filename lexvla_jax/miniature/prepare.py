"""What the embedded job needs before it trains (`config.miniature`): the synthetic set, its tokenizer, and the
pretrained language model of stage 1 (`lm_pretrain.py`) when `config.model.text_checkpoint` is its directory.

Runs on the main process only; the others wait at a barrier, so every process then reads the same files.
`lexvla train` runs it before the training loop; `lexvla prepare` runs it alone.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from lexvla_jax import sharding
from lexvla_jax.miniature import lm_pretrain, synthetic
from lexvla_jax.text.tokenizer import train_tokenizer


def prepare_synthetic(config: ml_collections.ConfigDict, log=print) -> None:
    """Generates `config.miniature.synthetic`'s set and trains its tokenizer when they are absent."""
    syn = config.get("miniature", {}).get("synthetic")
    if syn is None:
        return
    if not synthetic.exists(syn.dir):
        log(f"generating the synthetic dataset in {syn.dir} ...")
        synthetic.make_synthetic(
            syn.dir, num_train=syn.train, num_eval=syn.eval, seed=syn.seed, image_size=syn.image_size
        )
    if config.data.tokenizer and not os.path.exists(config.data.tokenizer):
        captions = synthetic.all_captions(syn.dir)
        train_tokenizer([*captions, config.data.prompt_template], config.model.text.vocab_size, config.data.tokenizer)


def uses_pretrained_lm(config: ml_collections.ConfigDict) -> bool:
    """Whether the text tower loads stage 1's language model (`config.miniature.lm.dir`)."""
    stage = config.get("miniature", {}).get("lm")
    checkpoint = config.model.get("text_checkpoint")
    return bool(stage and checkpoint) and os.path.abspath(checkpoint) == os.path.abspath(stage.dir)


def prepare(config: ml_collections.ConfigDict, log=print) -> None:
    """Everything the run reads that the project generates itself, made once, on the main process; the other
    processes wait. Does nothing for a config without a `miniature` section."""
    if "miniature" not in config:
        return
    if sharding.is_main_process():
        prepare_synthetic(config, log)
        if uses_pretrained_lm(config):
            lm_pretrain.ensure_pretrained_lm(config, log=log)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lexvla prepare")
