"""The paper's setting: DINOv2 ViT-L/14 (frozen) + Llama-2-7B (frozen, LoRA r=8 on all seven linears), CC-12M.

Point the checkpoint fields at local Hugging Face directories and the shard globs at img2dataset output:

  lexvla train --config configs/lexvla_cc12m.py --workdir gs://bucket/lexvla \\
      --config.model.vision_checkpoint=/ckpt/dinov2-large --config.model.text_checkpoint=/ckpt/Llama-2-7b-hf \\
      --config.data.tokenizer=/ckpt/Llama-2-7b-hf/tokenizer.model \\
      --config.data.train_shards='/data/cc12m/{00000..01242}.tar'

The evaluators in `config.evals` (COCO and Flickr30k retrieval, VOC PatchDis) need their paths set
(`--config.evals.coco.json=...`; see below). Without checkpoints or tokenizer the same file describes
shapes only (`lexvla compile`). Values the paper does not state (λs, temperature, optimiser, batch) are
documented defaults.
"""

import ml_collections

from lexvla_jax.data.config import default_data_config
from lexvla_jax.sharding import DEFAULT_RULES


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()

    config.data = default_data_config()
    config.data.train_shards = ""
    config.data.eval_shards = ""
    config.data.image_size = 224
    config.data.num_workers = 8
    config.data.shuffle_buffer = 10_000
    config.data.max_caption_tokens = 48
    config.data.max_length = 96  # used only when no tokenizer file is given (shapes-only compiles)

    config.model = dict(
        # tower: models/vision.py (qclip.py, siglip.py). pos_interpolation: 37×37 position table → 16×16 as
        # transformers does ("hf": we load HF checkpoints) or as facebookresearch's DINOv2 does ("dinov2":
        # scale_factor (16 + 0.1)/37); the paper does not say which.
        vision=dict(tower="dinov2", preset="dinov2_vitl14", pos_interpolation="hf"),
        text=dict(preset="llama2-7b"),
        vision_checkpoint="",
        text_checkpoint="",
        vocab_size=17149,  # V' of the paper's filtered Llama 2 vocabulary (used only without a tokenizer)
        vocab_filter="lowercase_alpha",  # vocab.RULES; keeps 17,182 of Llama 2's pieces (paper: 17,149)
        adapter_heads=16,
        # "block" (one width-1024 transformer block + a 1024→4096 projection, 16.8M parameters) matches the paper's
        # reported ~17M adapter; "mlp" (25.2M) does not (models/lexvla.py:Adapter).
        adapter_shape="block",
        text_encoder="llm",  # or "bow": models/lexvla.py:LexVLAConfig, configs/variants/qbow.py
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
    config.loss = dict(lambda_img=1e-3, lambda_txt=1e-3, penalty="overuse", warmup_steps=500, top_k=0)
    config.optim = dict(
        learning_rate=2e-4,
        warmup_steps=500,
        end_lr_fraction=0.0,
        grad_clip_norm=1.0,
        b1=0.9,
        b2=0.98,
        weight_decay=0.1,
        # The visual codebook's rows are word embeddings copied from Llama's lm_head; decay pulls every row toward
        # zero whether its word is used or not. On the main job, decay there (with λ_img 1e-3) let word pieces no
        # caption has take 145 of the eval images' 1,250 top-5 slots, 30 without (README, "The main job").
        no_decay=("visual_codebook",),
    )
    config.train = dict(
        num_steps=20_000,
        global_batch_size=4096,
        # Batch 4096 in one pass fits a v5p-8 (4 chips; up to 5188 there), any larger v5p slice and a v4-64
        # (33% of HBM). Small slices of smaller-HBM chips need GradCache micro-batches (same negatives, +38%
        # FLOPs for the extra forward pass): 4 on v6e-4 or v4-8, 2 on v5e-16 (benchmarks/aot_fit.py).
        micro_batches=1,
        seed=0,
        trainable=("adapter", "visual_codebook", "logit_scale", "lora"),
        log_every=50,
        profile_steps=(),  # (start, stop): a jax.profiler trace of those steps in WORKDIR/profile
        # No step for this long (seconds, or a multiple of the median step time, at least 30 s): every process
        # dumps its threads' stacks to the log and WORKDIR/hangs/, then exits 124 for the launcher to restart it.
        hang_timeout="20x",
        hang_timeout_slow=1800,  # seconds allowed for start-up and compilation, an evaluation or a checkpoint
        debug_hang=(),  # debug: (process, step): that process stops fetching the batch of that step
        final_eval=True,  # config.evals at the end of training (False: only on their every_steps; `lexvla eval` later)
        max_consecutive_skips=20,
        show_top_words=0,
        record_sample_keys=False,  # debug: write the sample keys of every step under the workdir
    )
    config.checkpoint = dict(
        every_steps=1000,
        keep=3,
        async_save=True,
        debug_kill_save=(),  # debug: (step, "before" | "during" | "after"): SIGKILL at that point of that save
    )
    config.eval = dict(batch_size=512)  # rows per batch when evaluators encode (any size works)
    # The paper's evaluations; set the paths to local copies (or any etils.epath location), e.g.
    # --config.evals.coco.json=/data/karpathy/dataset_coco.json --config.evals.coco.image_root=/data/coco.
    config.evals = ml_collections.ConfigDict()
    config.evals.coco = dict(
        type="retrieval",
        every_steps=2000,
        label="MSCOCO 5k",
        format="karpathy",
        json="",  # dataset_coco.json (Karpathy split)
        image_root="",  # holding val2014/ (the json's filepath)
        split="test",
        modes=("dense", "threshold", "topk"),
        top_k=512,  # Q(512)
    )
    config.evals.flickr = dict(
        type="retrieval",
        every_steps=2000,
        label="Flickr30k 1k",
        format="karpathy",
        json="",  # dataset_flickr30k.json
        image_root="",  # flickr30k-images/
        split="test",
        modes=("dense", "threshold", "topk"),
        top_k=512,
    )
    config.evals.voc = dict(
        type="patchdis",
        every_steps=0,
        label="VOC 2012 val",
        format="voc",
        root="",  # VOCdevkit/VOC2012
        split="val",
    )

    config.mesh = dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1))
    config.sharding = dict(rules=tuple(DEFAULT_RULES))
    config.dist = dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1)
    return config
