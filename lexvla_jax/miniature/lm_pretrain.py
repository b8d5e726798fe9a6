"""Stage 1 of the embedded job: a tiny Llama pretrained to name a caption's important words in context.

LexVLA reads a caption's lexical vector from a *pretrained* Llama 2: after the prompt
`... The focus of "[TEXT]" lies on important words:` its next-token distribution already spreads over the
caption's important words, the text codebook is its frozen `lm_head`, and the image side learns to land on the
same words. A tiny Llama trained from scratch has no such ability, so this stage gives it one. It trains a causal
language model on

    BOS + prompt(caption) + " w1, w2, …, wn." + EOS

where `w1…wn` are the caption's content words (`content_words`) in a fresh random order per example, with
the loss on the continuation tokens only. The best prediction after the prompt's last token is then an even
spread over the caption's content words: the in-context lexical prediction the paper borrows from Llama 2.
That first token weighs 1 in the loss and the later ones `later_words_weight` (0.1 in configs/tiny.py): they
keep the model a language model of the whole list, but at full weight they slow the first prediction down
(held-out precision@5 of the next word after 400 steps: 0.78 at weight 1, 0.92 at 0.1, 0.95 at 0).
The loss adds PaLM's auxiliary z-loss, `z_loss · (log Σ exp logits)²` (1e-2 in configs/tiny.py). The
language model's softmax ignores a shift of all logits, but the lexical vector is ELU1p of the logits
themselves, so that shift decides how sharp the text vector is. On 200 eval captions, without z-loss the logit
after the prompt averaged 4.7 for the caption's words and 1% of the other words scored above 3.2 (ELU1p 5.8
against 4.2: near equals). With it the log-partition there is 1.2, a logit reads nearly as a log-probability,
and ELU1p gives the caption's words 0.44 on average against 0.08 for the 99th percentile of the rest. Stage 2
(batch 128, 1,350 steps, λ_img 1e-3 with weight decay on the visual codebook) on the sharper text vectors:
image→text R@1 0.484 → 0.664, image word precision 0.750 → 0.797 (BENCHMARKS.md).
The prompt is `config.data.prompt_template`, the same one stage 2 reads, and it must end where a word follows
(`check_template_ends_before_a_word`).

The model (`config.model.text`, no LoRA) is saved as a Hugging Face Llama directory (`config.json`,
`model.safetensors`, the tokenizer and `pretrain_report.json`), which `hf_loader.load_hf_llama` and transformers'
`LlamaForCausalLM` both load: the same path as the paper's Llama-2-7B. `ensure_pretrained_lm` skips the stage
when that directory is complete.

`lexvla train` runs it first (`prepare.py`) when `config.model.text_checkpoint` is `miniature.lm.dir`, as in
configs/tiny.py; `lexvla prepare --config configs/tiny.py` makes it (and the rest of the miniature) alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lexvla_jax import build, configlib
from lexvla_jax.data import eval_set
from lexvla_jax.data.config import resolve_shards
from lexvla_jax.evaluate import word_precision
from lexvla_jax.miniature import hf_export
from lexvla_jax.models import llama
from lexvla_jax.text.content_words import content_words
from lexvla_jax.text.prompt import PromptEncoder, prompt_encoder
from lexvla_jax.text.tokenizer import load_tokenizer
from lexvla_jax.text.vocabulary import DEFAULT_RULE, filter_vocabulary

REPORT = "pretrain_report.json"
_print = functools.partial(print, flush=True)


def check_template_ends_before_a_word(prompt: PromptEncoder, word: str = "red") -> None:
    """Raises unless the prompt's last token is directly followed by `word`'s own word-start piece.

    The lexical prediction is read at that token, and stage 1 trains the model to predict the caption's words right
    after it: `words: red` must tokenise as the prompt's tokens plus the word's own piece, and the last prompt token
    must be text, not whitespace (a template ending in a space or newline reads its prediction off that).
    """
    tokenizer = prompt.tokenizer
    ids = prompt.encode("x")
    joined = tokenizer.encode(prompt.fill("x") + " " + word, add_bos=prompt.add_bos)
    follow = tokenizer.encode(word)
    if joined != ids + follow or len(follow) != 1 or not tokenizer.decode(ids[-1:]).strip():
        raise configlib.ConfigError(
            f"config.data.prompt_template must end so that a word follows its last token directly (e.g. "
            f"'... lies on important words:'); after it {word!r} is tokenised as "
            f"{[tokenizer.id_to_piece(i) for i in joined[len(ids) - 1 :]]}"
        )


class ExampleBuilder:
    """Token rows `BOS + prompt(caption) + continuation + EOS`, right-padded to `length`, with loss weights.

    The continuation is `"w1, w2, …, wn."` tokenised on its own: a Llama tokenizer's dummy prefix makes its first
    piece the word-start piece that follows the prompt's last token in the joined text (tests check the rows equal
    the joined text's tokens). Words that do not fit in `length` are dropped from the end of the list.
    """

    def __init__(self, prompt: PromptEncoder, max_word_tokens: int, later_words_weight: float = 1.0):
        self.prompt, self.tokenizer = prompt, prompt.tokenizer
        self.length = prompt.max_length + max_word_tokens
        self.later_words_weight = later_words_weight

    def continuation(self, content: Sequence[str]) -> list[int]:
        return [*self.tokenizer.encode(", ".join(content) + "."), self.tokenizer.eos_id] if content else []

    def example(self, caption: str, rng: np.random.Generator) -> tuple[list[int], int]:
        """(ids, number of prompt tokens) for one caption with its content words shuffled."""
        ids = self.prompt.encode(caption)
        content = content_words(caption)
        content = [content[i] for i in rng.permutation(len(content))]
        tail = self.continuation(content)
        while content and len(ids) + len(tail) > self.length:
            content = content[:-1]
            tail = self.continuation(content)
        return ids + tail, len(ids)

    def batch(self, captions: Sequence[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`input_ids`, `attention_mask` (int32) and `loss_weight` (float32), all `[B, length]`.

        `loss_weight` is 1 on the continuation's first token, `later_words_weight` on its other tokens, else 0.
        """
        shape = (len(captions), self.length)
        out = {
            "input_ids": np.full(shape, self.tokenizer.pad_id, np.int32),
            "attention_mask": np.zeros(shape, np.int32),
            "loss_weight": np.zeros(shape, np.float32),
        }
        for row, caption in enumerate(captions):
            ids, start = self.example(caption, rng)
            out["input_ids"][row, : len(ids)] = ids
            out["attention_mask"][row, : len(ids)] = 1
            if len(ids) > start:  # a caption without content words has no continuation and no loss
                out["loss_weight"][row, start + 1 : len(ids)] = self.later_words_weight
                out["loss_weight"][row, start] = 1.0
        return out


