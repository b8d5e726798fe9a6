"""Tiny random Hugging Face checkpoints (DINOv2 and Llama, written with `save_pretrained`) for loading tests,
and the tiny LexVLA config that loads them."""

import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Kept vocabulary of the LexVLA built on them: codebook rows of the 128-piece lm_head.
KEPT = np.array([3, 5, 8, 13, 21, 34, 55, 89, 100, 120], np.int32)


def write_tiny_hf(root) -> tuple:
    """`(dinov2 dir, llama dir, dinov2 model, llama model)` under `root`: 32-wide, 1 layer, 8-px patches of 32-px
    images, a 128-piece vocabulary, and an lm_head of unit-variance rows (HF initialises it near zero).

    torch and transformers are imported here, so test modules can skip without them.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    vision = transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            patch_size=8,
            image_size=32,
        )
    ).eval()
    text = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
        )
    ).eval()
    with torch.no_grad():
        text.lm_head.weight.normal_()
    vision.save_pretrained(root / "dinov2")
    text.save_pretrained(root / "llama")
    return str(root / "dinov2"), str(root / "llama"), vision, text


def lexvla_config(vision_dir: str = "", text_dir: str = "", overrides=()):
    """configs/tiny.py on these checkpoints ("": a random tower), sized for them."""
    from lexvla_jax import configlib

    return configlib.load_config(
        os.path.join(REPO, "configs", "tiny.py"),
        [
            f"model.vision_checkpoint={vision_dir}",
            f"model.text_checkpoint={text_dir}",
            "data.tokenizer=",
            "model.adapter_mlp_dim=16",
            "model.lora.targets=('q','v','down')",
            *overrides,
        ],
    )
