"""The paper's model on one GPU, for debugging: `debug_gpu.py:24gb` (RTX 3090/4090, A10, L4) or `:80gb` (A100/H100).

DINOv2 ViT-L/14 and Llama-2-7B frozen in bf16, LoRA r=8 on all seven linears, adapter and visual codebook
trainable. Data: the synthetic captioned set at 224 px, generated in `data/synthetic224` on first run, so
only the weights and Llama 2's tokenizer are needed (`launch/gpu.sh` passes them):

  lexvla train --config configs/debug_gpu.py:24gb --workdir runs/debug_gpu \\
      --config.model.text_checkpoint=/ckpt/Llama-2-7b-hf --config.data.tokenizer=/ckpt/Llama-2-7b-hf \\
      [--config.model.vision_checkpoint=/ckpt/dinov2-large]

Without checkpoints the towers are random with the same shapes (same memory and speed). The negatives
of the contrastive loss always span the global batch: GradCache micro-batches only bound activations.

Memory (V' = 16,754 kept words of Llama 2's tokenizer, prompts of 96 tokens, 257 image tokens):
  frozen       Llama-2-7B without lm_head 6.61 B × 2 B = 13.2 GB, ViT-L/14 0.30 B × 2 B = 0.61 GB,
               text codebook 68.6 M × 4 B = 0.27 GB                                     → 14.1 GB
  trained      visual codebook 68.6 M + adapter 25.2 M + LoRA 20.0 M = 113.8 M parameters,
               weights + gradients + two Adam moments, f32                               →  1.8 GB
  activations  grow with the micro-batch (remat "full" keeps each layer's input, e.g. Llama's
               32 × 96 × 4096 × 2 B = 25 MB per sample, and one layer's internals at a time)
XLA's peak for the whole step, compiled for one TPU chip (the same XLA program a GPU runs, up to fusion
and library workspaces): 24gb, micro-batches of 16: 14.31 GiB arguments + 2.24 GiB temporaries = 16.55 GiB
(v6e); 80gb, micro-batches of 256: 14.42 + 18.18 = 32.60 GiB (v5p). Measured with
`aot.compile_train_step(config, aot.topology_devices("v6e:2x2")[:1])` (`"v5p:2x2x1"` for 80gb), tokenizer
unset and `config.model.vocab_size=16754`: 6 to 20 minutes of compiling on 2 CPU cores, so no test runs it.
On the GPU itself, `lexvla compile --config configs/debug_gpu.py:24gb --local` prints the same report.
A 24 GB card gives XLA about 22 GiB with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (`launch/gpu.sh` sets it;
JAX's default of 75% would leave about 1 GiB spare), an 80 GB card about 75 GiB: room for cuDNN/cuBLAS
workspaces and fusion differences.
"""

import ml_collections

from lexvla_jax.configlib import ConfigError
from lexvla_jax.data.config import default_data_config
from lexvla_jax.sharding import DEFAULT_RULES

# (global batch, GradCache micro-batches) per GPU memory size; peaks in the module docstring.
SIZES = {
    "24gb": (256, 16),  # micro-batches of 16
    "80gb": (1024, 4),  # micro-batches of 256
}


def get_config(arg=None):
    arg = arg or "24gb"
    if arg not in SIZES:
        raise ConfigError(f"debug_gpu.py:{arg}: choose one of {sorted(SIZES)} (e.g. configs/debug_gpu.py:24gb)")
    global_batch, micro_batches = SIZES[arg]
    config = ml_collections.ConfigDict()

    config.data = default_data_config()
    config.miniature = ml_collections.ConfigDict()
    config.miniature.synthetic = dict(dir="data/synthetic224", train=4096, eval=250, seed=0, image_size=224)
    config.data.train_shards = "data/synthetic224/train"
    config.data.eval_shards = "data/synthetic224/eval"
    config.data.tokenizer = ""  # Llama 2's tokenizer.model (or the checkpoint directory holding it)
    config.data.image_size = 224
    config.data.num_workers = 4
    config.data.shuffle_buffer = 1000
    config.data.max_caption_tokens = 48
    config.data.max_length = 96  # used only when no tokenizer file is given (shapes-only compiles)

    config.model = dict(
        vision=dict(preset="dinov2_vitl14"),
        text=dict(preset="llama2-7b"),
        vision_checkpoint="",
        text_checkpoint="",
        vocab_size=17149,  # used only without a tokenizer
        adapter_heads=16,
        adapter_mlp_dim=4096,
        logit_scale_init=1 / 0.07,
        logit_scale_max=100.0,
        max_pool_chunk=2048,
        compute_dtype="bfloat16",
        frozen_param_dtype="bfloat16",
        remat="full",
        # init: LoRA's A drawn as PEFT's default (uniform ±1/√in; "he_uniform": ±√(6/in)), B zero.
        lora=dict(rank=8, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down"), init="peft"),
    )

    # top_k > 0: InfoNCE on each vector's top k entries (configs/variants/q512.py); 0: whole vectors.
    config.loss = dict(lambda_img=1e-3, lambda_txt=1e-3, penalty="overuse", warmup_steps=50, top_k=0)
    config.optim = dict(
        learning_rate=2e-4, warmup_steps=20, end_lr_fraction=0.0, grad_clip_norm=1.0, b1=0.9, b2=0.98, weight_decay=0.1
    )
    config.train = dict(
        num_steps=200,
        global_batch_size=global_batch,
        micro_batches=micro_batches,
        seed=0,
        trainable=("adapter", "visual_codebook", "logit_scale", "lora"),
        log_every=10,
        profile_steps=(),  # (start, stop): a jax.profiler trace of those steps in WORKDIR/profile
        # No step for this long (seconds, or a multiple of the median step time, at least 30 s): every process
        # dumps its threads' stacks to the log and WORKDIR/hangs/, then exits 124 for the launcher to restart it.
        hang_timeout="20x",
        hang_timeout_slow=1800,  # seconds allowed for start-up and compilation, an evaluation or a checkpoint
        debug_hang=(),  # debug: (process, step): that process stops fetching the batch of that step
        final_eval=True,  # config.evals at the end of training (False: only on their every_steps; `lexvla eval` later)
        max_consecutive_skips=20,
        show_top_words=3,
    )
    config.checkpoint = dict(
        every_steps=100,
        keep=1,
        async_save=True,
        debug_kill_save=(),  # debug: (step, "before" | "during" | "after"): SIGKILL at that point of that save
    )
    config.eval = dict(every_steps=100, batch_size=50)

    config.mesh = dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1))
    config.sharding = dict(rules=tuple(DEFAULT_RULES))
    config.dist = dict(mode="none", coordinator_address="", num_processes=0, process_id=-1)
    return config
