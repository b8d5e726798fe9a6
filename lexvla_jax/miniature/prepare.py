"""What the embedded job needs before it trains (`config.miniature`): the synthetic set, its tokenizer, the
self-supervised vision tower of stage 0 (`vision_pretrain.py`) when `config.model.vision_checkpoint` is its
directory, and the pretrained language model of stage 1 (`lm_pretrain.py`) when `config.model.text_checkpoint` is.

Runs on the main process only; the others wait at a barrier, so every process then reads the same files.
`lexvla train` runs it before the training loop; `lexvla prepare` runs it alone.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from lexvla_jax import sharding
from lexvla_jax.miniature import lm_pretrain, synthetic, vision_pretrain
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


def _loads_stage(config: ml_collections.ConfigDict, stage: str, checkpoint_field: str) -> bool:
    section = config.get("miniature", {}).get(stage)
    checkpoint = config.model.get(checkpoint_field)
    return bool(section and checkpoint) and os.path.abspath(checkpoint) == os.path.abspath(section.dir)


def uses_pretrained_lm(config: ml_collections.ConfigDict) -> bool:
    """Whether the text tower loads stage 1's language model (`config.miniature.lm.dir`)."""
    return _loads_stage(config, "lm", "text_checkpoint")


def uses_pretrained_vision(config: ml_collections.ConfigDict) -> bool:
    """Whether the vision tower loads stage 0's self-supervised tower (`config.miniature.vision.dir`)."""
    return _loads_stage(config, "vision", "vision_checkpoint")


def prepare(config: ml_collections.ConfigDict, log=print) -> None:
    """Everything the run reads that the project generates itself, made once, on the main process; the other
    processes wait. Does nothing for a config without a `miniature` section."""
    if "miniature" not in config:
        return
    if sharding.is_main_process():
        prepare_synthetic(config, log)
        if uses_pretrained_vision(config):
            vision_pretrain.ensure_pretrained_vision(config, log=log)
        if uses_pretrained_lm(config):
            lm_pretrain.ensure_pretrained_lm(config, log=log)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lexvla prepare")
