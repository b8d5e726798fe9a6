"""The LexVLA train step as a PyTorch user would write it: eager, from Hugging Face modules.

DINOv2 (`Dinov2Model`) and Llama (`LlamaForCausalLM`'s body) with LoRA on the configured linears, the
adapter (pre-norm attention block + two-layer MLP), both codebooks, the max-pooled image mapper written
directly (a `[B,P,V]` score tensor), InfoNCE + overuse penalties, and AdamW with global-norm clipping and
weight decay on matrices only. The trainable set is the one our config names. Our adapter, LoRA and
visual-codebook values are copied in, so both steps start from the same parameters and compute the same loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LORA_LINEARS = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


class LoRALinear(nn.Module):
    """`base(x) + (x A)(B · scale)`, as `layers.Linear` (A `[in, r]`, B `[r, out]`)."""

    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(tensor(a))
        self.lora_b = nn.Parameter(tensor(b))
        self.scale = scale

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a) @ (self.lora_b * self.scale)


def linear_from(kernel, bias) -> nn.Linear:
    """An `nn.Linear` holding our `[in, out]` kernel (and bias)."""
    layer = nn.Linear(*np.shape(kernel), bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(tensor(kernel).T)
        if bias is not None:
            layer.bias.copy_(tensor(bias))
    return layer


def layer_norm_from(norm, eps: float) -> nn.LayerNorm:
    layer = nn.LayerNorm(np.shape(norm["scale"])[0], eps=eps)
    with torch.no_grad():
        layer.weight.copy_(tensor(norm["scale"]))
        layer.bias.copy_(tensor(norm["bias"]))
    return layer


class Adapter(nn.Module):
    """Our `lexvla.Adapter`: `x + attn(norm1 x)`, then `fc2(gelu(fc1(norm2 x)))`, from its parameter values."""

    def __init__(self, p: dict, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = layer_norm_from(p["norm1"], eps)
        self.norm2 = layer_norm_from(p["norm2"], eps)
        att = p["attention"]
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        self.q, self.k, self.v, self.o = (linear_from(att[n]["kernel"], att[n]["bias"]) for n in names)
        self.fc1 = linear_from(p["fc1"]["kernel"], p["fc1"]["bias"])
        self.fc2 = linear_from(p["fc2"]["kernel"], p["fc2"]["bias"])

    def forward(self, x):
        b, t, d = x.shape
        y = self.norm1(x)
        heads = lambda z: z.reshape(b, t, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(self.q(y)), heads(self.k(y)), heads(self.v(y)))
        x = x + self.o(out.transpose(1, 2).reshape(b, t, d))
        return self.fc2(F.gelu(self.fc1(self.norm2(x))))


def elu1p(x):
    return F.elu(x) + 1


def overuse(s):
    mean = s.mean(0)
    return s.shape[1] * (mean**3).sum() / mean.sum()


class TorchLexVLA:
    """Models, trainable parameters and optimiser; `step(batch)` runs one training step and returns the loss."""

    def __init__(self, vision, text_lm, ours: dict, config, trainable: tuple[str, ...]):
        """vision: `Dinov2Model`; text_lm: `LlamaForCausalLM`; ours: our model's parameter values (nested dict
        of numpy arrays); config: our `LexVLAConfig`; trainable: `config.train.trainable`."""
        self.config = config
        self.vision, self.text = vision, text_lm.model
        for p in [*self.vision.parameters(), *self.text.parameters()]:
            p.requires_grad_(False)
        if "vision" in trainable:
            self.vision.requires_grad_(True)
        if "text" in trainable:
            self.text.requires_grad_(True)
        tc = config.text
        if tc.lora_rank:
            stacked = ours["text"]["layers"]
            for i, layer in enumerate(self.text.layers):
                for target in tc.lora_targets:
                    parent_name, name = LORA_LINEARS[target]
                    parent = getattr(layer, parent_name)
                    ours_linear = stacked[parent_name if parent_name == "mlp" else "self_attn"][name]
                    a, b = ours_linear["lora_a"][i], ours_linear["lora_b"][i]
                    setattr(parent, name, LoRALinear(getattr(parent, name), a, b, tc.lora_alpha / tc.lora_rank))
        self.adapter = Adapter(ours["adapter"], config.adapter_heads, config.vision.layer_norm_eps)
        self.adapter.requires_grad_("adapter" in trainable)
        codebook = tensor(ours["visual_codebook"])
        self.visual_codebook = nn.Parameter(codebook, requires_grad="visual_codebook" in trainable)
        self.text_codebook = tensor(ours["text_codebook"])
        self.logit_scale = nn.Parameter(tensor(ours["logit_scale"]), requires_grad="logit_scale" in trainable)
        params = [*self.vision.parameters(), *self.text.parameters(), *self.adapter.parameters()]
        params = [p for p in [*params, self.visual_codebook, self.logit_scale] if p.requires_grad]
        self.params = params
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        self.vision_trains = "vision" in trainable

    def make_optimizer(self, optim) -> None:
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [dict(params=decay, weight_decay=optim.weight_decay), dict(params=no_decay, weight_decay=0.0)]
        self.clip = optim.grad_clip_norm
        self.optimizer = torch.optim.AdamW(
            groups, lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=1e-8, foreach=True
        )

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        with torch.set_grad_enabled(self.vision_trains):
            tokens = self.vision(pixel_values=pixels).last_hidden_state
        return tokens[:, 1 + getattr(self.vision.config, "num_register_tokens", 0) :]

    def loss(self, batch, lambda_img: float, lambda_txt: float) -> torch.Tensor:
        h = self.adapter(self.image_tokens(batch["image"]))
        scores = torch.einsum("bpd,vd->bpv", h, self.visual_codebook)
        s_img = F.normalize(elu1p(scores).amax(dim=1), dim=-1)
        mask = batch["attention_mask"]
        hidden = self.text(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        positions = torch.arange(mask.shape[1])
        last = torch.where(mask.bool(), positions, -1).amax(dim=1)
        s_txt = F.normalize(elu1p(hidden[torch.arange(hidden.shape[0]), last] @ self.text_codebook.T), dim=-1)
        scale = torch.clamp(self.logit_scale.exp(), max=self.config.logit_scale_max)
        logits = scale * s_img @ s_txt.T
        labels = torch.arange(logits.shape[0])
        nce = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        return nce + lambda_img * overuse(s_img) + lambda_txt * overuse(s_txt)

    def step(self, batch, lambda_img: float, lambda_txt: float) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch, lambda_img, lambda_txt)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if math.isfinite(float(norm)):
            self.optimizer.step()
        return float(loss)


def torch_batch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
