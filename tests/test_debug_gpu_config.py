"""`configs/debug_gpu.py`: the paper's towers on one GPU, and the parameter counts its memory estimate uses."""

import math
import pathlib

import jax
import pytest
from flax import nnx

from lexvla_jax import build, configlib, optim

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "debug_gpu.py")


@pytest.mark.parametrize(("size", "batch", "micro"), [("24gb", 256, 16), ("80gb", 1024, 256)])
def test_sizes(size, batch, micro):
    config = configlib.load_config_file(f"{CONFIG}:{size}")
    assert config.train.global_batch_size == batch
    assert config.train.global_batch_size // config.train.micro_batches == micro
    assert (config.model.vision.preset, config.model.text.preset) == ("dinov2_vitl14", "llama2-7b")
    assert config.model.frozen_param_dtype == config.model.compute_dtype == "bfloat16"


def test_default_and_unknown_size():
    assert configlib.load_config_file(CONFIG).train.global_batch_size == 256
    with pytest.raises(configlib.ConfigError, match="debug_gpu.py:40gb: choose one of"):
        configlib.load_config_file(f"{CONFIG}:40gb")


def test_parameter_counts_of_the_memory_estimate():
    config = configlib.load_config_file(CONFIG)
    model = build.abstract_model(config, 16754)
    _, trainable, frozen = nnx.split(model, optim.trainable_filter(config.train.trainable), nnx.Param)
    count = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))
    assert count(trainable) == pytest.approx(113.8e6, abs=0.05e6)
    lora = count(nnx.state(model.text, nnx.LoRAParam))
    assert lora == pytest.approx(20.0e6, abs=0.05e6)
    assert count(nnx.state(model.text)) - lora == pytest.approx(6.61e9, abs=0.005e9)
    assert count(nnx.state(model.vision)) == pytest.approx(0.30e9, abs=0.01e9)
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
    assert frozen_bytes == pytest.approx(14.1e9, rel=0.01)