def train_captions(spec: str, field: str = "data.train_shards") -> list[str]:
    """Every readable caption of the webdataset tars in `spec`, in shard order."""
    captions = eval_set.read_captions(resolve_shards(spec, field))
    if not captions:
        raise configlib.ConfigError(f"config.{field}={spec!r} holds no readable captions to pretrain on")
    return captions


def eval_captions(spec: str) -> list[str]:
    """Every caption of every eval image (all paraphrases) of the webdataset tars in `spec`."""
    return eval_set.read_captions(resolve_shards(spec, "data.eval_shards"))


def lm_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
    """`config.model.text` as a plain float32 language model: no LoRA, no remat (whatever `text_checkpoint` says:
    stage 1 makes that checkpoint)."""
    fields = ml_collections.ConfigDict(config.to_dict())
    fields.model.text_checkpoint = ""
    return dataclasses.replace(
        build.text_config(fields),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat="none",
        lora_rank=0,
        lora_targets=(),
    )


def continuation_loss(model: llama.LlamaModel, batch: dict, z_loss: float = 0.0) -> jax.Array:
    """Next-token cross-entropy averaged over the continuation tokens with their `loss_weight`s.

    `z_loss` adds `z_loss · log(Σ exp logits)²` on the same tokens (PaLM's auxiliary z-loss), which pins the
    log-partition near 0 so that a logit reads as a log-probability.
    """
    logits = model(batch["input_ids"], batch["attention_mask"]).logits[:, :-1].astype(jnp.float32)
    targets, weight = batch["input_ids"][:, 1:], batch["loss_weight"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce = ce + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1e-6)


