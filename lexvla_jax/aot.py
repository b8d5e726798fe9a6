"""`lexvla compile`: compile the real train step for a TPU topology on this machine, without a TPU.

`--local` compiles it for this machine's own devices instead (a GPU, or the CPU) with the same report; the
memory limit is then what the runtime reports (GPU) or the host's RAM (CPU).

libtpu (the `test` extra) compiles for a named topology (`v5p:2x2x1`, `v4:2x2x1`, `v5e:4x4`, `v6e:2x2`,
...) through `jax.experimental.topologies`. Everything is shapes: no weights, no data. The report gives
per-device argument / temporary / output bytes from XLA's memory analysis, the device's HBM, the fraction
used and the step's FLOPs per device; the last line is `fits` or `does not fit` (also when the compiler
itself refuses the program for lack of HBM).

FLOPs per device are counted from the step's jaxpr (`throughput.matmul_flops`: matmuls and convolutions,
scan bodies times their length, divided by the devices). XLA's `cost_analysis()['flops']` is per device
too, but counts a while loop's body once, so for scanned layers it is far lower; it is printed alongside.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time

from lexvla_jax import libtpu_env  # noqa: E402  (before JAX: keeps libtpu quiet on TPU-less hosts)

libtpu_env.quiet_libtpu_without_tpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lexvla_jax import build, configlib, sharding  # noqa: E402
from lexvla_jax.program import make_program, with_shardings  # noqa: E402
from lexvla_jax.throughput import matmul_flops  # noqa: E402

GIB = 1024**3
# HBM the compiler may use per device, by `device_kind`: the "available HBM" libtpu 0.0.42 states when a
# program's temporaries alone exceed it ("95.74G", read as GiB). A `v4:` topology device is one TensorCore,
# half a chip, and gets half of the chip's HBM.
HBM_BYTES = {
    "TPU v4": int(15.25 * GIB),
    "TPU v5": int(95.74 * GIB),  # v5p
    "TPU v5p": int(95.74 * GIB),
    "TPU v5 lite": int(15.75 * GIB),  # v5e
    "TPU v5e": int(15.75 * GIB),
    "TPU v6 lite": int(31.25 * GIB),  # v6e (Trillium)
    "TPU v6e": int(31.25 * GIB),
}
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}


@dataclasses.dataclass
class CompileReport:
    topology: str
    device_kind: str
    num_devices: int
    global_batch: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    hbm_bytes: int
    flops: float
    matmul_flops: float = float("nan")
    compile_seconds: float = 0.0
    oom: str = ""  # the compiler's out-of-memory error, when it refused the program

    @property
    def used_bytes(self) -> int:
        """Peak per device: live arguments + temporaries + outputs not aliased to (donated) arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return not self.oom and self.used_bytes <= self.hbm_bytes

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / GIB:.2f} GiB"
        if self.oom:
            return [
                f"topology      {self.topology} ({self.num_devices} × {self.device_kind})",
                f"global batch  {self.global_batch}",
                f"arguments     {gib(self.argument_bytes)} per device",
                f"compiler      {self.oom}",
                "does not fit",
            ]
        return [
            f"topology      {self.topology} ({self.num_devices} × {self.device_kind})",
            f"global batch  {self.global_batch}",
            f"arguments     {gib(self.argument_bytes)} per device",
            f"temporaries   {gib(self.temp_bytes)} per device",
            f"outputs       {gib(self.output_bytes)} per device ({gib(self.alias_bytes)} aliased to donated inputs)",
            f"HBM           {gib(self.hbm_bytes)} per device; {self.used_bytes / self.hbm_bytes:.1%} used",
            f"FLOPs/step    {self.matmul_flops:.3e} per device (matmuls in the step's jaxpr / devices)",
            f"XLA FLOPs     {self.flops:.3e} per device (cost analysis: loop bodies, e.g. scanned layers, once)",
            f"compile       {self.compile_seconds:.0f} s",
            "fits" if self.fits else "does not fit",
        ]


