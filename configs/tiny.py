"""The embedded main job: a miniature LexVLA, in three stages, on the synthetic captioned image set.

Runs on a 2-core CPU in minutes. What is missing is made first (`miniature/prepare.py`, each step skipped when its
output exists): the synthetic set in `miniature.synthetic.dir`, a small Llama-style tokenizer trained on its
captions, stage 0 (`miniature/vision_pretrain.py`): the tiny vision tower pretrained self-supervised on the train
images alone (DINO's and iBOT's self-distillation with an EMA teacher, plus masked-patch pixel reconstruction),
saved as a Hugging Face Dinov2Model (`miniature.vision.dir`), then stage 1 (`miniature/lm_pretrain.py`): a tiny
Llama pretrained as a language model that names a caption's content words after the prompt, saved as a Hugging Face
directory (`miniature.lm.dir`). Stage 2 is LexVLA as in the paper on those two towers: `model.vision_checkpoint` and
`model.text_checkpoint` are their directories, both towers are frozen, LoRA adapters sit on the text tower (trained
at a tenth of the learning rate, `optim.lr_scales`: at the full rate they move a caption's vector off its words:
caption word precision 0.60 after 300 steps, 0.88 at 0.1×; BENCHMARKS.md), the text codebook is its `lm_head` rows
of the kept vocabulary (frozen) and the visual codebook starts from the same rows (`build.recipe`), so an image's
strongest dimensions are words of its captions. Trainable: adapter, visual codebook, logit scale, LoRA.
Usage:

  lexvla train --config configs/tiny.py --workdir runs/tiny

`configs/tiny.py:scratch` is the same model without stages 0 and 1: random towers that train (for tests and
compiles that need no pretrained weights).
"""

import ml_collections

from lexvla_jax import configlib
from lexvla_jax.data.config import default_data_config
from lexvla_jax.miniature import synthetic
from lexvla_jax.sharding import DEFAULT_RULES


