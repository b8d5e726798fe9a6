"""Q(512), Table 1: every lexical vector keeps only its 512 largest entries, in training and in evaluation.

Training (`config.loss.top_k`): InfoNCE scores the top-k vectors of both towers, not renormalised, so
training ranks pairs by the same dot products that top-k retrieval computes; the gradient reaches the kept
entries only, and the overuse penalty still sees the whole vectors (`losses.lexvla_loss`). Evaluation: every
retrieval evaluator scores its "topk" mode at the same k (LexVLA itself averages ~1,081 active words).

With `:tiny` k is 16: the synthetic tokenizer keeps about 200 words, where 512 would keep them all (16 is 8% of
them; 512 is 3% of the paper's 17,182).

  lexvla train --config configs/variants/q512.py --workdir DIR ...
"""

from lexvla_jax import configlib

TOP_K = {"paper": 512, "tiny": 16}


def get_config(arg=None):
    config = configlib.variant_base(__file__, arg)
    k = TOP_K[arg or "paper"]
    config.loss.top_k = k
    for entry in config.evals.values():
        if entry.type == "retrieval":
            entry.modes = tuple(dict.fromkeys((*entry.modes, "topk")))
            entry.top_k = k
    return config
