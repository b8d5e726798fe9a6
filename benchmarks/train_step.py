"""Train-step speed: our jitted step against the same step in eager PyTorch, and against the matmul peak.

Both steps are built from the same Hugging Face checkpoints (random weights written to a temporary
directory): ours through `build.build_model` and `program.make_program` (exactly what `lexvla train` runs),
PyTorch's from `Dinov2Model` + `LlamaForCausalLM` with LoRA (`benchmarks/torch_step.py`), with our adapter,
LoRA and visual codebook copied in, so the first losses agree. One process times them interleaved
(ours, PyTorch, matmul peak, ours, ...) and reports medians: the load of a shared machine then hits both
alike. FLOPs are the matmuls of our step's jaxpr (`throughput.matmul_flops`); the peak is the faster of XLA's and
PyTorch's float32 `n × n` matmul timed in the same repetitions.

Reference shapes (a CPU-sized stand-in for the paper config): DINOv2 ViT-S/14 at 224 px, frozen; Llama with
8 layers, width 512, 8 heads, FFN 1376, vocabulary 32,000, frozen with LoRA r=8 on all seven linears;
V' = 17,149; adapter with 6 heads and MLP 1536; batch 32; text length 64; float32; one device.
`--tiny` runs the main job's stage-2 model instead (`configs/tiny.py`: both towers frozen, LoRA on the text tower,
here with random towers: no stage 0 or 1; its tokenizer gives V' and the prompt length).
`--tower clip|siglip` swaps the image tower for a CLIP / SigLIP one of the same widths (Q(CLIP); ours only:
`torch_step.py` is DINOv2's, so with `--no-torch`).

    JAX_PLATFORMS=cpu python benchmarks/train_step.py [--reps 7] [--batch 32] [--breakdown] [--no-torch]
    JAX_PLATFORMS=cpu python benchmarks/train_step.py --tiny --breakdown
    JAX_PLATFORMS=cpu python benchmarks/train_step.py --tiny --tower clip --no-torch --breakdown
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def reference_config(args):
    """`configs/tiny.py` with the reference shapes; towers come from the checkpoints written later."""
    from lexvla_jax import configlib

    config = configlib.load_config_file(str(REPO / "configs" / "tiny.py") + ":scratch")
    m = config.model
    m.vision.update(
        preset="",
        hidden_size=args.vision_width,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        patch_size=14,
        image_size=args.image_size,
        mlp_ratio=4.0,
    )
    m.text.update(
        preset="",
        vocab_size=args.text_vocab,
        hidden_size=args.text_width,
        intermediate_size=args.text_ffn,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_heads,
        max_position_embeddings=max(256, args.text_length),
    )
    m.update(adapter_heads=args.adapter_heads, adapter_mlp_dim=args.adapter_mlp, max_pool_chunk=args.chunk)
    m.lora.update(rank=args.lora_rank, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    config.data.image_size = args.image_size
    config.train.update(global_batch_size=args.batch, trainable=("adapter", "visual_codebook", "logit_scale", "lora"))
    return config, args.vocab, args.text_length


def tiny_config(args):
    """The main job's config; V' and the prompt length from its tokenizer (made as `lexvla train` would)."""
    from lexvla_jax import build, configlib
    from lexvla_jax.miniature import prepare
    from lexvla_jax.text.prompt import prompt_encoder

    os.chdir(REPO)
    config = configlib.load_config(
        str(REPO / "configs" / "tiny.py"), ["model.text_checkpoint=", "model.vision_checkpoint="]
    )
    prepare.prepare(config)
    tokenizer, kept_ids = build.load_vocabulary(config)
    return config, len(kept_ids), prompt_encoder(config.data, tokenizer).max_length


def hf_vision_tower(v):
    """A random Hugging Face vision tower with the architecture of our tower config `v` (DINOv2, CLIP or SigLIP)."""
    import transformers

    from lexvla_jax.models import dinov2

    if isinstance(v, dinov2.Dinov2Config):
        return transformers.Dinov2Model(
            transformers.Dinov2Config(
                hidden_size=v.hidden_size,
                num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads,
                mlp_ratio=int(v.mlp_ratio),  # HF takes an int; ours are whole numbers
                patch_size=v.patch_size,
                image_size=v.image_size,
                layer_norm_eps=v.layer_norm_eps,
                attn_implementation="sdpa",
            )
        )
    family = "Siglip" if v.family == "siglip" else "CLIP"
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    hf = getattr(transformers, f"{family}VisionConfig")(
        **{f: getattr(v, f) for f in fields},
        image_size=v.image_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        attn_implementation="sdpa",
    )
    return getattr(transformers, f"{family}VisionModel")(hf)


def write_hf_towers(config, directory: str):
    """Random HF vision (the config's tower) and Llama checkpoints with the config's architecture; `(vision,
    text_lm)` torch models."""
    import torch
    import transformers

    from lexvla_jax import build

    torch.manual_seed(0)
    v, t = build.vision_config(config), build.text_config(config)
    vision = hf_vision_tower(v)
    text = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
            attn_implementation="sdpa",
        )
    )
    vision.save_pretrained(os.path.join(directory, "vision"))
    text.save_pretrained(os.path.join(directory, "llama"))
    config.model.vision_checkpoint = os.path.join(directory, "vision")
    config.model.text_checkpoint = os.path.join(directory, "llama")
    return vision.eval(), text.eval()


def random_batch(config, text_vocab: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images and right-padded prompts of 60–100% of `length` real tokens."""
    rng = np.random.default_rng(seed)
    b, size = config.train.global_batch_size, config.data.image_size
    lengths = rng.integers(int(0.6 * length), length + 1, size=(b, 1))
    return {
        "image": rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
        "input_ids": rng.integers(3, text_vocab, size=(b, length)).astype(np.int32),
        "attention_mask": (np.arange(length)[None] < lengths).astype(np.int32),
    }


class Ours:
    """Our compiled train step on one device, its inputs, and its matmul FLOPs."""

    def __init__(self, config, num_words: int, host_batch):
        from flax import nnx

        from lexvla_jax import build, sharding, throughput
        from lexvla_jax import step as step_lib
        from lexvla_jax.data.device_batch import make_global_batch
        from lexvla_jax.program import make_program

        mesh, rules = sharding.mesh_and_rules(config, jax.devices()[:1])
        with sharding.use_mesh_rules(mesh, rules):
            model = build.build_model(config, mesh, np.arange(num_words))
            self.program, params, self.frozen, self.rest = make_program(config, mesh, model)
        self.values = nnx.to_pure_dict(nnx.state(model))
        self.model_config = model.config
        self.program_loss = step_lib.LossConfig(**config.loss.to_dict())
        self.params = params
        self.state = self.program.init_state(jax.tree.map(jnp.copy, params))
        self.batch = make_global_batch(host_batch, mesh, rules)
        traced = self.program.step.trace(self.frozen, self.rest, self.state, self.batch)
        self.flops = throughput.matmul_flops(traced.jaxpr, mesh.devices.flat[0].platform)
        self.mesh, self.rules, self.host_batch = mesh, rules, host_batch
        start = time.perf_counter()
        self.first_loss = self.step()
        self.compile_s = time.perf_counter() - start

    def step(self) -> float:
        self.state, metrics = self.program.step(self.frozen, self.rest, self.state, self.batch)
        return float(metrics["loss"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peaks(n: int = 2048, tries: int = 3) -> tuple[float, float]:
    """Best-of-`tries` float32 `n×n @ n×n` GFLOP/s with XLA and with PyTorch."""
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    ta = torch.randn(n, n)
    flops = 2.0 * n**3
    xla = min(timed(lambda: mm(a, a).block_until_ready()) for _ in range(tries))
    pt = min(timed(lambda: torch.mm(ta, ta)) for _ in range(tries))
    return flops / xla / 1e9, flops / pt / 1e9


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The reference shapes (defaults) as options."""
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-length", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--vision-width", type=int, default=384)
    parser.add_argument("--vision-layers", type=int, default=12)
    parser.add_argument("--vision-heads", type=int, default=6)
    parser.add_argument("--text-width", type=int, default=512)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--text-heads", type=int, default=8)
    parser.add_argument("--text-ffn", type=int, default=1376)
    parser.add_argument("--text-vocab", type=int, default=32000)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=17149, help="V', the kept vocabulary (codebook rows)")
    parser.add_argument("--adapter-heads", type=int, default=6)
    parser.add_argument("--adapter-mlp", type=int, default=1536)
    parser.add_argument("--chunk", type=int, default=1024, help="config.model.max_pool_chunk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.py (the main job) instead of the reference")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions timed")
    parser.add_argument("--no-torch", action="store_true", help="time our step only")
    parser.add_argument("--breakdown", action="store_true", help="also time the jitted pieces of our step")
    parser.add_argument(
        "--tower", choices=("dinov2", "clip", "siglip"), default="dinov2", help="image tower (models/vision.py)"
    )
    add_shape_args(parser)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides")
    args = parser.parse_args()
    if args.tower != "dinov2" and not args.no_torch:
        parser.error(f"PyTorch's step (torch_step.py) runs DINOv2 only; add --no-torch to time --tower {args.tower}")

    import torch

    from lexvla_jax import configlib
    from lexvla_jax.configlib import apply_overrides

    torch.set_num_threads(os.cpu_count())
    config, num_words, length = tiny_config(args) if args.tiny else reference_config(args)
    if args.tower != "dinov2":  # the same widths, FFN width spelled as CLIP and SigLIP spell it
        configlib.swap_vision_tower(config, args.tower, "")
    config.loss.warmup_steps = 0  # full penalty weights from the first step, in both implementations
    config.mesh.shape = (1, 1, 1)
    apply_overrides(config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        vision, text = write_hf_towers(config, tmp)
        host_batch = random_batch(config, build_text_vocab(config), length)
        ours = Ours(config, num_words, host_batch)
    print(
        f"{'tiny' if args.tiny else 'reference'} shapes ({args.tower} tower): batch {config.train.global_batch_size}, "
        f"image {config.data.image_size}px, text length {length}, V'={num_words}, "
        f"trainable {tuple(config.train.trainable)}; jax {jax.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load {load()}"
    )
    print(f"ours: compiled + first step {ours.compile_s:.1f} s, matmul FLOPs/step {ours.flops:.4g}")
    theirs = None
    if not args.no_torch:
        from torch_step import TorchLexVLA, torch_batch

        theirs = TorchLexVLA(vision, text, ours.values, ours.model_config, tuple(config.train.trainable))
        theirs.make_optimizer(config.optim)
        tbatch = torch_batch(host_batch)
        lam = (config.loss.lambda_img, config.loss.lambda_txt)
        first = theirs.step(tbatch, *lam)
        print(f"first loss: ours {ours.first_loss:.6f}, PyTorch {first:.6f}")
    rows = []
    for rep in range(args.reps):
        row = {"ours": timed(ours.step)}
        if theirs is not None:
            row["torch"] = timed(lambda: theirs.step(tbatch, *lam))
        row["peak_xla"], row["peak_torch"] = matmul_peaks()
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        print(
            f"rep {rep}: ours {row['ours']:.3f} s"
            + (f", PyTorch {row['torch']:.3f} s (×{row['torch'] / row['ours']:.2f})" if theirs else "")
            + f", peak XLA {row['peak_xla']:.0f} / PyTorch {row['peak_torch']:.0f} GFLOP/s, load {row['load']:.1f}",
            flush=True,
        )
    report(rows, ours.flops)
    if args.breakdown:
        import step_breakdown

        step_breakdown.report(ours, reps=max(3, args.reps // 2))


def build_text_vocab(config) -> int:
    from lexvla_jax import build

    return build.text_config(config).vocab_size


def report(rows: list[dict], flops: float) -> None:
    med = lambda key: statistics.median(r[key] for r in rows)
    peak = [max(r["peak_xla"], r["peak_torch"]) for r in rows]
    fraction = statistics.median(flops / r["ours"] / 1e9 / p for r, p in zip(rows, peak, strict=True))
    print(f"\nmedians over {len(rows)} interleaved repetitions (load {load()}):")
    print(f"  ours      {med('ours'):.3f} s/step, {flops / med('ours') / 1e9:.1f} GFLOP/s")
    if "torch" in rows[0]:
        ratio = statistics.median(r["torch"] / r["ours"] for r in rows)
        print(f"  PyTorch   {med('torch'):.3f} s/step; PyTorch / ours = {ratio:.2f}× (median of per-rep ratios)")
    print(f"  peak      XLA {med('peak_xla'):.0f}, PyTorch {med('peak_torch'):.0f} GFLOP/s (float32 2048³ matmul)")
    print(f"  ours reach {fraction:.1%} of the peak (median of per-rep fractions)")


if __name__ == "__main__":
    main()