def topology_devices(name: str):
    """The devices of a named TPU topology (compile-only)."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # libtpu's errors are long; keep the first line
        raise SystemExit(
            f"lexvla compile: topology {name!r} unavailable ({configlib.first_line(e)}); try e.g. v5p:2x2x1"
        ) from None


def _vocab_and_length(config) -> tuple[int, int]:
    """V' and the text row length (prompt, or bag of words: `build.caption_encoder`), from the tokenizer when
    there is one, else from config fields."""
    data = config.data
    if data.tokenizer and os.path.exists(data.tokenizer):
        tokenizer, kept_ids = build.load_vocabulary(config)
        return len(kept_ids), build.caption_encoder(config, tokenizer, kept_ids).max_length
    if data.tokenizer:
        print(
            f"lexvla compile: tokenizer {data.tokenizer} not found; shapes from config.model.vocab_size "
            "and config.data.max_length (set config.data.tokenizer to use the tokenizer's)",
            file=sys.stderr,
        )
    bow = build.text_encoder(config) == "bow"
    if not config.model.vocab_size or not (data.max_length or bow):
        raise SystemExit(
            "lexvla compile: without a tokenizer file, set config.model.vocab_size and config.data.max_length"
        )
    return config.model.vocab_size, data.max_caption_tokens if bow else data.max_length


def compile_train_step(config, devices, topology: str = "") -> CompileReport:
    """Lowers and compiles the train step of `config` for `devices`; nothing is allocated."""
    mesh, rules = sharding.mesh_and_rules(config, devices)
    tc = config.train
    sharding.check_batch_size(tc.global_batch_size, mesh, rules, tc.micro_batches)
    num_words, length = _vocab_and_length(config)
    with sharding.use_mesh_rules(mesh, rules):
        model = build.abstract_model(config, num_words)
        program, _, frozen, rest = make_program(config, mesh, model)
        b, size = config.train.global_batch_size, config.data.image_size
        batch = {
            "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=program.batch_sharding),
            "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=program.batch_sharding),
            "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=program.batch_sharding),
        }
        args = (
            with_shardings(frozen, program.frozen_shardings),
            with_shardings(rest, program.rest_shardings),
            program.abstract_state,
            batch,
        )
        start = time.perf_counter()
        traced = program.step.trace(*args)
        kind = devices[0].device_kind
        report = functools.partial(
            CompileReport,
            topology=topology,
            device_kind=kind,
            num_devices=len(devices),
            global_batch=b,
            hbm_bytes=device_memory_bytes(devices[0]),
            matmul_flops=matmul_flops(traced.jaxpr, devices[0].platform) / len(devices),
        )
        try:
            compiled = traced.lower().compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            oom = str(e).strip().splitlines()[0]
            return report(
                argument_bytes=sum(_shard_bytes(x) for x in jax.tree.leaves(args)),
                temp_bytes=_bytes_in(oom, r"HLO temporaries \(([\d.]+)([KMGT]?)\)"),
                output_bytes=0,
                alias_bytes=0,
                flops=float("nan"),
                compile_seconds=time.perf_counter() - start,
                oom=oom,
            )
        seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return report(
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        flops=float(cost.get("flops", float("nan"))) if cost else float("nan"),
        compile_seconds=seconds,
    )


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def _bytes_in(message: str, pattern: str) -> int:
    """A size such as `2.45T` (binary units, as libtpu prints them) matched in `message`; 0 if absent."""
    match = re.search(pattern, message)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0


def device_memory_bytes(device) -> int:
    """Memory one device may use: the TPU table, else what the runtime reports, else (CPU) the host's RAM."""
    if device.device_kind in HBM_BYTES:
        return HBM_BYTES[device.device_kind]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # compile-only topology devices have no runtime
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise SystemExit(f"lexvla compile: memory of {device.device_kind!r} unknown; add it to lexvla_jax.aot.HBM_BYTES")