def get_config(arg=None):
    if arg not in (None, "scratch"):
        raise configlib.ConfigError(f"configs/tiny.py:{arg}: the only argument is :scratch")
    config = ml_collections.ConfigDict()

    # What `lexvla train` makes before training (lexvla_jax/miniature/, each part skipped when its output exists).
    config.miniature = ml_collections.ConfigDict()
    config.miniature.synthetic = dict(dir="data/synthetic", train=12000, eval=250, seed=0, image_size=64)

    config.data = default_data_config()
    config.data.train_shards = "data/synthetic/train"
    config.data.eval_shards = "data/synthetic/eval"
    config.data.tokenizer = "data/synthetic/tokenizer.model"
    config.data.image_size = 64
    # The synthetic images are drawn at the model's input size, shapes up to their edges: evaluation keeps them whole.
    config.data.eval_crop_pct = 1.0
    config.data.min_image_size = 8
    config.data.num_workers = 1
    config.data.shuffle_buffer = 500
    config.data.max_caption_tokens = 24
    # The paper's prompt without its one-shot example (stage 1 trains the tiny language model for this very prompt,
    # so it needs no example, and rows stay short). Its last token is followed directly by a word, not a quote
    # mark: stage 1 teaches the model to predict the caption's words right there.
    config.data.prompt_template = 'The focus of "[TEXT]" lies on important words:'

    config.model = dict(
        vision=dict(
            tower="dinov2",  # models/vision.py: "dinov2", "clip" or "siglip"
            preset="",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=8,
            image_size=64,
            mlp_ratio=2.0,
        ),
        text=dict(
            preset="",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        vision_checkpoint="",
        text_checkpoint="",
        vocab_size=0,  # only used without a tokenizer (shapes-only compiles)
        vocab_filter="lowercase_alpha",  # vocab.RULES
        adapter_heads=4,
        adapter_shape="mlp",  # or "block": models/lexvla.py:Adapter, configs/variants/adapter17m.py
        text_encoder="llm",  # or "bow": models/lexvla.py:LexVLAConfig, configs/variants/qbow.py
        adapter_mlp_dim=128,
        logit_scale_init=20.0,
        logit_scale_max=100.0,
        max_pool_chunk=256,
        compute_dtype="float32",
        frozen_param_dtype="float32",
        remat="none",
        lora=dict(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v"), init="peft"),
    )

    # Stage 0: the tiny vision tower pretrained self-supervised on the train images (vision_pretrain.py: DINO's and
    # iBOT's self-distillation with an EMA teacher), saved as a Hugging Face Dinov2Model; skipped when `dir` holds one.
    config.miniature.vision = dict(
        dir="data/synthetic/vision",
        steps=250,
        batch_size=64,
        learning_rate=2e-3,
        warmup_steps=50,
        weight_decay=0.04,
        local_crops=2,
        local_size=32,
        global_scale=(0.4, 1.0),
        local_scale=(0.1, 0.4),
        jitter=0.2,
        permute=0.8,  # probability that a view's colour channels are shuffled (vision_pretrain.py says why)
        gray=0.2,
        mask_ratio=(0.1, 0.5),
        prototypes=128,
        head_hidden=64,
        head_bottleneck=64,
        student_temp=0.1,
        teacher_temp=(0.04, 0.07),
        teacher_warmup=100,
        momentum=0.99,
        center_momentum=0.9,
        dino_weight=1.0,
        ibot_weight=1.0,
        pixel_weight=1.0,
        koleo_weight=0.1,
        seed=0,
        log_every=100,
        probe_images=400,  # the linear shape probe in its report (shape_probe.py); 0: none
    )

    # Stage 1: the tiny Llama pretrained as a language model that names a caption's content words after the
    # prompt (lm_pretrain.py), saved as a Hugging Face directory; skipped when `dir` holds one.
    config.miniature.lm = dict(
        dir="data/synthetic/lm",
        steps=500,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=50,
        weight_decay=0.01,
        max_word_tokens=20,
        z_loss=1e-2,  # pins log Σ exp(logits) near 0, so ELU1p(logit) ≈ probability (lm_pretrain.py says why)
        later_words_weight=0.1,  # loss weight of the words after the first (lm_pretrain.py says why)
        seed=0,
        log_every=100,
    )

    # top_k > 0: InfoNCE on each vector's top k entries (configs/variants/q512.py); 0: whole vectors.
    # λ_img below the paper's 1e-3: the overuse penalty pushes an image's mass onto rarely used words, here the
    # word pieces no caption has ("ri", "ground"); at 3e-4 image word precision is 0.869, at 1e-3 0.807
    # (BENCHMARKS.md).
    config.loss = dict(lambda_img=3e-4, lambda_txt=1e-3, penalty="overuse", warmup_steps=100, top_k=0)
    config.optim = dict(
        learning_rate=3e-3,
        warmup_steps=50,
        end_lr_fraction=0.05,
        grad_clip_norm=1.0,
        b1=0.9,
        b2=0.98,
        weight_decay=0.05,
        lr_scales={"lora": 0.1},  # per-group learning-rate factors (optim.scale_by_group)
        # Weight decay shrinks the codebook rows of words no caption has and pulls their image logits toward 0,
        # where ELU1p is 1: those word pieces then fill the images' top words (BENCHMARKS.md).
        no_decay=("visual_codebook",),
    )
    config.train = dict(
        num_steps=1350,  # image→text R@1 0.596, image word precision 0.869 (BENCHMARKS.md)
        global_batch_size=128,
        micro_batches=1,
        seed=0,
        # Both towers stay frozen (stage 0's vision tower, stage 1's language model), as in the paper.
        trainable=("adapter", "visual_codebook", "logit_scale", "lora"),
        log_every=25,
        profile_steps=(),  # (start, stop): a jax.profiler trace of those steps in WORKDIR/profile
        # No step for this long (seconds, or a multiple of the median step time, at least 30 s): every process
        # dumps its threads' stacks to the log and WORKDIR/hangs/, then exits 124 for the launcher to restart it.
        hang_timeout="20x",
        hang_timeout_slow=1800,  # seconds allowed for start-up and compilation, an evaluation or a checkpoint
        debug_hang=(),  # debug: (process, step): that process stops fetching the batch of that step
        final_eval=True,  # config.evals at the end of training (False: only on their every_steps; `lexvla eval` later)
        max_consecutive_skips=5,
        show_top_words=3,
        word_maps=4,  # PNGs of the first eval images' word maps in WORKDIR/word_maps
        record_sample_keys=False,  # debug: write the sample keys of every step under the workdir
    )
    config.checkpoint = dict(
        every_steps=450,
        keep=2,
        async_save=True,
        debug_kill_save=(),  # debug: (step, "before" | "during" | "after"): SIGKILL at that point of that save
    )
    config.eval = dict(batch_size=125)  # rows per batch when evaluators encode (any size works)
    # Evaluators (lexvla train runs each every `every_steps` and at the end; lexvla eval runs them all).
    # Their shards follow config.data.eval_shards.
    config.evals = ml_collections.ConfigDict()
    config.evals.retrieval = dict(
        type="retrieval",
        every_steps=450,
        label="synthetic",
        format="webdataset",
        shards=config.data.get_ref("eval_shards"),
        modes=("dense", "threshold", "topk"),
        top_k=16,  # the kept vocabulary of the synthetic tokenizer is a few hundred words
    )
    config.evals.patchdis = dict(
        type="patchdis",
        every_steps=0,
        label="synthetic shapes",
        format="webdataset",
        classes=synthetic.SHAPES,
        shards=config.data.get_ref("eval_shards"),
    )
    # Zero-shot classification: the eval images with one kind of shape (label: their mask's one class), the shape
    # names through a few templates (the vector of a class is their mean, evaluate/class_text.py).
    config.evals.zeroshot = dict(
        type="classification",
        every_steps=0,
        label="synthetic one-shape",
        format="webdataset",
        classes=synthetic.SHAPES,
        shards=config.data.get_ref("eval_shards"),
        templates=("a {c}", "a photo of a {c}", "a small {c}", "a large {c}"),
        top_k=16,
    )

    if arg == "scratch":
        config.train.trainable = ("vision", "text", "adapter", "visual_codebook", "logit_scale", "lora")
        config.optim.lr_scales = {}
        config.train.num_steps = 900  # as measured (BENCHMARKS.md); the text tower trains, so it needs fewer
        config.checkpoint.every_steps = config.evals.retrieval.every_steps = 300
    else:
        # Follow miniature.*.dir; overriding a checkpoint itself leaves the stage's dir alone (`identity`).
        config.model.text_checkpoint = config.miniature.lm.get_ref("dir").identity()
        config.model.vision_checkpoint = config.miniature.vision.get_ref("dir").identity()

    config.mesh = dict(shape=(-1, 1, 1), dcn_shape=(1, 1, 1))
    config.sharding = dict(rules=tuple(DEFAULT_RULES))
    config.dist = dict(mode="none", coordinator_address="", num_processes=0, process_id=-1)
    return config