def train_lm(
    config: ml_collections.ConfigDict,
    prompt: PromptEncoder,
    captions: Sequence[str],
    log: Callable[[str], None] = _print,
) -> tuple[llama.LlamaModel, list[float]]:
    """Trains the language model of `lm_config(config)` on `captions`; returns it and the logged losses."""
    cfg = config.miniature.lm
    builder = ExampleBuilder(prompt, cfg.max_word_tokens, cfg.later_words_weight)
    rng = np.random.default_rng(cfg.seed)
    model = llama.LlamaModel(lm_config(config), rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)
    z_loss = cfg.get("z_loss", 0.0)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: continuation_loss(nnx.merge(graphdef, p), batch, z_loss))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses, start = [], time.perf_counter()
    for i in range(1, cfg.steps + 1):
        batch = builder.batch([captions[j] for j in rng.integers(len(captions), size=cfg.batch_size)], rng)
        params, opt_state, loss = step(params, opt_state, batch)
        if i % cfg.log_every == 0 or i == cfg.steps:
            losses.append(float(loss))
            elapsed = time.perf_counter() - start
            log(f"stage 1 (language model): step {i}/{cfg.steps} loss {losses[-1]:.3f} ({elapsed:.0f}s)")
    return nnx.merge(graphdef, params), losses


def next_word_scores(
    model: llama.LlamaModel, prompt: PromptEncoder, captions: Sequence[str], kept_ids: np.ndarray
) -> np.ndarray:
    """Next-token logits after each caption's prompt, over the kept vocabulary `[N, V']` (float32)."""
    forward = jax.jit(lambda ids, mask: model(ids, mask).logits)
    rows = []
    for start in range(0, len(captions), 256):
        batch = prompt.batch(captions[start : start + 256])
        logits = np.asarray(forward(batch["input_ids"], batch["attention_mask"]))
        rows.append(logits[np.arange(len(logits)), batch["last_index"]][:, kept_ids])
    return np.concatenate(rows)


def next_word_quality(
    model: llama.LlamaModel, prompt: PromptEncoder, captions: Sequence[str], kept_ids: np.ndarray, k: int = 5
) -> dict[str, float]:
    """How well the next-token prediction after the prompt names each caption's content words.

    `precision@k`: fraction of the top-k kept words that are content words of the caption; `r_precision`: fraction
    of the caption's content words among its top-|content| kept words; `random`: either one for random words.
    """
    scores = next_word_scores(model, prompt, captions, kept_ids)
    kept_words = [prompt.tokenizer.word(i) for i in kept_ids]
    relevant = [set(content_words(c)) for c in captions]
    order = np.argsort(-scores, axis=1, kind="stable")
    found = [
        sum(kept_words[j] in rel for j in row[: len(rel)]) / len(rel)
        for row, rel in zip(order, relevant, strict=True)
        if rel
    ]
    return {
        f"precision@{k}": word_precision.top_k_precision(scores, relevant, kept_words, k),
        "r_precision": float(np.mean(found)),
        "random": word_precision.random_precision(relevant, kept_words),
    }


def is_complete(out_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in ("config.json", "model.safetensors"))


def ensure_pretrained_lm(
    config: ml_collections.ConfigDict, out_dir: str | None = None, log: Callable[[str], None] = _print
) -> str:
    """The pretrained LM directory (`config.miniature.lm.dir` by default), trained and saved unless complete."""
    out_dir = out_dir or config.miniature.lm.dir
    if is_complete(out_dir):
        log(f"stage 1 (language model): using {out_dir}")
        return out_dir
    tokenizer = load_tokenizer(config.data.tokenizer)
    prompt = prompt_encoder(config.data, tokenizer)
    check_template_ends_before_a_word(prompt)
    captions = train_captions(config.data.train_shards)
    log(f"stage 1 (language model): {config.miniature.lm.steps} steps on {len(captions)} captions")
    start = time.perf_counter()
    model, losses = train_lm(config, prompt, captions, log)
    report = {"steps": config.miniature.lm.steps, "seconds": time.perf_counter() - start, "losses": losses}
    if config.data.get("eval_shards"):
        kept = filter_vocabulary(tokenizer, config.model.get("vocab_filter", DEFAULT_RULE))
        report["held_out"] = next_word_quality(model, prompt, eval_captions(config.data.eval_shards), kept)
        log(
            "stage 1 (language model): held-out captions, next-word "
            + ", ".join(f"{k} {v:.3f}" for k, v in report["held_out"].items())
        )
    hf_export.save_hf_llama(
        model, out_dir, tokenizer_path=tokenizer.path, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id
    )
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    log(f"stage 1 (language model): saved to {out_dir} ({report['seconds']:.0f}s)")
    return out_dir
